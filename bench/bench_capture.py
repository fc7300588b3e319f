"""Activation capture throughput: personavec's capture against plain forward passes on the same data.

32 system+user+assistant conversations of 50..300 tokens (mixed), response-mean pooling, all layers.
Throughput is real (non-pad) tokens per second over the median time; a ratio between two variants is the
median over rounds of their paired time ratio (see ``common.paired_speedup``). Variants, all under
``torch.inference_mode``:

* ``lm_naive``: the full LM (with its head), one batch of 32 right-padded to the longest;
* ``backbone_naive``: ``lm.backbone`` only, same single batch of 32 (the issue's baseline);
* ``backbone_bucketed``: ``lm.backbone``, sorted by length and cut into batches of 8 (less padding);
* ``paper_loop``: the paper's way, one example at a time through the full LM with
  ``output_hidden_states=True``, then a response mean of every hidden state;
* ``capture_all``: ``capture_activations`` on all layers, ``response_mean`` only (on a CPU two batches
  at a time, each in a thread with half the intra-op threads: ``activations.default_workers``);
* ``capture_all_one_stream``: the same with ``workers=1``, one batch at a time on all threads;
* ``capture_all_3pool``: the same with the default three poolings;
* ``capture_l20``: ``capture_activations(layers=[20])``, which stops after block 20;
* ``backbone_same_batches``: ``lm.backbone`` without hooks on exactly the batches ``capture_all`` forms
  (recorded from one untimed call), so ``capture_all / backbone_same_batches`` is the cost of the
  hooks, pooling and tokenisation alone, whatever batching capture uses.

Baselines get pre-tokenised inputs; the capture variants tokenise inside the timed call (``encode_s``
in the results says how long that takes).

Run alone: ``python bench/bench_capture.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import conversations_of_length, load_lm, log, mixed_lengths, paired_speedup, time_interleaved

from personavec.core.activations import capture_activations, pad_batch, response_mean
from personavec.core.conversations import Conversation, Encoded, encode

N_CONVERSATIONS = 32
MIN_TOKENS, MAX_TOKENS = 50, 300
BUCKET_SIZE = 8
REPEATS = 3
WARMUP_CONVERSATIONS = 8
# Ratios of tokens/s reported, as (numerator, denominator).
RATIOS = (
    ("capture_all", "backbone_naive"),
    ("capture_all", "backbone_bucketed"),
    ("capture_all", "backbone_same_batches"),
    ("capture_all", "capture_all_one_stream"),
    ("capture_all_one_stream", "paper_loop"),
    ("capture_all", "paper_loop"),
    ("capture_all_3pool", "backbone_naive"),
    ("capture_l20", "paper_loop"),
    ("backbone_naive", "paper_loop"),
    ("backbone_bucketed", "paper_loop"),
    ("backbone_same_batches", "paper_loop"),
)
# The targets: the numerator reaches at least this multiple of the denominator.
TARGETS = {
    ("capture_all", "backbone_naive"): 0.95,
    ("capture_all", "paper_loop"): 1.5,
    ("capture_l20", "paper_loop"): 2.4,
}


Batch = tuple[tuple[Any, ...], dict[str, Any]]  # positional and keyword arguments of one forward call


def padded_batches(lm: Any, encoded: list[Encoded], batch_size: int, *, sort: bool) -> list[Batch]:
    """Backbone/LM call arguments, right-padded to each batch's longest example."""
    order = sorted(encoded, key=lambda e: -len(e.ids)) if sort else list(encoded)
    pad_id = int(lm.tokenizer.pad_token_id)
    out: list[Batch] = []
    for start in range(0, len(order), batch_size):
        ids, layout, _ = pad_batch(order[start : start + batch_size], pad_id, "right", lm.device)
        out.append(((), {"input_ids": ids, "attention_mask": layout.attention_mask, "use_cache": False}))
    return out


def record_backbone_calls(lm: Any, fn: Callable[[], object]) -> list[Batch]:
    """The arguments of every ``lm.backbone`` call made by ``fn()``."""
    calls: list[Batch] = []

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, dict(kwargs)))

    handle = lm.backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return calls


def padded_tokens(batches: list[Batch]) -> int:
    """Tokens computed, padding included (batch x width summed over batches)."""
    total = 0
    for args, kwargs in batches:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        total += ids.numel()
    return total


def forward_batches(module: torch.nn.Module, batches: list[Batch]) -> None:
    """One plain forward pass per batch (no KV cache, nothing kept)."""
    with torch.inference_mode():
        for args, kwargs in batches:
            module(*args, **kwargs)


def paper_loop(lm: Any, encoded: list[Encoded]) -> list[torch.Tensor]:
    """One example at a time, full LM, ``output_hidden_states=True``, response mean per hidden state."""
    pooled = []
    with torch.inference_mode():
        for e in encoded:
            ids = torch.tensor([e.ids], device=lm.device)
            out = lm.model(input_ids=ids, output_hidden_states=True)
            pooled.append(torch.stack([h[0, e.prompt_len :].mean(0) for h in out.hidden_states]).cpu())
    return pooled


