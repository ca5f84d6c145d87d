"""Tool-call and reasoning parsers on hand-written model texts, split at every pair of positions:
the pieces must give exactly what the whole text gives, and the whole text what we wrote by hand.
Includes vLLM's reported hermes bugs (lost closing braces, dropped empty arguments)."""

from __future__ import annotations

import json

import pytest

from jaxserve.server.chat_output import ChoiceParser, coalesce, finish_reason, whole_message
from jaxserve.server.reasoning import ReasoningSplitter, held_suffix
from jaxserve.server.tool_parsers import JsonValueScanner, ToolCallParser


def _call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


NESTED = '{"a": {"b": {"c": []}}, "s": "}}\\"{", "n": [1, {"x": {}}]}'
HERMES = [  # (text, content, [(name, arguments)])
    (_call("f", NESTED), "", [("f", NESTED)]),  # vLLM #22885: closing braces lost while streaming
    (_call("now", "{}"), "", [("now", "{}")]),  # vLLM #28806: empty arguments dropped
    ("Let me check.\n\n" + _call("f", '{"city": "Paris"}') + "\n" + _call("now", "{}"),
     "Let me check.", [("f", '{"city": "Paris"}'), ("now", "{}")]),
    ("a < b and <tool but no call", "a < b and <tool but no call", []),
    ('<tool_call>\n{"arguments": {"q": 1}, "name": "g"}\n</tool_call>', "", [("g", '{"q": 1}')]),  # keys swapped
    ("<tool_call>\nnot json\n</tool_call> after", "<tool_call>\nnot json\n</tool_call> after", []),
    (_call("f", '{"q": "caf\u00e9 \\u00e9"}'), "", [("f", '{"q": "caf\u00e9 \\u00e9"}')]),
    ("  \n", "  \n", []),
]
LLAMA = [
    ('{"name": "f", "parameters": {"a": {"b": 1}}}; {"name": "g", "parameters": {}}', "",
     [("f", '{"a": {"b": 1}}'), ("g", "{}")]),
    ('<|python_tag|>{"name": "f", "arguments": {"s": "}"}}', "", [("f", '{"s": "}"}')]),
    ('Hello {"name": "f"}', 'Hello {"name": "f"}', []),
]


def _run(fmt: str, pieces: list[str]) -> tuple[str, list[list[str]]]:
    p = ToolCallParser(fmt)
    content, calls = "", []
    for part in [*map(p.feed, pieces), p.finish()]:
        content += part[0]
        for d in part[1]:
            if d.name is not None:
                assert d.index == len(calls) and d.arguments == ""
                calls.append([d.name, ""])
            calls[d.index][1] += d.arguments
    return content, [tuple(c) for c in calls]


@pytest.mark.parametrize(("fmt", "case"), [("hermes", c) for c in HERMES] + [("llama3_json", c) for c in LLAMA])
def test_every_split_gives_the_hand_written_result(fmt, case):
    text, content, calls = case
    assert _run(fmt, [text]) == (content, calls)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            assert _run(fmt, [text[:i], text[i:j], text[j:]]) == (content, calls), (i, j)


def test_markup_is_held_back_only_while_it_could_be_markup():
    p = ToolCallParser("hermes")
    assert p.feed("Hi <tool") == ("Hi", [])  # " <tool" could open a call; the space waits for text
    assert p.feed("kit") == (" <toolkit", [])
    content, deltas = p.feed("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\"")
    assert content == "" and deltas[0].name == "f" and deltas[1].arguments == '{"a"'  # arguments stream at once


@pytest.mark.parametrize(("text", "end"), [('{"a": "}"} tail', 10), ('"x\\"y" ,', 6), ("12, ", 2), ("[[], {}]}", 8)])
def test_json_value_scanner_ends_where_the_value_ends(text, end):
    s, used = JsonValueScanner(), 0
    for ch in text:  # one character at a time: a bare scalar ends only at the delimiter after it
        used += s.scan(ch)
        if s.done:
            break
    assert used == end and JsonValueScanner().scan(text) == end


REASONING = [  # (parser, text, reasoning, content)
    ("qwen3", "<think>\nplan</think>\n\nanswer", "\nplan", "answer"),
    ("qwen3", "no thinking here", "", "no thinking here"),
    ("qwen3", "<think>cut off</thi", "cut off</thi", ""),
    ("qwen3", "<think>a</think>", "a", ""),
    ("deepseek_r1", "plan</think>answer", "plan", "answer"),
    ("deepseek_r1", "<think>plan</think>\nanswer", "plan", "answer"),
    ("deepseek_r1", "all reasoning", "all reasoning", ""),
]


@pytest.mark.parametrize("case", REASONING)
def test_reasoning_split_at_every_position(case):
    parser, text, reasoning, content = case

    def run(pieces: list[str]) -> tuple[str, str]:
        s, r, c = ReasoningSplitter(parser), "", ""
        for a, b in [*map(s.feed, pieces), s.finish()]:
            r, c = r + a, c + b
        return r, c

    assert run([text]) == (reasoning, content)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert run([text[:i], text[i:j], text[j:]]) == (reasoning, content)


def test_reasoning_then_tool_call_as_one_message():
    text = "<think>\nweather needed</think>\n\n" + _call("get_w", '{"city": "Oslo"}')
    parser = ChoiceParser("qwen3", "hermes", None)
    content, reasoning, calls = whole_message(parser, text)
    assert (content, reasoning) == (None, "\nweather needed")
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_w", '{"city": "Oslo"}')]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    assert finish_reason(parser, "stop") == "tool_calls" and finish_reason(parser, "length") == "length"


def test_stream_deltas_have_openai_shape_and_parallel_false_keeps_one_call():
    parser = ChoiceParser(None, "hermes", 1)
    deltas = [d for ch in _call("f", '{"a": 1}') + _call("g", "{}") for d in parser.feed(ch).tool_calls]
    first, rest = deltas[0], deltas[1:]
    assert first == {"index": 0, "id": first["id"], "type": "function", "function": {"name": "f", "arguments": ""}}
    assert all(set(d) == {"index", "function"} and d["index"] == 0 for d in rest)
    assert json.loads("".join(d["function"]["arguments"] for d in rest)) == {"a": 1}


def test_held_suffix():
    assert [held_suffix(t, "</think>") for t in ("ab<", "ab</th", "ab</think", "ab", "<x")] == [1, 4, 7, 0, 0]


def test_coalesce_joins_fragments_but_keeps_each_opening_apart():
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    frag = [{"index": 0, "function": {"arguments": a}} for a in ('{"a"', ": 1", "}")]
    head1 = {**head, "index": 1, "id": "call_2"}
    out = coalesce([head, *frag, head1, {"index": 1, "function": {"arguments": "{}"}}])
    assert out == [head, {"index": 0, "function": {"arguments": '{"a": 1}'}}, head1,
                   {"index": 1, "function": {"arguments": "{}"}}]
    assert frag[0]["function"]["arguments"] == '{"a"'  # inputs untouched
