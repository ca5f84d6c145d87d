"""Summarise ``scripts/bench_peers.sh`` runs: one markdown row per server and run, then the
jaxserve / peer ratios of output tok/s per workload across the runs.

With ``REPEAT=N`` a workload has N results per server and run (``NAME-W.json``, ``NAME-W-r2.json``
...); a cell shows their median (the values in brackets) and the ratio is of the medians.

    .venv/bin/python scripts/peers_table.py bench_results/peers-29 bench_results/peers-30 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

WORKLOADS = ("concurrent16", "concurrent64", "prefix16", "single")
SERVERS = ("jaxserve", "vllm-cpu", "llama.cpp")
LABELS = {"concurrent16": "16 × 64", "concurrent64": "64 × 128", "prefix16": "shared prefix 16 × 64",
          "single": "single"}


def results(run: Path, server: str, workload: str) -> list[dict]:
    """Every saved ``bench_serving.py`` result of ``server`` on ``workload`` in ``run``, in order."""
    first = run / f"{server}-{workload}.json"
    more = sorted(run.glob(f"{server}-{workload}-r*.json"), key=lambda p: int(p.stem.rsplit("-r", 1)[1]))
    return [json.loads(p.read_text()) for p in ([first] if first.exists() else []) + more]


def _read(run: Path, name: str) -> str:
    path = run / name
    return path.read_text().strip() if path.exists() else "-"


def cell(rs: list[dict], key: str, stat: str | None, fmt: str, every: bool = False) -> str:
    """The median over repeats of ``r[key][stat]`` (or ``r[key]``); ``every``: then each value."""
    vals = [r[key][stat] if stat else r[key] for r in rs]
    text = format(statistics.median(vals), fmt)
    return f"{text} ({', '.join(format(v, fmt) for v in vals)})" if every and len(vals) > 1 else text


def row(run: Path, server: str) -> str | None:
    """One markdown row: start-up, peak RSS, then tok/s (each repeat's in brackets), TTFT mean and ITL
    median per workload (medians over the repeats)."""
    per = {w: results(run, server, w) for w in WORKLOADS}
    if not any(per.values()):
        return None
    started = _read(run, f"{server}-startup_s.txt")
    if (run / f"{server}-all_compiled_s.txt").exists():
        started += f" ({_read(run, f'{server}-all_compiled_s.txt')})"
    cells = [run.name, server, started, _read(run, f"{server}-peak_rss_mib.txt")]
    for w in WORKLOADS:
        rs = per[w]
        failed = sum(r["failed_requests"] for r in rs)
        cells += ([cell(rs, "output_throughput", None, ".1f", every=True) + (f" ({failed} failed)" if failed else ""),
                   cell(rs, "ttft_ms", "mean", ".0f"), cell(rs, "itl_ms", "median", ".1f")] if rs else ["-"] * 3)
    return "| " + " | ".join(cells) + " |"


def ratio(run: Path, workload: str, peer: str) -> float | None:
    """jaxserve's median output tok/s over ``peer``'s on ``workload`` in ``run``."""
    ours, theirs = results(run, "jaxserve", workload), results(run, peer, workload)
    if not ours or not theirs:
        return None
    tok = lambda rs: statistics.median(r["output_throughput"] for r in rs)
    return tok(ours) / tok(theirs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bench_peers.sh output directories")
    p.add_argument("--peer", default="vllm-cpu", choices=SERVERS[1:], help="the ratios' denominator")
    args = p.parse_args(argv)
    head = ["run", "server", "start-up s (all compiled)", "peak RSS MiB"]
    for w in WORKLOADS:
        head += [f"{LABELS[w]}: tok/s", "TTFT mean ms", "ITL median ms"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in args.runs:
        for server in SERVERS:
            line = row(run, server)
            if line:
                print(line)
    print(f"\nRatios, jaxserve / {args.peer} (output tok/s, median of repeats), per run:")
    for w in WORKLOADS:
        rs = [ratio(run, w, args.peer) for run in args.runs]
        got = [r for r in rs if r is not None]
        if got:
            print(f"- {LABELS[w]}: {', '.join(f'{r:.2f}' for r in got)} (median {statistics.median(got):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
