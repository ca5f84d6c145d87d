"""Incremental detokenization: multi-byte characters are emitted whole, and the pieces add up."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from jaxserve.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(lookback_model):
    return AutoTokenizer.from_pretrained(str(lookback_model))


@pytest.mark.parametrize("text", ["日本語のテキスト 🙂 and café", "naïve 🙂🙂 Él", "plain ascii text"])
def test_deltas_never_split_characters(tok, text):
    ids = tok.encode(text)
    assert len(ids) > 3
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0x7F for c in text):
        assert any(d == "" for d in deltas), "some byte tokens must have been held back"


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hi") + [tok.convert_tokens_to_ids("<|im_end|>")]
    keep = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    skip = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(keep.add([t]) for t in ids) + keep.flush() == "hi<|im_end|>"
    assert "".join(skip.add([t]) for t in ids) + skip.flush() == "hi"


@pytest.mark.parametrize("text", ["日本語のテキスト 🙂 and café", "naïve 🙂🙂 Él"])
def test_output_after_any_prompt_cut(tok, text):
    """Prompt = the first k tokens, output = the rest (k may cut a character): the deltas are the
    full text minus the prompt's text, as the prompt's characters (even a cut one) are not output."""
    ids = tok.encode(text)
    for k in range(1, len(ids)):
        detok = IncrementalDetokenizer(tok, ids[:k])
        out = "".join(detok.add([t]) for t in ids[k:]) + detok.flush()
        assert out == tok.decode(ids)[len(tok.decode(ids[:k])):], k
