"""Screening throughput on the embedded model: ``personavec screen`` against the capture ceiling, and on Ray.

Data: system+user+assistant chat JSONL rows of 40..160 tokens (``common``'s hand-written sentences),
one vector (the demo's cruel-minus-kind direction) read at layer 20. Samples/s is samples over the
screening loop's seconds (``summary.json``'s ``screen_seconds``: read, score, write records; not the
dataset statistics after it); the whole ``screen()`` call is reported beside it. Variants, timed in
interleaved rounds (rotating order) after one untimed warm-up each on a few rows:

* ``capture``: the ceiling, ``capture_activations(layers=[20], poolings=(response_mean,))`` on the same
  conversations, already in memory, in one call (so it buckets lengths over the whole set);
* ``cheap``: ``screen(cheap=True)`` in this process, default batch size (64);
* ``cheap_ray1`` / ``cheap_ray2``: the same on a local Ray cluster, 1 worker x 2 threads, 2 workers x 1
  thread (the ``--ray --ray-workers N`` defaults on 2 cores);
* ``full``, ``full_ray1``, ``full_ray2``: full mode (the default 8 own answers of 64 new tokens per
  prompt) on fewer rows, batch size 32, so that two Ray workers get a batch each at a time; their
  generation and capture seconds come from the summary (summed over workers, so on Ray they exceed the
  wall time);
* ``full_greedy``: full mode in this process with one greedy own answer per prompt (``--own-samples 1``).

The Ray cluster is declared with logical CPUs for every variant's actors (8), so that each variant's
idle actors can wait between rounds with their replica loaded; only one variant runs at a time, on the
machine's cores. Actor start-up (model load) is timed once and reported apart.

Run: ``HF_HUB_OFFLINE=1 python bench/bench_screen.py [--samples 128] [--full-samples 64] [--rounds 3]
[--full-rounds 2] [--no-ray] [--no-full] [--json OUT]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import conversations_of_length, load_lm, log, mixed_lengths

from personavec.core.activations import capture_activations, response_mean
from personavec.core.conversations import Conversation
from personavec.core.models import LoadedModel
from personavec.screen.run import screen
from personavec.screen.scoring import Scorer, ScreenPlan
from personavec.screen.vectors import resolve_vectors
from personavec.steer.demo import demo_vector

LAYER = 20
MIN_TOKENS, MAX_TOKENS = 40, 160
CHEAP_BATCH, FULL_BATCH = 64, 32
MAX_NEW_TOKENS = 64
WARMUP_ROWS = 8
RAY_LOGICAL_CPUS = 8  # 1x2 + 2x1 threads, cheap and full: every variant's actors stay up


def write_jsonl(path: Path, conversations: list[Conversation]) -> Path:
    """The conversations as chat JSONL rows (``{"messages": [...]}``)."""
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": conv}) + "\n")
    return path


def screen_run(
    lm: LoadedModel, data: Path, plan: ScreenPlan, out: Path, batch_size: int, scorer: Scorer | None
) -> dict[str, Any]:
    """One screen of ``data`` into a fresh ``out``; its timing (wall and the summary's)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = screen(lm, data, plan, out, batch_size=batch_size, report=False, scorer=scorer)
    timing = dict(result.summary["timing"])
    timing["call_seconds"] = time.perf_counter() - t0
    return timing


def capture_run(lm: LoadedModel, conversations: list[Conversation]) -> dict[str, Any]:
    """The ceiling: one capture call over every conversation at the vector's layer."""
    t0 = time.perf_counter()
    capture_activations(lm, conversations, layers=[LAYER], poolings=(response_mean,))
    seconds = time.perf_counter() - t0
    return {"screen_seconds": seconds, "call_seconds": seconds}


def interleave(
    variants: dict[str, Callable[[], dict[str, Any]]],
    warmups: dict[str, Callable[[], object]],
    rounds: int,
) -> dict[str, list[dict[str, Any]]]:
    """Warm every variant up once, then ``rounds`` rounds of all, in an order that rotates each round."""
    for name, fn in warmups.items():
        log(f"warm-up {name}")
        fn()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(variants[name]())
            log(f"round {r + 1} {name}: {runs[name][-1]['screen_seconds']:.1f} s")
    return runs


def summarise(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Median loop and call seconds, samples/s over them, and the median time split."""

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    loop, call = med("screen_seconds"), med("call_seconds")
    assert loop is not None and call is not None
    return {
        "samples": n,
        "rounds": len(runs),
        "loop_seconds": loop,
        "samples_per_second": n / loop,
        "samples_per_second_whole_call": n / call,
        "generation_seconds": med("generation_seconds"),
        "capture_seconds": med("capture_seconds"),
        "other_seconds": med("other_seconds"),
        "runs": runs,
    }


def paired_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Median over rounds of ``b_i / a_i`` loop seconds: a's throughput relative to b's, paired by round."""
    return statistics.median(y["screen_seconds"] / x["screen_seconds"] for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--full-samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full-rounds", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="Write every timing here.")
    args = parser.parse_args()

    load_before, t_start = os.getloadavg(), time.perf_counter()
    lm = load_lm()
    log(f"torch threads: {torch.get_num_threads()}, load average {load_before[0]:.1f}")
    conversations = conversations_of_length(lm.tokenizer, mixed_lengths(args.samples, MIN_TOKENS, MAX_TOKENS))
    vectors = resolve_vectors([(demo_vector(lm), LAYER)], lm.info)
    plans = {
        "cheap": ScreenPlan(vectors, cheap=True),
        "full": ScreenPlan(vectors, max_new_tokens=MAX_NEW_TOKENS),
        "full_greedy": ScreenPlan(vectors, own_samples=1, max_new_tokens=MAX_NEW_TOKENS),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    data = write_jsonl(tmp / "data.jsonl", conversations)
    full_data = write_jsonl(tmp / "full.jsonl", conversations[: args.full_samples])
    warm_data = write_jsonl(tmp / "warm.jsonl", conversations[:WARMUP_ROWS])

    def run(name: str, mode: str, scorer: Scorer | None) -> Callable[[], dict[str, Any]]:
        src, batch = (data, CHEAP_BATCH) if mode == "cheap" else (full_data, FULL_BATCH)
        return lambda: screen_run(lm, src, plans[mode], tmp / name, batch, scorer)

    def warm(name: str, mode: str, scorer: Scorer | None) -> Callable[[], object]:
        return lambda: screen_run(lm, warm_data, plans[mode], tmp / f"warm-{name}", 4, scorer)

    startup: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        scorers: dict[str, Scorer | None] = {"": None}
        if not args.no_ray:
            import ray

            from personavec.screen.distributed import LOCAL_SYSTEM_CONFIG, RayOptions, ray_scorer

            t0 = time.perf_counter()
            # The settings `--ray` starts its own local cluster with (workers at normal priority).
            ray.init(
                address="local",
                num_cpus=RAY_LOGICAL_CPUS,
                include_dashboard=False,
                log_to_driver=False,
                _system_config=LOCAL_SYSTEM_CONFIG,
            )
            stack.callback(ray.shutdown)
            startup["cluster"] = time.perf_counter() - t0
            for workers in (1, 2):
                for mode in ("cheap",) if args.no_full else ("cheap", "full"):
                    t0 = time.perf_counter()
                    options = RayOptions(workers=workers, threads=2 // workers)
                    scorers[f"{mode}_ray{workers}"] = stack.enter_context(
                        ray_scorer(None, plans[mode], fingerprint=lm.info.fingerprint, options=options)
                    )
                    startup[f"{mode}_ray{workers}"] = time.perf_counter() - t0
            log("Ray start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()))

        cheap_variants: dict[str, Callable[[], dict[str, Any]]] = {
            "capture": lambda: capture_run(lm, conversations)
        }
        cheap_warm: dict[str, Callable[[], object]] = {
            "capture": lambda: capture_run(lm, conversations[:WARMUP_ROWS])
        }
        full_variants: dict[str, Callable[[], dict[str, Any]]] = {}
        full_warm: dict[str, Callable[[], object]] = {}
        for suffix in ("", "_ray1", "_ray2"):
            if suffix and args.no_ray:
                continue
            cheap_variants["cheap" + suffix] = run("cheap" + suffix, "cheap", scorers.get("cheap" + suffix))
            cheap_warm["cheap" + suffix] = warm("cheap" + suffix, "cheap", scorers.get("cheap" + suffix))
            if not args.no_full:
                full_variants["full" + suffix] = run("full" + suffix, "full", scorers.get("full" + suffix))
                full_warm["full" + suffix] = warm("full" + suffix, "full", scorers.get("full" + suffix))
        if not args.no_full:
            full_variants["full_greedy"] = run("full_greedy", "full_greedy", None)
            full_warm["full_greedy"] = warm("full_greedy", "full_greedy", None)
        cheap_runs = interleave(cheap_variants, cheap_warm, args.rounds)
        full_runs = interleave(full_variants, full_warm, args.full_rounds) if full_variants else {}

    results = {name: summarise(r, args.samples) for name, r in cheap_runs.items()}
    results.update({name: summarise(r, args.full_samples) for name, r in full_runs.items()})
    ratios = {
        f"{name}/capture": paired_ratio(cheap_runs[name], cheap_runs["capture"])
        for name in cheap_runs
        if name != "capture"
    }
    ratios.update(
        {f"{n}/full": paired_ratio(full_runs[n], full_runs["full"]) for n in full_runs if n != "full"}
    )
    report = {
        "model": lm.info.id,
        "layer": LAYER,
        "tokens": [MIN_TOKENS, MAX_TOKENS],
        "max_new_tokens": MAX_NEW_TOKENS,
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "total_minutes": (time.perf_counter() - t_start) / 60,
        "ray_startup_seconds": startup,
        "variants": results,
        "ratios": ratios,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The results table (what bench/README.md shows)."""
    lines = [
        "| Variant | Samples | Samples/s (loop) | Samples/s (whole call) | vs ceiling / vs full, paired "
        "| Generation s | Capture s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        ratio = report["ratios"].get(f"{name}/capture") or report["ratios"].get(f"{name}/full")
        gen, cap = v["generation_seconds"], v["capture_seconds"]
        lines.append(
            f"| {name} | {v['samples']} | {v['samples_per_second']:.2f} "
            f"| {v['samples_per_second_whole_call']:.2f} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} | {'-' if gen is None else f'{gen:.1f}'} "
            f"| {'-' if cap is None else f'{cap:.1f}'} |"
        )
    load = report["loadavg_1min"]
    lines.append("")
    lines.append(
        f"{report['cpus']} CPUs, {report['torch_threads']} torch threads, torch {report['torch']}; "
        f"1-min load average {load['before']:.1f} before, {load['after']:.1f} after; "
        f"{report['total_minutes']:.1f} min in all; Ray start-up (s): "
        + (", ".join(f"{k} {v:.1f}" for k, v in report["ray_startup_seconds"].items()) or "-")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
