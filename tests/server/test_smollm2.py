"""The bundled real model (SmolLM2-135M-Instruct, Q4_1 GGUF) served and checked against HF
transformers running the same dequantized weights."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import openai
import pytest

pytestmark = pytest.mark.hf_reference

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kw)
    model.generation_config.eos_token_id = None  # like ignore_eos: EOS is an ordinary token here
    return tok, model


@pytest.fixture(scope="module")
def client(smollm2_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused")


def _prompt_ids(tok, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


def test_chat_greedy_matches_hf_on_the_same_dequantized_weights(client, hf):
    import torch

    tok, model = hf
    n = 40
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=n, temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    ids = torch.tensor([_prompt_ids(tok, MESSAGES)])
    assert r.usage.prompt_tokens == ids.shape[1] and r.usage.completion_tokens == n
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                             pad_token_id=tok.pad_token_id)
    assert r.choices[0].message.content == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    assert "Paris" in r.choices[0].message.content


def test_logprobs_are_the_models_log_probabilities(client, hf):
    import torch

    tok, model = hf
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.7, seed=5, logprobs=True,
                  top_logprobs=5)
    r = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == r.choices[0].message.content
    as_ids = client.chat.completions.create(
        **kwargs, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}
    ).choices[0].logprobs.content
    generated = [int(c.token.removeprefix("token_id:")) for c in as_ids]
    assert [c.logprob for c in as_ids] == [c.logprob for c in content]  # same seed, same tokens
    prompt = _prompt_ids(tok, MESSAGES)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].double()
    ref = torch.log_softmax(logits, -1).numpy()
    for i, (item, tid) in enumerate(zip(content, generated, strict=True)):
        pos = len(prompt) - 1 + i
        assert item.logprob == pytest.approx(ref[pos, tid], abs=2e-3)
        top_ref = np.sort(ref[pos])[::-1][:5]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(list(top_ref), abs=2e-3)


def test_stream_equals_non_stream_and_utf8_is_never_split(client):
    messages = [{"role": "user", "content": "Write 'thank you' in Japanese, Chinese and Greek."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=48, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
              if c.choices]
    assert "".join(deltas) == full
    assert not any("\ufffd" in d for d in deltas)
    assert any(ord(ch) > 0x7F for ch in full), "the test needs multi-byte output"


def test_seed_reproducible_alone_and_in_a_busy_batch(smollm2_server):
    async def run():
        c = openai.AsyncOpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused")
        ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
                   temperature=1.0)
        alone = await c.chat.completions.create(**ask, seed=1234)
        others = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Number {i}?"}],
                                            max_tokens=30, temperature=1.3) for i in range(3)]
        busy, *_ = await asyncio.gather(c.chat.completions.create(**ask, seed=1234), *others)
        different = await c.chat.completions.create(**ask, seed=4321)
        return alone, busy, different

    alone, busy, different = asyncio.run(run())
    assert alone.choices[0].message.content == busy.choices[0].message.content
    assert alone.choices[0].message.content != different.choices[0].message.content


def test_penalties_reduce_repetition(client):
    base = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0, logprobs=True,
                extra_body={"ignore_eos": True})

    def repeats(r) -> int:
        toks = [c.token for c in r.choices[0].logprobs.content]
        return len(toks) - len(set(toks))

    plain = repeats(client.chat.completions.create(**base))
    assert plain > 10, "greedy SmolLM2 repeats itself; the test relies on it"
    assert repeats(client.chat.completions.create(**base, frequency_penalty=1.5)) < plain
    assert repeats(client.chat.completions.create(**base, presence_penalty=1.5)) < plain
    rep = dict(base, extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    assert repeats(client.chat.completions.create(**rep)) < plain


JSON_PROMPTS = [
    "Describe a cat as JSON with its name and age.",
    "Give me a JSON object for a book: title, author, year.",
    "List three fruits in JSON.",
    "Give the capital of France as JSON.",
    "Make a JSON user profile with a name, an email and a list of hobbies.",
    "Write a JSON object with the keys x and y set to two numbers.",
]


def test_json_object_mode_every_reply_parses(smollm2_server):
    """Structured outputs on the real model: a handful of prompts in JSON mode, every reply a JSON object.

    (Some open prompts, e.g. "a color and its hex code", send this 135M model into JSON that never
    ends: those replies stop at max_tokens, a valid prefix; the prompts here are ones it finishes.)"""
    client = openai.AsyncOpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused")

    async def ask(prompt: str):
        return await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}], max_tokens=256,
            temperature=0.7, seed=7, response_format={"type": "json_object"},
        )

    async def main():
        async with client:
            return await asyncio.gather(*(ask(p) for p in JSON_PROMPTS))

    for prompt, r in zip(JSON_PROMPTS, asyncio.run(main()), strict=True):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        assert isinstance(json.loads(choice.message.content), dict), (prompt, choice.message.content)
