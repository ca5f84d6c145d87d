"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """Raise anywhere in a handler to answer with this status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, type: str | None = None,  # noqa: A002
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")


def error_body(status: int, message: str, *, param: str | None = None, type: str | None = None) -> dict:  # noqa: A002
    return ErrorResponse(
        error=ErrorInfo(message=message, type=type or _TYPES.get(status, "Error"), param=param, code=status)
    ).model_dump()


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.status, err.message, param=err.param, type=err.type), status_code=err.status,
        headers=err.headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # Union members show up as extra path parts (e.g. 'str', 'list[...]'); keep the field names.
    names = [p for p in loc if not any(ch in p for ch in "[]") and p not in ("str", "int", "float", "bool")]
    param = ".".join(names) or None
    if e.get("type") == "json_invalid":
        return f"invalid JSON body: {e.get('msg')}", None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown field (not supported by this server)"
    elif e.get("type") == "missing":
        msg = "field required" if param else "the request body is empty; a JSON object is required"
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes OpenAI's error body: ours as raised, validation errors a 400 naming the field,
    HTTP errors with their status, anything else a 500 (logged)."""
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        body = error_body(exc.status_code, message, param=getattr(exc, "param", None))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)
