"""Monitoring cost on the embedded model (CPU, float32).

(a) ``monitor`` on a batch of 32 prompts with 3 vectors (layers 10, 15, 20) against one plain backbone
    forward pass over the same, already tokenised batch that stops after block 20 (the deepest layer
    used): the ratio says what tokenising, hooks and projections add to the one pass monitoring needs.
(b) ``monitor(..., generate=True)`` with per-token tracing of the same 3 vectors against plain
    ``generate``: 8 prompts x 48 new tokens, greedy, so both variants produce the same tokens. The
    monitored run does one extra decoding step (to read the last token's activation), included here.

Variants are interleaved in ABBA order (the first variant leads in even rounds, the second in odd ones,
so a slow drift of background load hits both alike). We report each variant's median and, because a
shared machine's load changes between rounds, also the median of the per-round ratios.
Run alone: ``python bench/bench_monitor.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import QUESTIONS, SYSTEMS, Timing, load_lm, log

from personavec.core.activations import pad_batch
from personavec.core.conversations import encode
from personavec.core.generation import SamplingParams, generate
from personavec.core.vectors import PersonaVector, VectorMeta
from personavec.monitor.monitoring import monitor

LAYERS = (10, 15, 20)
BATCH_PROMPTS = 32
GEN_PROMPTS = 8
NEW_TOKENS = 48
REPEATS = {"forward": 8, "generate": 6}  # even, so each variant leads equally often
OPEN_ENDED = (  # so that answers run the full 48 tokens
    "Describe, in detail, how to plan a week-long road trip across a large country.",
    "Write a long story about a lighthouse keeper and a lost cat.",
    "Explain step by step how bread is made, from flour to the finished loaf.",
    "List twenty things to do on a rainy afternoon and explain each one.",
    "Describe the water cycle in detail for a curious student.",
    "Write a detailed guide to starting a vegetable garden on a balcony.",
    "Explain how a computer boots, from pressing the power button to the login screen.",
    "Tell me everything you know about the history of the bicycle.",
)


class _Stop(Exception):
    pass


def vectors(lm: Any) -> list[PersonaVector]:
    """Three random vectors with recommended layers 10, 15 and 20 (their values do not affect cost)."""
    out = []
    for i, layer in enumerate(LAYERS):
        g = torch.Generator().manual_seed(i)
        meta = VectorMeta(
            trait=f"trait{i}",
            model_id=lm.info.id,
            model_fingerprint=lm.info.fingerprint,
            n_blocks=lm.info.n_blocks,
            hidden_size=lm.info.hidden_size,
            extra={"recommended_layer": layer},
        )
        out.append(PersonaVector(torch.randn(lm.info.n_blocks + 1, lm.info.hidden_size, generator=g), meta))
    return out


def prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` system + user prompts of mixed lengths."""
    return [
        [
            {"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
            {"role": "user", "content": QUESTIONS[(i // len(SYSTEMS) + i) % len(QUESTIONS)]},
        ]
        for i in range(n)
    ]


def plain_forward(lm: Any, convs: list[list[dict[str, str]]]) -> Callable[[], object]:
    """One backbone pass over the pre-tokenised batch, stopped after the deepest block used."""
    ids, layout, positions = pad_batch(
        [encode(lm.tokenizer, c) for c in convs], int(lm.tokenizer.pad_token_id), "right", lm.device
    )

    def stop(*_args: object) -> None:
        raise _Stop

    def fn() -> object:
        handle = lm.blocks[max(LAYERS) - 1].register_forward_hook(stop)
        try:
            with torch.inference_mode(), contextlib.suppress(_Stop):
                lm.backbone(
                    input_ids=ids,
                    attention_mask=layout.attention_mask,
                    position_ids=positions,
                    use_cache=False,
                )
        finally:
            handle.remove()
        return None

    return fn


def paired_rounds(
    baseline: Callable[[], object], monitored: Callable[[], object], repeats: int
) -> tuple[Timing, Timing, list[float]]:
    """Warm up both, then ``repeats`` ABBA-ordered rounds; returns both timings and per-round ratios."""
    baseline()
    monitored()
    timings = (Timing("baseline"), Timing("monitored"))
    fns = (baseline, monitored)
    for r in range(repeats):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            fns[which]()
            timings[which].seconds.append(time.perf_counter() - start)
    ratios = [m / b for b, m in zip(timings[0].seconds, timings[1].seconds)]
    return timings[0], timings[1], ratios


def count_passes(lm: Any, fn: Callable[[], object]) -> int:
    """Forward passes of the model during ``fn()``."""
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


def run(lm: Any) -> dict[str, Any]:
    """Time both comparisons; returns medians, the forward ratio and the generation overhead."""
    vecs = vectors(lm)
    batch = prompts(BATCH_PROMPTS)
    log(f"(a) monitor {BATCH_PROMPTS} prompts x {len(vecs)} vectors vs one forward up to layer {max(LAYERS)}")
    fwd_base, fwd_mon, fwd_ratios = paired_rounds(
        plain_forward(lm, batch),
        lambda: monitor(lm, vecs, batch, batch_size=BATCH_PROMPTS),
        REPEATS["forward"],
    )
    gen_convs = [[{"role": "user", "content": p}] for p in OPEN_ENDED[:GEN_PROMPTS]]
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    gen_variants: dict[str, Callable[[], object]] = {
        "generate": lambda: generate(lm, gen_convs, params, batch_size=GEN_PROMPTS),
        "generate_monitored": lambda: monitor(
            lm, vecs, gen_convs, generate=True, params=params, batch_size=GEN_PROMPTS
        ),
    }
    log(f"(b) generate {GEN_PROMPTS} x {NEW_TOKENS} tokens with and without per-token monitoring")
    gen_base, gen_mon, gen_ratios = paired_rounds(
        gen_variants["generate"], gen_variants["generate_monitored"], REPEATS["generate"]
    )
    traced = monitor(lm, vecs, gen_convs, generate=True, params=params, batch_size=GEN_PROMPTS)
    return {
        "forward_seconds": {"plain_forward": fwd_base.seconds, "monitor": fwd_mon.seconds},
        "generate_seconds": {"generate": gen_base.seconds, "generate_monitored": gen_mon.seconds},
        "forward_medians": {"plain_forward": fwd_base.median, "monitor": fwd_mon.median},
        "generate_medians": {"generate": gen_base.median, "generate_monitored": gen_mon.median},
        "monitor_over_forward": fwd_mon.median / fwd_base.median,
        "monitor_over_forward_paired": statistics.median(fwd_ratios),
        "generation_overhead_pct": 100.0 * (gen_mon.median / gen_base.median - 1.0),
        "generation_overhead_pct_paired": 100.0 * (statistics.median(gen_ratios) - 1.0),
        "passes": {k: count_passes(lm, fn) for k, fn in gen_variants.items()},
        "traced_tokens_per_answer": sorted({len(r.token_ids or ()) for r in traced}),
        "load_average_1m": os.getloadavg()[0],
    }


def markdown(result: dict[str, Any]) -> str:
    """The results as a small markdown table."""
    f, g = result["forward_medians"], result["generate_medians"]
    passes = result["passes"]
    rows = [
        "| measurement | baseline median (s) | monitored median (s) | ratio of medians "
        "| median of paired ratios |",
        "|---|---:|---:|---:|---:|",
        f"| (a) {BATCH_PROMPTS} prompts, 3 vectors (layers {', '.join(map(str, LAYERS))}) vs one forward "
        f"to layer {max(LAYERS)} | {f['plain_forward']:.3f} | {f['monitor']:.3f} | "
        f"{result['monitor_over_forward']:.2f}x | {result['monitor_over_forward_paired']:.2f}x |",
        f"| (b) generate {GEN_PROMPTS} x {NEW_TOKENS} tokens, per-token trace of 3 vectors "
        f"({passes['generate']} vs {passes['generate_monitored']} passes) | {g['generate']:.3f} | "
        f"{g['generate_monitored']:.3f} | {result['generation_overhead_pct']:+.1f}% | "
        f"{result['generation_overhead_pct_paired']:+.1f}% |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    res = run(load_lm())
    print(json.dumps(res, indent=2))
    print()
    print(markdown(res))
