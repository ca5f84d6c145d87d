"""Reasoning models: the ``<think>…</think>`` section split into ``reasoning_content``.

``--reasoning-parser qwen3``: the output is reasoning when it starts with ``<think>`` (Qwen3 writes
it; with ``enable_thinking: false`` the template closes an empty block in the prompt and the output
is all content). ``deepseek_r1``: the template opened ``<think>``, so the output is reasoning up to
``</think>`` (a leading ``<think>`` the model repeats is dropped). The split is the same whether the
text arrives whole or in pieces (``ReasoningSplitter``); the whitespace between ``</think>`` and
the answer is dropped. With a structured output, the constraint applies after the thinking section
(``after_reasoning``).
"""

from __future__ import annotations

import json

from jaxserve.engine.grammar import JSON_OPTIONS
from jaxserve.sampling_params import StructuredOutput

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")


def held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (text to hold back)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Streams model text into (reasoning, content) pieces for one choice."""

    def __init__(self, parser: str) -> None:
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}")
        self.parser = parser
        self.state = "start"  # start -> reasoning -> content, or start -> content
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """New (reasoning, content) text; text that could be part of a tag is held back."""
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            stripped = self.buf.lstrip()
            if START.startswith(stripped) and len(stripped) < len(START):
                return "", ""  # could still be "<think>"
            if stripped.startswith(START):
                self.state, self.buf = "reasoning", stripped[len(START):]
            else:
                self.state = "reasoning" if self.parser == "deepseek_r1" else "content"
        if self.state == "reasoning":
            at = self.buf.find(END)
            if at < 0:
                keep = held_suffix(self.buf, END)
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf = self.buf[:at], self.buf[at + len(END):].lstrip()
            self.state = "answer_start" if not self.buf else "content"
        if self.state == "answer_start":
            self.buf = self.buf.lstrip()
            if not self.buf:
                return reasoning, ""
            self.state = "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Whatever is still held back at the end of the output."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning" or (self.state == "start" and self.parser == "deepseek_r1"):
            return rest, ""
        return "", rest if self.state != "answer_start" else ""


def reasoning_prefix(parser: str) -> str:
    """Lark rules for a grammar that lets the thinking section come first: ``start: think_ body``."""
    if parser == "qwen3":
        think = r'think_[lazy]: /<think>(.|\n)*<\/think>/' + "\n"
        return 'start: (think_ WS_*)? body\n' + think + 'WS_: /[ \\n]/\n'
    return r'start: think_ WS_* body' + "\n" + r'think_[lazy]: /(.|\n)*<\/think>/' + "\nWS_: /[ \\n]/\n"


def _lark_regex(regex: str) -> str:
    """``regex`` inside Lark's ``/…/`` (unescaped slashes escaped)."""
    out, escaped = [], False
    for ch in regex:
        out.append("\\/" if ch == "/" and not escaped else ch)
        escaped = ch == "\\" and not escaped
    return "/" + "".join(out) + "/"


def after_reasoning(so: StructuredOutput | None, parser: str | None) -> StructuredOutput | None:
    """``so`` as a Lark grammar that allows the thinking section first. A ``grammar`` is the client's
    own and is used as sent (it can spell out the think block itself, as llguidance's docs show)."""
    if so is None or parser is None or so.kind == "grammar":
        return so
    if so.kind in ("json_schema", "json_object"):
        schema = json.loads(so.spec) if so.kind == "json_schema" else {"type": "object"}
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        body = "%json " + json.dumps({"x-guidance": JSON_OPTIONS, **schema})
    elif so.kind == "regex":
        body = _lark_regex(so.spec)
    else:  # choice
        body = " | ".join(json.dumps(c) for c in json.loads(so.spec))
    return StructuredOutput("grammar", reasoning_prefix(parser) + "body: " + body + "\n", param=so.param)
