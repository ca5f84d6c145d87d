"""The server through the official ``openai`` SDK (sync and async) on a hand-computable model.

The lookback model's next token is a hand-computable function of the last two tokens, the one
before the last read back from the KV cache (``tests.helpers.lookback_continue``), so every expected
text is computed here from that rule and the tokenizer.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.helpers import lookback_continue
from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EOS = 2


def _expected(tok, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    ids = lookback_continue(prompt_ids, n, eos=EOS)
    return ids, tok.decode(ids, skip_special_tokens=True)


def _chat_prompt(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


MESSAGES = [{"role": "system", "content": "Count."}, {"role": "user", "content": "Go on"}]


def test_models_and_health(client, lookback_server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["lookback", "alias"]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert httpx.get(f"{lookback_server.base_url}/health").status_code == 200


def test_chat_completion(client, tok):
    r = client.chat.completions.create(model="lookback", messages=MESSAGES, max_tokens=7, temperature=0)
    prompt = _chat_prompt(tok, MESSAGES)
    _, text = _expected(tok, prompt, 7)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "lookback"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 7, len(prompt) + 7)


def test_chat_stream_equals_non_stream(client, tok):
    kwargs = dict(model="alias", messages=MESSAGES, max_tokens=9, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[0].model == "lookback"  # the first served name is reported


def test_completions_several_prompts_and_n(client, tok):
    r = client.completions.create(model="lookback", prompt=["ab", "xyz"], n=2, max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    first = _expected(tok, tok.encode("ab"), 4)[1]
    second = _expected(tok, tok.encode("xyz"), 4)[1]
    assert [c.text for c in r.choices] == [first, first, second, second]
    assert r.usage.prompt_tokens == len(tok.encode("ab")) + len(tok.encode("xyz"))
    assert r.usage.completion_tokens == 16
    r = client.completions.create(model="lookback", prompt=[[40, 41, 42], [7]], max_tokens=3, temperature=0)
    assert [c.text for c in r.choices] == [_expected(tok, [40, 41, 42], 3)[1], _expected(tok, [7], 3)[1]]


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model="lookback", prompt=[10], temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_stream(client, tok):
    chunks = list(client.completions.create(model="lookback", prompt=[100], max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == _expected(tok, [100], 5)[1]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_eos_finishes_with_stop(client):
    # After 310 the first token with residue (1 + 1) mod 16 is 322 mod 320 = 2, the EOS.
    r = client.completions.create(model="lookback", prompt=[1, 310], max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_async_client_concurrent_requests(lookback_server, tok):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{lookback_server.base_url}/v1", api_key=API_KEY)
        prompts = [[20 + 7 * i] for i in range(6)]
        rs = await asyncio.gather(*[
            client.completions.create(model="lookback", prompt=p, max_tokens=6, temperature=0) for p in prompts
        ])
        return prompts, rs

    prompts, rs = asyncio.run(run())
    for p, r in zip(prompts, rs, strict=True):
        assert r.choices[0].text == _expected(tok, p, 6)[1]


def test_errors_have_openai_shape(client, lookback_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.body["message"] == "The model `nope` does not exist; served models: lookback, alias."
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lookback", messages=MESSAGES, temperature=2.5)
    assert e.value.body["param"] == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lookback", prompt=[5] * 10, max_tokens=300)
    assert "256" in e.value.body["message"] and "310" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lookback", messages=MESSAGES,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lookback", messages=MESSAGES, extra_body={"bogus_field": 1})
    assert "bogus_field" in e.value.body["param"]
    raw = httpx.post(f"{lookback_server.base_url}/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json", **AUTH})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    raw = httpx.post(f"{lookback_server.base_url}/v1/completions", json={"prompt": 5, "max_tokens": "x"},
                     headers=AUTH)
    assert raw.status_code == 400, raw.text
    body = json.loads(raw.text)["error"]
    assert body["code"] == 400 and body["type"] == "BadRequestError"


def test_api_key_required_except_health(lookback_server):
    base = lookback_server.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{base}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{base}/v1/models", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()


def test_cors_preflight_allowed_and_denied(lookback_server):
    url = f"{lookback_server.base_url}/v1/chat/completions"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(url, headers={"Origin": "http://allowed.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
    denied = httpx.options(url, headers={"Origin": "http://evil.example", **pre})
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
