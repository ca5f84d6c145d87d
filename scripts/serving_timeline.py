"""Where a serving burst's time goes: a per-step timeline and each request's TTFT, server side.

Starts ``python -m jaxserve.serve`` (the flags after ``--``) in a child process whose engine is
instrumented by wrapping a few methods (nothing in the engine changes): every step records its
scheduled chunks (prefill or decode, tokens, prefix-cache hit tokens of newly admitted requests),
its shape, the host time of ``LLMEngine.step`` and the moment its result reached the host. Once its
background compiles are done, the parent sends the workload (bench_serving.py's prompts and
request bodies, each with an ``X-Request-Id``) ``--bursts`` times and stamps each request's send and
first content chunk on the same clock (CLOCK_MONOTONIC). Then it splits every request's TTFT into:
client → admission (HTTP, chat template, tokenization), admission → first scheduled (queueing),
first scheduled → the step holding its last prompt chunk ends (prefill steps), → its token reaches
the host (async scheduling: fetched after the next step is dispatched), → first chunk at the client
(detokenize, event loop, SSE, client parse), and prints the step table.

    .venv/bin/python scripts/serving_timeline.py --workload concurrent16 --bursts 3 -- \\
        --config configs/smollm2.yaml --port 8010 --compilation-cache-dir /tmp/xlacache_sched
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from server_health import NotReady, wait_healthy  # noqa: E402

if TYPE_CHECKING:
    import jax
    import numpy as np

    from jaxserve.engine.compilation import StepShape
    from jaxserve.engine.model_runner import HostLogprobs, StepHandle
    from jaxserve.engine.output_processor import RequestOutput
    from jaxserve.engine.sampler import LogprobsOut
    from jaxserve.engine.scheduler import SchedulerOutput
    from jaxserve.request import Request, RequestStatus

WORKLOADS = {  # (prompts, output tokens, shared system-prompt words): scripts/bench_peers.sh's
    "concurrent16": (16, 64, 0),
    "concurrent64": (64, 128, 0),
    "prefix16": (16, 64, 512),
    "single": (8, 64, 0),  # one request at a time
}


def workload_args(name: str) -> argparse.Namespace:
    """bench_serving.py's arguments for a workload (chat, temperature 0, ignore_eos)."""
    n, out, prefix = WORKLOADS[name]
    return argparse.Namespace(
        model="SmolLM2-135M-Instruct", endpoint="chat", num_prompts=n, random_output_len=out, random_input_len=None,
        tokenizer=None, dataset=None, prefix_repetition_prefix_len=prefix, prefix_repetition_num_prefixes=1,
        temperature=0.0, ignore_eos=True, seed=0, sequential=name == "single")


def _trace_scheduler(state: dict, log: Callable[[dict], None]) -> None:
    """Wrap Scheduler.schedule (the step's chunks, queue lengths and time into ``state``) and
    Scheduler.finish (one record per request: its arrival, first scheduled and first token moments)."""
    from jaxserve.engine import scheduler

    orig_schedule, orig_finish = scheduler.Scheduler.schedule, scheduler.Scheduler.finish

    def schedule(self: scheduler.Scheduler) -> SchedulerOutput:
        t = time.monotonic()
        res = orig_schedule(self)
        state["sched"] = {"t_sched": t, "sched_s": time.monotonic() - t, "waiting": len(self.waiting),
                          "running": len(self.running), "chunks": [
                              [s.request.request_id, s.start, s.num_tokens, s.request.num_prompt_tokens,
                               (s.request.first_scheduled_time or 0.0) >= t]  # admitted in this step
                              for s in res.scheduled]}
        return res

    def finish(self: scheduler.Scheduler, req: Request, status: RequestStatus) -> None:
        log({"request": req.request_id, "arrival": req.arrival_time, "first_scheduled": req.first_scheduled_time,
             "first_token": req.first_token_time, "prompt_tokens": req.num_prompt_tokens})
        return orig_finish(self, req, status)

    scheduler.Scheduler.schedule = schedule
    scheduler.Scheduler.finish = finish


