"""One chat choice's text -> reasoning, content and tool calls, streamed or whole.

The reasoning splitter (``server/reasoning.py``) runs first, then the tool-call parser
(``server/tool_parsers.py``) on the content. A non-streaming response runs the same pipeline over
the whole text, so a stream reassembled by the client equals the response for the same seed (ids
aside). Tool-call ids are ``call_<24 hex>``; a call's first delta has its index, id, type and name
(arguments ""), the next ones argument fragments.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from jaxserve.server.protocol import FunctionCall, ToolCall
from jaxserve.server.reasoning import ReasoningSplitter
from jaxserve.server.tool_parsers import CallDelta, ToolCallParser


@dataclasses.dataclass
class Parsed:
    """What one piece of output adds to the message."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # OpenAI's delta shape


class ChoiceParser:
    """The pipeline for one choice (no parser configured: the text is the content)."""

    def __init__(self, reasoning: str | None, tool_format: str | None, max_calls: int | None) -> None:
        self.reasoning = ReasoningSplitter(reasoning) if reasoning else None
        self.tools = ToolCallParser(tool_format) if tool_format else None
        self.max_calls = max_calls
        self.ids: list[str] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str) -> Parsed:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        return self._tools(reasoning, content, final=False)

    def finish(self) -> Parsed:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        return self._tools(reasoning, content, final=True)

    def _tools(self, reasoning: str, content: str, *, final: bool) -> Parsed:
        if self.tools is None:
            return Parsed(reasoning, content)
        text, deltas = self.tools.feed(content)
        if final:
            more_text, more = self.tools.finish()
            text, deltas = text + more_text, deltas + more
        return Parsed(reasoning, text, [d for d in map(self._delta, deltas) if d is not None])

    def _delta(self, d: CallDelta) -> dict[str, Any] | None:
        if self.max_calls is not None and d.index >= self.max_calls:
            return None  # parallel_tool_calls=false: the first call only
        if d.name is not None:
            self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
            return {"index": d.index, "id": self.ids[d.index], "type": "function",
                    "function": {"name": d.name, "arguments": d.arguments}}
        return {"index": d.index, "function": {"arguments": d.arguments}} if d.arguments else None


def coalesce(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive argument fragments of one call joined (a call's opening stays on its own)."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and "id" not in d and "id" not in prev and prev["index"] == d["index"]:
            prev["function"]["arguments"] += d["function"]["arguments"]
        else:
            out.append({**d, "function": dict(d["function"])})
    return out


def whole_message(parser: ChoiceParser, text: str) -> tuple[str | None, str | None, list[ToolCall] | None]:
    """(content, reasoning_content, tool_calls) of a complete output."""
    parts = [parser.feed(text), parser.finish()]
    calls: dict[int, ToolCall] = {}
    for d in (d for p in parts for d in p.tool_calls):
        if "id" in d:
            calls[d["index"]] = ToolCall(id=d["id"], function=FunctionCall(**d["function"]))
        else:
            calls[d["index"]].function.arguments += d["function"]["arguments"]
    content = "".join(p.content for p in parts)
    reasoning = "".join(p.reasoning for p in parts)
    if calls and not content:
        content = None
    return content, reasoning or None, list(calls.values()) or None


def finish_reason(parser: ChoiceParser, reason: str | None) -> str | None:
    """``tool_calls`` for an output that ended normally with calls in it."""
    return "tool_calls" if reason == "stop" and parser.called else reason
