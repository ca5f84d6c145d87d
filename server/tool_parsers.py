"""Tool calls read out of the model's text, streamed the way OpenAI streams them.

One parser per format (``--tool-call-parser``): ``hermes`` (Qwen2.5/Qwen3: ``<tool_call>\\n{"name":
"f", "arguments": {...}}\\n</tool_call>``, anywhere in the text, one after another) and
``llama3_json`` (Llama 3.x: the output *is* ``{"name": "f", "parameters": {...}}``, optionally
after ``<|python_tag|>``, several joined by ``;``). ``feed`` takes text as it arrives and returns
(content, tool-call deltas): a call's first delta carries its name, later ones fragments of its
arguments, copied character by character from the model's own JSON (nothing is re-serialised, so
no brace is lost and ``{}`` stays ``{}``); markup never reaches the content, and only text that
could still be the start of markup is held back. Whole text or any split of it gives the same
result. Whitespace before a call is dropped (between calls too), and a block that does not parse
as a call is content, as the model wrote it.
"""

from __future__ import annotations

import dataclasses
import json

import regex

from jaxserve.server.reasoning import held_suffix

FORMATS = ("hermes", "llama3_json")
_NAME = r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
HEADER = {"hermes": regex.compile(_NAME + r'"arguments"\s*:\s*'),
          "llama3_json": regex.compile(_NAME + r'"(?:parameters|arguments)"\s*:\s*')}


@dataclasses.dataclass
class CallDelta:
    """One piece of call ``index``: ``name`` set on its first piece only; ``arguments`` a fragment."""

    index: int
    name: str | None = None
    arguments: str = ""


class JsonValueScanner:
    """Finds where one JSON value ends in text that arrives in pieces (strings, escapes, nesting)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = self.started = False
        self.done = False

    def scan(self, text: str) -> int:
        """Characters of ``text`` that belong to the value (all of them unless it ends inside)."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                if ch not in "{[\"":
                    self.done = ch in ",}] \n"
                    if self.done:
                        return i
                    self.depth = -1  # a bare scalar: ends at a delimiter
                    continue
            if self.depth == -1:
                if ch in ",}] \n\t":
                    self.done = True
                    return i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ToolCallParser:
    """One choice's text -> (content, call deltas), for one format."""

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool call parser {fmt!r}")
        self.fmt = fmt
        self.start = "<tool_call>" if fmt == "hermes" else ""
        self.end = "</tool_call>" if fmt == "hermes" else ""
        self.state = "text" if fmt == "hermes" else "lead"
        self.buf = ""
        self.pending_ws = ""  # whitespace-only content, sent once text follows, dropped before a call
        self.calls = 0
        self.scanner = JsonValueScanner()

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        """New content and call deltas for ``text``."""
        self.buf += text
        content: list[str] = []
        deltas: list[CallDelta] = []
        while True:
            step = getattr(self, "_" + self.state)(content, deltas)
            if not step:
                return "".join(content), deltas

    def finish(self) -> tuple[str, list[CallDelta]]:
        """The end of the output: held text is content; an unfinished call keeps what it streamed."""
        content: list[str] = []
        deltas: list[CallDelta] = []
        if self.state == "fallback":
            self._fallback(content, deltas, final=True)
        if self.state in ("text", "lead", "llama_text"):
            self._content(content, self.buf, final=True)
        elif self.state == "header":
            self._content(content, self.start + self.buf, final=True)
        self.buf = ""
        return "".join(content), deltas

    # -- content --------------------------------------------------------------------------
    def _content(self, out: list[str], text: str, *, final: bool = False) -> None:
        if text.strip():
            body = text.rstrip()
            out.append(self.pending_ws + body)
            self.pending_ws = text[len(body):]
        else:
            self.pending_ws += text
        if final and not self.calls:
            out.append(self.pending_ws)
            self.pending_ws = ""

    def _text(self, content: list[str], _: list[CallDelta]) -> bool:
        at = self.buf.find(self.start)
        if at < 0:
            keep = held_suffix(self.buf, self.start)
            self._content(content, self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self._content(content, self.buf[:at])
        self.pending_ws, self.buf, self.state = "", self.buf[at + len(self.start):], "header"
        return True

    def _lead(self, content: list[str], _: list[CallDelta]) -> bool:
        """llama3_json: a call only where the output starts with ``{`` or ``<|python_tag|>``."""
        stripped = self.buf.lstrip()
        tag = "<|python_tag|>"
        if not stripped or (tag.startswith(stripped) and len(stripped) < len(tag)):
            return False
        if stripped.startswith(tag):
            stripped = stripped[len(tag):]
            if not stripped.strip():
                self.buf = stripped
                return False
        if stripped.lstrip().startswith("{"):
            self.buf, self.state = stripped, "header"
        else:
            self.state = "llama_text"
        return True

    def _llama_text(self, content: list[str], _: list[CallDelta]) -> bool:
        self._content(content, self.buf)
        self.buf = ""
        return False

    # -- a call ---------------------------------------------------------------------------
    def _header(self, content: list[str], deltas: list[CallDelta]) -> bool:
        m = HEADER[self.fmt].match(self.buf, partial=True)
        if m is None:
            self.state = "fallback"
            return True
        if m.partial or m.end() == len(self.buf):  # the name, or the whitespace after it, may go on
            return False
        name = json.loads(f'"{m.group(1)}"')
        deltas.append(CallDelta(self.calls, name=name))
        self.buf, self.state, self.scanner = self.buf[m.end():], "args", JsonValueScanner()
        return True

    def _args(self, _: list[str], deltas: list[CallDelta]) -> bool:
        n = self.scanner.scan(self.buf)
        if n:
            deltas.append(CallDelta(self.calls, arguments=self.buf[:n]))
        self.buf = self.buf[n:]
        if not self.scanner.done:
            return False
        self.calls += 1
        self.state = "tail"
        return True

    def _tail(self, content: list[str], _: list[CallDelta]) -> bool:
        """After the arguments: the call's closing ``}`` and end tag (hermes) or ``}`` and ``;`` (llama)."""
        if self.fmt == "hermes":
            at = self.buf.find(self.end)
            if at < 0:
                return False
            self.buf, self.state = self.buf[at + len(self.end):], "text"
            return True
        stripped = self.buf.lstrip()
        if not stripped or (stripped[0] == "}" and not stripped[1:].strip()):
            return False
        rest = stripped[1:].lstrip() if stripped[0] == "}" else stripped
        if rest.startswith(";"):
            self.buf, self.state = rest[1:], "header"
        else:
            self.buf, self.state = rest, "llama_text"
        return True

    def _fallback(self, content: list[str], deltas: list[CallDelta], *, final: bool = False) -> bool:
        """A block whose header is not ``{"name": ..., "arguments": ...}`` in that order: parsed whole."""
        if self.fmt == "hermes":
            at = self.buf.find(self.end)
            if at < 0 and not final:
                return False
            block, rest = (self.buf, "") if at < 0 else (self.buf[:at], self.buf[at + len(self.end):])
            raw = self.start + block + (self.end if at >= 0 else "")
        else:
            if not final:
                return False
            block, rest, raw = self.buf, "", self.buf
        call = _whole_call(block)
        if call is None:
            self._content(content, raw, final=final)
        else:
            deltas += [CallDelta(self.calls, name=call[0]), CallDelta(self.calls, arguments=call[1])]
            self.calls += 1
        self.buf, self.state = rest, "text" if self.fmt == "hermes" else "llama_text"
        return bool(rest)


def _whole_call(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete call object, or None."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
