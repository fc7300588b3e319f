"""Which layer a vector recommends, and why: the rule every command uses to read and steer.

Held-out AUROC of answers saturates on a small model (>= 0.94 at every layer for ``evil`` on
SmolLM2-135M), so a tie-break by effect size picked early layers, where the answers' wording rather than
the trait separates them; a graded ladder of persona prompts then did not order along the vector there
(Spearman -0.17 at layer 4 against 0.74-0.79 at 15-25). What monitoring needs is a layer where the
*persona a prompt sets up* is already visible at the last prompt token, before the answer starts.

The vector the rule reads is the run's main vector (the answers' difference of means joined with the
prompts' last-token contrast, minus persona intensity: ``extraction.persona_direction``), so the layer
and the direction are chosen for the same use.

The rule (:func:`choose_layer`): candidates are the middle-to-late blocks (40-90 % of the depth by
default: the first blocks carry wording rather than traits, where new traits even read reversed, and
the last ones prepare the next token; the paper's best layers sit at about 70 %). Re-read the held-out
questions under the spec's trait-eliciting and suppressing system prompts, without answers, and measure
per layer how far apart the two sets of last-prompt projections onto the vector lie (Cohen's d,
smoothed over neighbouring layers so one noisy layer cannot win alone); the largest wins. Held-out
answer AUROC is recorded beside it but does not vote: with an offline judge its labels are few and
noisy (0.5-0.7 at every layer for impolite), and where they are good it is saturated. Every series is
stored in the summary, so a user can see the choice. The evidence is in ``docs/results.md`` ("Layer
choice").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personavec.core.activations import capture_activations, last_prompt
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import LayerEvaluation, cohens_d, finite_or_low
from personavec.extract.responses import ResponseRow

RULE = (
    "largest last-prompt separation of the trait-eliciting vs suppressing prompts on held-out questions "
    "(Cohen's d of the projection, averaged over the layer and its neighbours), among {where}"
)
DEPTH_WINDOW = (0.4, 0.9)


def default_candidates(n_blocks: int, window: tuple[float, float] = DEPTH_WINDOW) -> list[int]:
    """Layers between the two fractions of the depth (at least one layer)."""
    lo, hi = window
    layers = [layer for layer in range(1, n_blocks + 1) if lo * n_blocks <= layer <= hi * n_blocks]
    return layers or [max(1, round(n_blocks / 2))]


@dataclass(frozen=True)
class LayerChoice:
    """The recommended layer and the evidence behind it.

    Attributes:
        layer: The recommended layer (our convention: output of block ``layer``).
        rule: The rule, in one sentence.
        candidates: Layers the rule could pick from.
        scores: Series per layer ``1..L`` (``prompt_separation``, ``smoothed_separation``,
            ``heldout_auroc``), index ``l - 1`` for layer ``l``.
    """

    layer: int
    rule: str
    candidates: list[int]
    scores: dict[str, list[float | None]]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON form (``summary["layer_choice"]``)."""
        return dict(self.__dict__)


def prompt_separation(
    lm: LoadedModel, vector: PersonaVector, rows: Sequence[ResponseRow], *, batch_size: int = 16
) -> list[float | None]:
    """Per layer ``1..L``: Cohen's d of last-prompt projections, trait-eliciting vs suppressing prompts.

    Each row is re-read as its system prompt and question only (the answer is dropped), which is what
    monitoring sees before a model answers.

    Args:
        lm: The target model.
        vector: The vector to project onto (its unit direction per layer).
        rows: Held-out rows of both polarities (their system prompts and questions are used).
        batch_size: Prompts per forward pass.

    Returns:
        d per layer (``None`` where it is undefined).

    Raises:
        PersonavecError: If either polarity has fewer than two rows.
    """
    labels = torch.tensor([r.polarity == "pos" for r in rows], dtype=torch.long)
    if int(labels.sum()) < 2 or int((1 - labels).sum()) < 2:
        raise PersonavecError("prompt separation needs at least two held-out prompts of each polarity")
    convs = [r.conversation()[:-1] for r in rows]
    acts = capture_activations(lm, convs, poolings=[last_prompt], batch_size=batch_size)["last_prompt"]
    units = vector.data / vector.norms().clamp(min=1e-12).unsqueeze(-1)
    proj = torch.einsum("nld,ld->nl", acts, units)
    out: list[float | None] = []
    for layer in range(1, lm.info.n_blocks + 1):
        d = cohens_d(proj[:, layer], labels)
        out.append(d if d == d else None)
    return out


def smooth(values: Sequence[float | None]) -> list[float | None]:
    """Mean of each value and its neighbours (missing values are skipped)."""
    out: list[float | None] = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - 1) : i + 2] if v is not None]
        out.append(sum(window) / len(window) if window else None)
    return out


def choose_layer(
    evaluation: LayerEvaluation,
    separation: Sequence[float | None],
    candidates: Sequence[int] | None = None,
) -> LayerChoice:
    """Apply the rule: the candidate layer where the prompts' personas separate most along the vector.

    Args:
        evaluation: Held-out answer evaluation of the vector, recorded beside.
        separation: :func:`prompt_separation` of the vector, per layer ``1..L``.
        candidates: Layers the choice may pick from (default :func:`default_candidates`).

    Returns:
        The choice with its evidence.

    Raises:
        PersonavecError: If a candidate is out of range.
    """
    n = len(evaluation.layers)
    cands = sorted(set(candidates)) if candidates else default_candidates(n)
    bad = [c for c in cands if not 1 <= c <= n]
    if bad:
        raise PersonavecError(f"layer {bad[0]} is out of range: choose layers in 1..{n}")
    smoothed = smooth(separation)
    aucs = evaluation.auroc
    layer = max(cands, key=lambda c: (finite_or_low(_num(smoothed[c - 1])), finite_or_low(aucs[c - 1])))
    lo, hi = DEPTH_WINDOW
    where = (
        "the given layers"
        if candidates
        else f"layers {cands[0]}-{cands[-1]} ({lo:.0%}-{hi:.0%} of the depth)"
    )
    return LayerChoice(
        layer=layer,
        rule=RULE.format(where=where),
        candidates=cands,
        scores={
            "prompt_separation": list(separation),
            "smoothed_separation": smoothed,
            "heldout_auroc": [a if a == a else None for a in aucs],
        },
    )


def _num(x: float | None) -> float:
    return float("nan") if x is None else x
