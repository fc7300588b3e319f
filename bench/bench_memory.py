"""Peak memory of capture over many conversations: streaming stays flat, collecting grows a little.

Each measurement runs in its own process: load the model, warm up on 32 conversations (the first
forward pass pages in the weights and fills the allocator, which is not what we measure), note the peak
RSS, then capture all layers with ``response_mean`` over N short (~60 token) conversations and note the
peak RSS after the first tenth of the data and at the end:

* ``iter``: ``iter_activations``, keeping only a running sum of the pooled vectors;
* ``capture``: ``capture_activations``, which keeps an ``[N, L + 1, d]`` float32 tensor
  (N x 31 x 576 x 4 bytes: 14 MB for N = 200, 143 MB for N = 2,000).

Peak RSS is read two ways. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is, on Linux, carried over from
the parent across fork/exec: a child of a 3 GB process reports at least 3 GB whatever it does, so the
child also records the value it starts with (``inherited_mb``), and ``run_all.py`` runs this benchmark
before it loads a model itself. ``VmHWM`` from ``/proc/self/status`` is the peak of the child's own
address space only; it is the number the table reports.

Streaming is "flat" when the peak at the end of the largest run exceeds the peak at its half-way point
by less than 5%: memory that grew with the data would set a new peak in the second half. (Until
2026-11-26 the reference was the peak after the first tenth. With two CPU streams, which two batches
happen to run together sets a transient peak, and a tenth of the data is too few batches to have met
the worst pair: a trace of N = 3,000 reached its peak at example 512 and never again, with RSS between
1.10 and 1.25 GB from start to end, yet the tenth-to-end rule read +113 MB on one N = 2,000 run.)

Comparing different N directly mixes in batch shapes: length bucketing puts the longest
conversations first, and a larger N fills fuller batches of them (32 x ~90 tokens at N = 2,000, fewer
rows at N = 200), so the larger run's peak is set in its first seconds whatever happens later.

Run alone: ``python bench/bench_memory.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import log

SIZES = (200, 2000)
MODES = ("iter", "capture")

CHILD = """
import json, resource, sys, time

def ru_maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def vm_hwm_mb():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024

inherited = ru_maxrss_mb()
import torch
from common import conversation, load_lm
from personavec.core.activations import capture_activations, iter_activations, response_mean

mode, n = sys.argv[1], int(sys.argv[2])
lm = load_lm()
capture_activations(lm, [conversation(i, 1 + i % 2) for i in range(32)], poolings=[response_mean])
warm = vm_hwm_mb()
convs = [conversation(i, 1 + i % 2) for i in range(n)]
done, early, half = [0], [None], [None]

def on_batch(k):
    # The peak once a tenth and once half of the data is through (see the module docstring).
    done[0] += k
    if early[0] is None and done[0] >= n // 10:
        early[0] = vm_hwm_mb()
    if half[0] is None and done[0] >= n // 2:
        half[0] = vm_hwm_mb()

start = time.perf_counter()
if mode == "iter":
    total = torch.zeros(lm.info.n_blocks + 1, lm.info.hidden_size)
    for ex in iter_activations(lm, convs, poolings=[response_mean], on_batch=on_batch):
        total += ex.pooled["response_mean"]
else:
    acts = capture_activations(lm, convs, poolings=[response_mean], on_batch=on_batch)
seconds = time.perf_counter() - start
print(json.dumps({
    "warm_peak_mb": warm, "early_peak_mb": early[0], "half_peak_mb": half[0], "peak_mb": vm_hwm_mb(),
    "ru_maxrss_mb": ru_maxrss_mb(), "inherited_mb": inherited, "seconds": seconds,
}))
"""


def child(mode: str, n: int) -> dict[str, Any]:
    """One measurement in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(n)],
        env=env,
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """Peak RSS of every (mode, N); per mode, the growth over the second half of the largest N."""
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        for n in sizes:
            log(f"memory: {mode} over {n} conversations")
            start = time.perf_counter()
            results[f"{mode}_{n}"] = {**child(mode, n), "process_wall_s": time.perf_counter() - start}
    growth = {
        mode: results[f"{mode}_{sizes[-1]}"]["peak_mb"] - results[f"{mode}_{sizes[-1]}"]["half_peak_mb"]
        for mode in MODES
    }
    return {"runs": results, "growth_mb": growth}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
