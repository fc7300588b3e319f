"""Judge-free measure of a (steered) answer: re-read it with the unsteered model.

Steering changes what the model *says*; to measure the trait in what it said, each (question, answer)
is read again by the **unsteered** model, without any system prompt (as in held-out evaluation), and

* the response-mean activation at one layer is projected onto the vector's unit direction there
  (:func:`personavec.core.steering.project`): the *trait read-back*, in residual-stream units;
* the mean per-token log-likelihood of the answer gives its perplexity under the unsteered model;
  a steered answer whose perplexity is far above the unsteered answers' has stopped being fluent.

Both come from one forward pass of the full model per batch: a hook on the chosen block pools the
activations while the LM head yields the log-likelihoods.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personavec.core.activations import (
    BatchLayout,
    default_max_padding,
    forward_mask,
    layer_hooks,
    length_batches,
    pad_batch,
    response_mean,
)
from personavec.core.conversations import Encoded, encode
from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.judging.coherence import NO_QUESTION, answer_log_likelihoods


@dataclass(frozen=True)
class ReadBack:
    """Read-back of answers, in input order.

    Attributes:
        layer: Layer index the projection was taken at.
        projection: Response-mean projection per answer (``nan`` for an empty answer).
        log_likelihood: Mean log-likelihood per answer token in nats (``nan`` for an empty answer).
        tokens: With ``tokens=True``, each answer's token strings.
        token_projection: With ``tokens=True``, each answer token's projection.
    """

    layer: int
    projection: list[float]
    log_likelihood: list[float]
    tokens: list[list[str]] | None = None
    token_projection: list[list[float]] | None = None

    @property
    def perplexity(self) -> list[float]:
        """Per-answer perplexity, ``exp(-log_likelihood)``."""
        return [math.exp(-ll) if math.isfinite(ll) else math.nan for ll in self.log_likelihood]

    def mean_projection(self) -> float:
        """Mean projection over non-empty answers (``nan`` if none)."""
        vals = [p for p in self.projection if math.isfinite(p)]
        return sum(vals) / len(vals) if vals else math.nan

    def pooled_perplexity(self) -> float:
        """Perplexity of the answers together: ``exp(-mean log-likelihood)`` (geometric mean)."""
        vals = [x for x in self.log_likelihood if math.isfinite(x)]
        return math.exp(-sum(vals) / len(vals)) if vals else math.nan


def perplexity_ratio(steered: ReadBack, unsteered: ReadBack) -> float:
    """Pooled perplexity of steered answers divided by that of the unsteered answers (1 = as fluent)."""
    base = unsteered.pooled_perplexity()
    return steered.pooled_perplexity() / base if base and math.isfinite(base) else math.nan


def read_back(
    lm: LoadedModel,
    vector: PersonaVector,
    items: Sequence[tuple[str, str]],
    layer: int,
    *,
    tokens: bool = False,
    batch_size: int = 16,
    token_budget: int = 2048,
) -> ReadBack:
    """Re-read (question, answer) pairs with the unsteered model and measure trait and fluency.

    Call it outside any ``steer`` block: the point is the *unsteered* model's view of the text.

    Args:
        lm: The model (unsteered).
        vector: The persona vector to project on.
        items: ``(question, answer)`` pairs; read without a system prompt.
        layer: Layer index of the projection (``1..L``).
        tokens: Also return every answer token's string and projection (for heatmaps).
        batch_size: Most answers per forward pass.
        token_budget: Most padded tokens per forward pass.

    Returns:
        The :class:`ReadBack`.

    Raises:
        PersonavecError: On a vector/model mismatch, a bad layer, or a zero vector at ``layer``.
    """
    vector.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    check_layers([layer], lm.info.n_blocks, allow_embeddings=False)
    direction = vector.at(layer)
    norm = float(direction.norm())
    if norm == 0.0:
        raise PersonavecError(f"vector '{vector.meta.trait}' is zero at layer {layer}: nothing to project on")
    unit = (direction / norm).to(lm.device)

    n = len(items)
    proj = [math.nan] * n
    lls = [math.nan] * n
    tok_str: list[list[str]] = [[] for _ in range(n)]
    tok_proj: list[list[float]] = [[] for _ in range(n)]
    idx: list[int] = []
    encoded: list[Encoded] = []
    for i, (question, answer) in enumerate(items):
        if not answer.strip():
            continue  # an empty answer has nothing to read: nan, not 0
        # Encoded exactly as the perplexity judge encodes, so a sweep can score coherence from these
        # log-likelihoods instead of a second pass.
        conv = [
            {"role": "user", "content": question if question.strip() else NO_QUESTION},
            {"role": "assistant", "content": answer},
        ]
        enc = encode(lm.tokenizer, conv)
        if enc.response_len:
            idx.append(i)
            encoded.append(enc)
    pad_id = int(lm.tokenizer.pad_token_id)
    padding = default_max_padding(lm.device)
    for batch in length_batches([len(e.ids) for e in encoded], batch_size, token_budget, padding):
        encs = [encoded[b] for b in batch]
        ids, layout, positions = pad_batch(encs, pad_id, "right", lm.device)
        # Only logits from the earliest answer's first prediction on are needed; skipping the rest keeps
        # the [batch, positions, vocab] tensor small (the vocabulary is often 50k+).
        first = min(e.prompt_len for e in encs) - 1
        hidden, logits = _hooked_pass(lm, ids, layout, positions, layer, ids.shape[1] - first)
        pooled = response_mean(hidden, layout) @ unit
        per_token = hidden @ unit
        batch_lls = answer_log_likelihoods(logits, ids, encs)
        for row, b in enumerate(batch):
            e, i = encoded[b], idx[b]
            proj[i] = float(pooled[row])
            lls[i] = batch_lls[row]
            if tokens:
                tok_str[i] = [lm.tokenizer.decode([t]) for t in e.ids[e.prompt_len :]]
                tok_proj[i] = [float(x) for x in per_token[row, e.prompt_len : len(e.ids)]]
    return ReadBack(layer, proj, lls, tok_str if tokens else None, tok_proj if tokens else None)


def _hooked_pass(
    lm: LoadedModel, ids: Tensor, layout: BatchLayout, positions: Tensor, layer: int, keep: int
) -> tuple[Tensor, Tensor]:
    """One full forward pass returning the hidden states at ``layer`` and the last ``keep`` logits."""
    captured: dict[str, Tensor] = {}
    try:
        kwargs = (
            {"logits_to_keep": keep}
            if "logits_to_keep" in inspect.signature(lm.model.forward).parameters
            else {}
        )
    except (TypeError, ValueError):
        kwargs = {}

    # Capture's hooks record only the calling thread's pass: another thread may run its own passes
    # through this model meanwhile (the sweep's streams).
    with layer_hooks(lm, [layer]) as (slot, _ours):
        slot.record = lambda _layer, hidden: captured.__setitem__("h", hidden.float())
        with torch.inference_mode():
            logits = lm.model(
                input_ids=ids,
                attention_mask=forward_mask(layout),
                position_ids=positions,
                use_cache=False,
                **kwargs,
            ).logits
    return captured["h"], logits
