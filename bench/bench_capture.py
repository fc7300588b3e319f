"""Activation capture throughput: personavec's capture against plain forward passes on the same data.

32 system+user+assistant conversations of 50..300 tokens (mixed), response-mean pooling, all layers.
Throughput is real (non-pad) tokens per second. Variants, all under ``torch.inference_mode``:

* ``lm_naive``: the full LM (with its head), one batch of 32 right-padded to the longest;
* ``backbone_naive``: ``lm.backbone`` only, same single batch of 32 (the issue's baseline);
* ``backbone_bucketed``: ``lm.backbone``, sorted by length and cut into batches of 8 (less padding);
* ``paper_loop``: the paper's way, one example at a time through the full LM with
  ``output_hidden_states=True``, then a response mean of every hidden state;
* ``capture_all``: ``capture_activations`` on all layers, ``response_mean`` only;
* ``capture_all_3pool``: the same with the default three poolings;
* ``capture_l20``: ``capture_activations(layers=[20])``, which stops after block 20;
* ``capture_all_bs8`` / ``capture_l20_bs8``: ``capture_all`` / ``capture_l20`` with ``batch_size=8``,
  so that length bucketing actually splits the data (with the default ``batch_size=32`` and
  ``token_budget=16384`` all 32 conversations fit in one batch padded to the longest).

Baselines get pre-tokenised inputs; the capture variants tokenise inside the timed call (a few ms).

Run alone: ``python bench/bench_capture.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from common import conversations_of_length, load_lm, log, mixed_lengths, time_interleaved

from personavec.activations import capture_activations, pad_batch, response_mean
from personavec.conversations import Conversation, Encoded, encode

N_CONVERSATIONS = 32
MIN_TOKENS, MAX_TOKENS = 50, 300
BUCKET_SIZE = 8
REPEATS = 3
WARMUP_CONVERSATIONS = 8
# Ratios of tokens/s reported, as (numerator, denominator).
RATIOS = (
    ("capture_all", "backbone_naive"),
    ("capture_all", "backbone_bucketed"),
    ("capture_all", "paper_loop"),
    ("capture_all_3pool", "backbone_naive"),
    ("capture_l20", "paper_loop"),
    ("capture_all_bs8", "backbone_naive"),
    ("capture_all_bs8", "backbone_bucketed"),
    ("capture_all_bs8", "paper_loop"),
    ("capture_l20_bs8", "paper_loop"),
    ("backbone_naive", "paper_loop"),
    ("backbone_bucketed", "paper_loop"),
)
# The targets: the numerator reaches at least this multiple of the denominator.
TARGETS = {
    ("capture_all", "backbone_naive"): 0.95,
    ("capture_all", "paper_loop"): 1.5,
    ("capture_l20", "paper_loop"): 2.4,
}


def padded_batches(
    lm: Any, encoded: list[Encoded], batch_size: int, *, sort: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches, right-padded to each batch's longest example."""
    order = sorted(encoded, key=lambda e: -len(e.ids)) if sort else list(encoded)
    pad_id = int(lm.tokenizer.pad_token_id)
    out = []
    for start in range(0, len(order), batch_size):
        ids, layout, _ = pad_batch(order[start : start + batch_size], pad_id, "right", lm.device)
        out.append((ids, layout.attention_mask))
    return out


def forward_batches(module: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One plain forward pass per batch (no KV cache, nothing kept)."""
    with torch.inference_mode():
        for ids, mask in batches:
            module(input_ids=ids, attention_mask=mask, use_cache=False)


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
    return {
        "lm_naive": lambda: forward_batches(lm.model, naive),
        "backbone_naive": lambda: forward_batches(lm.backbone, naive),
        "backbone_bucketed": lambda: forward_batches(lm.backbone, bucketed),
        "paper_loop": lambda: paper_loop(lm, encoded),
        "capture_all": lambda: capture_activations(lm, convs, poolings=rm),
        "capture_all_3pool": lambda: capture_activations(lm, convs),
        "capture_l20": lambda: capture_activations(lm, convs, layers=[20], poolings=rm),
        "capture_all_bs8": lambda: capture_activations(lm, convs, poolings=rm, batch_size=BUCKET_SIZE),
        "capture_l20_bs8": lambda: capture_activations(
            lm, convs, layers=[20], poolings=rm, batch_size=BUCKET_SIZE
        ),
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
    lengths = [len(encode(lm.tokenizer, c).ids) for c in convs]
    real = sum(lengths)
    padded_naive = N_CONVERSATIONS * max(lengths)
    by_len = sorted(lengths, reverse=True)
    chunks = [by_len[i : i + BUCKET_SIZE] for i in range(0, len(by_len), BUCKET_SIZE)]
    padded_bucketed = sum(len(chunk) * chunk[0] for chunk in chunks)
    log(f"capture: {len(convs)} conversations, {min(lengths)}..{max(lengths)} tokens, {real} real tokens")
    max_diff = check_capture_matches_paper(lm, convs)

    # Warm-up: every variant once on 8 conversations, which include the longest one.
    warmups = build_variants(lm, convs[:WARMUP_CONVERSATIONS])
    timings = time_interleaved(build_variants(lm, convs), repeats, warmups)
    tps = {name: real / t.median for name, t in timings.items()}
    cpu_tps = {name: real / t.cpu_median for name, t in timings.items()}
    ratios = {f"{a} / {b}": tps[a] / tps[b] for a, b in RATIOS}
    cpu_ratios = {f"{a} / {b}": cpu_tps[a] / cpu_tps[b] for a, b in RATIOS}
    targets = {f"{a} / {b} >= {x}": ratios[f"{a} / {b}"] >= x for (a, b), x in TARGETS.items()}
    cpu_targets = {f"{a} / {b} >= {x}": cpu_ratios[f"{a} / {b}"] >= x for (a, b), x in TARGETS.items()}
    return {
        "data": {
            "conversations": len(convs),
            "min_tokens": min(lengths),
            "max_tokens": max(lengths),
            "real_tokens": real,
            "padded_tokens_naive": padded_naive,
            "padded_tokens_bucketed": padded_bucketed,
        },
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
