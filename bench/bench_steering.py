"""Steered sampling throughput: ``generate`` inside ``steer(...)`` against plain ``generate``.

One batch of 8 prompts, 64 new tokens, one steered layer (15, coef 2.0, the demo vector), greedy and
sampled. Throughput counts the tokens the model computed: batch x decoding steps, where the steps are
counted in an untimed rerun (generation is deterministic for a fixed seed), so an early end of sequence
in one variant cannot make it look faster.

Run alone: ``python bench/bench_steering.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from common import load_lm, log, time_interleaved

from personavec.demo import demo_vector
from personavec.generation import SamplingParams, generate
from personavec.steering import steer
from personavec.vectors import PersonaVector

BATCH = 8
NEW_TOKENS = 64
LAYER = 15
COEF = 2.0
REPEATS = 3
PROMPTS = (  # open-ended, so that answers run past 64 tokens
    "Describe, in detail, how to plan a week-long road trip across a large country.",
    "Write a long story about a lighthouse keeper and a lost cat.",
    "Explain step by step how bread is made, from flour to the finished loaf.",
    "List twenty things to do on a rainy afternoon and explain each one.",
    "Describe the water cycle in detail for a curious student.",
    "Write a detailed guide to starting a vegetable garden on a balcony.",
    "Explain how a computer boots, from pressing the power button to the login screen.",
    "Tell me everything you know about the history of the bicycle.",
)
PARAMS = {
    "greedy": SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0),
    "sampled": SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, seed=0),
}


def count_steps(lm: Any, fn: Callable[[], object]) -> int:
    """Forward passes of the model during ``fn()`` (= tokens generated per row)."""
    calls = 0

    def hook(*_args: object) -> None:
        nonlocal calls
        calls += 1

    handle = lm.model.register_forward_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return calls


def build_variants(lm: Any, vector: PersonaVector) -> dict[str, Callable[[], object]]:
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:BATCH]]

    def plain(params: SamplingParams) -> Callable[[], object]:
        return lambda: generate(lm, convs, params, batch_size=BATCH)

    def steered(params: SamplingParams) -> Callable[[], object]:
        def fn() -> object:
            with steer(lm, vector, layers=LAYER, coef=COEF):
                return generate(lm, convs, params, batch_size=BATCH)

        return fn

    variants: dict[str, Callable[[], object]] = {}
    for mode, params in PARAMS.items():
        variants[f"{mode}_plain"] = plain(params)
        variants[f"{mode}_steered"] = steered(params)
    return variants


def run(lm: Any, repeats: int = REPEATS) -> dict[str, Any]:
    """Time plain and steered generation; returns tokens/s medians and steered/plain ratios."""
    vector = demo_vector(lm)
    variants = build_variants(lm, vector)
    log(f"steering: batch {BATCH}, {NEW_TOKENS} new tokens, layer {LAYER}, coef {COEF}")
    timings = time_interleaved(variants, repeats)
    steps = {name: count_steps(lm, fn) for name, fn in variants.items()}
    tps = {name: BATCH * steps[name] / t.median for name, t in timings.items()}
    ratios = {f"{mode}: steered / plain": tps[f"{mode}_steered"] / tps[f"{mode}_plain"] for mode in PARAMS}
    return {
        "steps": steps,
        "seconds": {name: t.seconds for name, t in timings.items()},
        "tokens_per_s": tps,
        "ratios": ratios,
        "targets": {f"{mode} steered >= 95% of plain": ratios[f"{mode}: steered / plain"] >= 0.95
                    for mode in PARAMS},
    }


if __name__ == "__main__":
    print(json.dumps(run(load_lm()), indent=2))
