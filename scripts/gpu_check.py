"""The whole GPU table in one command: environment, compiled-kernel and engine correctness, kernel
and engine benchmarks, the HF ``generate`` peer and an end-to-end server request.

Each step is a subprocess with its own time box inside one overall budget, so a failure or hang in
one still leaves the others' results. Writes to ``--out`` (the device tool's ``$OUT``):
``gpu_check.json`` (every figure), ``gpu_check.md`` (the table for docs/benchmarks.md) and
``gpu_check.log`` (each step's output tail). ``--smoke`` runs the same steps on tiny shapes, on
the CPU, in interpret mode (CI runs it so the script cannot rot).

  scripts/gpu_check.sh                  # on the GPU machine (installs the carried wheels first)
  python scripts/gpu_check.py --smoke --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
XDIST = ["-n", "12"] if importlib.util.find_spec("xdist") else []


@dataclasses.dataclass
class Step:
    """One time-boxed subprocess; ``argv`` may name ``{tmp}`` (a scratch directory)."""

    name: str
    argv: list[str]
    timeout: float
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def gpu_steps() -> list[Step]:
    """The GPU run, within the default 360 s budget: the steps are in order of importance and the
    last ones are cut first when the budget runs out (on the first H200 run every step together
    needed about 7.5 minutes; ``--steps`` runs the rest in a second call)."""
    cuda = {"JAX_PLATFORMS": "cuda"}
    offline = ["--load-format", "dummy", "--dtype", "bfloat16", "--batches", "1,16,64,256", "--input-len", "512",
               "--output-len", "128", "--max-num-seqs", "256", "--max-num-batched-tokens", "4096",
               "--max-model-len", "1024"]
    return [
        Step("env", [PY, "scripts/gpu_env_probe.py"], 30, cuda),
        # Each case compiles its own kernels (~5 s on the H200): 12 pytest-xdist workers share the GPU.
        Step("kernels", [PY, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *XDIST, "tests/pallas_kernels"],
             120, {**cuda, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
        Step("engine", [PY, "scripts/gpu_engine_check.py"], 90, cuda),
        Step("bench_kernels", [PY, "scripts/bench_kernels.py", "--quick"], 90, cuda),
        Step("offline_7b", [PY, "scripts/bench_offline.py", "--model", "{tmp}/qwen2.5-7b", *offline], 110, cuda),
        Step("hf_generate", [PY, "scripts/peers/gpu_hf_generate.py", "--batches", "1,64"], 100),
        Step("serve", [PY, "scripts/gpu_serve_check.py", "--model", "{tmp}/qwen2.5-0.5b",
                       "--server-args", "--load-format dummy --dtype bfloat16 --max-model-len 1024 "
                       "--max-num-seqs 4 --max-num-batched-tokens 32 --gpu-memory-utilization 0.5"], 90, cuda),
        Step("offline_0.5b", [PY, "scripts/bench_offline.py", "--model", "{tmp}/qwen2.5-0.5b", *offline], 80, cuda),
        Step("kernel_sweep", [PY, "scripts/bench_kernels.py", "--sweep"], 90, cuda),
        # LoRA: 16 requests over 4 rank-8/16 adapters on all modules vs 16 on the base model vs LoRA off.
        Step("lora", [PY, "scripts/bench_lora.py", "--model", "{tmp}/qwen2.5-0.5b", "--load-format", "dummy",
                      "--dtype", "bfloat16", "--input-len", "256", "--output-len", "128", "--rounds", "2",
                      "--max-num-batched-tokens", "2048", "--lora-off"], 120, cuda),
    ]


def smoke_steps() -> list[Step]:
    """The same steps on tiny shapes on the CPU (interpret mode): minutes, not a benchmark."""
    cpu = {"JAX_PLATFORMS": "cpu"}
    offline = ["--load-format", "dummy", "--batches", "1,2", "--input-len", "16", "--output-len", "4",
               "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--max-model-len", "64"]
    return [
        Step("env", [PY, "scripts/gpu_env_probe.py"], 60, cpu),
        Step("kernels", [PY, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/pallas_kernels",
                         "-k", "decode_only and mha_4_4 or test_kernel_matches_reference"], 240, cpu),
        Step("engine", [PY, "scripts/gpu_engine_check.py"], 400, cpu),
        Step("bench_kernels", [PY, "scripts/bench_kernels.py", "--smoke"], 200, cpu),
        Step("offline_tiny", [PY, "scripts/bench_offline.py", "--model", "{tmp}/tiny", *offline], 300, cpu),
        Step("hf_generate", [PY, "scripts/peers/gpu_hf_generate.py", "--smoke"], 120, cpu),
        Step("serve", [PY, "scripts/gpu_serve_check.py", "--model", "{tmp}/tiny", "--server-args",
                       "--load-format dummy --max-model-len 64 --max-num-seqs 2 --max-num-batched-tokens 16 "
                       "--kv-cache-memory-gib 0.01", "--too-small", "--kv-cache-memory-gib 0.000001"],
             300, cpu),
        Step("lora", [PY, "scripts/bench_lora.py", "--model", "{tmp}/tiny", "--load-format", "dummy", "--num-prompts",
                      "4", "--input-len", "8", "--output-len", "4", "--rounds", "1", "--max-num-batched-tokens", "32"],
             300, cpu),
    ]


def run_step(step: Step, tmp: Path, remaining: float, log: TextIO) -> dict:
    """Run one step within ``min(step.timeout, remaining)``; JSON lines of its stdout are its records."""
    timeout = min(step.timeout, remaining)
    if timeout < 10:
        return {"status": "skipped", "reason": "out of time"}
    argv = [a.replace("{tmp}", str(tmp)) for a in step.argv]
    env = {**os.environ, **step.env}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc, status = proc.stdout, proc.stderr, proc.returncode, "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc, status = None, "timeout"
    seconds = time.perf_counter() - t0
    records = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    log.write(f"===== {step.name}: {status} rc={rc} {seconds:.1f}s\n$ {' '.join(argv)}\n")
    log.write("\n".join(out.splitlines()[-60:]) + "\n--- stderr ---\n" + "\n".join(err.splitlines()[-60:]) + "\n")
    log.flush()
    result = {"status": status, "rc": rc, "seconds": round(seconds, 1), "timeout": round(timeout), "records": records}
    if status != "ok":
        result["tail"] = (out.splitlines()[-8:] + err.splitlines()[-12:])
    if step.name == "kernels":
        summary = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
        result["summary"] = summary[-1] if summary else None
        result["failed_tests"] = [ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith("FAILED ")][:20]
    return result


def prepare_models(tmp: Path, smoke: bool) -> None:
    """Config + tokenizer directories for ``--load-format dummy`` (no weights written)."""
    for shape in ("tiny",) if smoke else ("qwen2.5-0.5b", "qwen2.5-7b"):
        subprocess.run([PY, str(ROOT / "scripts" / "make_dummy_model.py"), "--shape", shape, "--output",
                        str(tmp / shape)], check=True, stdout=subprocess.DEVNULL, timeout=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, interpret mode")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    p.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 360; smoke 1500)")
    p.add_argument("--steps", default=None, help="comma-separated subset of step names")
    args = p.parse_args(argv)
    from gpu_check_report import render_markdown  # beside this file

    budget = args.budget or (1500 if args.smoke else 360)
    steps = smoke_steps() if args.smoke else gpu_steps()
    if args.steps:
        steps = [s for s in steps if s.name in args.steps.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "smoke" if args.smoke else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                     time.gmtime()), "budget_s": budget, "steps": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, (out / "gpu_check.log").open("w") as log:
        prepare_models(Path(tmp), args.smoke)
        for step in steps:
            r = run_step(step, Path(tmp), budget - (time.perf_counter() - t0), log)
            results["steps"][step.name] = r
            print(f"[gpu_check] {step.name}: {r['status']} in {r.get('seconds', 0)}s", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    results["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    md = render_markdown(results)
    (out / "gpu_check.md").write_text(md)
    print(md)
    return 0 if all(r["status"] == "ok" for r in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
