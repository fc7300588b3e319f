"""Run every core benchmark, write ``bench/results/core.json`` and print a markdown table.

Usage (from the repository root, with the venv active)::

    HF_HUB_OFFLINE=1 python bench/run_all.py

``--repeats`` changes the number of timed rounds (default 3, 5 for steering), ``--memory-sizes`` the
conversation counts of the memory benchmark (default 200 2000), ``--threads`` the number of torch
intra-op threads here and in the child processes (default: torch's default, one per core). On a machine
shared with other busy processes use ``--threads 1``: two OpenMP threads that keep waiting for each
other at barriers while one of them is descheduled made the same work take 2-15x longer, run to run.
The tables are also written to ``bench/results/core.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_capture
import bench_load
import bench_memory
import bench_steering
import torch
import transformers
from common import Timing, load_lm, log, paired_speedup

import personavec

RESULTS = Path(__file__).parent / "results"
SOURCES = ("activations.py", "conversations.py", "generation.py", "models.py", "steering.py")
FLAT_FRACTION = 0.05  # "flat": peak RSS grows by less than 5% of the smaller run's peak


def timed_section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one benchmark, recording its wall time and the machine's load average around it."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = fn()
    result["wall_s"] = time.perf_counter() - start
    result["loadavg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    log(f"{name}: done in {result['wall_s']:.0f} s")
    return result


def pct(x: float) -> str:
    return f"{x:.2f}x"


def status(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


CAPTURE_VARIANTS = {
    "lm_naive": "(a) full LM with head, 1 batch of 32 padded to the longest",
    "backbone_naive": "(b) backbone only, 1 batch of 32 padded to the longest: **baseline**",
    "backbone_bucketed": "(b') backbone only, sorted by length, batches of 8",
    "backbone_same_batches": "(b'') backbone only, on the batches capture forms (no hooks)",
    "paper_loop": "(c) paper: 1 example at a time, full LM, output_hidden_states",
    "capture_all": (
        "(d) capture_activations, all layers, response_mean (2 batches at once, 1 intra-op thread each)"
    ),
    "capture_all_one_stream": "(d1) the same with workers=1 (1 batch at a time, 2 intra-op threads)",
    "capture_all_3pool": "(d') capture_activations, all layers, 3 default poolings",
    "capture_l20": "(e) capture_activations, layers=[20]",
}


def capture_section(r: dict[str, Any]) -> list[str]:
    d = r["data"]
    wall, cpu = r["tokens_per_s"], r["cpu_tokens_per_s"]

    def vs(name: str, ref: str) -> str:
        # The same paired-rounds ratio as bench_capture's targets (common.paired_speedup).
        fast = Timing(name, r["seconds"][name], r["cpu_seconds"][name])
        slow = Timing(ref, r["seconds"][ref], r["cpu_seconds"][ref])
        return f"{pct(paired_speedup(fast, slow))} / {pct(paired_speedup(fast, slow, cpu=True))}"

    throughput = [
        [desc, f"{wall[k]:,.0f}", f"{cpu[k]:,.0f}", vs(k, "backbone_naive"), vs(k, "paper_loop")]
        for k, desc in CAPTURE_VARIANTS.items()
    ]
    targets = []
    for (a, b), x in bench_capture.TARGETS.items():
        key = f"{a} / {b}"
        targets.append(
            [
                f"{a} >= {pct(x)} of {b}",
                f"{pct(r['ratios'][key])} / {pct(r['cpu_ratios'][key])}",
                f"{status(r['targets'][f'{key} >= {x}'])} / {status(r['cpu_targets'][f'{key} >= {x}'])}",
            ]
        )
    return [
        f"**Activation capture**: {d['conversations']} conversations of {d['min_tokens']}..{d['max_tokens']} "
        f"tokens, {d['real_tokens']:,} real tokens; computed with padding: {d['padded_tokens_naive']:,} in "
        f"one batch, {d['padded_tokens_bucketed']:,} in sorted batches of 8, {d['padded_tokens_capture']:,} "
        f"in capture's own {len(d['capture_batch_shapes'])} batches "
        f"({', '.join('x'.join(map(str, b)) for b in d['capture_batch_shapes'])}). Tokenising the "
        f"{d['conversations']} conversations (inside capture's timings) takes {d['encode_s'] * 1000:.0f} ms. "
        f"Tokens/s are real tokens over the median wall time and over the median process CPU time.",
        "",
        *table(
            ["Variant", "tok/s (wall)", "tok/s (CPU)", "vs (b), wall / CPU", "vs (c), wall / CPU"], throughput
        ),
        *table(["Target", "Ratio, wall / CPU", "Status, wall / CPU"], targets),
    ]


def steering_section(r: dict[str, Any]) -> list[str]:
    wall, cpu = r["tokens_per_s"], r["cpu_tokens_per_s"]
    rows = []
    for mode in r["targets"]:
        plain, steered = f"{mode}_plain", f"{mode}_steered"
        rows.append(
            [
                f"{mode} ({r['steps'][plain]} / {r['steps'][steered]} steps)",
                f"{wall[plain]:,.1f} / {cpu[plain]:,.1f}",
                f"{wall[steered]:,.1f} / {cpu[steered]:,.1f}",
                f"{pct(r['steered_over_plain'][mode])} / {pct(r['cpu_steered_over_plain'][mode])}",
                f"{status(r['targets'][mode])} / {status(r['cpu_targets'][mode])}",
            ]
        )
    return [
        f"**Steered generation**: batch {bench_steering.BATCH}, {bench_steering.NEW_TOKENS} new tokens, "
        f"steer(layers={bench_steering.LAYER}, coef={bench_steering.COEF}) with the demo vector; target: "
        f"steered >= {pct(bench_steering.TARGET)} of unsteered tokens/s.",
        "",
        *table(
            [
                "Sampling",
                "Unsteered tok/s, wall / CPU",
                "Steered tok/s, wall / CPU",
                "Ratio, wall / CPU",
                "Status, wall / CPU",
            ],
            rows,
        ),
    ]


def load_section(r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    rows = [
        [
            "First load, fresh cache, new process (GGUF conversion)",
            f"{s['first_process_s']:.1f} s",
            f"{s['first_load_s']:.1f} s",
        ],
        [
            "Cached load, new process",
            f"{s['cached_process_s']:.1f} s",
            f"{s['cached_load_s']:.2f} s ({s['cached_load_warm_median_s']:.2f} s when repeated in-process)",
        ],
    ]
    return [
        f"**Embedded model load** (imports alone: {s['import_s']:.1f} s):",
        "",
        *table(["Load", "Whole process", "load_model() only, imports excluded"], rows),
    ]


def memory_section(r: dict[str, Any]) -> list[str]:
    runs = r["runs"]
    sizes = sorted({int(k.split("_")[1]) for k in runs})
    rows = []
    for mode, desc in (("iter", "iter_activations, running sum"), ("capture", "capture_activations")):
        small, large = runs[f"{mode}_{sizes[0]}"], runs[f"{mode}_{sizes[-1]}"]
        # Growth within the largest run over its second half (see bench_memory.py for why).
        growth = large["peak_mb"] - large["half_peak_mb"]
        flat = growth <= FLAT_FRACTION * large["half_peak_mb"]
        rows.append(
            [
                desc,
                f"{small['peak_mb']:,.0f} / {large['peak_mb']:,.0f}",
                f"{large['early_peak_mb']:,.0f} -> {large['half_peak_mb']:,.0f} -> {large['peak_mb']:,.0f} "
                f"({growth:+,.0f})",
                f"{large['seconds']:.0f} s",
                (status(flat) if mode == "iter" else ("flat" if flat else "grows")),
            ]
        )
    return [
        f"**Peak memory** (VmHWM, MB), all layers, response_mean, ~60-token conversations, one process per "
        f"run; target for streaming: flat, i.e. the peak grows by < {FLAT_FRACTION:.0%} over the second half "
        f"of N={sizes[-1]} (capture_activations keeps its [N, L+1, d] result, so it grows):",
        "",
        *table(
            [
                "Capture",
                f"Peak, N={sizes[0]} / N={sizes[-1]}",
                f"N={sizes[-1]}: after 10% -> 50% -> end (second half)",
                f"Time for N={sizes[-1]}",
                "Status",
            ],
            rows,
        ),
    ]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    load = meta["loadavg_1min"]
    header = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; {meta['machine']}; {meta['torch_threads']} torch thread(s); torch "
        f"{meta['torch']}, transformers {meta['transformers']}; total {meta['wall_s'] / 60:.1f} min; 1-min "
        f"load average {load['before']:.1f} before, {load['after']:.1f} after "
        f"(other processes share the cores). Each variant warmed up once, then timed in interleaved rounds: "
        f"tokens/s use the median time, ratios the median of the per-round paired ratios.",
        "",
    ]
    sections = (
        capture_section(results["capture"])
        + steering_section(results["steering"])
        + load_section(results["load"])
        + memory_section(results["memory"])
    )
    return "\n".join(header + sections).rstrip() + "\n"


def source_hashes() -> dict[str, str]:
    """Short hashes of the personavec modules measured, to tell which version of the code ran."""
    package = Path(personavec.__file__).parent
    return {name: hashlib.sha256((package / name).read_bytes()).hexdigest()[:12] for name in SOURCES}


def in_process(repeats: int | None) -> dict[str, Any]:
    """The benchmarks that share one model loaded in this process."""
    lm = load_lm()
    capture_repeats = repeats or bench_capture.REPEATS
    steering_repeats = repeats or bench_steering.REPEATS
    return {
        "capture": timed_section("capture", lambda: bench_capture.run(lm, capture_repeats)),
        "steering": timed_section("steering", lambda: bench_steering.run(lm, steering_repeats)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 3, steering 5)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=list(bench_memory.SIZES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the child processes

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    sources = source_hashes()
    results: dict[str, Any] = {}
    # The child-process benchmarks first, while this process is small: load times a fresh conversion, and
    # a child's ru_maxrss starts at its parent's peak (see bench_memory.py).
    results["load"] = timed_section("load", bench_load.run)
    results["memory"] = timed_section("memory", lambda: bench_memory.run(tuple(args.memory_sizes)))
    results.update(in_process(args.repeats))
    results["meta"] = {
        "command": "HF_HUB_OFFLINE=1 python bench/run_all.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "personavec_sources": sources,
        "sources_changed_during_run": source_hashes() != sources,
        "repeats": args.repeats,
        "wall_s": time.perf_counter() - start,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    if results["meta"]["sources_changed_during_run"]:
        log("WARNING: personavec's sources changed during the run; results mix two versions")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (RESULTS / "core.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
