"""Soak test: many random requests against a running jaxserve, some clients leaving mid-way.

N requests at concurrency C (chat and completions, streamed or not, ``n`` > 1, logprobs, stop
strings, penalties, seeds); a fraction of clients disconnect at a random point (mid-stream after a
random number of chunks, or mid-request after a random delay), a few read their stream at one chunk
per second. After the load it waits for the server to settle and reports errors by status, the KV
blocks still in use and the requests still running or waiting (``/metrics``), the server's RSS
before and after (``/proc/<pid>/status``), and generated tokens per second. Loopback only; bounded
by ``--requests`` and ``--time-limit``. Exit status 1 when a target fails: any 5xx or transport
error, leaked blocks, stuck requests, RSS growth over ``--max-rss-growth-mb``.

    python scripts/soak.py --base-url http://127.0.0.1:8000 --pid <server pid> --model NAME \\
        --requests 1000 --concurrency 64 --disconnect-fraction 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import re
import sys
import time
from urllib.parse import urlparse

import httpx

WORDS = "the a cat dog sat on mat and ran far away quick brown fox jumps over lazy river stone".split()


@dataclasses.dataclass
class Plan:
    """One client's request and behaviour."""

    path: str
    body: dict
    leave_after: int | None = None  # streams: disconnect after this many chunks
    leave_after_s: float | None = None  # non-streams: disconnect after this many seconds
    slow: bool = False  # read one chunk per second


@dataclasses.dataclass
class Tally:
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # transport / events
    started: int = 0
    disconnected: int = 0
    slow_readers: int = 0


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


def _sampling(rng: random.Random, max_tokens: int) -> dict:
    body: dict = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0, 1.5])}
    if rng.random() < 0.3:
        body["n"] = rng.randint(2, 3)
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, rng.randint(1, 3))
    if rng.random() < 0.3:
        body.update(presence_penalty=rng.uniform(-1, 1), frequency_penalty=rng.uniform(-1, 1))
    if rng.random() < 0.2:
        body["repetition_penalty"] = rng.uniform(1.0, 1.5)
    if rng.random() < 0.5:
        body["seed"] = rng.randint(0, 2**31 - 1)
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    return body


def make_plan(rng: random.Random, model: str, max_tokens: int, disconnect: float, slow: float) -> Plan:
    """A random request (chat or completions, streamed or not) and how its client behaves."""
    body = {"model": model, **_sampling(rng, max_tokens), "stream": rng.random() < 0.6}
    chat = rng.random() < 0.5
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
        if rng.random() < 0.25:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
    else:
        body["prompt"] = _prompt(rng)
        if rng.random() < 0.25:
            body["logprobs"] = rng.randint(0, 5)
    if body["stream"] and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    plan = Plan("/v1/chat/completions" if chat else "/v1/completions", body)
    r = rng.random()
    if r < disconnect:
        if body["stream"]:
            plan.leave_after = rng.randint(0, body["max_tokens"])
        else:
            plan.leave_after_s = rng.uniform(0.0, 0.5)
    elif r < disconnect + slow and body["stream"]:
        plan.slow = True
        body["max_tokens"] = min(body["max_tokens"], 5)  # at 1 chunk/s: bounded in time
    return plan


