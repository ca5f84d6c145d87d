"""API-key check: ``Authorization: Bearer <key>`` on every route except /health."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxserve.server.errors import error_body

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
