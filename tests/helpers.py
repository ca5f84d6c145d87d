"""Test fixtures that write real checkpoints: tiny random HF models, a hand-computable model, a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% if greeting is defined %}{{ greeting }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! 0123456789",
    "Paged attention keeps the KV cache in fixed-size blocks; continuous batching fills them.",
    "JAX compiles the step once per shape bucket, then serves without recompiling.",
    "Él habló en español, café, naïve, 日本語のテキスト, emoji 🙂 and symbols #$%&*().",
] * 8


def write_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (TINY_VOCAB ids incl. ChatML specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(directory))


def hf_config(arch: str, **overrides):
    """A tiny transformers config for ``arch`` (llama, llama3, mistral, qwen2, qwen3)."""
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.08, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "llama3":
        cfg = transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None, head_dim=16)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def write_hf_checkpoint(arch: str, directory: Path, *, seed: int = 0, **overrides):
    """Random-weight HF checkpoint (float32 safetensors + tokenizer); returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # make biases and norm weights non-trivial so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    write_tiny_tokenizer(directory)
    return model


LOOKBACK_PERIOD = 16  # the lookback model reads a previous token's residue mod this
_LOOKBACK_HEAD_DIM = 32
_LOOKBACK_THETA = 10.0  # RoPE base: with 16 frequency pairs this makes "one position back" a sharp peak
_LOOKBACK_AMPLITUDE = 12.0  # q/k size: the previous position's score beats any other by > 45 logits


def lookback_levels(last: int, prev: int, vocab: int = TINY_VOCAB) -> np.ndarray:
    """The lookback model's logits in units of the final norm's scale (0, 1, 2 or 3 per token).

    ``last`` is the token at the current position, ``prev`` the one before it (``last`` itself at
    position 0). The 16 tokens after ``last`` (mod vocab) get 2; every token whose residue mod 16 is
    ``prev``'s + 1 gets 1 more: exactly one of the 16 has that residue, so it wins with 3.
    """
    levels = np.zeros(vocab, np.float64)
    levels[(last + np.arange(1, LOOKBACK_PERIOD + 1)) % vocab] = 2
    levels[np.arange(vocab) % LOOKBACK_PERIOD == (prev + 1) % LOOKBACK_PERIOD] += 1
    return levels


def lookback_next(last: int, prev: int, vocab: int = TINY_VOCAB) -> int:
    """Greedy next token: the first token after ``last`` whose residue mod 16 is ``prev``'s + 1."""
    return (last + ((prev + 1 - last) % LOOKBACK_PERIOD or LOOKBACK_PERIOD)) % vocab


def lookback_continue(
    tokens: list[int], n: int, *, eos: int | None = None, min_tokens: int = 0, vocab: int = TINY_VOCAB
) -> list[int]:
    """The lookback model's greedy continuation of ``tokens``: ``n`` tokens, or up to and including ``eos``.

    Below ``min_tokens`` outputs ``eos`` is masked, as the engine does: the first of the best
    remaining tokens wins.
    """
    seq = list(tokens)
    for _ in range(n):
        last, prev = seq[-1], seq[-2] if len(seq) > 1 else seq[-1]
        if eos is not None and len(seq) - len(tokens) < min_tokens:
            levels = lookback_levels(last, prev, vocab)
            levels[eos] = -np.inf
            seq.append(int(np.argmax(levels)))
        else:
            seq.append(lookback_next(last, prev, vocab))
        if seq[-1] == eos and len(seq) - len(tokens) >= min_tokens:
            break
    return seq[len(tokens):]


def lookback_logit_scale(vocab: int = TINY_VOCAB) -> float:
    """The final RMSNorm's factor: its input holds three ones (token, constant, attention output)."""
    hidden = _lookback_hidden(vocab)
    return 1.0 / np.sqrt(3.0 / hidden + 1e-6)


