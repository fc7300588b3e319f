"""Embedded model load time: first load (GGUF conversion) against a cached load, each in a fresh process.

Both runs use the same new, empty ``PERSONAVEC_CACHE`` folder: the first converts the GGUF file and
caches the result, the second loads the cached folder. Each reports its whole process wall time (Python
start, imports, load), its import time, and the time of ``load_model()`` alone (imports excluded: the
child imports ``transformers`` and the Llama modeling code before starting the clock). The cached child
also loads twice more, to show the load time once the files are in the page cache.

Run alone: ``python bench/bench_load.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import log

CACHED_REPEATS = 3

CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama
from personavec.core.models import load_model
t1 = time.perf_counter()
loads = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    lm = load_model()
    loads.append(time.perf_counter() - start)
    del lm
print(json.dumps({"import_s": t1 - t0, "load_s": loads}))
"""


def child(cache: str, loads: int) -> dict[str, Any]:
    """Run one loading process; returns its wall time and the times it measured itself."""
    env = {**os.environ, "PERSONAVEC_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(loads)], env=env, capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    return {"process_wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def run() -> dict[str, Any]:
    """First (converting) and cached loads in a fresh temporary cache."""
    with tempfile.TemporaryDirectory(prefix="personavec-bench-cache-") as cache:
        log("load: first load (converts the GGUF file)")
        first = child(cache, 1)
        log("load: cached load")
        cached = child(cache, CACHED_REPEATS)
    return {
        "first": first,
        "cached": cached,
        "summary": {
            "first_process_s": first["process_wall_s"],
            "first_load_s": first["load_s"][0],
            "cached_process_s": cached["process_wall_s"],
            "cached_load_s": cached["load_s"][0],
            "cached_load_warm_median_s": statistics.median(cached["load_s"][1:]),
            "import_s": cached["import_s"],
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