def _trace_steps(state: dict, log: Callable[[dict], None]) -> None:
    """Wrap ModelRunner._run (the step's shape and launch moment), ModelRunner.fetch (when results
    reach the host) and LLMEngine.step (one record per step: its host time, ``state``, first tokens)."""
    from jaxserve.engine import llm_engine, model_runner

    orig_run, orig_fetch, orig_step = model_runner.ModelRunner._run, model_runner.ModelRunner.fetch, llm_engine.LLMEngine.step

    def run(self: model_runner.ModelRunner, shape: StepShape, inputs: tuple) -> tuple[jax.Array, LogprobsOut]:
        state["shape"] = [shape.num_tokens, shape.num_seqs, shape.decode_only]
        state["t_launch"] = time.monotonic()
        return orig_run(self, shape, inputs)

    def fetch(self: model_runner.ModelRunner, handle: StepHandle) -> tuple[np.ndarray, HostLogprobs | None]:
        t = time.monotonic()
        res = orig_fetch(self, handle)
        state.setdefault("fetches", []).append([t, time.monotonic()])
        return res

    def step(self: llm_engine.LLMEngine) -> list[RequestOutput]:
        state.clear()
        t0 = time.monotonic()
        outs = orig_step(self)
        rec = {"t0": t0, "t1": time.monotonic(), **state}
        rec["firsts"] = [[o.request_id, len(o.new_token_ids)] for o in outs if o.new_token_ids]
        log(rec)
        return outs

    model_runner.ModelRunner._run = run
    model_runner.ModelRunner.fetch = fetch
    llm_engine.LLMEngine.step = step


def serve_traced(trace_path: str, argv: list[str]) -> int:
    """The child: jaxserve.serve with the engine's step, scheduler and fetch wrapped to log JSON lines."""
    from jaxserve import serve
    from jaxserve.engine import async_engine

    if os.environ.get("TIMELINE_BURST_WINDOW_MS"):  # A/B of the engine loop's burst gathering
        async_engine.AsyncEngine.burst_window_s = float(os.environ["TIMELINE_BURST_WINDOW_MS"]) / 1e3
    out = open(trace_path, "a", buffering=1)  # noqa: SIM115 - one line per step, closed at exit

    def log(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")

    state: dict = {}  # the current step's facts, filled by the wrappers, logged by the step's
    _trace_scheduler(state, log)
    _trace_steps(state, log)
    return serve.main(argv)


async def burst(args: argparse.Namespace, bargs: argparse.Namespace, tag: str) -> list[dict]:
    """One burst of the workload; each request's id, send and first-content moments (monotonic)."""
    prompts, prefixes = bench_serving.build_prompts(bargs), bench_serving.build_prefixes(bargs)
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits) as client:
        async def one(i: int, prompt: str) -> dict:
            rid = f"{tag}x{i}"
            client.headers["X-Request-Id"] = rid  # read when the request is built, before the first await
            t_send = time.monotonic()
            res = await bench_serving.one_request(client, bargs, prompt, prefixes[i % len(prefixes)] if prefixes else "")
            return {"id": rid, "send": t_send, "first": t_send + res.ttft, "end": t_send + res.e2e,
                    "tokens": res.output_tokens, "ok": res.ok, "error": res.error}
        t = time.monotonic()
        if bargs.sequential:
            rows = [await one(i, p) for i, p in enumerate(prompts)]
        else:
            rows = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        print(f"burst {tag}: {time.monotonic() - t:.2f} s", flush=True)
        return rows


def wait_ready(base_url: str, timeout: float) -> None:
    """Until ``/health`` is 200 and no compile is pending (``--background-compile`` done)."""

    def compiled() -> bool:
        m = httpx.get(base_url + "/metrics", timeout=2)
        pend = [float(line.split()[-1]) for line in m.text.splitlines() if line.startswith("jaxserve:compiles_pending")]
        return bool(pend) and sum(pend) == 0

    try:
        wait_healthy(base_url, timeout, interval=1, also=compiled)
    except NotReady as e:
        raise SystemExit(f"server not ready (or compiles still pending): {e}") from None


