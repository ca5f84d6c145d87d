"""Tool calls and reasoning over HTTP through the ``openai`` SDK: the lookback model with the shipped
hermes template (``tools_server``). Forced choices always give valid calls; scripted outputs (a
grammar with tool_choice 'auto', whose text the parsers then read) pin the exact messages; a stream
reassembled by the SDK equals the response for the same seed."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.server.conftest import API_KEY

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "description": "the time; no arguments"}}]
MSG = [{"role": "user", "content": "weather in Oslo?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # no <think> prefix in the grammar


@pytest.fixture(scope="module")
def sdk(tools_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tools_server.base_url}/v1", api_key="unused")


def _valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "now":
        return args == {}
    return (name == "get_weather" and set(args) == {"city", "days"} and isinstance(args["city"], str)
            and len(args["city"]) <= 6 and type(args["days"]) is int and 1 <= args["days"] <= 7)


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def _streamed(sdk: openai.OpenAI, **kw):
    state = ChatCompletionStreamState()
    for chunk in sdk.chat.completions.create(stream=True, **kw):
        state.handle_chunk(chunk)
    return state.get_final_completion()


def _same(a, b) -> None:
    """Two completions agree on everything but ids (``content`` "" and None alike: the stream's role
    delta carries content "")."""
    for x, y in zip(a.choices, b.choices, strict=True):
        assert x.finish_reason == y.finish_reason
        assert (x.message.content or None, _calls(x.message)) == (y.message.content or None, _calls(y.message))
        assert getattr(x.message, "reasoning_content", None) == getattr(y.message, "reasoning_content", None)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                    {"type": "function", "function": {"name": "now"}}])
def test_forced_choices_always_give_valid_calls_and_stream_the_same(sdk, choice):
    kw = dict(model="tools", messages=MSG, tools=TOOLS, tool_choice=choice, max_tokens=150, temperature=1.0,
              extra_body=NO_THINKING)
    for seed in (1, 2):
        whole = sdk.chat.completions.create(n=2, seed=seed, **kw)
        for c in whole.choices:
            calls = _calls(c.message)
            assert c.finish_reason == "tool_calls" and c.message.content is None and calls
            assert all(_valid_call(n, a) for n, a in calls), calls
            if isinstance(choice, dict):
                assert calls == [(choice["function"]["name"], calls[0][1])]  # one call of that function
        # vLLM #21544/#24509: required + streaming errored; here the SDK's reassembly is the response
        _same(_streamed(sdk, seed=seed, **kw), sdk.chat.completions.create(seed=seed, **kw))


def _scripted(sdk: openai.OpenAI, text: str, **kw):
    """The model's text forced by a grammar (tool_choice 'auto', non-strict tools: no tool grammar),
    then parsed: (non-streamed, SDK-reassembled stream)."""
    body = dict(model="tools", messages=MSG, tools=TOOLS, max_tokens=200, seed=0,
                extra_body={"guided_grammar": "start: " + json.dumps(text)}, **kw)
    return sdk.chat.completions.create(**body), _streamed(sdk, **body)


def _hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


NESTED = '{"city": "a}}\\"{", "days": 2, "extra": {"n": [{}, {"m": {}}]}}'


def test_two_parallel_calls_nested_braces_and_empty_arguments(sdk):
    text = "Checking.\n" + _hermes("get_weather", NESTED) + "\n" + _hermes("now", "{}")
    whole, streamed = _scripted(sdk, text)
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    assert _calls(msg) == [("get_weather", NESTED), ("now", "{}")]  # vLLM #22885 lost braces, #28806 dropped {}
    assert len({c.id for c in msg.tool_calls}) == 2 and all(c.id.startswith("call_") for c in msg.tool_calls)
    _same(whole, streamed)
    # the SDK's message object goes back into the conversation as is, followed by the tool results
    history = [*MSG, msg, *({"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in msg.tool_calls)]
    again = sdk.chat.completions.create(model="tools", messages=history, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert again.usage.prompt_tokens > whole.usage.prompt_tokens + 60


def test_raw_stream_chunks_have_openai_tool_call_shape(tools_server):
    text = "Hi.\n" + _hermes("get_weather", NESTED) + "\n" + _hermes("now", "{}")
    body = {"model": "tools", "messages": MSG, "tools": TOOLS, "max_tokens": 200, "stream": True,
            "guided_grammar": "start: " + json.dumps(text)}
    deltas, finish = [], []
    with httpx.stream("POST", f"{tools_server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                deltas.append(choice["delta"])
                finish.append(choice["finish_reason"])
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert all(len(c) == 1 for c in calls)  # one piece per chunk, as OpenAI sends them
    opening = [c[0] for c in calls if "id" in c[0]]
    assert [(o["index"], o["type"], o["function"]) for o in opening] == [
        (0, "function", {"name": "get_weather", "arguments": ""}), (1, "function", {"name": "now", "arguments": ""})]
    fragments = [c[0] for c in calls if "id" not in c[0]]
    assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in fragments)
    assert "".join(f["function"]["arguments"] for f in fragments if f["index"] == 0) == NESTED
    assert "".join(d.get("content") or "" for d in deltas) == "Hi."  # no markup in content
    assert finish[-1] == "tool_calls" and not any(finish[:-1])


def test_parallel_tool_calls_false_keeps_the_first_call(sdk):
    whole, streamed = _scripted(sdk, _hermes("now", "{}") + "\n" + _hermes("now", "{}"), parallel_tool_calls=False)
    assert _calls(whole.choices[0].message) == [("now", "{}")]
    _same(whole, streamed)


def test_reasoning_split_stream_and_non_stream(sdk):
    whole, streamed = _scripted(sdk, "<think>\nneed weather</think>\n\n" + _hermes("now", "{}"))
    msg = whole.choices[0].message
    assert (msg.reasoning_content, msg.content, _calls(msg)) == ("\nneed weather", None, [("now", "{}")])
    _same(whole, streamed)
    whole, streamed = _scripted(sdk, "<think>hm</think>\n\nIt is sunny.", tool_choice="none")
    msg = whole.choices[0].message
    assert (msg.reasoning_content, msg.content, msg.tool_calls) == ("hm", "It is sunny.", None)
    assert whole.choices[0].finish_reason == "stop"
    _same(whole, streamed)


def test_tool_turns_render_through_the_template(tools_server):
    messages = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(f"{tools_server.base_url}/tokenize", json={"model": "tools", "messages": messages}, timeout=30)
    text = httpx.post(f"{tools_server.base_url}/detokenize", json={"tokens": r.json()["tokens"]}, timeout=30).json()
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n") in text["prompt"]
    r = httpx.post(f"{tools_server.base_url}/tokenize", json={"model": "tools", "messages": MSG, "tools": TOOLS},
                   timeout=30)
    text = httpx.post(f"{tools_server.base_url}/detokenize", json={"tokens": r.json()["tokens"]}, timeout=30).json()
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n" in text["prompt"]  # the template's tool list
    bad = [*MSG, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{oops"}}]}]
    r = httpx.post(f"{tools_server.base_url}/v1/chat/completions", json={"messages": bad}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice", "--tool-call-parser"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
])
def test_tools_without_the_server_flags_are_400(lookback_server, body, param, words):
    r = httpx.post(f"{lookback_server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": MSG, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_tools_with_tool_choice_none_render_without_flags(lookback_server):
    r = httpx.post(f"{lookback_server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": MSG, "tools": TOOLS, "tool_choice": "none", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools[1].function.name"),
])
def test_bad_tool_requests_name_the_field(tools_server, body, param):
    r = httpx.post(f"{tools_server.base_url}/v1/chat/completions", json={"messages": MSG, "tools": TOOLS, **body},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_plan_names_the_missing_flag_or_template():
    from jaxserve.server.errors import OpenAIError
    from jaxserve.server.protocol import ChatCompletionRequest
    from jaxserve.server.tool_calls import ChatOptions, plan_tools

    req = ChatCompletionRequest(messages=MSG, tools=TOOLS, tool_choice="required")
    hermes = ChatOptions(tool_call_parser="hermes")
    with pytest.raises(OpenAIError, match="--chat-template") as e:
        plan_tools(req, hermes, "{% for m in messages %}{{ m.content }}{% endfor %}")  # a template without tools
    assert e.value.param == "tools"
    plan = plan_tools(req, hermes, "{{ tools }}")
    assert plan.forced and plan.structured.kind == "grammar" and plan.parse_format == "hermes"
    assert plan_tools(req.model_copy(update={"tool_choice": "none"}), ChatOptions(), None).structured is None


def test_config_flags():
    from jaxserve.config import ConfigError, ServeConfig

    with pytest.raises(ConfigError, match="--tool-call-parser"):
        ServeConfig(model="m", enable_auto_tool_choice=True)
    with pytest.raises(ConfigError, match="chat_template: cannot read"):
        ServeConfig(model="m", chat_template="no_such_template.jinja")
    shipped = ServeConfig(model="m", chat_template="hermes_tool_chat.jinja").chat_template_text
    assert "<tool_call>" in shipped and "tools" in shipped
    assert ServeConfig(model="m", chat_template="{{ messages }}").chat_template_text == "{{ messages }}"
