"""Every request field and endpoint of the OpenAI surface, on the hand-computable lookback model.

Next token = the first token after the last one whose residue mod 16 is the previous token's + 1
(``tests.helpers.lookback_continue``); token 2 is EOS. The logits are ``lookback_levels`` (3 for the
winner, 2 for the other 15 tokens after the last one, 1 for the 19 other tokens of the winner's
residue, 0 elsewhere) times the final RMSNorm's factor, so log-probabilities and penalties are known
in closed form.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import TINY_VOCAB, lookback_continue, lookback_levels, lookback_logit_scale
from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SCALE = lookback_logit_scale()
LOGZ = math.log(math.exp(3 * SCALE) + 15 * math.exp(2 * SCALE) + 19 * math.exp(SCALE) + (TINY_VOCAB - 35))
TOP_LOGPROB = 3 * SCALE - LOGZ
SECOND_LOGPROB = 2 * SCALE - LOGZ
EOS = 2
MSG = [{"role": "user", "content": "hi"}]


def _count(prompt: list[int], n: int) -> list[int]:
    """The greedy continuation (up to and including EOS)."""
    return lookback_continue(prompt, n, eos=EOS)


def _penalised_greedy(prompt: list[int], n: int, rep: float, freq: float, pres: float) -> list[int]:
    """vLLM's penalties on the lookback logits: repetition over prompt + output, the others over output."""
    seq: list[int] = list(prompt)
    for _ in range(n):
        logits = lookback_levels(seq[-1], seq[-2] if len(seq) > 1 else seq[-1]) * SCALE
        seen = np.zeros(TINY_VOCAB, bool)
        seen[seq] = True
        logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
        counts = np.bincount(seq[len(prompt):], minlength=TINY_VOCAB)
        logits = logits - freq * counts - pres * (counts > 0)
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def _prompt_ids(tok, messages, **kw) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", headers=AUTH).text
    out = {}
    for line in text.splitlines():
        if line.startswith("jaxserve:"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def _wait_idle(base: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(base)
        if (m["jaxserve:kv_cache_used_blocks"] == 0 and m["jaxserve:num_requests_running"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


# ------------------------------------------------------------------ messages and templates
def test_roles_content_parts_names_and_developer(client, tok):
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": "again"},
    ]
    r = client.chat.completions.create(model="lookback", messages=messages, max_tokens=3, temperature=0)
    rendered = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "42"},
                {"role": "user", "content": "again"}]
    ids = _prompt_ids(tok, rendered, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tok.decode(_count(ids, 3))


def test_add_generation_prompt_continue_final_message_and_template_kwargs(client, lookback_server, tok):
    base = lookback_server.base_url
    with_prompt = httpx.post(f"{base}/tokenize", headers=AUTH, json={"messages": MSG}).json()
    without = httpx.post(f"{base}/tokenize", headers=AUTH, json={"messages": MSG, "add_generation_prompt": False}).json()
    assert with_prompt["tokens"] == _prompt_ids(tok, MSG, add_generation_prompt=True)
    assert without["tokens"] == _prompt_ids(tok, MSG, add_generation_prompt=False)
    assert with_prompt["count"] > without["count"] and with_prompt["max_model_len"] == 256
    greet = httpx.post(f"{base}/tokenize", headers=AUTH,
                       json={"messages": MSG, "chat_template_kwargs": {"greeting": "Hello!"}}).json()
    assert greet["tokens"] == _prompt_ids(tok, MSG, add_generation_prompt=True, greeting="Hello!")
    cont = [*MSG, {"role": "assistant", "content": "The answer"}]
    r = client.chat.completions.create(
        model="lookback", messages=cont, max_tokens=2, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    ids = tok.encode(tok.apply_chat_template(cont, tokenize=False, continue_final_message=True),
                     add_special_tokens=False)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == tok.decode(_count(ids, 2))


# ------------------------------------------------------------------ lengths
def test_max_tokens_defaults_and_max_completion_tokens(client, tok):
    r = client.chat.completions.create(model="lookback", messages=MSG, max_completion_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="lookback", messages=MSG, temperature=0, extra_body={"ignore_eos": True})
    n_prompt = len(_prompt_ids(tok, MSG, add_generation_prompt=True))
    assert r.usage.completion_tokens == 256 - n_prompt and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lookback", messages=MSG, max_tokens=3, max_completion_tokens=4)
    assert e.value.body["param"] == "max_completion_tokens"


# ------------------------------------------------------------------ n, streaming, usage
def test_n_choices_and_interleaved_stream(client):
    r = client.chat.completions.create(model="lookback", messages=MSG, n=3, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1 and r.usage.completion_tokens == 9
    chunks = list(client.chat.completions.create(model="lookback", messages=MSG, n=2, max_tokens=3, temperature=0,
                                                 stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(ch.delta.content or "" for ch in mine) == r.choices[0].message.content


def test_stream_usage_options(client):
    chunks = list(client.completions.create(model="lookback", prompt=[7], max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    assert [c.usage.completion_tokens for c in chunks if c.choices] == [1, 2, 3, 4]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5
    plain = list(client.completions.create(model="lookback", prompt=[7], max_tokens=2, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)


def test_raw_sse_framing(lookback_server):
    with httpx.stream("POST", f"{lookback_server.base_url}/v1/chat/completions", headers=AUTH,
                      json={"messages": MSG, "max_tokens": 2, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


# ------------------------------------------------------------------ stopping
def test_stop_strings_across_token_boundaries_stream_and_not(client, tok):
    prompt = [60]
    tokens = _count(prompt, 12)
    assert EOS not in tokens
    full = tok.decode(tokens)
    pieces = [tok.decode([t]) for t in tokens]
    k = next(i for i in range(3, 11) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1)
    start = sum(len(p) for p in pieces[:k]) + len(pieces[k]) - 1
    stop = full[start : start + 2]  # last character of token k + first of token k + 1
    assert full.index(stop) == start
    kwargs = dict(model="lookback", prompt=prompt, max_tokens=12, temperature=0, stop=["zzzz", stop])
    r = client.completions.create(**kwargs)
    assert r.choices[0].text == full[:start] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(streamed) == full[:start]  # no partial stop text was ever sent
    inc = client.completions.create(**kwargs, extra_body={"include_stop_str_in_output": True})
    assert inc.choices[0].text == full[: start + 2]


def test_stop_token_ids_ignore_eos_min_tokens_skip_special(client, tok):
    want = _count([50, 51], 9)
    r = client.completions.create(model="lookback", prompt=[50, 51], max_tokens=9, temperature=0,
                                  extra_body={"stop_token_ids": [want[2]]})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == want[2]
    # After 310 the first token with residue (1 + 1) mod 16 is 322 mod 320 = 2, the EOS.
    assert _count([1, 310], 8) == [EOS]
    r = client.completions.create(model="lookback", prompt=[1, 310], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8
    # After [1, 319] EOS comes at once; min_tokens 2 masks it, so the first of the 15 runners-up (0)
    # wins instead, and the rule runs once round the vocabulary back to EOS.
    assert _count([1, 319], 60) == [EOS]
    want = lookback_continue([1, 319], 60, eos=EOS, min_tokens=2)
    assert want[0] == 0 and want[-1] == EOS and len(want) == 38
    r = client.completions.create(model="lookback", prompt=[1, 319], max_tokens=60, temperature=0,
                                  extra_body={"min_tokens": 2, "skip_special_tokens": False})
    assert r.usage.completion_tokens == len(want) and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=False)
    assert r.choices[0].text.endswith("<|im_end|>")


# ------------------------------------------------------------------ sampling fields
def _ids(r) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def test_logit_bias_top_k_top_p_min_p_seed_user(client):
    ids = dict(logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    r = client.completions.create(model="lookback", prompt=[10], max_tokens=4, temperature=0,
                                  logit_bias={"77": 100}, user="someone", **ids)
    assert _ids(r) == [77] * 4
    greedy = client.completions.create(model="lookback", prompt=[10], max_tokens=6, temperature=0).choices[0].text
    # At temperature 2 the winner leads the 15 runners-up by 5.4 logits: top_k=1, high min_p and tiny
    # top_p keep only it, so the draw is greedy whatever the seed.
    for extra in ({"top_k": 1}, {"min_p": 0.5}, {"top_p": 0.01}):
        for seed in (1, 2, 3):
            r = client.completions.create(model="lookback", prompt=[10], max_tokens=6, temperature=2.0, seed=seed,
                                          extra_body=extra)
            assert r.choices[0].text == greedy, (extra, seed)
    # Unfiltered, temperature 2 leaves each runner-up ~0.4%: 64 draws leave the greedy path.
    kwargs = dict(model="lookback", prompt=[10], max_tokens=64, extra_body={"ignore_eos": True})
    sampled = client.completions.create(**kwargs, temperature=2.0, seed=3).choices[0].text
    assert sampled != client.completions.create(**kwargs, temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lookback", prompt=[10], logit_bias={"99999": 1})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lookback", prompt=[10], presence_penalty=3)
    assert e.value.body["param"] == "presence_penalty"


def test_n_choices_with_a_seed_differ_and_repeat(client):
    kwargs = dict(model="lookback", prompt=[10, 11], max_tokens=48, temperature=2.0, seed=7, n=3,
                  extra_body={"ignore_eos": True})
    first = [c.text for c in client.completions.create(**kwargs).choices]
    assert len(set(first)) == 3  # seed + index per choice
    assert [c.text for c in client.completions.create(**kwargs).choices] == first
    single = client.completions.create(**{**kwargs, "n": 1, "seed": 8}).choices[0].text
    assert single == first[1]  # choice 1 of seed 7 is seed 8


@pytest.mark.parametrize("rep,freq,pres", [(2.0, 0.0, 0.0), (1.8, 2.0, 2.0)])
def test_penalties_change_tokens_as_computed(client, rep, freq, pres):
    # After [20, 36] the winner is 37, already in the prompt: repetition 2 halves its logit (32.1 ->
    # 16.0) below the runners-up (21.4), so the first unseen runner-up, 38, comes instead.
    prompt = [37, 20, 36]
    want = _penalised_greedy(prompt, 12, rep, freq, pres)
    assert want[0] == 38 and want != _count(prompt, 12)
    r = client.completions.create(model="lookback", prompt=prompt, max_tokens=12, temperature=0, logprobs=1,
                                  frequency_penalty=freq, presence_penalty=pres,
                                  extra_body={"repetition_penalty": rep, "return_tokens_as_token_ids": True,
                                              "ignore_eos": True})
    assert _ids(r) == want


# ------------------------------------------------------------------ logprobs
def test_chat_logprobs_are_true_log_probabilities(client, tok):
    r = client.chat.completions.create(model="lookback", messages=MSG, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    ids = _count(_prompt_ids(tok, MSG, add_generation_prompt=True), 3)
    assert len(content) == 3
    for item, tid in zip(content, ids, strict=True):
        assert item.logprob == pytest.approx(TOP_LOGPROB, abs=1e-4)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(TOP_LOGPROB, abs=1e-4)
        assert item.top_logprobs[1].logprob == pytest.approx(SECOND_LOGPROB, abs=1e-3)
    assert b"".join(bytes(i.bytes) for i in content).decode("utf-8", "replace") == tok.decode(ids)
    plain = client.chat.completions.create(model="lookback", messages=MSG, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape_and_echo(client, tok):
    r = client.completions.create(model="lookback", prompt="ab", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert lp.token_logprobs == pytest.approx([TOP_LOGPROB] * 3, abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(3)]
    stream = list(client.completions.create(model="lookback", prompt="ab", max_tokens=3, temperature=0, logprobs=2,
                                            stream=True))
    assert [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    echo = client.completions.create(model="lookback", prompt="ab", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text == "ab" + r.choices[0].text
    echo_stream = "".join(c.choices[0].text for c in client.completions.create(
        model="lookback", prompt="ab", max_tokens=3, temperature=0, echo=True, stream=True) if c.choices)
    assert echo_stream == echo.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lookback", prompt="ab", max_tokens=3, echo=True, logprobs=1)
    assert e.value.body["param"] == "logprobs"


# ------------------------------------------------------------------ endpoints
def test_tokenize_detokenize_version(lookback_server, tok):
    base = lookback_server.base_url
    t = httpx.post(f"{base}/tokenize", headers=AUTH, json={"prompt": "hello world"}).json()
    assert t["tokens"] == tok.encode("hello world") and t["count"] == len(t["tokens"])
    d = httpx.post(f"{base}/detokenize", headers=AUTH, json={"tokens": t["tokens"]}).json()
    assert d == {"prompt": "hello world"}
    bad = httpx.post(f"{base}/detokenize", headers=AUTH, json={"tokens": [999999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{base}/tokenize", headers=AUTH, json={"prompt": "x", "messages": MSG})
    assert both.status_code == 400
    assert "version" in httpx.get(f"{base}/version", headers=AUTH).json()


def test_every_route_but_health_needs_the_key(lookback_server):
    base = lookback_server.base_url
    routes = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/metrics")]
    for method, path in routes:
        r = httpx.request(method, f"{base}{path}", json={})
        assert r.status_code == 401, path
    assert httpx.get(f"{base}/health").status_code == 200


# ------------------------------------------------------------------ raw HTTP errors
def test_raw_http_errors(lookback_server):
    base = lookback_server.base_url
    url = f"{base}/v1/completions"
    cases = [
        (httpx.post(url, headers={**AUTH, "content-type": "application/json"}, content=b'{"prompt": [1,'), 400),
        (httpx.post(url, headers={**AUTH, "content-type": "text/plain"}, content=b'{"prompt": [1]}'), 415),
        (httpx.post(url, headers=AUTH, json={"prompt": [1], "max_tokens": "many"}), 400),
        (httpx.post(url, headers=AUTH, json={"prompt": [1], "temperature": -1}), 400),
        (httpx.post(url, headers=AUTH, json={"prompt": [1], "n": 0}), 400),
        (httpx.post(url, headers=AUTH, json={"prompt": [1], "stop": 5}), 400),
        (httpx.post(url, headers=AUTH, json={"max_tokens": 3}), 400),
        (httpx.post(url, headers=AUTH, json=[1, 2]), 400),
        (httpx.post(url, headers=AUTH, json={"prompt": [1], "stream_options": {"include_usage": True}}), 400),
        (httpx.post(url, headers=AUTH, json={"prompt": "x" * (33 << 20)}), 413),
        (httpx.post(f"{base}/v1/chat/completions", headers=AUTH, json={"messages": [], "max_tokens": 1}), 400),
        (httpx.post(f"{base}/v1/chat/completions", headers=AUTH,
                    json={"messages": [{"role": "wizard", "content": "x"}]}), 400),
        (httpx.post(f"{base}/v1/chat/completions", headers=AUTH,
                    json={"messages": MSG, "response_format": {"type": "xml"}}), 400),
        (httpx.get(f"{base}/v1/nothing", headers=AUTH), 404),
    ]
    for r, status in cases:
        assert r.status_code == status, (r.request.url, r.text[:200])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    temp = httpx.post(url, headers=AUTH, json={"prompt": [1], "temperature": -1}).json()["error"]
    assert temp["param"] == "temperature"
    assert httpx.get(f"{base}/health").status_code == 200  # still serving


# ------------------------------------------------------------------ disconnects
def test_disconnect_mid_stream_frees_blocks(lookback_server):
    base = lookback_server.base_url
    with httpx.stream("POST", f"{base}/v1/completions", headers=AUTH,
                      json={"prompt": [5] * 30, "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _metrics(base)["jaxserve:kv_cache_used_blocks"] > 0
    m = _wait_idle(base)
    assert m["jaxserve:kv_cache_used_blocks"] == 0 and m["jaxserve:num_requests_running"] == 0


def test_disconnect_non_streaming_frees_blocks(lookback_server):
    base = lookback_server.base_url
    before = _metrics(base)["jaxserve:request_aborted_total"]
    with pytest.raises(httpx.ReadTimeout):
        # 32 sequences x 220 tokens through 4 slots: thousands of steps, far longer than the timeout.
        httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=0.1,
                   json={"prompt": [[5] * 30] * 8, "n": 4, "max_tokens": 220, "ignore_eos": True})
    m = _wait_idle(base)
    assert m["jaxserve:kv_cache_used_blocks"] == 0 and m["jaxserve:request_aborted_total"] > before
