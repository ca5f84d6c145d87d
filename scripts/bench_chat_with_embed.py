"""Chat throughput of a chat + embedding server with and without a concurrent embedding load.

Against a running server holding both models (e.g. ``configs/chat_and_embed.yaml``): the chat
workload of ``bench_serving.py`` runs alone, then again while ``--embed-clients`` clients post
``/v1/embeddings`` batches of ``--embed-batch`` sentences in a loop until the chat workload ends;
both rounds ``--repeats`` times, alternating. Prints chat output tok/s per round and the embedding
rate during the loaded rounds.

  python -m jaxserve.serve --config configs/chat_and_embed.yaml &
  python scripts/bench_chat_with_embed.py --chat-model SmolLM2-135M-Instruct --embed-model all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving  # noqa: E402


async def embed_load(args: argparse.Namespace, stop: asyncio.Event) -> tuple[int, float]:
    """Posts embedding batches from ``args.embed_clients`` clients until ``stop``; (sentences, seconds)."""
    rng = random.Random(args.seed)
    batches = [[" ".join(rng.choices(bench_serving.WORDS, k=rng.randint(8, 28))) for _ in range(args.embed_batch)]
               for _ in range(8)]
    done = 0

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        nonlocal done
        k = i
        while not stop.is_set():
            r = await client.post("/v1/embeddings", json={"model": args.embed_model, "input": batches[k % len(batches)]})
            r.raise_for_status()
            done += len(r.json()["data"])
            k += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(args.embed_clients)))
    return done, time.perf_counter() - start


async def one_round(args: argparse.Namespace, chat_args: argparse.Namespace, loaded: bool) -> dict:
    """One chat workload, alone or beside the embedding load."""
    stop = asyncio.Event()
    load = asyncio.create_task(embed_load(args, stop)) if loaded else None
    if load is not None:
        await asyncio.sleep(1.0)  # the embedding load is running before the chat requests arrive
    summary = await bench_serving.run(chat_args)
    stop.set()
    sentences, seconds = await load if load is not None else (0, 1.0)
    return {"loaded": loaded, "chat_tok_s": summary["output_throughput"], "failed": summary["failed_requests"],
            "ttft_ms": summary["ttft_ms"]["mean"], "embed_per_s": sentences / seconds if loaded else 0.0}


async def main_async(args: argparse.Namespace) -> list[dict]:
    chat_args = argparse.Namespace(
        base_url=args.base_url, model=args.chat_model, endpoint="chat", num_prompts=args.num_prompts,
        random_input_len=None, random_output_len=args.output_len, tokenizer=None, dataset=None,
        request_rate=float("inf"), max_concurrency=args.num_prompts, temperature=0.0, ignore_eos=True,
        api_key=None, seed=args.seed, warmup=True, save_result=None, no_progress=True,
    )
    rounds = []
    for _ in range(args.repeats):
        for loaded in (False, True):
            r = await one_round(args, chat_args, loaded)
            print(r, flush=True)
            rounds.append(r)
    return rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--chat-model", required=True)
    p.add_argument("--embed-model", required=True)
    p.add_argument("--num-prompts", type=int, default=16, help="concurrent chat requests")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--embed-clients", type=int, default=4)
    p.add_argument("--embed-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rounds = asyncio.run(main_async(args))
    alone = [r["chat_tok_s"] for r in rounds if not r["loaded"]]
    loaded = [r for r in rounds if r["loaded"]]
    print(f"chat tok/s alone: {', '.join(f'{x:.1f}' for x in alone)}")
    print("chat tok/s with embedding load: " + ", ".join(f"{r['chat_tok_s']:.1f}" for r in loaded)
          + "; embeddings/s: " + ", ".join(f"{r['embed_per_s']:.1f}" for r in loaded))
    return 0 if all(r["failed"] == 0 for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
