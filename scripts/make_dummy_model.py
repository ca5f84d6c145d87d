"""Write a model directory holding only config.json and a tokenizer, for ``--load-format dummy``.

The shapes are the real Qwen2.5 ones the throughput issue benchmarks on GPUs (bf16, random
weights: no checkpoint to download or write). The tokenizer is bytes only (256 tokens plus
ChatML specials): enough to serve and to detokenize whatever the random model samples.

    python scripts/make_dummy_model.py --shape qwen2.5-7b --output /tmp/qwen2.5-7b-dummy
    python scripts/bench_offline.py --model /tmp/qwen2.5-7b-dummy --load-format dummy --dtype bfloat16 ...

``--weights SEED`` also writes float32 safetensors drawn with numpy (the same values on every
machine), so the directory loads as a real checkpoint: the GPU check compares a GPU's greedy tokens
with the CPU's on such a model (``tiny``: 2 layers, 4 query / 2 KV heads of 64, decisive logits).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Config

SHAPES = {  # as in ../shared/peers/gpu_hf_generate.py (the HF generate baseline)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer without merges: ids 0-255 are bytes, then the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(directory))


def write_random_weights(directory: Path, cfg: Qwen2Config, seed: int) -> None:
    """float32 weights ~ N(0, 1/fan_in), norms 1, small q/k/v biases, embeddings N(0, 0.1²) and an
    untied LM head: attention outputs outweigh the token's own embedding in the residual stream, so
    the next token depends on the cached context (a broken KV cache changes it), and the logits
    are spread wide, so argmax ties are rare."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.RandomState(seed)
    d, f, n, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    h = d // n
    def w(out: int, inp: int) -> np.ndarray:
        return (rng.randn(out, inp) / np.sqrt(inp)).astype(np.float32)
    t = {"model.embed_tokens.weight": (0.1 * rng.randn(cfg.vocab_size, d)).astype(np.float32),
         "model.norm.weight": np.ones(d, np.float32)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": np.ones(d, np.float32),
              p + "post_attention_layernorm.weight": np.ones(d, np.float32),
              p + "self_attn.q_proj.weight": w(n * h, d), p + "self_attn.k_proj.weight": w(k * h, d),
              p + "self_attn.v_proj.weight": w(k * h, d), p + "self_attn.o_proj.weight": w(d, n * h),
              p + "self_attn.q_proj.bias": (0.1 * rng.randn(n * h)).astype(np.float32),
              p + "self_attn.k_proj.bias": (0.1 * rng.randn(k * h)).astype(np.float32),
              p + "self_attn.v_proj.bias": (0.1 * rng.randn(k * h)).astype(np.float32),
              p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = w(cfg.vocab_size, d)
    save_file(t, str(directory / "model.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--weights", type=int, default=None, metavar="SEED",
                   help="also write float32 random weights drawn with numpy from SEED (a loadable checkpoint)")
    args = p.parse_args()
    from transformers import Qwen2Config

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=32768, rope_theta=1e6,
                      architectures=["Qwen2ForCausalLM"])
    if args.weights is not None:
        cfg.dtype = "float32"
    cfg.save_pretrained(str(out))
    write_byte_tokenizer(out)
    if args.weights is not None:
        write_random_weights(out, cfg, args.weights)
        print(f"wrote {out} ({args.shape}: config.json, tokenizer, random float32 weights from seed {args.weights})")
    else:
        print(f"wrote {out} ({args.shape}: config.json + tokenizer; serve it with --load-format dummy)")


if __name__ == "__main__":
    main()