def _lookback_hidden(vocab: int) -> int:
    return -(-(vocab + 1 + LOOKBACK_PERIOD) // 8) * 8  # divisible by any tensor-parallel size up to 8


def write_lookback_checkpoint(directory: Path, vocab: int = TINY_VOCAB) -> None:
    """A 1-layer Llama whose greedy next token depends on the token one position back *in the KV cache*.

    Hidden state: one-hot token (dims ``[0, vocab)``), a constant 1 (dim ``vocab``) and 16 dims for
    the attention output. Query head 0 attends to the previous position only: q and k are
    constant (read from the constant dim) and chosen so that RoPE's rotation peaks at a distance of
    one. Its values are the one-hot residue ``token % 16``, written into the residual stream. The LM
    head adds 2 for each of the 16 tokens after the current one and 1 for tokens whose residue is
    the previous token's + 1 (``lookback_levels``). Other heads, the MLP and KV head 1 are zero.
    Any error in slot mapping, block tables, positions or recomputation changes the previous token
    a decode step reads, and so its output (``lookback_continue`` is the reference).
    """
    from safetensors.numpy import save_file

    d, h, period = _lookback_hidden(vocab), _LOOKBACK_HEAD_DIM, LOOKBACK_PERIOD
    const, attn = vocab, vocab + 1  # the constant dim and the first attention-output dim
    embed = np.zeros((vocab, d), np.float32)
    embed[np.arange(vocab), np.arange(vocab)] = 1.0
    embed[:, const] = 1.0
    norm_in = np.full(d, np.sqrt(2.0 / d), np.float32)  # undoes RMSNorm's scaling of two ones
    half = h // 2
    inv_freq = _LOOKBACK_THETA ** (-np.arange(0, h, 2) / h)
    q = np.zeros((4 * h, d), np.float32)  # q · R(m - n) k peaks at m - n = 1 (rotate-half RoPE)
    q[:half, const] = _LOOKBACK_AMPLITUDE * np.cos(inv_freq)
    q[half:h, const] = -_LOOKBACK_AMPLITUDE * np.sin(inv_freq)
    k = np.zeros((2 * h, d), np.float32)
    k[:half, const] = _LOOKBACK_AMPLITUDE
    v = np.zeros((2 * h, d), np.float32)
    v[np.arange(vocab) % period, np.arange(vocab)] = 1.0
    o = np.zeros((d, 4 * h), np.float32)
    o[attn + np.arange(period), np.arange(period)] = 1.0
    head = np.zeros((vocab, d), np.float32)
    for j in range(vocab):
        head[j, (j - np.arange(1, period + 1)) % vocab] = 2.0
        head[j, attn + (j - 1) % period] = 1.0
    t = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": head,
        "model.layers.0.input_layernorm.weight": norm_in,
        "model.layers.0.post_attention_layernorm.weight": np.ones(d, np.float32),
        "model.layers.0.self_attn.q_proj.weight": q,
        "model.layers.0.self_attn.k_proj.weight": k,
        "model.layers.0.self_attn.v_proj.weight": v,
        "model.layers.0.self_attn.o_proj.weight": o,
        "model.layers.0.mlp.gate_proj.weight": np.zeros((8, d), np.float32),
        "model.layers.0.mlp.up_proj.weight": np.zeros((8, d), np.float32),
        "model.layers.0.mlp.down_proj.weight": np.zeros((d, 8), np.float32),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(t, str(directory / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": d, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": h, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": _LOOKBACK_THETA, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    write_tiny_tokenizer(directory)


_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (interleave the two RoPE halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf(model, path: Path, arch: str, qtype: str = "F32") -> None:
    """Write a transformers model as a GGUF file the way llama.cpp's converter lays it out."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(2)
    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}." + _GGUF_LAYER[".".join(parts[3:])]
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mapping_count() -> int:
    """This process's memory mappings (lines of /proc/self/maps); 0 where there is no procfs."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


SENTENCES = [  # mixed lengths: 3 to ~60 MiniLM tokens
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks; continuous batching fills them as requests "
    "arrive and leave, and JAX compiles each padded shape once at start-up, never while it serves.",
    "Embeddings!",
    "Él habló en español: café, naïve, and a few emoji 🙂 for good measure.",
    "A sentence of medium length about transformers and pooling.",
]


def minilm_reference(directory: Path, sentences: list[str]) -> np.ndarray:
    """HF transformers' BertModel (torch, float32), pooled as the directory's files say (mean, then
    L2 norm when modules.json lists Normalize): sentence-transformers' pipeline, written out."""
    import torch
    from transformers import AutoTokenizer, BertModel

    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((directory / "modules.json").read_text())]
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and modules == ["Transformer", "Pooling", "Normalize"]
    tok = AutoTokenizer.from_pretrained(str(directory))
    model = BertModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in sentences:  # one at a time: no padding on the reference side
            batch = tok([s], return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
    return np.stack(out)
