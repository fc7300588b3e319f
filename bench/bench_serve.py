"""Server throughput: tokens/s at 1, 8 and 32 concurrent clients against direct library generation.

The server runs in this process (engine thread + uvicorn on 127.0.0.1, a free port); clients are
threads posting non-streamed OpenAI chat requests (greedy, ``--tokens`` tokens with ``ignore_eos`` so
every answer has the same length). The library baselines call ``core.generation.generate`` with one
stream (``workers=1``, like the engine's single worker): 8 prompts one at a time (batch 1) and the same
8 prompts as one batch (batch 8). Library answers are counted in tokens by re-tokenising them (they stop
at the end of turn, so they can be a little shorter than ``--tokens``).

Variants run interleaved round by round (``common.time_interleaved``), medians reported.

Run: ``HF_HUB_OFFLINE=1 python bench/bench_serve.py --rounds 3`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch
from common import QUESTIONS, load_lm, log, time_interleaved

from personavec.core.generation import SamplingParams, generate
from personavec.serve.app import ServerSettings, create_app, serve_in_thread
from personavec.serve.engine import Engine, EngineConfig
from personavec.serve.registry import VectorRegistry


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def client_round(url: str, clients: int, tokens: int, counted: list[int]) -> Callable[[], None]:
    """One round: ``clients`` threads, each sending one request at the same time."""

    def one(i: int) -> int:
        body = {
            "model": "smol",
            "messages": prompt(i),
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    def run() -> None:
        with ThreadPoolExecutor(clients) as pool:
            counted.append(sum(pool.map(one, range(clients))))

    return run


def library_round(lm: Any, batch: int, tokens: int, counted: list[int]) -> Callable[[], None]:
    params = SamplingParams(max_new_tokens=tokens)
    convs = [prompt(i) for i in range(8)]

    def run() -> None:
        answers = generate(lm, convs, params, batch_size=batch, workers=1)
        counted.append(sum(len(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()
    lm = load_lm()
    counts: dict[str, list[int]] = {}
    engine = Engine(lm, VectorRegistry(lm), EngineConfig(max_batch=args.max_batch, max_queue=256))
    app = create_app(engine, ServerSettings("smol", max_tokens=args.tokens))
    with engine, serve_in_thread(app) as url:
        variants: dict[str, Callable[[], None]] = {}
        for batch in (1, 8):
            variants[f"library batch {batch}"] = library_round(
                lm, batch, args.tokens, counts.setdefault(f"library batch {batch}", [])
            )
        for n in (int(c) for c in args.clients.split(",")):
            name = f"server {n} client{'s' if n > 1 else ''}"
            variants[name] = client_round(url, n, args.tokens, counts.setdefault(name, []))
        log(f"timing {len(variants)} variants x {args.rounds} rounds")
        timings = time_interleaved(variants, args.rounds)
        stats = engine.stats
    rows = {}
    for name, timing in timings.items():
        tokens = counts[name][-1]  # the same work every round (greedy)
        rows[name] = {"tokens": tokens, "seconds": timing.median, "tokens_per_s": tokens / timing.median}
        log(f"{name:>18}: {tokens:4d} tokens in {timing.median:6.2f}s = {tokens / timing.median:6.1f} tok/s")
    one = rows["server 1 client"]["tokens_per_s"]
    speedups = {name: r["tokens_per_s"] / one for name, r in rows.items() if name.startswith("server")}
    result = {
        "benchmark": "serve",
        "tokens_per_answer": args.tokens,
        "max_batch": args.max_batch,
        "rounds": args.rounds,
        "rows": rows,
        "server_speedup_over_one_client": speedups,
        "engine": {"peak_batch": stats.peak_batch, "merges": stats.merges, "steps": stats.steps},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
