"""``X-Request-Id``: taken from the request (or generated), returned on the response, and on every
log line written while the request is handled.

The id lives in a context variable set by ``RequestIdMiddleware`` (the outermost middleware, so
401/413/415 answers carry it too); ``RequestIdFilter`` copies it onto log records. Generation
requests also name their engine requests after it (``chatcmpl-<id>-<choice>``), so the engine
thread's lines about a request carry it as well.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_VALID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # printable, no spaces: safe in log lines and ids

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def job_id(prefix: str) -> str:
    """The id of a generation request's response and engine requests: ``prefix`` + the request id."""
    return prefix + (request_id.get() or uuid.uuid4().hex)


class RequestIdMiddleware:
    """Sets ``request_id`` for the request (the client's ``X-Request-Id`` if it is a plain token of at
    most 128 characters, else a new uuid4 hex) and returns it in the response's ``X-Request-Id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(HEADER.encode(), b"").decode("latin-1")
        rid = sent if _VALID.fullmatch(sent) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) and ``record.request_tag`` (`` [id]`` or empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid or "-"
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class AccessLogRequestId(logging.Filter):
    """uvicorn's access lines: sets ``record.request_tag`` (`` [id]`` or empty) for ``ACCESS_FORMAT``.

    uvicorn's ``AccessFormatter`` unpacks exactly five ``args``, so the id travels as an attribute.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_tag = f" [{rid}]" if rid else ""
        return True


ACCESS_FORMAT = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s%(request_tag)s'


def uvicorn_log_config() -> dict:
    """uvicorn's own logging configuration with the request id at the end of each access line."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["access"]["fmt"] = ACCESS_FORMAT
    return config