def analyse(trace: Path, clients: list[dict], t_start: float) -> str:
    """The burst's summary line, its step table and its per-request TTFT table (markdown)."""
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    t_end = max(c["end"] for c in clients) + 0.1
    steps = [r for r in recs if "t0" in r and r.get("sched", {}).get("chunks") and t_start <= r["t0"] <= t_end]
    table, fetched = step_table(steps, t_start)
    ok = [c for c in clients if c["ok"]]
    dur = max(c["end"] for c in ok) - min(c["send"] for c in ok)
    ttft = statistics.fmean(c["first"] - c["send"] for c in ok) * 1e3
    n_mixed = sum(1 for s in steps if s.get("shape") and not s["shape"][2])
    summary = (f"SUMMARY ok {len(ok)}/{len(clients)}: output {sum(c['tokens'] for c in ok) / dur:.1f} tok/s, "
               f"TTFT mean {ttft:.0f} ms, {len(steps)} steps ({n_mixed} mixed)")
    reqs = {r["request"]: r for r in recs if "request" in r}
    return "\n".join([summary, "", table, "", request_table(clients, reqs, fetched)])


def step_table(steps: list[dict], t_start: float) -> tuple[str, dict[str, float]]:
    """One row per step; and, per request, when the step with its last prompt chunk was fetched
    (its result reached the host: in the next step's ``fetch``)."""
    lines = ["| step | t0 ms | host ms (step()) | wait ms (fetch) | shape T/B | rows: prefill (tokens) / decode | "
             "new reqs (hit tokens) | waiting after |", "|---|---|---|---|---|---|---|---|"]
    fetched: dict[str, float] = {}
    for i, s in enumerate(steps):
        ch = s["sched"]["chunks"]  # [request id, start, tokens, prompt tokens, admitted now]
        pre = [c for c in ch if c[2] > 1 or c[1] < c[3]]
        new = [c for c in ch if c[4]]
        nxt = steps[i + 1].get("fetches", []) if i + 1 < len(steps) else []
        for c in pre:
            if c[1] + c[2] == c[3]:
                fetched[c[0]] = nxt[0][1] if nxt else s["t1"]
        wait = sum(b - a for a, b in nxt) * 1e3
        host = (s["t1"] - s["t0"] - sum(b - a for a, b in s.get("fetches", []))) * 1e3
        shape = s.get("shape") or ["?", "?", "?"]
        lines.append(
            f"| {i} | {(s['t0'] - t_start) * 1e3:.0f} | {host:.1f} | {wait:.1f} | {shape[0]}/{shape[1]} "
            f"| {len(pre)} ({sum(c[2] for c in pre)}) / {len(ch) - len(pre)} "
            f"| {len(new)} ({', '.join(str(c[1]) for c in new)}) | {s['sched']['waiting']} |")
    return "\n".join(lines), fetched


def request_table(clients: list[dict], reqs: dict[str, dict], fetched: dict[str, float]) -> str:
    """Each request's TTFT split: admit, queue, prefill (→ its last prompt step fetched), to_host
    (→ its token applied on the host), out (→ first chunk at the client)."""
    rows = []
    for c in clients:
        key = next((k for k in reqs if k.endswith(f"{c['id']}-0")), None)
        rq = reqs.get(key)
        if rq is None or rq["first_token"] is None:
            continue
        pf = fetched.get(key, rq["first_token"])
        rows.append({
            "ttft": c["first"] - c["send"], "admit": rq["arrival"] - c["send"],
            "queue": rq["first_scheduled"] - rq["arrival"], "prefill": pf - rq["first_scheduled"],
            "to_host": rq["first_token"] - pf, "out": c["first"] - rq["first_token"], "prompt": rq["prompt_tokens"],
        })
    if not rows:
        return ""
    keys = ["ttft", "admit", "queue", "prefill", "to_host", "out"]
    out = ["| request | " + " | ".join(f"{k} ms" for k in keys) + " | prompt tokens |", "|---" * (len(keys) + 2) + "|"]
    for i, r in enumerate(sorted(rows, key=lambda r: r["ttft"])):
        out.append(f"| {i} | " + " | ".join(f"{r[k] * 1e3:.0f}" for k in keys) + f" | {r['prompt']} |")
    out.append("| **mean** | " + " | ".join(f"**{statistics.fmean(r[k] for r in rows) * 1e3:.0f}**" for k in keys)
               + " | |")
    return "\n".join(out)


