"""Strict JSON request bodies: what FastAPI parses before validation, with every failure a 400.

RFC 8259 JSON only: no ``NaN`` / ``Infinity`` (Python's ``json`` accepts them), no number that
overflows a float or an int of more than 4,300 digits, UTF-8 only, no lone surrogates in strings
(``"\\ud800"`` parses in Python but no tokenizer can encode it), and at most ``MAX_JSON_DEPTH``
levels of nesting (a 10⁵-deep body would otherwise end in a RecursionError). Installed as the
app's route class, so every route reads its body through ``parse_body``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

MAX_JSON_DEPTH = 64  # OpenAI bodies nest ~6 levels; JSON schemas for structured outputs a few more


class BodyError(HTTPException):
    """A 400 for a body that is not acceptable JSON; ``param`` is the offending field's path."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message)
        self.param = param


def _reject_constant(name: str) -> float:
    raise BodyError(f"invalid JSON body: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise BodyError(f"invalid JSON body: the number {text[:40]} overflows a 64-bit float")
    return value


def _check_values(root: Any) -> None:
    """Depth and lone surrogates, iteratively (the parsed body may be as deep as the parser allowed)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(root, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise BodyError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels", ".".join(path[:3]) or None)
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, path)
                stack.append((v, (*path, k)))
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(value))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        param = ".".join(path) or None
        raise BodyError(f"{param or 'body'}: a string holds a lone UTF-16 surrogate at character {e.start}", param) from None


def parse_body(body: bytes) -> Any:
    """The body's JSON value, or a BodyError (400) saying what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"invalid JSON body: not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BodyError(f"invalid JSON body: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BodyError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise BodyError(f"invalid JSON body: {' '.join(str(e).split())[:120]}") from None
    _check_values(value)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are read by ``parse_body``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, given a request whose ``json()`` is ``parse_body``'s."""
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
