"""Why capture misses its targets against the paper's per-example loop: a diagnostic, not a benchmark.

Not run by ``run_all.py`` (about 8 minutes on 2 cores). It answers three questions, each with timings
interleaved over 3 rounds and ratios as paired medians against the paper loop:

1. Where does capture's time go? A ``torch.profiler`` table of one ``capture_activations`` call.
2. What does padding cost? ``capture_activations`` with its default length bucketing against the same
   call with ``length_batches(max_padding=0.05)`` patched in, for all layers and for ``layers=[20]``.
3. What is the ceiling? On the issue's reference shape (32 conversations of ~200 tokens, almost no
   padding): the plain batched backbone, capture, and the paper loop with and without its LM head
   and ``output_hidden_states``.

Run: ``HF_HUB_OFFLINE=1 python bench/capture_diagnostics.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from bench_capture import (
    MAX_TOKENS,
    MIN_TOKENS,
    N_CONVERSATIONS,
    forward_batches,
    padded_batches,
    padded_tokens,
    paper_loop,
    record_backbone_calls,
)
from common import conversations_of_length, load_lm, log, mixed_lengths, paired_speedup, time_interleaved
from torch.profiler import ProfilerActivity, profile

import personavec.core.activations as activations
from personavec.core.activations import capture_activations, response_mean
from personavec.core.conversations import Conversation, Encoded, encode

TIGHT_PADDING = 0.05
REPEATS = 3


@contextmanager
def max_padding(fraction: float) -> Iterator[None]:
    """Make ``capture_activations`` bucket with a different padding bound while the block runs."""
    original = activations.length_batches
    activations.length_batches = functools.partial(original, max_padding=fraction)
    try:
        yield
    finally:
        activations.length_batches = original


def capture(
    lm: Any, convs: list[Conversation], padding: float | None = None, **kw: Any
) -> Callable[[], object]:
    def fn() -> object:
        if padding is None:
            return capture_activations(lm, convs, poolings=[response_mean], **kw)
        with max_padding(padding):
            return capture_activations(lm, convs, poolings=[response_mean], **kw)

    return fn


def backbone_loop(lm: Any, encoded: list[Encoded]) -> None:
    """The paper loop without the LM head and without ``output_hidden_states``."""
    with torch.inference_mode():
        for e in encoded:
            lm.backbone(input_ids=torch.tensor([e.ids], device=lm.device), use_cache=False)


def report(title: str, lm: Any, convs: list[Conversation], variants: dict[str, Callable[[], object]]) -> None:
    """Time the variants against ``paper_loop`` and print tokens/s, padding and the paired ratio."""
    real = sum(len(encode(lm.tokenizer, c).ids) for c in convs)
    timings = time_interleaved(variants, REPEATS)
    print(f"\n{title} ({len(convs)} conversations, {real} real tokens)")
    print(f"{'variant':34s} {'tok/s':>7s} {'padded':>7s} {'vs paper':>9s}")
    for name, fn in variants.items():
        padded = padded_tokens(record_backbone_calls(lm, fn)) if name.startswith("capture") else None
        ratio = paired_speedup(timings[name], timings["paper_loop"])
        padded_text = "" if padded is None else str(padded)
        print(f"{name:34s} {real / timings[name].median:7.0f} {padded_text:>7s} {ratio:8.2f}x", flush=True)


def main() -> None:
    lm = load_lm()
    mixed = conversations_of_length(lm.tokenizer, mixed_lengths(N_CONVERSATIONS, MIN_TOKENS, MAX_TOKENS))
    mixed_encoded = [encode(lm.tokenizer, c, require_response=True) for c in mixed]

    log("1. profile of one capture_activations call (all layers, response_mean)")
    capture(lm, mixed)()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        capture(lm, mixed)()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

    log(f"2. default length bucketing vs max_padding={TIGHT_PADDING}, mixed lengths")
    report(
        "Mixed lengths",
        lm,
        mixed,
        {
            "paper_loop": lambda: paper_loop(lm, mixed_encoded),
            "capture_all (default)": capture(lm, mixed),
            f"capture_all (max_padding {TIGHT_PADDING})": capture(lm, mixed, TIGHT_PADDING),
            "capture_l20 (default)": capture(lm, mixed, layers=[20]),
            f"capture_l20 (max_padding {TIGHT_PADDING})": capture(lm, mixed, TIGHT_PADDING, layers=[20]),
        },
    )

    log("3. the issue's reference shape: 32 conversations of ~200 tokens")
    uniform = conversations_of_length(lm.tokenizer, [200] * N_CONVERSATIONS)
    uniform_encoded = [encode(lm.tokenizer, c, require_response=True) for c in uniform]
    one_batch = padded_batches(lm, uniform_encoded, len(uniform_encoded), sort=False)
    report(
        "Uniform ~200 tokens",
        lm,
        uniform,
        {
            "paper_loop": lambda: paper_loop(lm, uniform_encoded),
            "paper_loop without head/hidden states": lambda: backbone_loop(lm, uniform_encoded),
            "backbone, 1 batch of 32": lambda: forward_batches(lm.backbone, one_batch),
            "capture_all": capture(lm, uniform),
            "capture_l20": capture(lm, uniform, layers=[20]),
        },
    )


if __name__ == "__main__":
    main()
