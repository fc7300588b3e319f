"""One stream with every intra-op thread against parallel streams (``personavec.core.parallel``).

Each step that runs independent batches is timed with ``workers=1`` (one batch at a time, all torch
threads) and with ``workers=2`` (two batches at once, half the threads each), interleaved round by
round on the same inputs:

* capture: ``capture_activations`` over the 32 mixed-length conversations of ``bench_capture.py``;
* generation: ``generate`` of 32 prompts, batches of 16, 48 sampled tokens;
* perplexity judge: ``PerplexityCoherence.log_likelihood`` of 64 answers;
* local judge: ``LocalJudge.score`` of 8 answers (the embedded model judging itself);
* steering sweep: ``sweep`` of the demo vector on the evil trait, 2 layers x 4 strengths x 2
  conditions x 8 questions plus the unsteered baselines (144 answers of 24 greedy tokens, 5 batches),
  each call into a fresh store so nothing is cached.

Run: ``HF_HUB_OFFLINE=1 python bench/bench_streams.py --rounds 3`` (about 12 minutes on 2 cores;
the default is 5 rounds).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (
    QUESTIONS,
    conversations_of_length,
    load_lm,
    log,
    mixed_lengths,
    paired_speedup,
    time_interleaved,
)

from personavec.core.activations import capture_activations, response_mean
from personavec.core.generation import SamplingParams, generate
from personavec.core.store import JsonlStore
from personavec.judging.base import JudgeItem
from personavec.judging.coherence import PerplexityCoherence
from personavec.judging.llm import LocalJudge
from personavec.steer.demo import demo_vector
from personavec.steer.sweep import sweep
from personavec.traits.library import load_trait

STEPS = ("capture", "generation", "perplexity judge", "local judge", "steering sweep")


def build(lm: Any, workers: int) -> dict[str, Callable[[], object]]:
    """The timed calls of every step for one setting of ``workers``."""
    convs = conversations_of_length(lm.tokenizer, mixed_lengths(32, 50, 300))
    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(32)]
    sampled = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.9)
    answers = [str(c[-1]["content"]) for c in convs]
    items = [JudgeItem(QUESTIONS[i % len(QUESTIONS)], a) for i, a in enumerate(answers * 2)]
    perplexity = PerplexityCoherence(lm, workers=workers)
    spec = load_trait("evil")
    local = LocalJudge(lm, spec.judge_prompt, workers=workers)
    vector = demo_vector(lm)

    def steering_sweep() -> object:
        with tempfile.TemporaryDirectory() as tmp:
            return sweep(
                lm, vector, spec, layers=[10, 15], n_questions=8, params=SamplingParams(max_new_tokens=24),
                store=JsonlStore(f"{tmp}/sweep.jsonl"), workers=workers,
            )  # fmt: skip

    return {
        "capture": lambda: capture_activations(lm, convs, poolings=[response_mean], workers=workers),
        "generation": lambda: generate(lm, prompts, sampled, batch_size=16, workers=workers),
        "perplexity judge": lambda: perplexity.log_likelihood(items),
        "local judge": lambda: local.score(items[:8]),
        "steering sweep": steering_sweep,
    }


def run(lm: Any, rounds: int) -> dict[str, Any]:
    one, two = build(lm, 1), build(lm, 2)
    variants = {f"{step} | 1": one[step] for step in STEPS} | {f"{step} | 2": two[step] for step in STEPS}
    timings = time_interleaved(variants, rounds)
    return {
        "rounds": rounds,
        "seconds": {k: t.seconds for k, t in timings.items()},
        "speedup": {s: paired_speedup(timings[f"{s} | 2"], timings[f"{s} | 1"]) for s in STEPS},
        "cpu_speedup": {s: paired_speedup(timings[f"{s} | 2"], timings[f"{s} | 1"], cpu=True) for s in STEPS},
        "median_s": {k: t.median for k, t in timings.items()},
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"Command: `HF_HUB_OFFLINE=1 python bench/bench_streams.py --rounds {r['rounds']}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; medians of {r['rounds']} interleaved rounds, speed-up = "
        "median of the per-round paired ratios.",
        "",
        "| Step | 1 stream x 2 threads (s) | 2 streams x 1 thread (s) | Speed-up, wall / CPU time |",
        "|---|---|---|---|",
    ]
    for s in STEPS:
        lines.append(
            f"| {s} | {r['median_s'][f'{s} | 1']:.2f} | {r['median_s'][f'{s} | 2']:.2f} | "
            f"{r['speedup'][s]:.2f}x / {r['cpu_speedup'][s]:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    log("streams: loading the model")
    result = run(load_lm(), args.rounds)
    print(json.dumps(result, indent=2))
    print(table(result))
