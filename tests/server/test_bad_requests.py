"""A corpus of bad requests: each gets its documented 4xx in OpenAI's error shape naming the right
``param``, none reaches an engine thread, and the server still serves afterwards.

Runs the real app (``tests/server/fake_app.py``: real tokenizer, template, admission; stand-in
engines with spies). Cases are ``(name, path, body, status, param)``; ``body`` is a JSON value or
raw bytes; ``param`` is the expected ``error.param`` (a prefix match: pydantic names nested spots
such as ``messages.0.content``).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.server.fake_app import fake_serving, tiny_tokenizer

CHAT, CMPL, EMB, SCORE, TOK, DETOK = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/score", "/tokenize", "/detokenize")
USER = {"role": "user", "content": "hi"}
MB10 = "a" * (10 << 20)


def chat(**fields) -> dict:
    return {"messages": [USER], "max_tokens": 2, **fields}


def chat_raw(fragment: str) -> bytes:
    """A chat body with ``fragment`` spliced in as raw JSON text (NaN, surrogates, huge numbers)."""
    return ('{"messages": [{"role": "user", "content": "hi"}], ' + fragment + "}").encode()


def nested(depth: int) -> bytes:
    return chat_raw('"chat_template_kwargs": {"x": ' + "[" * depth + "]" * depth + "}")


CASES = [
    # --- not JSON, or not acceptable JSON
    ("truncated object", CHAT, b'{"messages": [{"role": "user", "content": "hi"}', 400, None),
    ("truncated string", CHAT, b'{"messages": [{"role": "us', 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("body is an array", CHAT, [], 400, None),
    ("body is a string", CHAT, "hi", 400, None),
    ("body is null", CHAT, None, 400, None),
    ("NaN", CHAT, chat_raw('"temperature": NaN'), 400, None),
    ("Infinity", CHAT, chat_raw('"temperature": Infinity'), 400, None),
    ("-Infinity", CHAT, chat_raw('"presence_penalty": -Infinity'), 400, None),
    ("float overflow", CHAT, chat_raw('"max_tokens": 1e400'), 400, None),
    ("5000-digit integer", CHAT, chat_raw('"max_tokens": ' + "9" * 5000), 400, None),
    ("NaN logit_bias value", CHAT, chat_raw('"logit_bias": {"5": NaN}'), 400, None),
    ("invalid UTF-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("lone high surrogate", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages.0.content"),
    ("lone low surrogate in a key", CHAT, chat_raw('"logit_bias": {"\\udc00": 1}'), 400, "logit_bias"),
    ("10^5-deep nesting", CHAT, nested(100_000), 400, None),
    ("100-deep nesting", CHAT, nested(100), 400, "chat_template_kwargs"),
    ("body over the size limit", CHAT, chat(messages=[{"role": "user", "content": "a" * (33 << 20)}]), 413, None),
    # --- wrong types and values at every level of a chat request
    ("messages missing", CHAT, {"max_tokens": 2}, 400, "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages"),
    ("messages empty", CHAT, chat(messages=[]), 400, "messages"),
    ("message not an object", CHAT, chat(messages=["hi"]), 400, "messages.0"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    ("role missing", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages.0.role"),
    ("content a number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("content part of unknown type", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages.0.content"),
    ("content part without text", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages.0.content"),
    ("content part text a list", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]), 400, "messages.0.content"),
    ("unknown field", CHAT, chat(foo=1), 400, "foo"),
    ("unknown message field", CHAT, chat(messages=[{**USER, "bogus": 1}]), 400, "messages.0.bogus"),
    ("max_tokens negative", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens huge", CHAT, chat(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens a string", CHAT, chat(max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens fractional", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_completion_tokens conflicts", CHAT, chat(max_completion_tokens=3), 400, "max_completion_tokens"),
    ("min_tokens over max_tokens", CHAT, chat(min_tokens=5), 400, "min_tokens"),
    ("temperature too high", CHAT, chat(temperature=3), 400, "temperature"),
    ("top_p zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_k below -1", CHAT, chat(top_k=-5), 400, "top_k"),
    ("repetition_penalty zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("presence_penalty too high", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    ("n zero", CHAT, chat(n=0), 400, "n"),
    ("n a million", CHAT, chat(n=10**6), 400, "n"),
    ("10^4 stop strings", CHAT, chat(stop=[f"s{i}" for i in range(10_000)]), 400, "stop"),
    ("empty stop string", CHAT, chat(stop=[""]), 400, "stop"),
    ("stop a number", CHAT, chat(stop=5), 400, "stop"),
    ("logit_bias 10^5 keys", CHAT, chat(logit_bias={str(i): 1 for i in range(100_000)}), 400, "logit_bias"),
    ("logit_bias out of vocabulary", CHAT, chat(logit_bias={"999999": 1}), 400, "logit_bias"),
    ("logit_bias key not an id", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias value out of range", CHAT, chat(logit_bias={"1": 1000}), 400, "logit_bias"),
    ("logit_bias value a string", CHAT, chat(logit_bias={"1": "x"}), 400, "logit_bias.1"),
    ("stop_token_ids negative", CHAT, chat(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("stop_token_ids out of vocabulary", CHAT, chat(stop_token_ids=[10**6]), 400, "stop_token_ids"),
    ("seed over 64 bits", CHAT, chat(seed=2**64), 400, "seed"),
    ("top_logprobs over the cap", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=5), 400, "top_logprobs"),
    ("response_format unknown type", CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type"),
    ("stream not a bool", CHAT, chat(stream="maybe"), 400, "stream"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("tools without --tool-call-parser", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tool_choice"),
    ("chat_template_kwargs not an object", CHAT, chat(chat_template_kwargs=[1]), 400, "chat_template_kwargs"),
    ("continue_final_message after a user turn", CHAT,
     chat(continue_final_message=True, add_generation_prompt=False), 400, "continue_final_message"),
    ("unknown model", CHAT, chat(model="nope"), 404, "model"),
    ("embedding model on chat", CHAT, chat(model="emb"), 400, "model"),
    ("10^4 messages", CHAT, chat(messages=[USER] * 10_000), 400, "messages"),
    ("10 MB message", CHAT, chat(messages=[{"role": "user", "content": MB10}]), 400, "messages"),
    ("prompt over max_model_len", CHAT, chat(messages=[{"role": "user", "content": "x " * 200}]), 400, "max_tokens"),
    # --- completions
    ("prompt missing", CMPL, {"max_tokens": 2}, 400, "prompt"),
    ("prompt empty list", CMPL, {"prompt": []}, 400, "prompt"),
    ("prompt empty string", CMPL, {"prompt": ""}, 400, "prompt"),
    ("prompt empty id list", CMPL, {"prompt": [[]]}, 400, "prompt"),
    ("prompt id out of range", CMPL, {"prompt": [10**6]}, 400, "prompt"),
    ("prompt id negative", CMPL, {"prompt": [-1]}, 400, "prompt"),
    ("prompt ids fractional", CMPL, {"prompt": [1.5]}, 400, "prompt"),
    ("prompt an object", CMPL, {"prompt": {"a": 1}}, 400, "prompt"),
    ("prompt ids too long", CMPL, {"prompt": [5] * 100_000}, 400, "max_tokens"),
    ("10 MB prompt", CMPL, {"prompt": MB10}, 400, "prompt"),
    ("logprobs over the cap", CMPL, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("echo with logprobs", CMPL, {"prompt": "hi", "echo": True, "logprobs": 1}, 400, "logprobs"),
    ("suffix", CMPL, {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("best_of", CMPL, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("completion n a million", CMPL, {"prompt": "hi", "n": 10**6}, 400, "n"),
    # --- embeddings, score, tokenize, detokenize
    ("input missing", EMB, {}, 400, "input"),
    ("input empty list", EMB, {"input": []}, 400, "input"),
    ("input empty id list", EMB, {"input": [[]]}, 400, "input"),
    ("input id out of range", EMB, {"input": [10**6]}, 400, "input"),
    ("input a number", EMB, {"input": 5}, 400, "input"),
    ("input 10 MB", EMB, {"input": MB10}, 400, "input"),
    ("input with a lone surrogate", EMB, b'{"input": "\\ud800"}', 400, "input"),
    ("encoding_format unknown", EMB, {"input": "hi", "encoding_format": "hex"}, 400, "encoding_format"),
    ("dimensions unsupported", EMB, {"input": "hi", "dimensions": 4}, 400, "dimensions"),
    ("generate model on embeddings", EMB, {"input": "hi", "model": "gen"}, 400, "model"),
    ("score text_1 empty", SCORE, {"text_1": [], "text_2": "a"}, 400, "text_1"),
    ("score 2:1", SCORE, {"text_1": ["a", "b"], "text_2": ["c"]}, 400, "text_1"),
    ("score text_2 missing", SCORE, {"text_1": "a"}, 400, "text_2"),
    ("score 10 MB", SCORE, {"text_1": "a", "text_2": MB10}, 400, "text_1"),
    ("tokenize prompt a number", TOK, {"prompt": 5}, 400, "prompt"),
    ("tokenize neither prompt nor messages", TOK, {}, 400, "prompt"),
    ("tokenize unknown role", TOK, {"messages": [{"role": "x", "content": "y"}]}, 400, "messages.0.role"),
    ("tokenize 10 MB", TOK, {"prompt": MB10}, 400, "prompt"),
    ("detokenize id out of range", DETOK, {"tokens": [10**6]}, 400, "tokens"),
    ("detokenize id a string", DETOK, {"tokens": ["a"]}, 400, "tokens.0"),
]


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    s = fake_serving(tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def client(serving):
    return TestClient(serving.app)


def post(client: TestClient, path: str, body) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def assert_openai_error(r, status: int, param: str | None) -> None:
    """``r`` is ``status`` with OpenAI's error body; its param starts with ``param`` (None: any)."""
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["code"] == status
    if param is not None:
        assert isinstance(err["param"], str) and err["param"].startswith(param), err


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request(serving, client, name, path, body, status, param):
    added, embedded = serving.added, serving.embedded
    assert_openai_error(post(client, path, body), status, param)
    assert (serving.added, serving.embedded) == (added, embedded), "a bad request reached an engine"