async def _stream(client: httpx.AsyncClient, plan: Plan, tally: Tally) -> None:
    async with client.stream("POST", plan.path, json=plan.body) as r:
        tally.statuses[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            return
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if '"error"' in line and line.startswith('data: {"error"'):
                tally.errors["error event: " + json.loads(line[6:])["error"].get("type", "?")] += 1
            chunks += 1
            if plan.leave_after is not None and chunks > plan.leave_after:
                tally.disconnected += 1
                return  # leaving the context manager closes the connection mid-stream
            if plan.slow:
                await asyncio.sleep(1.0)


async def _once(client: httpx.AsyncClient, plan: Plan, tally: Tally) -> None:
    tally.started += 1
    if plan.slow:
        tally.slow_readers += 1
    try:
        if plan.body["stream"]:
            await _stream(client, plan, tally)
        elif plan.leave_after_s is not None:
            try:
                r = await asyncio.wait_for(client.post(plan.path, json=plan.body), plan.leave_after_s)
                tally.statuses[r.status_code] += 1
            except TimeoutError:
                tally.disconnected += 1  # the cancelled request closed its connection
        else:
            r = await client.post(plan.path, json=plan.body)
            tally.statuses[r.status_code] += 1
    except httpx.HTTPError as e:
        tally.errors[f"transport: {type(e).__name__}"] += 1


async def run_load(base_url: str, plans: list[Plan], concurrency: int, deadline: float, api_key: str | None) -> Tally:
    """Run ``plans`` with at most ``concurrency`` in flight; stops starting new ones at ``deadline``."""
    tally = Tally()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=600) as client:
        queue: asyncio.Queue[Plan] = asyncio.Queue()
        for p in plans:
            queue.put_nowait(p)

        async def worker() -> None:
            while not queue.empty() and time.monotonic() < deadline:
                await _once(client, queue.get_nowait(), tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def scrape(base_url: str, api_key: str | None) -> dict[str, float]:
    """``/metrics`` as {series without labels: value} (one served model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    out: dict[str, float] = {}
    for m in re.finditer(r"^(jaxserve:[a-z0-9_]+)(?:\{[^}]*\})? (\S+)$", text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def settle(base_url: str, api_key: str | None, timeout: float) -> dict[str, float]:
    """Poll ``/metrics`` until nothing runs, waits or holds KV blocks (or ``timeout``); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base_url, api_key)
        busy = m["jaxserve:num_requests_running"] + m["jaxserve:num_requests_waiting"] + m["jaxserve:kv_cache_used_blocks"]
        if busy == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="the server's pid, for its RSS (same machine)")
    p.add_argument("--model", required=True, help="a served model name")
    p.add_argument("--api-key")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--disconnect-fraction", type=float, default=0.2)
    p.add_argument("--slow-fraction", type=float, default=0.01, help="streams read at 1 chunk/s")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=None, help="requests before the RSS baseline (default: C)")
    p.add_argument("--time-limit", type=float, default=3600.0, help="stop starting requests after this")
    p.add_argument("--settle-timeout", type=float, default=30.0)
    p.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    if urlparse(args.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--base-url must be a loopback address")
    return args


def soak(args: argparse.Namespace) -> dict:
    """Warm up, measure, load, settle; returns the report (``ok``: every target met)."""
    rng = random.Random(args.seed)
    plan = lambda d, s: make_plan(rng, args.model, args.max_tokens, d, s)  # noqa: E731
    warm = [plan(0.0, 0.0) for _ in range(args.warmup if args.warmup is not None else args.concurrency)]
    asyncio.run(run_load(args.base_url, warm, args.concurrency, time.monotonic() + args.time_limit, args.api_key))
    settle(args.base_url, args.api_key, args.settle_timeout)
    rss0, m0 = rss_mb(args.pid), scrape(args.base_url, args.api_key)
    plans = [plan(args.disconnect_fraction, args.slow_fraction) for _ in range(args.requests)]
    t0 = time.monotonic()
    tally = asyncio.run(run_load(args.base_url, plans, args.concurrency, t0 + args.time_limit, args.api_key))
    elapsed = time.monotonic() - t0
    m1 = settle(args.base_url, args.api_key, args.settle_timeout)
    rss1 = rss_mb(args.pid)
    generated = m1["jaxserve:generation_tokens_total"] - m0["jaxserve:generation_tokens_total"]
    report = {
        "requests": tally.started,
        "concurrency": args.concurrency, "seconds": round(elapsed, 1),
        "statuses": dict(sorted(tally.statuses.items())), "errors": dict(tally.errors),
        "disconnected": tally.disconnected, "slow_readers": tally.slow_readers,
        "leaked_kv_blocks": m1["jaxserve:kv_cache_used_blocks"],
        "running_after": m1["jaxserve:num_requests_running"], "waiting_after": m1["jaxserve:num_requests_waiting"],
        "aborted": m1["jaxserve:request_aborted_total"] - m0["jaxserve:request_aborted_total"],
        "preemptions": m1["jaxserve:num_preemptions_total"] - m0["jaxserve:num_preemptions_total"],
        "compiles_while_serving": m1.get("jaxserve:compiles_while_serving_total"),
        "generated_tokens": generated, "tok_per_s": round(generated / elapsed, 1),
        "rss_mb_before": rss0, "rss_mb_after": rss1,
    }
    fives = sum(n for s, n in tally.statuses.items() if s >= 500)
    growth = (rss1 - rss0) if rss0 is not None and rss1 is not None else 0.0
    report["ok"] = (fives == 0 and not tally.errors and report["leaked_kv_blocks"] == 0
                    and report["running_after"] == 0 and report["waiting_after"] == 0
                    and growth < args.max_rss_growth_mb)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = soak(args)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>24}: {v}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
