"""The grammars behind tool calls and reasoning, compiled by llguidance for the lookback tokenizer:
which texts each accepts (whole) and which it rejects, token by token as the engine feeds them."""

from __future__ import annotations

import json

import pytest

from jaxserve.engine.grammar import GrammarCompiler
from jaxserve.sampling_params import StructuredOutput
from jaxserve.server.protocol import ToolDefinition
from jaxserve.server.reasoning import after_reasoning
from jaxserve.server.tool_calls import call_grammar

TOOLS = [ToolDefinition(type="function", function={"name": "get_w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 4}}, "required": ["city"]}}),
    ToolDefinition(type="function", function={"name": "now"})]
W = '<tool_call>\n{"name": "get_w", "arguments": {"city": "Oslo"}}\n</tool_call>'
NOW = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
LLAMA_W, LLAMA_NOW = '{"name": "get_w", "parameters": {"city": "Oslo"}}', '{"name": "now", "parameters": {}}'


@pytest.fixture(scope="module")
def accepts(tok):
    compiler = GrammarCompiler(tok, len(tok), (tok.eos_token_id,))

    def run(so: StructuredOutput, text: str) -> bool:
        m = compiler.compile(so).matcher()
        return all(m.consume(t) for t in tok.encode(text, add_special_tokens=False)) and m.ll.is_accepting()

    return run


@pytest.mark.parametrize(("fmt", "kw", "good", "bad"), [
    ("hermes", {"parallel": True}, [W, W + "\n" + NOW], ["", "hi", W.replace("Oslo", "Bergen"),
                                                         NOW.replace("{}", '{"x": 1}'), W.replace(": ", ":")]),
    ("hermes", {"parallel": False}, [W, NOW], [W + "\n" + NOW]),
    ("hermes", {"parallel": True, "lazy": True}, ["free text", "a " + W + " b " + NOW, ""],
     ['<tool_call>\n{"name": "other"', "x " + W.replace("Oslo", "Bergen")]),
    ("hermes", {"parallel": True, "reasoning": "qwen3"}, ["<think>\nplan</think>\n\n" + W, NOW], ["plan</think>" + W]),
    ("hermes", {"parallel": True, "reasoning": "deepseek_r1"}, ["plan</think>\n\n" + W], [W]),
    ("llama3_json", {"parallel": True}, [LLAMA_W, LLAMA_W + "; " + LLAMA_NOW], ["text", LLAMA_W + "; "]),
    ("llama3_json", {"parallel": True, "lazy": True}, ["text", LLAMA_NOW], ['{"name": "x"}']),
])
def test_call_grammars(accepts, fmt, kw, good, bad):
    so = StructuredOutput("grammar", call_grammar(fmt, TOOLS, **kw), param="tools")
    assert [accepts(so, t) for t in good] == [True] * len(good)
    assert [accepts(so, t) for t in bad] == [False] * len(bad)


@pytest.mark.parametrize(("so", "text"), [
    (StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                 "required": ["a"]})), '{"a": 1}'),
    (StructuredOutput("json_object"), '{"q": [1]}'),
    (StructuredOutput("regex", "a/b[0-9]"), "a/b1"),
    (StructuredOutput("choice", json.dumps(["yes", "no"])), "no"),
])
def test_structured_outputs_apply_after_the_thinking_section(accepts, so, text):
    qwen3, r1 = after_reasoning(so, "qwen3"), after_reasoning(so, "deepseek_r1")
    assert accepts(qwen3, text) and accepts(qwen3, "<think>\nhm</think>\n\n" + text)
    assert accepts(r1, "hm</think>" + text) and not accepts(r1, text)
    assert not accepts(qwen3, "<think>hm</think>" + text + "x")
    grammar = StructuredOutput("grammar", 'start: "<think>" /[a-z]+/ "</think>ok"')
    assert after_reasoning(grammar, "qwen3") is grammar  # the client's own grammar is used as sent