def build_variants(lm: Any, convs: list[Conversation]) -> dict[str, Callable[[], object]]:
    """The timed calls, each over all of ``convs``; inputs of the baselines are prepared here."""
    encoded = [encode(lm.tokenizer, c, require_response=True) for c in convs]
    naive = padded_batches(lm, encoded, len(encoded), sort=False)
    bucketed = padded_batches(lm, encoded, BUCKET_SIZE, sort=True)
    rm = [response_mean]
    same = record_backbone_calls(lm, lambda: capture_activations(lm, convs, poolings=rm))
    return {
        "lm_naive": lambda: forward_batches(lm.model, naive),
        "backbone_naive": lambda: forward_batches(lm.backbone, naive),
        "backbone_bucketed": lambda: forward_batches(lm.backbone, bucketed),
        "backbone_same_batches": lambda: forward_batches(lm.backbone, same),
        "paper_loop": lambda: paper_loop(lm, encoded),
        "capture_all": lambda: capture_activations(lm, convs, poolings=rm),
        "capture_all_one_stream": lambda: capture_activations(lm, convs, poolings=rm, workers=1),
        "capture_all_3pool": lambda: capture_activations(lm, convs),
        "capture_l20": lambda: capture_activations(lm, convs, layers=[20], poolings=rm),
    }


def describe_data(lm: Any, convs: list[Conversation]) -> dict[str, Any]:
    """Lengths, real and padded token counts of each batching, and how long tokenisation takes."""
    encoded = [encode(lm.tokenizer, c, require_response=True) for c in convs]
    lengths = [len(e.ids) for e in encoded]
    capture_batches = record_backbone_calls(
        lm, lambda: capture_activations(lm, convs, poolings=[response_mean])
    )
    encode_s = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        [encode(lm.tokenizer, c, require_response=True) for c in convs]
        encode_s.append(time.perf_counter() - start)
    return {
        "conversations": len(convs),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "real_tokens": sum(lengths),
        "padded_tokens_naive": padded_tokens(padded_batches(lm, encoded, len(encoded), sort=False)),
        "padded_tokens_bucketed": padded_tokens(padded_batches(lm, encoded, BUCKET_SIZE, sort=True)),
        "padded_tokens_capture": padded_tokens(capture_batches),
        "capture_batch_shapes": [list(kw["input_ids"].shape) for _args, kw in capture_batches],
        "encode_s": statistics.median(encode_s),
    }


def check_capture_matches_paper(lm: Any, convs: list[Conversation]) -> float:
    """Largest |difference| between capture and the paper loop below the last layer (sanity check)."""
    encoded = [encode(lm.tokenizer, c, require_response=True) for c in convs[:4]]
    ref = torch.stack(paper_loop(lm, encoded))[:, :-1]  # the last row differs by the final norm, by design
    ours = capture_activations(lm, convs[:4], poolings=[response_mean])["response_mean"][:, :-1]
    return float((ref - ours).abs().max())


def run(lm: Any, repeats: int = REPEATS) -> dict[str, Any]:
    """Time every variant; returns tokens/s medians (wall and CPU time), raw timings and the targets."""
    convs = conversations_of_length(lm.tokenizer, mixed_lengths(N_CONVERSATIONS, MIN_TOKENS, MAX_TOKENS))
    data = describe_data(lm, convs)
    real = data["real_tokens"]
    log(
        f"capture: {len(convs)} conversations, {data['min_tokens']}..{data['max_tokens']} tokens, "
        f"{real} real tokens; capture batches {data['capture_batch_shapes']}"
    )
    max_diff = check_capture_matches_paper(lm, convs)

    # Warm-up: every variant once on 8 conversations, which include the longest one.
    warmups = build_variants(lm, convs[:WARMUP_CONVERSATIONS])
    timings = time_interleaved(build_variants(lm, convs), repeats, warmups)
    tps = {name: real / t.median for name, t in timings.items()}
    cpu_tps = {name: real / t.cpu_median for name, t in timings.items()}
    ratios = {f"{a} / {b}": paired_speedup(timings[a], timings[b]) for a, b in RATIOS}
    cpu_ratios = {f"{a} / {b}": paired_speedup(timings[a], timings[b], cpu=True) for a, b in RATIOS}
    targets = {f"{a} / {b} >= {x}": ratios[f"{a} / {b}"] >= x for (a, b), x in TARGETS.items()}
    cpu_targets = {f"{a} / {b} >= {x}": cpu_ratios[f"{a} / {b}"] >= x for (a, b), x in TARGETS.items()}
    return {
        "data": data,
        "max_abs_diff_capture_vs_paper": max_diff,
        "seconds": {name: t.seconds for name, t in timings.items()},
        "cpu_seconds": {name: t.cpu_seconds for name, t in timings.items()},
        "tokens_per_s": tps,
        "cpu_tokens_per_s": cpu_tps,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "targets": targets,
        "cpu_targets": cpu_targets,
    }


if __name__ == "__main__":
    print(json.dumps(run(load_lm()), indent=2))
