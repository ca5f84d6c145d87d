"""Online serving benchmark for any OpenAI-compatible server (jaxserve, vLLM, llama.cpp, SGLang).

Reports what ``vllm bench serve`` reports: successful/failed requests, duration, request
throughput, output and total token throughput, and TTFT / TPOT / ITL / E2E latency (mean, median,
p99). Streaming with ``stream_options.include_usage``; token counts come from the server's usage
(or one token per streamed chunk when a server sends none).

  python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \
      --endpoint chat --num-prompts 16 --max-concurrency 16 --random-output-len 64 --temperature 0

A shared prefix (vLLM's ``prefix_repetition`` dataset): ``--prefix-repetition-prefix-len N`` puts one
of ``--prefix-repetition-num-prefixes`` random prefixes of N words (tokens with ``--tokenizer``) in
front of every prompt, request i taking prefix i mod num_prefixes; on the chat endpoint the prefix
is the system message (a shared system prompt), on the completions endpoint it is prepended.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHAT_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis simply.",
    "Give me three tips for better sleep.", "What is 17 times 23?", "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?", "Suggest a name for a bakery.", "Summarize the plot of Romeo and Juliet.",
    "How do airplanes fly?", "List four primary colors of light and paint.", "What is a prime number?",
    "Translate 'good morning' into Spanish and German.", "Write a limerick about a robot.",
    "What are the benefits of exercise?", "How does a refrigerator work?",
]
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain music garden window paper energy").split()


@dataclasses.dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def build_prefixes(args: argparse.Namespace) -> list[str]:
    """The shared prefixes (none without ``--prefix-repetition-prefix-len``), seeded apart from the prompts."""
    if not args.prefix_repetition_prefix_len:
        return []
    rng = random.Random(args.seed + 1)
    n = args.prefix_repetition_prefix_len
    return [_random_text(args, rng, n) for _ in range(args.prefix_repetition_num_prefixes)]


@functools.cache
def _tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _random_text(args: argparse.Namespace, rng: random.Random, n: int) -> str:
    """``n`` random words, or ``n`` random tokens of ``--tokenizer``."""
    if args.tokenizer:
        tok = _tokenizer(args.tokenizer)
        return tok.decode([rng.randrange(100, tok.vocab_size - 100) for _ in range(n)])
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_prompts(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    if args.dataset:
        rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
        texts = [r.get("prompt") or r.get("text") for r in rows]
        return [texts[i % len(texts)] for i in range(args.num_prompts)]
    if args.random_input_len is None:
        return [CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)] for i in range(args.num_prompts)]
    return [_random_text(args, rng, args.random_input_len) for _ in range(args.num_prompts)]


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, prefix: str = "") -> Result:
    body: dict = {
        "model": args.model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": args.random_output_len, "temperature": args.temperature,
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        system = [{"role": "system", "content": prefix}] if prefix else []
        body["messages"] = [*system, {"role": "user", "content": prompt}]
        url = "/v1/chat/completions"
    else:
        body["prompt"] = f"{prefix} {prompt}" if prefix else prompt
        url = "/v1/completions"
    start = time.perf_counter()
    last = start
    res = Result(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])
                    return res
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                for c in msg.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content") if args.endpoint == "chat" else c.get("text")
                    if piece:
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itls.append(now - last)
                        last = now
                        chunks += 1
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0
    if not res.ok:
        res.error = "no tokens streamed"
    return res


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(values)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {"mean": statistics.fmean(s) * scale, "median": statistics.median(s) * scale, "p99": p99 * scale}


async def run(args: argparse.Namespace) -> dict:
    prompts = build_prompts(args)
    prefixes = build_prefixes(args)
    prefix_of = lambda i: prefixes[i % len(prefixes)] if prefixes else ""  # noqa: E731
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.max_concurrency or len(prompts), 1) + 4)
    sem = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        if args.warmup:
            await one_request(client, args, prompts[0], prefix_of(0))
        bar = tqdm(total=len(prompts), desc="requests", disable=args.no_progress)

        async def limited(p: str, prefix: str) -> Result:
            async with sem:
                r = await one_request(client, args, p, prefix)
            bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(p, prefix_of(i))))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "base_url": args.base_url, "model": args.model, "endpoint": args.endpoint,
        "num_prompts": len(prompts), "prefix_len": args.prefix_repetition_prefix_len,
        "num_prefixes": len(prefixes), "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itls]), "e2el_ms": _stats([r.e2e for r in ok]),
    }
    return summary


def print_summary(s: dict) -> None:
    print("============ Serving Benchmark Result ============")
    rows = [
        ("Successful requests", s["successful_requests"]), ("Failed requests", s["failed_requests"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for name, key in (("Time to First Token", "ttft_ms"), ("Time per Output Token (excl. 1st token)", "tpot_ms"),
                      ("Inter-token Latency", "itl_ms"), ("End-to-end Latency", "e2el_ms")):
        rows.append((f"---{name}---", ""))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {key.split('_')[0].upper()} (ms)", f"{s[key][stat]:.2f}"))
    for name, value in rows:
        print(f"{name:<42}{value}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    print("==================================================")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--random-input-len", type=int, default=None, help="random prompts of this many words/tokens")
    p.add_argument("--random-output-len", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--tokenizer", default=None, help="make random prompts of exact token length with this tokenizer")
    p.add_argument("--dataset", default=None, help="JSONL with a 'prompt' (or 'text') per line")
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=0,
                   help="a shared prefix of this many words/tokens before every prompt (chat: the system message)")
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=1, help="distinct shared prefixes")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (servers that support it)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", action="store_true", help="send one request before timing")
    p.add_argument("--save-result", default=None, help="write the summary JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    summary = asyncio.run(run(args))
    print_summary(summary)
    if args.save_result:
        Path(args.save_result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_result).write_text(json.dumps(summary, indent=2))
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
