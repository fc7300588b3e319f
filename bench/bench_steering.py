"""Steered sampling throughput: ``generate`` inside ``steer(...)`` against plain ``generate``.

One batch of 8 prompts, 64 new tokens, one steered layer (15, coef 2.0, the demo vector), greedy and
sampled. Throughput counts the tokens the model computed: batch x decoding steps, where the steps are
counted during the timed calls by a pre-hook on the model (one Python call per step, in both variants);
the prompts ask for long answers so that every variant runs all 64 steps. The steered/unsteered ratio is
the median over rounds of the paired time ratio (see ``common.paired_speedup``).

Run alone: ``python bench/bench_steering.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from common import load_lm, log, paired_speedup, time_interleaved

from personavec.core.generation import SamplingParams, generate
from personavec.core.steering import steer
from personavec.core.vectors import PersonaVector
from personavec.steer.demo import demo_vector

BATCH = 8
NEW_TOKENS = 64
LAYER = 15
COEF = 2.0
TARGET = 0.95  # steered tokens/s over unsteered
REPEATS = 5  # generation is short and its wall time swings most on a shared machine
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


class StepCounter:
    """Counts forward passes of the model (= tokens generated per row) in the last call of each variant."""

    def __init__(self) -> None:
        self.calls = 0
        self.steps: dict[str, int] = {}

    def hook(self, *_args: object) -> None:
        self.calls += 1

    def wrap(self, name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def counted() -> object:
            before = self.calls
            out = fn()
            self.steps[name] = self.calls - before
            return out

        return counted


def build_variants(
    lm: Any, vector: PersonaVector, new_tokens: int = NEW_TOKENS
) -> dict[str, Callable[[], object]]:
    """Plain and steered ``generate`` calls, greedy and sampled."""
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
        sized = replace(params, max_new_tokens=new_tokens)
        variants[f"{mode}_plain"] = plain(sized)
        variants[f"{mode}_steered"] = steered(sized)
    return variants


def run(lm: Any, repeats: int = REPEATS) -> dict[str, Any]:
    """Time plain and steered generation; returns tokens/s medians and steered/plain ratios."""
    vector = demo_vector(lm)
    counter = StepCounter()
    variants = {name: counter.wrap(name, fn) for name, fn in build_variants(lm, vector).items()}
    log(f"steering: batch {BATCH}, {NEW_TOKENS} new tokens, layer {LAYER}, coef {COEF}")
    handle = lm.model.register_forward_pre_hook(counter.hook)
    try:
        # Warm-up: every variant once with 8 new tokens (same code path, prefill included).
        timings = time_interleaved(variants, repeats, build_variants(lm, vector, new_tokens=8))
    finally:
        handle.remove()
    steps = counter.steps
    tps = {name: BATCH * steps[name] / t.median for name, t in timings.items()}
    cpu_tps = {name: BATCH * steps[name] / t.cpu_median for name, t in timings.items()}

    def ratio(mode: str, cpu: bool) -> float:
        # Steered over unsteered tokens/s: paired time ratio, corrected should the step counts differ.
        plain, steered = f"{mode}_plain", f"{mode}_steered"
        return paired_speedup(timings[steered], timings[plain], cpu=cpu) * steps[steered] / steps[plain]

    ratios = {mode: ratio(mode, cpu=False) for mode in PARAMS}
    cpu_ratios = {mode: ratio(mode, cpu=True) for mode in PARAMS}
    return {
        "steps": steps,
        "seconds": {name: t.seconds for name, t in timings.items()},
        "cpu_seconds": {name: t.cpu_seconds for name, t in timings.items()},
        "tokens_per_s": tps,
        "cpu_tokens_per_s": cpu_tps,
        "steered_over_plain": ratios,
        "cpu_steered_over_plain": cpu_ratios,
        "targets": {mode: ratios[mode] >= TARGET for mode in PARAMS},
        "cpu_targets": {mode: cpu_ratios[mode] >= TARGET for mode in PARAMS},
    }


if __name__ == "__main__":
    print(json.dumps(run(load_lm()), indent=2))
