"""The FastAPI application: routes, middleware (API key, CORS, body limits), error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from jaxserve import __version__
from jaxserve.config import ServeConfig
from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
from jaxserve.engine.async_engine import AsyncEngine, EngineState
from jaxserve.engine.embedding_engine import EmbedInfo
from jaxserve.engine.interface import EngineDeadError, EngineInfo
from jaxserve.server.auth import APIKeyMiddleware
from jaxserve.server.caps import RequestCaps, check_caps
from jaxserve.server.chat import create_chat_completion
from jaxserve.server.completions import create_completion
from jaxserve.server.embeddings import create_embedding, create_pooling
from jaxserve.server.errors import OpenAIError, error_body, install_error_handlers
from jaxserve.server.json_body import StrictJSONRoute
from jaxserve.server.limits import RequestLimitsMiddleware
from jaxserve.server.lora import add_lora_routes
from jaxserve.server.metrics import metrics_text
from jaxserve.server.offload import off_loop
from jaxserve.server.request_id import RequestIdMiddleware
from jaxserve.server.score import create_score
from jaxserve.server.shutdown import Drain, DrainMiddleware
from jaxserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    PoolingRequest,
    ScoreRequest,
    TokenizeRequest,
)
from jaxserve.server.tokenize import detokenize, tokenize
from jaxserve.server.tool_calls import ChatOptions


Engine = AsyncEngine | AsyncEmbeddingEngine  # what build_app serves (``task``: generate or embed)
TASK_ENDPOINTS = {"generate": "/v1/chat/completions and /v1/completions", "embed": "/v1/embeddings, /pooling, /score"}


@dataclasses.dataclass(frozen=True)
class ServedModel:
    config: ServeConfig
    engine: Engine

    @functools.cached_property
    def chat(self) -> ChatOptions:
        """Chat template override, tool-call and reasoning parsers (read once)."""
        return ChatOptions.from_config(self.config)

    @property
    def caps(self) -> RequestCaps:
        return RequestCaps.from_config(self.config)


class Router:
    """The served models by every accepted name; ``model`` left out means the first model of the task."""

    def __init__(self, models: list[ServedModel]) -> None:
        self.models = models
        self.by_name = {n: m for m in models for n in m.config.accepted_model_names}

    def resolve(self, name: str | None, task: str) -> tuple[ServedModel, str]:
        """The model a request names (404 listing the served names) and its reported name; a 400 naming
        its task when it does not serve ``task``."""
        if name is None:
            m = next((m for m in self.models if m.engine.task == task), self.models[0])
        elif name in self.by_name:
            m = self.by_name[name]
        else:
            names = [*self.by_name, *(r.name for m in self.models for r in _loras(m))]
            raise OpenAIError(404, f"The model `{name}` does not exist; served models: {', '.join(names)}.",
                              param="model", type="NotFoundError")
        if m.engine.task != task:
            raise OpenAIError(
                400, f"The model `{m.config.model_name}` serves task '{m.engine.task}' "
                f"({TASK_ENDPOINTS[m.engine.task]}); it does not support this endpoint (task '{task}').", param="model")
        return m, m.config.model_name

    def resolve_generate(self, name: str | None) -> tuple[ServedModel, str, str | None]:
        """Like ``resolve`` for generation, where ``name`` may also be a LoRA adapter of a served
        model: (model, reported name, adapter name or None)."""
        if name is not None and name not in self.by_name:
            m = next((m for m in self.models if any(r.name == name for r in _loras(m))), None)
            if m is not None:
                return m, name, name
        return (*self.resolve(name, "generate"), None)

    def lora_base(self, name: str | None) -> AsyncEngine:
        """The engine runtime LoRA updates go to: the model ``name``, else the first that allows them."""
        allowed = [m for m in self.models if m.config.runtime_lora_updates and m.engine.task == "generate"]
        m = self.resolve(name, "generate")[0] if name is not None else (allowed or [None])[0]
        if m is None or m not in allowed:
            raise OpenAIError(400, "runtime LoRA updates are not enabled for this model (--enable-lora-runtime-updates)",
                              param="model")
        _ready_info(m.engine)
        return m.engine

    def name_taken(self, name: str) -> bool:
        return name in self.by_name or any(r.name == name for m in self.models for r in _loras(m))


def _loras(m: ServedModel) -> list:
    """The LoRA adapters a served model serves now (none for embedding models)."""
    return m.engine.loras if isinstance(m.engine, AsyncEngine) else []


def build_app(
    config: ServeConfig | list[ServeConfig], engine: Engine | list[Engine],
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app for one model or several (``config[i]`` served by ``engine[i]``; server settings are the
    first config's); ``on_shutdown`` runs when the server stops (uvicorn re-raises SIGTERM afterwards,
    so clean-up must happen here, not after ``uvicorn.run`` returns)."""
    configs = config if isinstance(config, list) else [config]
    engines = engine if isinstance(engine, list) else [engine]
    router = Router([ServedModel(c, e) for c, e in zip(configs, engines, strict=True)])

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    app = FastAPI(title="jaxserve", version=__version__, lifespan=lifespan)
    app.router.route_class = StrictJSONRoute  # every body parsed by server/json_body.py
    install_error_handlers(app)
    _add_status_routes(app, router)
    _add_generation_routes(app, router)
    _add_embedding_routes(app, router)
    if any(c.runtime_lora_updates for c in configs):
        add_lora_routes(app, router.lora_base, router.name_taken)
    app.state.drain = Drain(engines)  # serve.py starts it on SIGTERM / Ctrl-C
    _add_middleware(app, configs[0])
    return app