def main() -> int:
    if sys.argv[1:2] == ["--serve-traced"]:  # the child
        return serve_traced(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="concurrent16", help=f"comma-separated, run in order: {sorted(WORKLOADS)}")
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--port", type=int, default=8010)
    p.add_argument("--burst-window-ms", type=float, default=None,
                   help="override AsyncEngine.burst_window_s in the server (0: no burst gathering)")
    p.add_argument("--external", default=None, metavar="URL",
                   help="send the bursts to a server already running there (e.g. vLLM's; --model names its model) "
                        "and print each request's TTFT, without a server-side trace")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--out", type=Path, default=None, help="directory for the raw trace and client stamps")
    args, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.external:
        return external(args)
    args.base_url = f"http://127.0.0.1:{args.port}"
    out = args.out or Path(tempfile.mkdtemp(prefix="timeline_"))
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.jsonl"
    trace.write_text("")
    cmd = [sys.executable, __file__, "--serve-traced", str(trace), *rest, "--port", str(args.port), "--log-level", "warning"]
    env = dict(os.environ)
    if args.burst_window_ms is not None:
        env["TIMELINE_BURST_WINDOW_MS"] = str(args.burst_window_ms)
    server = subprocess.Popen(cmd, stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                              env=env)
    try:
        wait_ready(args.base_url, 900)
        reports = []
        for name in args.workload.split(","):
            bargs = workload_args(name)
            prefixes = bench_serving.build_prefixes(bargs)
            asyncio.run(_warmup(args, bargs, prefixes))
            for b in range(args.bursts):
                time.sleep(1.0)
                t_start = time.monotonic()
                clients = asyncio.run(burst(args, bargs, f"{name}b{b}"))
                time.sleep(0.5)
                reports.append((name, b, clients, t_start))
    finally:
        server.terminate()
        server.wait(timeout=60)
    for name, b, clients, t_start in reports:
        (out / f"clients-{name}-b{b}.json").write_text(json.dumps(clients))
        print(f"\n### {name}, burst {b}\n")
        print(analyse(trace, clients, t_start))
    print(f"\nraw: {out}")
    return 0


def external(args: argparse.Namespace) -> int:
    """The bursts against a server this script did not start: client-side TTFTs only."""
    args.base_url = args.external.rstrip("/")
    for name in args.workload.split(","):
        bargs = workload_args(name)
        bargs.model = args.model
        asyncio.run(_warmup(args, bargs, bench_serving.build_prefixes(bargs)))
        for b in range(args.bursts):
            time.sleep(1.0)
            clients = asyncio.run(burst(args, bargs, f"{name}b{b}"))
            ok = [c for c in clients if c["ok"]]
            ttfts = sorted((c["first"] - c["send"]) * 1e3 for c in ok)
            dur = max(c["end"] for c in ok) - min(c["send"] for c in ok)
            print(f"SUMMARY {name} burst {b}: ok {len(ok)}/{len(clients)}, output "
                  f"{sum(c['tokens'] for c in ok) / dur:.1f} tok/s, TTFT mean {statistics.fmean(ttfts):.0f} ms; "
                  f"sorted: {', '.join(f'{t:.0f}' for t in ttfts)}")
    return 0


async def _warmup(args: argparse.Namespace, bargs: argparse.Namespace, prefixes: list[str]) -> None:
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None) as client:
        prompts = bench_serving.build_prompts(bargs)
        await bench_serving.one_request(client, bargs, prompts[0], prefixes[0] if prefixes else "")


if __name__ == "__main__":
    sys.exit(main())
