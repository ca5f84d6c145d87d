"""``/v1/embeddings`` with the OpenAI SDK and raw HTTP on a MiniLM server: formats, inputs, errors."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from tests.helpers import SENTENCES
from tests.server.conftest import API_KEY

LONG = " ".join(["words"] * 100)  # 102 tokens with [CLS]/[SEP]: over the server's 64


@pytest.fixture(scope="module")
def sdk(minilm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{minilm_server.base_url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tok(minilm_dir):
    return AutoTokenizer.from_pretrained(str(minilm_dir))


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/embeddings", json={"model": "minilm", **body}, timeout=60)


def _vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], np.float32)


@pytest.mark.hf_reference
def test_sdk_float_equals_hf(sdk, minilm_hf_vectors):
    out = sdk.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    ours = np.array([d.embedding for d in out.data], np.float32)
    ref = minilm_hf_vectors
    assert np.min(np.sum(ours * ref, -1)) >= 0.99999 and np.abs(ours - ref).max() <= 1e-5


def test_sdk_base64_and_float_agree(sdk, minilm_server):
    floats = sdk.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    b64 = sdk.embeddings.create(model="minilm", input=SENTENCES)  # the SDK asks for base64 and decodes it
    assert [d.index for d in floats.data] == list(range(len(SENTENCES)))
    np.testing.assert_array_equal(np.array([d.embedding for d in b64.data]), np.array([d.embedding for d in floats.data]))
    raw = _post(minilm_server, {"input": SENTENCES[:2], "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]])
    np.testing.assert_array_equal(decoded, np.array([d.embedding for d in floats.data[:2]], np.float32))
    assert floats.model == "minilm" and floats.object == "list" and len(floats.data[0].embedding) == 384
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=-1), 1.0, atol=1e-6)  # Normalize module


def test_token_id_inputs_and_usage(minilm_server, tok):
    ids = tok(SENTENCES[:3])["input_ids"]
    text = _post(minilm_server, {"input": SENTENCES[:3]})
    assert text.json()["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    np.testing.assert_allclose(_vectors(_post(minilm_server, {"input": ids})), _vectors(text), atol=1e-6)
    np.testing.assert_allclose(_vectors(_post(minilm_server, {"input": ids[1]})), _vectors(text)[1:2], atol=1e-6)
    one = _post(minilm_server, {"input": SENTENCES[1]})
    np.testing.assert_allclose(_vectors(one), _vectors(text)[1:2], atol=1e-6)


def test_add_special_tokens_and_user(minilm_server, tok):
    bare = tok([SENTENCES[1]], add_special_tokens=False)["input_ids"]
    got = _post(minilm_server, {"input": [SENTENCES[1]], "add_special_tokens": False, "user": "someone"})
    assert got.json()["usage"]["prompt_tokens"] == len(bare[0])
    np.testing.assert_allclose(_vectors(got), _vectors(_post(minilm_server, {"input": bare})), atol=1e-6)


def test_too_long_and_truncation(minilm_server, tok):
    r = _post(minilm_server, {"input": ["short", LONG]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "input 1 has 102 tokens" in r.json()["error"]["message"] and "maximum of 64" in r.json()["error"]["message"]
    cut = tok([LONG], truncation=True, max_length=64)["input_ids"]  # [CLS] ... [SEP], as sentence-transformers
    for k in (-1, 64):
        got = _post(minilm_server, {"input": [LONG], "truncate_prompt_tokens": k})
        np.testing.assert_allclose(_vectors(got), _vectors(_post(minilm_server, {"input": cut})), atol=1e-6)
    ids = tok(SENTENCES[2])["input_ids"]
    got = _post(minilm_server, {"input": ids, "truncate_prompt_tokens": 5})  # token ids: the last 5 (vLLM)
    np.testing.assert_allclose(_vectors(got), _vectors(_post(minilm_server, {"input": ids[-5:]})), atol=1e-6)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": ""}, "input", "input 0 is empty"),
    ({"input": []}, "input", "input is empty"),
    ({"input": ["a", ""]}, "input", "input 1 is empty"),
    ({"input": [[101, 102], []]}, "input", "input 1 is empty"),
    ({"input": [101, 99999]}, "input", "token id 99999 is out of range [0, 30522)"),
    ({"input": ["a", 5]}, "input", ""),
    ({"input": "a", "dimensions": 64}, "dimensions", "does not declare Matryoshka"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "between 1 and the model's maximum"),
    ({"input": "a", "truncate_prompt_tokens": 65}, "truncate_prompt_tokens", "length 64, got 65"),
    ({"input": "a", "priority": 1}, "priority", "unknown field"),
])
def test_bad_requests_are_400(minilm_server, body, param, words):
    r = _post(minilm_server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_tasks_are_named_when_the_endpoint_does_not_match(minilm_server, lookback_server):
    r = httpx.post(f"{minilm_server.base_url}/v1/chat/completions", timeout=30,
                   json={"model": "minilm", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert "serves task 'embed' (/v1/embeddings, /pooling, /score)" in r.json()["error"]["message"]
    r = httpx.post(f"{lookback_server.base_url}/v1/embeddings", json={"model": "lookback", "input": "hi"},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400 and "serves task 'generate'" in r.json()["error"]["message"]
    r = httpx.post(f"{minilm_server.base_url}/v1/embeddings", json={"model": "nope", "input": "hi"}, timeout=30)
    assert r.status_code == 404
    card = httpx.get(f"{minilm_server.base_url}/v1/models").json()["data"][0]
    assert (card["id"], card["task"], card["max_model_len"]) == ("minilm", "embed", 64)
    lookback_card = httpx.get(f"{lookback_server.base_url}/v1/models",
                              headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]
    assert lookback_card["task"] == "generate"


def test_concurrent_requests_get_their_own_rows(minilm_server):
    """16 requests at once are batched together by the engine thread; each gets its own vectors."""
    inputs = [[SENTENCES[i % 6], SENTENCES[(i * 5 + 1) % 6]][: 1 + i % 2] for i in range(16)]
    alone = {s: _vectors(_post(minilm_server, {"input": [s]}))[0] for s in SENTENCES}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda x: _vectors(_post(minilm_server, {"input": x})), inputs))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, np.stack([alone[s] for s in x]), atol=2e-6)
