"""How much batching helps on this machine: backbone tokens/s at batch 1..32 of 200-token inputs.

First, the ceiling under everything else: GFLOP/s of a plain ``linear`` with the embedded model's own
weight shapes at 1 to 6,400 rows (one token, one short example, one ~200-token example, a batch of 32).
Where a 200-row multiply already runs as fast as a 6,400-row one, batching cannot buy speed; only
skipped work can.

Also the paper's loop (full LM, ``output_hidden_states=True``, one example at a time), the LM with
``logits_to_keep=1`` on the same inputs, and batches of 4 run by two Python threads with one intra-op
thread each against one stream with two intra-op threads. A diagnostic for the capture targets, not
part of ``run_all.py`` (about 2 minutes on 2 cores). Random token ids; medians of 3 calls after a warm-up.

Run: ``HF_HUB_OFFLINE=1 python bench/batch_shapes.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from common import load_lm

LENGTH, TOTAL = 200, 32


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def linear_gflops(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> float:
    """GFLOP/s of ``x @ w.T`` for ``x`` of ``[rows, in_features]``, median of 5 after a warm-up."""
    x = torch.randn(rows, in_features, dtype=dtype)
    w = torch.randn(out_features, in_features, dtype=dtype)
    reps = max(1, 200_000_000 // (rows * in_features * out_features))  # ~0.4 GFLOP per timed call

    def call() -> None:
        for _ in range(reps):
            torch.nn.functional.linear(x, w)

    sec = median_seconds(call, repeats=5)
    return 2 * rows * in_features * out_features * reps / sec / 1e9


def matmul_ceiling(lm: object) -> None:
    """Print GFLOP/s for the model's linear shapes at several row counts, float32 and bfloat16."""
    cfg = lm.model.config  # type: ignore[attr-defined]
    d, ff = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shapes = {"q/o proj": (d, d), "k/v proj": (d, kv), "gate/up": (d, ff), "down": (ff, d)}
    shapes["LM head"] = (d, cfg.vocab_size)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (i, o) in shapes.items():
            cells = [f"{rows} rows {linear_gflops(rows, i, o, dtype):.0f}" for rows in (1, 50, 200, 6400)]
            print(f"GFLOP/s {str(dtype)[6:]}, {name} {i}x{o}: " + ", ".join(cells), flush=True)


def main() -> None:
    lm = load_lm()
    matmul_ceiling(lm)
    print(f"torch threads {torch.get_num_threads()}, attention {lm.model.config._attn_implementation}")
    tokens = TOTAL * LENGTH
    with torch.inference_mode():
        for b in (1, 2, 4, 8, 16, 32):
            ids = torch.randint(100, 20000, (b, LENGTH))
            sec = median_seconds(
                lambda ids=ids, b=b: [lm.backbone(input_ids=ids, use_cache=False) for _ in range(TOTAL // b)]
            )
            print(f"backbone, batches of {b} x {LENGTH}: {tokens / sec:.0f} tok/s", flush=True)
        one = torch.randint(100, 20000, (1, LENGTH))
        sec = median_seconds(
            lambda: [lm.model(input_ids=one, output_hidden_states=True) for _ in range(TOTAL)]
        )
        print(f"paper loop, 1 x {LENGTH}: {tokens / sec:.0f} tok/s", flush=True)
        sec = median_seconds(
            lambda: [lm.model(input_ids=one, use_cache=False, logits_to_keep=1) for _ in range(TOTAL)]
        )
        print(f"LM with logits_to_keep=1, 1 x {LENGTH}: {tokens / sec:.0f} tok/s", flush=True)

    four = torch.randint(100, 20000, (4, LENGTH))

    def stream(n: int) -> None:
        with torch.inference_mode():  # thread-local: each worker enters it itself
            for _ in range(n):
                lm.backbone(input_ids=four, use_cache=False)

    threads = torch.get_num_threads()
    sec = median_seconds(lambda: stream(TOTAL // 4))
    print(f"backbone 4 x {LENGTH}, one stream, {threads} intra-op threads: {tokens / sec:.0f} tok/s")

    def two_streams() -> None:
        workers = [threading.Thread(target=stream, args=(TOTAL // 8,)) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    torch.set_num_threads(1)
    sec = median_seconds(two_streams)
    print(f"backbone 4 x {LENGTH}, two Python threads x 1 intra-op thread: {tokens / sec:.0f} tok/s")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
