"""Write a model directory holding only config.json and a tokenizer, for ``--load-format dummy``.

The shapes are the real Qwen2.5 ones the throughput issue benchmarks on GPUs (bf16, random
weights: no checkpoint to download or write). The tokenizer is bytes only (256 tokens plus
ChatML specials): enough to serve and to detokenize whatever the random model samples.

    python scripts/make_dummy_model.py --shape qwen2.5-7b --output /tmp/qwen2.5-7b-dummy
    python scripts/bench_offline.py --model /tmp/qwen2.5-7b-dummy --load-format dummy --dtype bfloat16 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {  # as in ../shared/peers/gpu_hf_generate.py (the HF generate baseline)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    from transformers import Qwen2Config

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=32768, rope_theta=1e6,
                      architectures=["Qwen2ForCausalLM"])
    cfg.save_pretrained(str(out))
    write_byte_tokenizer(out)
    print(f"wrote {out} ({args.shape}: config.json + tokenizer; serve it with --load-format dummy)")


if __name__ == "__main__":
    main()