LOADING_RETRY_AFTER_S = 5


def _ready_info(engine: Engine) -> EngineInfo | EmbedInfo:
    """The engine's info, or a 503: while the model loads at once with ``Retry-After`` (clients such
    as the ``openai`` SDK retry after it; nothing waits on a start-up that may fail), after a
    failure with its cause."""
    if engine.state is EngineState.LOADING:
        raise OpenAIError(503, "the model is loading; retry shortly",
                          headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})
    try:
        return engine.info
    except EngineDeadError as e:
        raise OpenAIError(503, str(e)) from None


def _add_status_routes(app: FastAPI, router: Router) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 only when every model serves; else 503 with the first one that does not."""
        waiting = next((m for m in router.models if not m.engine.is_ready), None)
        if waiting is None:
            return Response(status_code=200)
        e = waiting.engine
        message = e.error or f"the engine is {e.state.value}"
        if len(router.models) > 1:
            message = f"{waiting.config.model_name}: {message}"
        return JSONResponse(error_body(503, message), status_code=503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        """``GET /v1/models``: every accepted model name and loaded LoRA adapter, with its max length and task."""
        cards = []
        for m in router.models:
            max_len = m.engine.info.max_model_len if m.engine.is_ready else m.config.max_model_len
            cards += [ModelCard(id=name, root=m.config.model, max_model_len=max_len, task=m.engine.task)
                      for name in m.config.accepted_model_names]
            cards += [ModelCard(id=r.name, root=str(r.path), parent=m.config.model_name, max_model_len=max_len,
                                task=m.engine.task) for r in _loras(m)]
        return ModelList(data=cards).model_dump()

    @app.get("/metrics")
    async def metrics() -> Response:
        body = metrics_text([(m.engine.is_ready, m.engine.metrics(), m.config.model_name) for m in router.models])
        return Response(body, media_type="text/plain; version=0.0.4")


def _add_generation_routes(app: FastAPI, router: Router) -> None:
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        m, name, lora = router.resolve_generate(req.model)
        check_caps(req, m.caps)
        _ready_info(m.engine)
        return await create_chat_completion(req, raw, m.engine, name, m.chat, lora)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        m, name, lora = router.resolve_generate(req.model)
        check_caps(req, m.caps)
        _ready_info(m.engine)
        return await create_completion(req, raw, m.engine, name, lora)

    def any_task(name: str | None) -> ServedModel:
        m = router.by_name.get(name) if name is not None else router.models[0]
        return m if m is not None else router.resolve_generate(name)[0]  # a LoRA adapter's base model, or the 404

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict:
        """``POST /tokenize``: a prompt or chat messages to ids (messages need a generating model's chat template)."""
        m = any_task(req.model)
        if req.messages is not None:  # an encoder has no chat template
            m, _ = router.resolve(m.config.model_name, "generate")
        check_caps(req, m.caps)
        return await off_loop(tokenize, req, _ready_info(m.engine), m.chat.chat_template)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict:
        return detokenize(req, _ready_info(any_task(req.model).engine))


def _add_embedding_routes(app: FastAPI, router: Router) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        m, name = router.resolve(req.model, "embed")
        check_caps(req, m.caps)
        _ready_info(m.engine)
        return await create_embedding(req, m.engine, name)

    @app.post("/pooling")
    async def pooling(req: PoolingRequest) -> dict:
        m, name = router.resolve(req.model, "embed")
        check_caps(req, m.caps)
        _ready_info(m.engine)
        return await create_pooling(req, m.engine, name)

    @app.post("/score")
    @app.post("/v1/score")
    async def score(req: ScoreRequest) -> dict:
        m, name = router.resolve(req.model, "embed")
        check_caps(req, m.caps)
        _ready_info(m.engine)
        return await create_score(req, m.engine, name)


def _add_middleware(app: FastAPI, config: ServeConfig) -> None:
    """Middleware added last runs first: the request id, CORS, then the shutdown gate, the API key, body limits."""
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, keys=list(config.api_key))
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=config.allowed_methods,
            allow_headers=config.allowed_headers,
            allow_credentials=config.allow_credentials,
        )
    app.add_middleware(RequestIdMiddleware)
