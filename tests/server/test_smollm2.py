"""The bundled real model (SmolLM2-135M-Instruct, Q4_1 GGUF) served and checked against HF."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.hf_reference

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_chat_greedy_matches_hf_on_the_same_dequantized_weights(smollm2_server, smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = openai.OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key="unused")
    n = 40
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=n, temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    text = r.choices[0].message.content
    assert r.usage.completion_tokens == n

    kw = dict(gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kw)
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False, return_tensors="pt")
    assert r.usage.prompt_tokens == ids.shape[1]
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is an ordinary token here
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    assert text == expected
    assert "Paris" in text
