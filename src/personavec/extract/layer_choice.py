"""Which layer a vector recommends, and why: the rule every command uses to read and steer.

Held-out AUROC of answers saturates on a small model (>= 0.94 at every layer for ``evil`` on
SmolLM2-135M), so a tie-break by effect size picked early layers, where the answers' wording rather than
the trait separates them; a graded ladder of persona prompts then did not order along the vector there
(Spearman -0.17 at layer 4 against 0.74-0.79 at 15-25). What monitoring needs is a layer where *how
strongly* a prompt sets up the persona is already visible at the last prompt token, before the answer
starts: not only the two extremes apart, but the steps between them in order.

The vector the rule reads is the run's main vector (the answers' difference of means joined with the
prompts' last-token contrast, minus persona intensity: ``extraction.persona_direction``), so the layer
and the direction are chosen for the same use.

The rule (:func:`choose_layer`): candidates are the middle-to-late blocks (40-90 % of the depth by
default: the first blocks carry wording rather than traits, where new traits even read reversed, and
the last ones prepare the next token; the paper's best layers sit at about 70 %). A five-rung ladder is
built from the spec alone (:func:`persona_ladder`: the suppressing prompts, neutral prompts, "a slightly
<name> assistant", "a very <name> assistant", the eliciting prompts); every rung is read on the held-out
questions without answers, and per layer the rank correlation between rung and last-prompt projection
onto the vector is measured (:func:`read_ladder`). The highest wins; ties go to the larger separation
of the two ends (Cohen's d, smoothed over neighbouring layers). An earlier rule used that separation
alone: it ranks layers where the two ends lie far apart but the middle rungs are out of order (for
``impolite`` it chose layer 19, where a hand-written persona ladder reached only 0.76). Held-out answer
AUROC is recorded beside it but does not vote: with an offline judge its labels are few and noisy
(0.5-0.7 at every layer for impolite), and where they are good it is saturated. Every series is stored
in the summary, so a user can see the choice. The evidence is in ``docs/results.md`` ("Layer choice").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personavec.core.activations import capture_activations, last_prompt
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.stats import spearman
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import NEUTRAL_SYSTEM_PROMPTS, LayerEvaluation, cohens_d, finite_or_low
from personavec.traits.spec import TraitSpec

RULE = (
    "highest rank correlation between persona strength and last-prompt projection on held-out questions "
    "(ladder from the spec: suppressing prompts < neutral < 'slightly <name>' < 'very <name>' < eliciting "
    "prompts), ties to the larger separation of the two ends, among {where}"
)
DEPTH_WINDOW = (0.4, 0.9)
# The middle rungs use only the trait's name, so they exist for any spec, authored or templated.
MIDDLE_RUNGS = ("You are a slightly {name} assistant.", "You are a very {name} assistant.")


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
        scores: Series per layer ``1..L`` (``ladder_spearman``, ``prompt_separation``,
            ``smoothed_separation``, ``heldout_auroc``), index ``l - 1`` for layer ``l``.
    """

    layer: int
    rule: str
    candidates: list[int]
    scores: dict[str, list[float | None]]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON form (``summary["layer_choice"]``)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class LadderReading:
    """How a vector reads a ladder of persona prompts, per layer ``1..L`` (index ``l - 1``).

    Attributes:
        spearman: Rank correlation between rung and last-prompt projection, over every prompt.
        separation: Cohen's d of the projections, top rung against bottom rung.
    """

    spearman: list[float | None]
    separation: list[float | None]


def persona_ladder(spec: TraitSpec, n_pairs: int | None = None) -> list[list[str]]:
    """System prompts of rising persona strength, built from the spec alone (no answers needed).

    Args:
        spec: The trait.
        n_pairs: Use only the first pairs (as a ``--quick`` run does); default all.

    Returns:
        Five rungs, weakest first: the suppressing prompts, neutral prompts, "slightly <name>",
        "very <name>", the eliciting prompts.
    """
    pairs = spec.pairs[: n_pairs or len(spec.pairs)]
    name = spec.name.replace("_", " ").replace("-", " ")
    return [
        [p.negative for p in pairs],
        list(NEUTRAL_SYSTEM_PROMPTS),
        *([rung.format(name=name)] for rung in MIDDLE_RUNGS),
        [p.positive for p in pairs],
    ]


def read_ladder(
    lm: LoadedModel,
    vector: PersonaVector,
    rungs: Sequence[Sequence[str]],
    questions: Sequence[str],
    *,
    batch_size: int = 16,
) -> LadderReading:
    """Project every rung's system prompt x question at the last prompt token, per layer.

    Args:
        lm: The target model.
        vector: The vector to project onto (its unit direction per layer).
        rungs: System prompts per rung, weakest first (:func:`persona_ladder`).
        questions: Questions asked under every prompt (held-out ones: the vector never saw them).
        batch_size: Prompts per forward pass.

    Returns:
        Spearman and end-to-end separation per layer (``None`` where undefined).

    Raises:
        PersonavecError: If there are fewer than two rungs, an empty rung or fewer than two questions.
    """
    if len(rungs) < 2 or any(not rung for rung in rungs) or len(questions) < 2:
        raise PersonavecError("a ladder needs two or more non-empty rungs and at least two questions")
    convs, levels = [], []
    for level, rung in enumerate(rungs):
        for system in rung:
            for q in questions:
                convs.append([{"role": "system", "content": system}, {"role": "user", "content": q}])
                levels.append(level)
    acts = capture_activations(lm, convs, poolings=[last_prompt], batch_size=batch_size)["last_prompt"]
    units = vector.data / vector.norms().clamp(min=1e-12).unsqueeze(-1)
    proj = torch.einsum("nld,ld->nl", acts, units)
    lv = torch.tensor(levels)
    ends = (lv == 0) | (lv == len(rungs) - 1)
    top = (lv[ends] == len(rungs) - 1).long()
    rho: list[float | None] = []
    sep: list[float | None] = []
    for layer in range(1, lm.info.n_blocks + 1):
        rho.append(spearman(levels, proj[:, layer].tolist()))
        d = cohens_d(proj[ends, layer], top)
        sep.append(d if d == d else None)
    return LadderReading(rho, sep)


def smooth(values: Sequence[float | None]) -> list[float | None]:
    """Mean of each value and its neighbours (missing values are skipped)."""
    out: list[float | None] = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - 1) : i + 2] if v is not None]
        out.append(sum(window) / len(window) if window else None)
    return out


def choose_layer(
    evaluation: LayerEvaluation,
    ladder: LadderReading,
    candidates: Sequence[int] | None = None,
) -> LayerChoice:
    """Apply the rule: the candidate layer that orders the persona ladder best along the vector.

    Args:
        evaluation: Held-out answer evaluation of the vector, recorded beside.
        ladder: :func:`read_ladder` of the vector.
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
    smoothed = smooth(ladder.separation)
    aucs = evaluation.auroc

    def key(c: int) -> tuple[float, float, float]:
        i = c - 1
        return (
            finite_or_low(_num(ladder.spearman[i])),
            finite_or_low(_num(smoothed[i])),
            finite_or_low(aucs[i]),
        )

    layer = max(cands, key=key)
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
            "ladder_spearman": list(ladder.spearman),
            "prompt_separation": list(ladder.separation),
            "smoothed_separation": smoothed,
            "heldout_auroc": [a if a == a else None for a in aucs],
        },
    )


def _num(x: float | None) -> float:
    return float("nan") if x is None else x
