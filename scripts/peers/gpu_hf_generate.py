"""Peer baseline: Hugging Face transformers ``generate()`` throughput (a copy of
``../shared/peers/gpu_hf_generate.py`` with arguments, kept in the repository because only the
repository travels to the GPU machine).

Random-weight Qwen2 models of real shapes (0.5B and 7B), bf16, sdpa attention, fixed-length
prompts, greedy, ``min_new_tokens == max_new_tokens``. One JSON line per case.

  python scripts/peers/gpu_hf_generate.py --batches 1,64            # on a GPU
  python scripts/peers/gpu_hf_generate.py --smoke                   # tiny shape on CPU (script check)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def run(name: str, batch: int, prompt_len: int, new_tokens: int, device: str) -> dict:
    """Output tokens/s of one ``generate`` call (after a short warm-up call)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = Qwen2Config(**SHAPES[name], max_position_embeddings=32768, rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    vocab = SHAPES[name]["vocab_size"]
    ids = torch.randint(min(100, vocab // 4), min(50000, vocab - 1), (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :32], attention_mask=mask[:, :32], max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)
        sync()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync()
        dt = time.perf_counter() - t
    gen = (out.shape[1] - prompt_len) * batch
    row = dict(peer="hf-transformers-generate", model=name, batch=batch, prompt_len=prompt_len,
               new_tokens=new_tokens, seconds=round(dt, 3), out_tok_per_s=round(gen / dt, 1),
               gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-7b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="the tiny shape on CPU, batch 2, 8 tokens")
    args = p.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        print(json.dumps({"peer": "hf-transformers-generate", "skipped": f"no torch/transformers: {e}"}))
        return 0
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}), flush=True)
    if args.smoke:
        print(json.dumps(run("tiny", 2, 16, 8, "cpu")), flush=True)
        return 0
    for name in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            print(json.dumps(run(name, batch, args.prompt_len, args.new_tokens, "cuda")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
