"""The FastAPI application: routes, middleware (API key, CORS, body limits), error handlers."""

from __future__ import annotations

import asyncio
import contextlib
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
from jaxserve.server.chat import create_chat_completion
from jaxserve.server.completions import create_completion
from jaxserve.server.embeddings import create_embedding
from jaxserve.server.errors import OpenAIError, error_body, install_error_handlers
from jaxserve.server.limits import RequestLimitsMiddleware
from jaxserve.server.metrics import metrics_text
from jaxserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from jaxserve.server.tokenize import detokenize, tokenize


Engine = AsyncEngine | AsyncEmbeddingEngine  # what build_app serves (``task``: generate or embed)
TASK_ENDPOINTS = {"generate": "/v1/chat/completions and /v1/completions", "embed": "/v1/embeddings"}


def build_app(
    config: ServeConfig, engine: Engine, on_shutdown: Callable[[], None] | None = None
) -> FastAPI:
    """The app; ``on_shutdown`` runs when the server stops (uvicorn re-raises SIGTERM afterwards,
    so clean-up must happen here, not after ``uvicorn.run`` returns)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    app = FastAPI(title="jaxserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    _add_status_routes(app, config, engine)
    _add_generation_routes(app, config, engine)
    _add_middleware(app, config)
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


def _check_task(engine: Engine, task: str, name: str) -> None:
    """A 400 naming the model's task when a request is for an endpoint of another task."""
    if engine.task != task:
        raise OpenAIError(400, f"The model `{name}` serves task '{engine.task}' ({TASK_ENDPOINTS[engine.task]}); "
                          f"it does not support this endpoint (task '{task}').", param="model")


def _add_status_routes(app: FastAPI, config: ServeConfig, engine: Engine) -> None:
    @app.get("/health")
    async def health() -> Response:
        if engine.is_ready:
            return Response(status_code=200)
        return JSONResponse(
            error_body(503, engine.error or f"the engine is {engine.state.value}"), status_code=503
        )

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        max_len = engine.info.max_model_len if engine.is_ready else config.max_model_len
        cards = [
            ModelCard(id=name, root=config.model, max_model_len=max_len, task=engine.task)
            for name in config.accepted_model_names
        ]
        return ModelList(data=cards).model_dump()

    @app.get("/metrics")
    async def metrics() -> Response:
        body = metrics_text(engine.is_ready, engine.metrics(), config.model_name)
        return Response(body, media_type="text/plain; version=0.0.4")


def _add_generation_routes(app: FastAPI, config: ServeConfig, engine: Engine) -> None:
    accepted = set(config.accepted_model_names)

    def resolve_model(name: str | None) -> str:
        if name is not None and name not in accepted:
            raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", type="NotFoundError")
        return config.model_name

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        name = resolve_model(req.model)
        _check_task(engine, "generate", name)
        _ready_info(engine)
        return await create_chat_completion(req, raw, engine, name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        name = resolve_model(req.model)
        _check_task(engine, "generate", name)
        _ready_info(engine)
        return await create_completion(req, raw, engine, name)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        name = resolve_model(req.model)
        _check_task(engine, "embed", name)
        _ready_info(engine)
        return await create_embedding(req, engine, name)

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict:
        name = resolve_model(req.model)
        if req.messages is not None:
            _check_task(engine, "generate", name)  # an encoder has no chat template
        return tokenize(req, _ready_info(engine))

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict:
        resolve_model(req.model)
        return detokenize(req, _ready_info(engine))


def _add_middleware(app: FastAPI, config: ServeConfig) -> None:
    """Middleware added last runs first: CORS, then the API key, then body limits."""
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, keys=list(config.api_key))
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=config.allowed_methods,
            allow_headers=config.allowed_headers,
            allow_credentials=config.allow_credentials,
        )