def test_a_good_request_reaches_the_engine_after_the_corpus(serving, client):
    """The spy's twin (a good request does count), and the server still serves."""
    added = serving.added
    assert client.get("/health").status_code == 200
    r = post(client, CHAT, chat())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "dd"
    assert serving.added == added + 1
    r = post(client, EMB, {"input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_other_methods_and_paths(client):
    assert_openai_error(client.get("/v1/nope"), 404, None)
    assert_openai_error(client.get(CHAT), 405, None)
    r = client.post(CHAT, content=b"{}", headers={"Content-Type": "text/plain"})
    assert_openai_error(r, 415, None)


def test_caps_follow_the_config(tmp_path_factory):
    """The caps are the config's: lowered, a request just over each is refused."""
    s = fake_serving(tiny_tokenizer(tmp_path_factory.mktemp("tok2")), max_n=2, max_stop_strings=1,
                     max_logit_bias=1, max_messages=1, max_prompt_chars=10, max_logprobs=2)
    client = TestClient(s.app)
    try:
        for fields, param in [({"n": 3}, "n"), ({"stop": ["a", "b"]}, "stop"),
                              ({"logit_bias": {"1": 1, "2": 1}}, "logit_bias"), ({"messages": [USER, USER]}, "messages"),
                              ({"messages": [{"role": "user", "content": "x" * 11}]}, "messages"),
                              ({"logprobs": True, "top_logprobs": 3}, "top_logprobs")]:
            r = post(client, CHAT, chat(**fields))
            assert_openai_error(r, 400, param)
            assert "exceeds this server's limit" in r.json()["error"]["message"]
        r = post(client, CHAT, chat(n=2, stop=["a"], logit_bias={"1": 1}, logprobs=True, top_logprobs=2))
        assert r.status_code == 200, r.text
    finally:
        s.shutdown()
