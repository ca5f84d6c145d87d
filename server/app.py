"""The FastAPI application: routes, API-key check, CORS, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxserve import __version__
from jaxserve.config import ServeConfig
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.server.chat import create_chat_completion
from jaxserve.server.completions import create_completion
from jaxserve.server.errors import OpenAIError, error_body, install_error_handlers
from jaxserve.server.limits import RequestLimitsMiddleware
from jaxserve.server.metrics import metrics_text
from jaxserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from jaxserve.server.requests import chat_prompt_ids

UNGUARDED_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on every route except /health (constant-time check)."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        ok = False
        for k in self.keys:  # compare against every key so timing does not reveal which matched
            ok |= hmac.compare_digest(token, k)
        if not ok:
            response = JSONResponse(
                error_body(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')."),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(
    config: ServeConfig, engine: AsyncEngine, on_shutdown: Callable[[], None] | None = None
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
    accepted = set(config.accepted_model_names)

    def resolve_model(name: str | None) -> str:
        if name is not None and name not in accepted:
            raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", type="NotFoundError")
        return config.model_name

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
        max_len = engine.engine.max_model_len if engine.engine is not None else config.max_model_len
        cards = [
            ModelCard(id=name, root=config.model, max_model_len=max_len) for name in config.accepted_model_names
        ]
        return ModelList(data=cards).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        name = resolve_model(req.model)
        _require_ready(engine)
        return await create_chat_completion(req, raw, engine, name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        name = resolve_model(req.model)
        _require_ready(engine)
        return await create_completion(req, raw, engine, name)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        resolve_model(req.model)
        _require_ready(engine)
        llm = engine.check()
        tok = llm.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "send exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest(
                messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, chat_template_kwargs=req.chat_template_kwargs,
            )
            tokens = chat_prompt_ids(tok, chat)
            if req.add_special_tokens:
                tokens = tok.build_inputs_with_special_tokens(tokens)
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            tokens = tok.encode(req.prompt, add_special_tokens=add)
        return {"count": len(tokens), "max_model_len": llm.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        resolve_model(req.model)
        _require_ready(engine)
        llm = engine.check()
        vocab = llm.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"token id {bad} is out of range [0, {vocab})", param="tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_text(engine, config.model_name), media_type="text/plain; version=0.0.4")

    # Middleware added last runs first: CORS, then the API key, then body limits.
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
    return app


def _require_ready(engine: AsyncEngine) -> None:
    if not engine.is_ready:
        raise OpenAIError(503, engine.error or f"the engine is {engine.state.value}; try again shortly")

