"""Run every core benchmark, write ``bench/results/core.json`` and print a markdown table.

Usage (from the repository root, with the venv active)::

    HF_HUB_OFFLINE=1 python bench/run_all.py

``--repeats`` changes the number of timed rounds (default 3), ``--memory-sizes`` the conversation counts of
the memory benchmark (default 200 2000), ``--threads`` the number of torch intra-op threads here and in
the child processes (default: torch's default, one per core). On a machine shared with other busy
processes use ``--threads 1``: two OpenMP threads that keep waiting for each other at barriers while one
of them is descheduled made the same work take 2-15x longer, run to run. The table is also
written to ``bench/results/core.md``.
"""

from __future__ import annotations

import argparse
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
from common import load_lm, log

RESULTS = Path(__file__).parent / "results"
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


def yes(ok: bool) -> str:
    return "met" if ok else "**missed**"


def capture_rows(r: dict[str, Any]) -> list[list[str]]:
    tps, ratio, ok = r["tokens_per_s"], r["ratios"], r["targets"]
    d = r["data"]
    pad = f"{d['padded_tokens_naive']} padded / {d['real_tokens']} real tokens"
    pad_b = f"{d['padded_tokens_bucketed']} padded / {d['real_tokens']} real tokens"
    rows = [
        ("lm_naive", "full LM with head, 1 batch of 32 (naive padding)", pad, "", ""),
        ("backbone_naive", "backbone only, 1 batch of 32 (naive padding): **baseline**", pad, "", ""),
        ("backbone_bucketed", "backbone only, sorted, batches of 8", pad_b, "", ""),
        ("paper_loop", "paper: 1 example at a time, full LM, output_hidden_states", "no padding", "", ""),
        (
            "capture_all",
            "capture_activations, all layers, response_mean",
            f"{ratio['capture_all / backbone_naive']:.0%} of baseline, "
            f"{ratio['capture_all / backbone_bucketed']:.0%} of bucketed, "
            f"{ratio['capture_all / paper_loop']:.2f}x paper",
            ">= 95% of baseline; >= 1.5x paper",
            f"{yes(ok['capture_all >= 95% of backbone_naive'])}; {yes(ok['capture_all >= 1.5x paper_loop'])}",
        ),
        (
            "capture_all_3pool",
            "capture_activations, all layers, 3 default poolings",
            f"{ratio['capture_all_3pool / backbone_naive']:.0%} of baseline",
            "",
            "",
        ),
        (
            "capture_l20",
            "capture_activations, layers=[20] (stops after block 20)",
            f"{ratio['capture_l20 / paper_loop']:.2f}x paper",
            ">= 2.4x paper",
            yes(ok["capture_l20 >= 2.4x paper_loop"]),
        ),
        (
            "capture_all_bs8",
            "capture_activations, all layers, response_mean, batch_size=8",
            f"{ratio['capture_all_bs8 / backbone_naive']:.0%} of baseline, "
            f"{ratio['capture_all_bs8 / backbone_bucketed']:.0%} of bucketed",
            "",
            "",
        ),
        (
            "capture_l20_bs8",
            "capture_activations, layers=[20], batch_size=8",
            f"{ratio['capture_l20_bs8 / paper_loop']:.2f}x paper",
            "",
            "",
        ),
    ]
    return [
        ["Capture", desc, f"{tps[key]:,.0f} tok/s", note, target, status]
        for key, desc, note, target, status in rows
    ]


def steering_rows(r: dict[str, Any]) -> list[list[str]]:
    tps, ratio, ok = r["tokens_per_s"], r["ratios"], r["targets"]
    rows = []
    for mode in ("greedy", "sampled"):
        steps = r["steps"][f"{mode}_plain"]
        rows.append(
            [
                "Steering",
                f"{mode}, unsteered (batch 8, {steps} steps)",
                f"{tps[f'{mode}_plain']:,.0f} tok/s",
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                "Steering",
                f"{mode}, steer(layers=15, coef=2.0)",
                f"{tps[f'{mode}_steered']:,.0f} tok/s",
                f"{ratio[f'{mode}: steered / plain']:.0%} of unsteered",
                ">= 95%",
                yes(ok[f"{mode} steered >= 95% of plain"]),
            ]
        )
    return rows


def load_rows(r: dict[str, Any]) -> list[list[str]]:
    s = r["summary"]
    return [
        [
            "Load",
            "first load, fresh cache (new process, incl. GGUF conversion)",
            f"{s['first_process_s']:.1f} s",
            f"load_model() {s['first_load_s']:.1f} s",
            "",
            "",
        ],
        [
            "Load",
            "cached load (new process)",
            f"{s['cached_process_s']:.1f} s",
            f"imports {s['import_s']:.1f} s",
            "",
            "",
        ],
        [
            "Load",
            "load_model() in-process, cached, imports excluded",
            f"{s['cached_load_s']:.2f} s",
            f"{s['cached_load_warm_median_s']:.2f} s when repeated",
            "",
            "",
        ],
    ]


def memory_rows(r: dict[str, Any]) -> list[list[str]]:
    runs = r["runs"]
    sizes = sorted({int(k.split("_")[1]) for k in runs})
    rows = []
    for mode, desc in (("iter", "iter_activations, running sum"), ("capture", "capture_activations")):
        small, large = runs[f"{mode}_{sizes[0]}"], runs[f"{mode}_{sizes[-1]}"]
        growth = large["peak_mb"] - small["peak_mb"]
        flat = growth <= FLAT_FRACTION * small["peak_mb"]
        rows.append(
            [
                "Memory",
                f"{desc}, N={sizes[0]} -> N={sizes[-1]}, peak RSS",
                f"{small['peak_mb']:,.0f} -> {large['peak_mb']:,.0f} MB",
                f"{growth:+,.0f} MB (peak after warm-up: {small['warm_peak_mb']:,.0f} / "
                f"{large['warm_peak_mb']:,.0f} MB; {large['seconds']:.0f} s for N={sizes[-1]})",
                "flat (< 5%)" if mode == "iter" else "O(N), small",
                yes(flat) if mode == "iter" else ("flat" if flat else "grows"),
            ]
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    header = ["Benchmark", "Measure", "Result", "Notes", "Target", "Status"]
    rows = (
        capture_rows(results["capture"])
        + steering_rows(results["steering"])
        + load_rows(results["load"])
        + memory_rows(results["memory"])
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    meta = results["meta"]
    return "\n".join(
        [
            f"Command: `{meta['command']}`  ",
            f"Date: {meta['date']}; machine: {meta['machine']}; {meta['torch_threads']} torch thread(s); "
            f"torch {meta['torch']}, "
            f"transformers {meta['transformers']}; medians of {meta['repeats']} interleaved rounds; "
            f"total {meta['wall_s'] / 60:.1f} min; 1-min load average "
            f"{meta['loadavg_1min']['before']:.1f} before, {meta['loadavg_1min']['after']:.1f} after.",
            "",
            *lines,
        ]
    )


def in_process(repeats: int) -> dict[str, Any]:
    """The benchmarks that share one model loaded in this process."""
    lm = load_lm()
    return {
        "capture": timed_section("capture", lambda: bench_capture.run(lm, repeats)),
        "steering": timed_section("steering", lambda: bench_steering.run(lm, repeats)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=list(bench_memory.SIZES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the child processes

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    results: dict[str, Any] = {}
    # Load first: it times a fresh conversion in a child process before this process holds a model.
    results["load"] = timed_section("load", bench_load.run)
    results.update(in_process(args.repeats))
    results["memory"] = timed_section("memory", lambda: bench_memory.run(tuple(args.memory_sizes)))
    results["meta"] = {
        "command": "HF_HUB_OFFLINE=1 python bench/run_all.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "wall_s": time.perf_counter() - start,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / "core.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
