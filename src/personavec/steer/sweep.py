"""Steering sweep: how much trait, and how much fluency, each (layer, coefficient) buys.

For every cell of a grid of layers x coefficients the trait's evaluation questions are answered under
steering, and each answer is measured twice:

* judge-free (:mod:`personavec.steer.readback`): the unsteered model re-reads the answer; the response-mean
  projection at one fixed *read-back layer* (the vector's recommended layer, so all cells share a unit)
  is the trait expression, and the perplexity ratio to the unsteered answers is the fluency cost;
* with judges, when given: trait and coherence scores 0-100.

Two conditions are swept: *amplify* (no system prompt, coefficients >= 0) and *suppress* (the trait's
first eliciting system prompt, ``spec.pairs[0].positive``, coefficients <= 0), each against its own
unsteered baseline.

Coefficients are in the vector's own units (``steer`` adds ``coef * v_l``), but the default grid is set
in *fractions of the residual-stream norm*: ``coef * ||v_l|| / r_l`` with ``r_l`` the mean per-token
residual norm at layer ``l`` on neutral text. A fraction means the same on every model and layer; a raw
coefficient does not. Cells whose added norm would push the residual past ``10 x r_l`` are refused.

Everything is cached in a :class:`~personavec.core.store.JsonlStore`, so a killed sweep resumes and a repeated
one recomputes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple, TypeGuard

import torch

from personavec.core.activations import capture_activations, response_mean
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel
from personavec.core.parallel import choose_workers, ordered_map, raise_if_stopping
from personavec.core.stats import spearman
from personavec.core.steering import steer
from personavec.core.store import JsonlStore, record_key
from personavec.core.vectors import PersonaVector
from personavec.judging.base import Judge, JudgeItem
from personavec.judging.coherence import REFERENCES, PerplexityCoherence, repetition_share
from personavec.steer.readback import ReadBack, read_back
from personavec.traits.spec import TraitSpec

log = logging.getLogger(__name__)

_Row = tuple[str, str, float, str]  # one answer to make: key, condition, coef, question
_Measured = dict[tuple[str, int, float], list[dict[str, Any]]]  # (condition, layer, coef) -> answer rows
_Judges = tuple[tuple[Judge | None, str], ...]  # (judge, kind): the trait judge, then the coherence judge
_CONDITIONS = ("amplify", "suppress")

# A steered residual above this multiple of the layer's usual norm is far off-distribution: refused.
MAX_NORM_MULTIPLE = 10.0
# Geometric: the trait rises and fluency falls roughly with log(coef), and the coherent range is often
# below 0.3 of the residual norm on small models. 1/32 was dropped from the default: on SmolLM2-135M it
# never moved the trait beyond question-to-question noise, and four steps keep the default sweep with
# the local judge within 20 minutes on 2 CPU cores.
DEFAULT_FRACTIONS = (0.0625, 0.125, 0.25, 0.5)
QUICK_FRACTIONS = (0.0625, 0.125, 0.25)
# Fraction of the residual norm used when a vector has no sweep result yet. At the middle-to-late
# layers the layer rule recommends, 0.25 broke coherence on SmolLM2-135M (evil at layer 17: perplexity
# ratio 2.32, "the abyss of the abyss ..."), while 0.125 moved read-back from -8.1 to +5.4 at ratio 1.58;
# a quick sweep on that vector also chose 0.125.
DEFAULT_STEER_FRACTION = 0.125


@dataclass(frozen=True)
class Guard:
    """When a cell still counts as coherent.

    Attributes:
        coherence_min: Least mean judge coherence (0-100), used when the judge has real signal.
        ppl_ratio_max: Largest perplexity ratio to the unsteered answers, used otherwise.
        repetition_max: Largest mean share of repeated word 3-grams, checked with the perplexity guard:
            a loop ("evil evil evil ...") is *likely* text to a language model, so perplexity alone
            passes it.
    """

    coherence_min: float = 50.0
    ppl_ratio_max: float = 2.0
    repetition_max: float = 0.5


@dataclass(frozen=True)
class Cell:
    """Aggregated result of one (condition, layer, coefficient).

    Attributes:
        condition: ``amplify`` (no system prompt) or ``suppress`` (trait-eliciting system prompt).
        layer: Steering layer (0 for the unsteered baseline).
        coef: Coefficient in vector units.
        fraction: ``coef * ||v_layer|| / residual_norm[layer]`` (signed).
        trait: Mean read-back projection.
        ppl_ratio: Perplexity ratio to the condition's unsteered answers.
        repetition: Mean share of repeated word 3-grams.
        judge_trait: Mean trait judge score, if a judge was given.
        judge_coherence: Mean coherence judge score, if a judge was given.
        n: Answers behind the numbers.
        refused: True when the cell was not run (steered norm too large).
    """

    condition: str
    layer: int
    coef: float
    fraction: float
    trait: float
    ppl_ratio: float
    repetition: float = 0.0
    judge_trait: float | None = None
    judge_coherence: float | None = None
    n: int = 0
    refused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return asdict(self)


@dataclass
class SweepResult:
    """What a sweep found.

    Attributes:
        cells: Steered cells (refused ones included, marked).
        baselines: Condition -> the unsteered cell.
        readback_layer: Layer the trait read-back is taken at.
        residual_norms: Layer -> mean residual norm on neutral text.
        choice: The automatic choice (see :func:`choose`).
        agreement: Spearman correlations between read-back and judge measures across cells.
        examples: Sample answers: dicts with condition, layer, coef, fraction, question, answer,
            projection and per-token projections.
        warnings: Human-readable warnings (refused cells ...).
        settings: Grid, sampling and judge names.
    """

    cells: list[Cell]
    baselines: dict[str, Cell]
    readback_layer: int
    residual_norms: dict[int, float]
    choice: dict[str, Any]
    agreement: dict[str, float | None]
    examples: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (written as ``sweep.json``); non-finite numbers become ``null``."""
        return _finite(
            {
                "cells": [c.to_dict() for c in self.cells],
                "baselines": {k: c.to_dict() for k, c in self.baselines.items()},
                "readback_layer": self.readback_layer,
                "residual_norms": {str(k): v for k, v in self.residual_norms.items()},
                "choice": self.choice,
                "agreement": self.agreement,
                "examples": self.examples,
                "warnings": self.warnings,
                "settings": self.settings,
            }
        )


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by ``None``, so the JSON is strict (no ``NaN`` tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def vector_hash(vector: PersonaVector) -> str:
    """Short hash of the vector's values (metadata changes, such as a stored choice, keep it)."""
    return hashlib.sha256(vector.data.contiguous().numpy().tobytes()).hexdigest()[:16]


def residual_norms(lm: LoadedModel, layers: Sequence[int] | None = None) -> dict[int, float]:
    """Mean per-token residual-stream norm per layer, on neutral (question, answer) text.

    Answer tokens only: they are what steering acts on during generation, and it leaves out the first
    positions, whose norms are often huge outliers (attention sinks).

    Args:
        lm: The model.
        layers: Layer indices (default ``1..L``).

    Returns:
        Layer -> mean L2 norm.
    """
    wanted = check_layers(range(1, lm.info.n_blocks + 1) if layers is None else layers, lm.info.n_blocks)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in REFERENCES]
    acts = capture_activations(lm, convs, layers=wanted, poolings=[response_mean], tokens=True)
    assert acts.tokens is not None
    norms = torch.cat([t[p:].norm(dim=-1) for t, p in zip(acts.tokens, acts.prompt_lens)])  # [T, layers]
    return {layer: float(norms[:, i].mean()) for i, layer in enumerate(wanted)}


def readback_layer(vector: PersonaVector) -> int:
    """The layer trait expression is read at: the vector's recommended layer, else the middle block."""
    rec = vector.recommended_layer
    return rec if rec is not None else max(1, round(vector.meta.n_blocks / 2))


def default_layers(vector: PersonaVector, *, quick: bool = False) -> list[int]:
    """Steering layers: the recommended layer plus the middle of the network (1/3, 1/2, 2/3 of the depth).

    Steering works best in the middle layers (the Persona Vectors paper's best layers sit there), while
    the recommended layer is where the trait separates best; four layers keep the default grid small.

    Args:
        vector: The vector (its ``n_blocks`` and recommended layer).
        quick: Two layers only: the recommended one and the middle block (or 1/3 depth).

    Returns:
        Sorted layer indices in ``1..L``.
    """
    n = vector.meta.n_blocks
    rec = readback_layer(vector)
    if quick:
        other = round(n / 2) if round(n / 2) != rec else round(n / 3)
        layers = {rec, other}
    else:
        layers = {rec, round(n / 3), round(n / 2), round(2 * n / 3)}
        for extra in (rec + 2, rec - 2):  # fill up to four when the recommended layer is one of them
            if len(layers) < 4:
                layers.add(extra)
    return sorted(x for x in layers if 1 <= x <= n)


def coef_for_fraction(vector: PersonaVector, layer: int, fraction: float, norms: dict[int, float]) -> float:
    """The coefficient whose added vector has ``fraction`` of layer ``layer``'s residual norm."""
    vnorm = float(vector.at(layer).norm())
    if vnorm == 0.0:
        raise PersonavecError(f"vector '{vector.meta.trait}' is zero at layer {layer}: cannot steer with it")
    return fraction * norms[layer] / vnorm


def fraction_of_norm(vector: PersonaVector, layer: int, coef: float, norms: dict[int, float]) -> float:
    """Signed ``coef * ||v_layer|| / residual_norm[layer]``."""
    return coef * float(vector.at(layer).norm()) / norms[layer]


def too_large(fraction: float) -> bool:
    """Whether adding this fraction of the residual norm can push it past ``MAX_NORM_MULTIPLE`` x."""
    # Worst case (vector aligned with the residual): ||h + c v|| = r + |c| ||v||.
    return 1.0 + abs(fraction) > MAX_NORM_MULTIPLE


def judge_has_signal(judge: Judge | None) -> bool:
    """Whether a judge can tell good from bad answers (a calibrated perplexity judge may not)."""
    if judge is None:
        return False
    cal = getattr(judge, "calibration", None)
    if cal is not None:
        hi, lo = cal
        return bool(hi - lo >= 0.05)
    return True


def passes_guard(cell: Cell, guard: Guard, use_judge: bool) -> bool:
    """Whether a cell stays coherent enough under the guard in force."""
    if cell.refused:
        return False
    if use_judge:
        return cell.judge_coherence is not None and cell.judge_coherence >= guard.coherence_min
    return (
        math.isfinite(cell.ppl_ratio)
        and cell.ppl_ratio <= guard.ppl_ratio_max
        and cell.repetition <= guard.repetition_max
    )


def _numbers(cell: Cell, baseline: Cell) -> dict[str, Any]:
    return {
        "layer": cell.layer,
        "coef": cell.coef,
        "coef_fraction_of_residual_norm": cell.fraction,
        "trait_readback": cell.trait,
        "baseline_trait_readback": baseline.trait,
        "trait_change": cell.trait - baseline.trait,
        "ppl_ratio": cell.ppl_ratio,
        "repetition": cell.repetition,
        "judge_trait": cell.judge_trait,
        "judge_coherence": cell.judge_coherence,
        "baseline_judge_coherence": baseline.judge_coherence,
        "n": cell.n,
    }


def choose(
    cells: Sequence[Cell],
    baselines: dict[str, Cell],
    *,
    use_judge: bool,
    guard: Guard | None = None,
    coherence_judge: str | None = None,
) -> dict[str, Any]:
    """Pick the amplifying and the suppressing setting from sweep cells.

    Amplify: among ``amplify`` cells with ``coef > 0`` that pass the guard, the one whose read-back
    rises most above the unsteered baseline (it must rise). Suppress: among ``suppress`` cells with
    ``coef < 0`` that pass the guard, the one with the largest drop below the baseline answered under the
    same eliciting system prompt (it must drop). Refused cells never win.

    Args:
        cells: Steered cells.
        baselines: ``amplify`` / ``suppress`` -> unsteered cell.
        use_judge: Guard with judge coherence (``>= coherence_min``) instead of the perplexity ratio.
        guard: Thresholds.
        coherence_judge: Judge name, recorded in ``chosen_by``.

    Returns:
        ``{"amplify": numbers | None, "suppress": numbers | None, "chosen_by": {...}}``.
    """
    guard = guard or Guard()
    out: dict[str, Any] = {}
    for condition, sign in (("amplify", 1.0), ("suppress", -1.0)):
        base = baselines.get(condition)
        best: Cell | None = None
        if base is not None:
            ok = [
                c
                for c in cells
                if c.condition == condition
                and sign * c.coef > 0
                and math.isfinite(c.trait)
                and sign * (c.trait - base.trait) > 0
                and passes_guard(c, guard, use_judge)
            ]
            # Largest change wins; on a tie the gentler coefficient (less risk to fluency).
            best = max(ok, key=lambda c: (sign * (c.trait - base.trait), -abs(c.fraction)), default=None)
        out[condition] = None if best is None or base is None else _numbers(best, base)
    guard_text = (
        f"judge coherence mean >= {guard.coherence_min:g} ({coherence_judge})"
        if use_judge
        else (
            f"perplexity ratio <= {guard.ppl_ratio_max:g} x unsteered "
            f"and repetition <= {guard.repetition_max:g}"
        )
    )
    out["chosen_by"] = {
        "trait": "read-back projection (unsteered re-read, no system prompt)",
        "guard": guard_text,
        "signal": "judge" if use_judge else "perplexity",
    }
    return out


def steering_defaults(
    lm: LoadedModel, vector: PersonaVector, norms: dict[int, float] | None = None
) -> dict[str, Any]:
    """Layer and coefficient to steer with when the user gives none.

    The sweep's stored choice (``meta.extra["steering"]["amplify"]``) when present; else the recommended
    layer (or the middle block) with a coefficient worth ``DEFAULT_STEER_FRACTION`` of its residual norm.

    Args:
        lm: The model (measures residual norms when needed).
        vector: The vector.
        norms: Residual norms already measured.

    Returns:
        ``{"layer", "coef", "fraction", "source"}``.
    """
    stored = (vector.meta.extra.get("steering") or {}).get("amplify")
    if stored:
        return {
            "layer": int(stored["layer"]),
            "coef": float(stored["coef"]),
            "fraction": stored.get("coef_fraction_of_residual_norm"),
            "source": "sweep choice in the vector file",
        }
    layer = readback_layer(vector)
    norms = norms or residual_norms(lm, [layer])
    coef = coef_for_fraction(vector, layer, DEFAULT_STEER_FRACTION, norms)
    return {
        "layer": layer,
        "coef": coef,
        "fraction": DEFAULT_STEER_FRACTION,
        "source": f"recommended layer, {DEFAULT_STEER_FRACTION:g} of the residual norm",
    }


def with_choice(vector: PersonaVector, result: SweepResult) -> PersonaVector:
    """The vector with the sweep's choice in ``meta.extra["steering"]``."""
    steering = {
        **result.choice,
        "readback_layer": result.readback_layer,
        "residual_norms": {str(k): v for k, v in result.residual_norms.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return vector.with_meta(extra={**vector.meta.extra, "steering": steering})


def _mean(vals: Sequence[float | None]) -> float | None:
    good = [float(v) for v in vals if v is not None and math.isfinite(v)]
    return sum(good) / len(good) if good else None


def sweep(
    lm: LoadedModel,
    vector: PersonaVector,
    spec: TraitSpec,
    *,
    layers: Sequence[int] | None = None,
    coefs: Sequence[float] | None = None,
    store: JsonlStore,
    trait_judge: Judge | None = None,
    coherence_judge: Judge | None = None,
    n_questions: int | None = None,
    params: SamplingParams | None = None,
    on_progress: Callable[[int], None] | None = None,
    quick: bool = False,
    guard: Guard | None = None,
    batch_size: int = 48,
    workers: int | None = None,
) -> SweepResult:
    """Steer on the trait's evaluation questions over layers x coefficients and measure each cell.

    Args:
        lm: The model.
        vector: The persona vector (must match the model).
        spec: The trait (evaluation questions; ``pairs[0].positive`` for the suppression condition).
        layers: Steering layers (default: :func:`default_layers`).
        coefs: Positive coefficients in vector units, used at every layer, and their negatives for
            suppression (default: per-layer coefficients worth :data:`DEFAULT_FRACTIONS` of the residual
            norm, or :data:`QUICK_FRACTIONS` with ``quick``).
        store: Cache; a repeated call with the same settings recomputes nothing.
        trait_judge: Optional trait judge.
        coherence_judge: Optional coherence judge; with real signal it sets the guard.
        n_questions: Use the first questions only (``quick``: 5).
        params: Sampling (default greedy, 64 tokens; ``quick``: 32 tokens).
        on_progress: Called with the number of answers finished (cached ones included).
        quick: The small preset: 2 layers x 3 coefficients x 5 questions, 32 tokens.
        guard: Coherence thresholds.
        batch_size: Prompts per generation / read-back batch.
        workers: Batches run at once, each in its own thread with its own steering (default: 2 on a
            CPU, 1 on an accelerator, 1 while the model carries hooks; see
            :func:`personavec.core.parallel.choose_workers`). The batches and seeds are the same either way.

    Returns:
        The :class:`SweepResult`.

    Raises:
        PersonavecError: On a vector/model mismatch, a bad layer or coefficient, or no questions.
    """
    _check_vector(lm, vector)
    plan = _plan(lm, vector, spec, store, layers, coefs, n_questions=n_questions, params=params, quick=quick)
    progress = _Progress(on_progress)
    judges: _Judges = ((trait_judge, "trait"), (coherence_judge, "coherence"))
    # Every missing answer first, layer by layer in shared batches; the steps after only read the store.
    _answer_missing(plan, progress, batch_size=batch_size, workers=workers)
    measured = _measure(plan, progress, judges)
    baselines = {c: _baseline(c, measured[(c, 0, 0.0)]) for c in _CONDITIONS}
    base_ll = {c: _mean_ll(measured[(c, 0, 0.0)]) for c in _CONDITIONS}
    cells, warnings = _steered_cells(plan.grid, measured, base_ll)
    use_judge = _judge_guards(coherence_judge, [*cells, *baselines.values()])
    choice = choose(
        cells, baselines, use_judge=use_judge, guard=guard, coherence_judge=_name(coherence_judge)
    )
    result = SweepResult(
        cells=cells,
        baselines=baselines,
        readback_layer=plan.readback_layer,
        residual_norms=plan.norms,
        choice=choice,
        agreement=_agreement([*baselines.values(), *cells]),
        warnings=warnings,
        settings=_settings(plan, spec, coefs=coefs, quick=quick, judges=(trait_judge, coherence_judge)),
    )
    result.examples = _examples(lm, vector, result, measured)
    return result


# -- the steps of sweep(), in the order it takes them --------------------------------------------------
class _GridCell(NamedTuple):
    condition: str
    layer: int
    coef: float
    fraction: float


@dataclass(frozen=True)
class _Plan:
    """What one sweep will do, fixed before the first answer is made."""

    lm: LoadedModel
    vector: PersonaVector
    store: JsonlStore
    params: SamplingParams
    questions: Sequence[str]
    layers: list[int]
    grid: list[_GridCell]
    readback_layer: int
    norms: dict[int, float]
    vhash: str
    system: dict[str, str | None]  # condition -> system prompt

    def key(self, condition: str, layer: int, coef: float, question: str) -> str:
        """The store key of one answer: everything that changes it, so a changed setting is new work."""
        return record_key(
            {
                "model": self.lm.info.fingerprint,
                "vector": self.vhash,
                "readback_layer": self.readback_layer,
                "system": self.system[condition],
                "layer": layer,
                "coef": round(coef, 10),
                "question": question,
                "sampling": asdict(self.params),
            }
        )

    def keys(self, condition: str, layer: int, coef: float) -> list[str]:
        """The keys of one cell's answers, one per question."""
        return [self.key(condition, layer, coef, q) for q in self.questions]

    def missing(self, condition: str, layer: int, coef: float) -> list[_Row]:
        """The answers of one cell that are not in the store yet."""
        keys = self.keys(condition, layer, coef)
        return [(k, condition, coef, q) for k, q in zip(keys, self.questions) if k not in self.store]


class _Progress:
    """Reports each answer once to ``on_progress``, whether made now or found in the store."""

    def __init__(self, on_progress: Callable[[int], None] | None) -> None:
        self.on_progress = on_progress
        self.counted: set[str] = set()

    def made(self, keys: list[str]) -> None:
        self.counted.update(keys)
        if self.on_progress is not None:
            self.on_progress(len(keys))

    def found(self, keys: list[str]) -> None:
        new = [k for k in keys if k not in self.counted]
        self.counted.update(new)
        if self.on_progress is not None and new:
            self.on_progress(len(new))


def _check_vector(lm: LoadedModel, vector: PersonaVector) -> None:
    """Refuse a vector of another model shape; warn when it was made on other weights of this shape."""
    vector.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    if vector.meta.model_fingerprint and vector.meta.model_fingerprint != lm.info.fingerprint:
        log.warning(
            "vector was made on %s (fingerprint %s), this model is %s (%s): same shape, maybe other weights",
            vector.meta.model_id,
            vector.meta.model_fingerprint,
            lm.info.id,
            lm.info.fingerprint,
        )


def _plan(
    lm: LoadedModel,
    vector: PersonaVector,
    spec: TraitSpec,
    store: JsonlStore,
    layers: Sequence[int] | None,
    coefs: Sequence[float] | None,
    *,
    n_questions: int | None,
    params: SamplingParams | None,
    quick: bool,
) -> _Plan:
    """Questions, layers and the grid of coefficients, with the defaults filled in and checked."""
    params = params or SamplingParams(max_new_tokens=32 if quick else 64)
    n_q = n_questions or (5 if quick else None)
    questions = spec.evaluation_questions[:n_q] if n_q else list(spec.evaluation_questions)
    if not questions:
        raise PersonavecError(f"trait '{spec.name}' has no evaluation questions to sweep on")
    steer_layers = check_layers(
        default_layers(vector, quick=quick) if layers is None else layers,
        lm.info.n_blocks,
        allow_embeddings=False,
    )
    if coefs is not None and any(not math.isfinite(c) for c in coefs):
        raise PersonavecError("coefficients must be finite numbers")
    rb_layer = readback_layer(vector)
    norms = residual_norms(lm, sorted({*steer_layers, rb_layer}))
    return _Plan(
        lm=lm,
        vector=vector,
        store=store,
        params=params,
        questions=questions,
        layers=steer_layers,
        grid=_grid(vector, steer_layers, coefs, norms, quick=quick),
        readback_layer=rb_layer,
        norms=norms,
        vhash=vector_hash(vector),
        system={"amplify": None, "suppress": spec.pairs[0].positive},
    )


def _grid(
    vector: PersonaVector,
    layers: list[int],
    coefs: Sequence[float] | None,
    norms: dict[int, float],
    *,
    quick: bool,
) -> list[_GridCell]:
    """Per layer, each positive coefficient for ``amplify`` and its negative for ``suppress``."""
    grid: list[_GridCell] = []
    for layer in layers:
        if coefs is not None:
            pos = sorted({abs(float(c)) for c in coefs if c != 0})
            cs = [(c, fraction_of_norm(vector, layer, c, norms)) for c in pos]
        else:
            fr = QUICK_FRACTIONS if quick else DEFAULT_FRACTIONS
            cs = [(coef_for_fraction(vector, layer, f, norms), f) for f in fr]
        for c, f in cs:
            grid.append(_GridCell("amplify", layer, c, f))
            grid.append(_GridCell("suppress", layer, -c, -f))
    return grid


def _answer_missing(plan: _Plan, progress: _Progress, *, batch_size: int, workers: int | None) -> None:
    """Answer and read back every missing answer in batches, storing each batch as soon as it is done."""
    jobs = [
        (layer, rows[i : i + batch_size])
        for layer, rows in _todo(plan)
        for i in range(0, len(rows), batch_size)
    ]
    # A hook already on the model (a sweep run inside the caller's own steer() or monitoring) keeps
    # per-pass state that two streams would share: then one stream (see choose_workers).
    streams = choose_workers(plan.lm, workers, len(jobs))
    with contextlib.closing(ordered_map(functools.partial(_answer_batch, plan), jobs, streams)) as results:
        for (layer, chunk), (answers, rb) in zip(jobs, results):
            plan.store.append(_answer_records(layer, chunk, answers, rb))
            progress.made([k for k, *_rest in chunk])


def _todo(plan: _Plan) -> list[tuple[int, list[_Row]]]:
    """The missing answers per steering layer (0: the unsteered baselines); refused cells are left out."""
    todo = [(0, [*plan.missing("amplify", 0, 0.0), *plan.missing("suppress", 0, 0.0)])]
    for layer in plan.layers:
        cells = [g for g in plan.grid if g.layer == layer and not too_large(g.fraction)]
        todo.append((layer, [row for g in cells for row in plan.missing(g.condition, layer, g.coef)]))
    return todo


def _answer_batch(plan: _Plan, job: tuple[int, list[_Row]]) -> tuple[list[str], ReadBack]:
    """Generate and read back one batch of rows at one layer, each steered by its own coefficient.

    One batched ``generate`` call per batch instead of one small call per cell (decoding is much
    cheaper per row in wide batches). Steering is scoped to this thread, so two batches can run at
    once on two streams, each with its own layer and coefficients.
    """
    layer, chunk = job
    lm, params = plan.lm, plan.params
    convs: list[list[dict[str, str]]] = []
    for _k, cond, _c, q in chunk:
        sys_msg = plan.system[cond]
        head = [{"role": "system", "content": sys_msg}] if sys_msg else []
        convs.append([*head, {"role": "user", "content": q}])
    seeds = [int(k[:8], 16) for k, *_rest in chunk]
    row_coefs = [c for _k, _cond, c, _q in chunk]
    if layer == 0 or not any(row_coefs):
        answers = generate(lm, convs, params, seeds=seeds, batch_size=len(chunk), workers=1)
    else:
        with steer(lm, plan.vector, layers=layer, coef=row_coefs, this_thread_only=True):
            answers = generate(lm, convs, params, seeds=seeds, batch_size=len(chunk), workers=1)
    raise_if_stopping()  # the sweep is stopping (error, Ctrl-C): this batch will not be stored
    rb = read_back(lm, plan.vector, [(q, a) for (*_r, q), a in zip(chunk, answers)], plan.readback_layer)
    return answers, rb


def _answer_records(layer: int, chunk: list[_Row], answers: list[str], rb: ReadBack) -> list[dict[str, Any]]:
    """The store records of one answered batch."""
    return [
        {
            "key": k,
            "type": "answer",
            "condition": cond,
            "layer": layer,
            "coef": c,
            "question": q,
            "answer": a,
            "projection": rb.projection[j],
            "log_likelihood": rb.log_likelihood[j],
        }
        for j, ((k, cond, c, q), a) in enumerate(zip(chunk, answers))
    ]


def _measure(plan: _Plan, progress: _Progress, judges: _Judges) -> _Measured:
    """Every cell's answers read from the store and judged: the baselines first, then the grid's cells.

    Refused cells have no answers and are left out.
    """
    cells = [(c, 0, 0.0) for c in _CONDITIONS]
    cells += [(g.condition, g.layer, g.coef) for g in plan.grid if not too_large(g.fraction)]
    return {cell: _cell_rows(plan, progress, judges, *cell) for cell in cells}


def _cell_rows(
    plan: _Plan, progress: _Progress, judges: _Judges, condition: str, layer: int, coef: float
) -> list[dict[str, Any]]:
    """One cell's answer rows, with ``judge_trait`` / ``judge_coherence`` filled in when judged."""
    keys = plan.keys(condition, layer, coef)
    progress.found(keys)
    rows = [plan.store.get(k) or {} for k in keys]
    for judge, kind in judges:
        if judge is not None:
            _judge(plan, judge, kind, rows)
    return rows


def _judge(plan: _Plan, judge: Judge, kind: str, rows: list[dict[str, Any]]) -> None:
    """Score the rows not scored yet, store the scores and set ``judge_<kind>`` on every row."""
    jkeys = [record_key({"answer": r["key"], "judge": judge.name, "kind": kind}) for r in rows]
    need = [(jk, r) for jk, r in zip(jkeys, rows) if jk not in plan.store]
    scorable = [(jk, r) for jk, r in need if str(r["answer"]).strip()]
    scores = _scores(plan, judge, [r for _jk, r in scorable])
    got = {jk: s for (jk, _r), s in zip(scorable, scores)}
    plan.store.append(
        [
            {"key": jk, "type": "score", "kind": kind, "judge": judge.name, "score": got.get(jk)}
            for jk, _ in need
        ]
    )
    for r, jk in zip(rows, jkeys):
        r[f"judge_{kind}"] = (plan.store.get(jk) or {}).get("score")


def _scores(plan: _Plan, judge: Judge, rows: list[dict[str, Any]]) -> list[float | None]:
    if not rows:
        return []
    if _reuses_readback(judge, plan):
        # The read-back already measured these log-likelihoods: same model, same encoding.
        return judge.score_measured([r["log_likelihood"] for r in rows], [str(r["answer"]) for r in rows])
    return judge.score([JudgeItem(r["question"], r["answer"]) for r in rows])


def _reuses_readback(judge: Judge, plan: _Plan) -> TypeGuard[PerplexityCoherence]:
    # A perplexity judge on this very model, with answers shorter than its truncation, would repeat
    # the read-back's forward pass and get the same numbers.
    return (
        isinstance(judge, PerplexityCoherence)
        and judge.lm is plan.lm
        and plan.params.max_new_tokens <= judge.max_answer_tokens
    )


def _mean_ll(rows: list[dict[str, Any]]) -> float:
    """Mean log-likelihood per token over the rows that have a finite one (NaN when none has)."""
    lls = [
        float(r["log_likelihood"])
        for r in rows
        if r["log_likelihood"] is not None and math.isfinite(r["log_likelihood"])
    ]
    return sum(lls) / len(lls) if lls else math.nan


def _aggregate(
    condition: str,
    layer: int,
    coef: float,
    fraction: float,
    rows: list[dict[str, Any]],
    base_ll: float | None,
) -> Cell:
    """One cell's means; ``base_ll`` is the unsteered mean log-likelihood (None for a baseline)."""
    mean_ll = _mean_ll(rows)
    # exp(-mean_ll) / exp(-base_ll): pooled perplexity relative to the unsteered answers.
    ratio = 1.0 if base_ll is None else (math.exp(base_ll - mean_ll) if not math.isnan(mean_ll) else math.nan)
    trait = _mean([r["projection"] for r in rows])
    return Cell(
        condition=condition,
        layer=layer,
        coef=coef,
        fraction=fraction,
        trait=math.nan if trait is None else trait,
        ppl_ratio=ratio,
        repetition=sum(repetition_share(str(r["answer"])) for r in rows) / len(rows),
        judge_trait=_mean([r.get("judge_trait") for r in rows]),
        judge_coherence=_mean([r.get("judge_coherence") for r in rows]),
        n=len(rows),
    )


def _baseline(condition: str, rows: list[dict[str, Any]]) -> Cell:
    return replace(_aggregate(condition, 0, 0.0, 0.0, rows, None), ppl_ratio=1.0)


def _steered_cells(
    grid: list[_GridCell], measured: _Measured, base_ll: dict[str, float]
) -> tuple[list[Cell], list[str]]:
    """The grid's cells in grid order, refused ones marked, and a warning per refused cell."""
    cells: list[Cell] = []
    warnings: list[str] = []
    for g in grid:
        if too_large(g.fraction):
            msg = (
                f"refused layer {g.layer} coef {g.coef:.3g}: it adds {abs(g.fraction):.1f}x the layer's "
                f"residual norm (steered norm could exceed {MAX_NORM_MULTIPLE:g}x usual)"
            )
            warnings.append(msg)
            log.warning(msg)
            cells.append(Cell(g.condition, g.layer, g.coef, g.fraction, math.nan, math.nan, refused=True))
            continue
        rows = measured[(g.condition, g.layer, g.coef)]
        cells.append(_aggregate(g.condition, g.layer, g.coef, g.fraction, rows, base_ll[g.condition]))
    return cells, warnings


def _judge_guards(coherence_judge: Judge | None, cells: list[Cell]) -> bool:
    """Whether the coherence judge, rather than perplexity, guards the choice."""
    if not judge_has_signal(coherence_judge):
        return False
    # A judge that gives every cell the same score (or none) cannot guard anything.
    scored = [c.judge_coherence for c in cells if c.judge_coherence is not None]
    return len(scored) >= 2 and max(scored) - min(scored) > 1e-6


def _agreement(cells: list[Cell]) -> dict[str, float | None]:
    """Spearman correlations between read-back and judge measures over the cells that were run."""
    run = [c for c in cells if not c.refused]
    return {
        "readback_vs_judge_trait": spearman([c.trait for c in run], [c.judge_trait for c in run]),
        "ppl_ratio_vs_judge_coherence": spearman(
            [c.ppl_ratio for c in run], [c.judge_coherence for c in run]
        ),
    }


def _settings(
    plan: _Plan,
    spec: TraitSpec,
    *,
    coefs: Sequence[float] | None,
    quick: bool,
    judges: tuple[Judge | None, Judge | None],
) -> dict[str, Any]:
    """What the sweep was run with, as stored in ``sweep.json``; ``judges``: trait, coherence."""
    trait_judge, coherence_judge = judges
    return {
        "layers": plan.layers,
        "coefs": list(coefs) if coefs is not None else None,
        "fractions": list(QUICK_FRACTIONS if quick else DEFAULT_FRACTIONS) if coefs is None else None,
        "questions": len(plan.questions),
        "sampling": asdict(plan.params),
        "suppress_system_prompt": spec.pairs[0].positive,
        "trait_judge": _name(trait_judge),
        "coherence_judge": _name(coherence_judge),
        "model": plan.lm.info.id,
        "model_fingerprint": plan.lm.info.fingerprint,
        "vector_hash": plan.vhash,
        "trait": spec.name,
        "quick": quick,
    }


def _name(judge: Judge | None) -> str | None:
    return judge.name if judge else None


def _examples(
    lm: LoadedModel,
    vector: PersonaVector,
    result: SweepResult,
    all_rows: _Measured,
) -> list[dict[str, Any]]:
    """First question's answer at each coefficient of the chosen layer, with per-token projections."""
    picked = _example_rows(result, all_rows)
    items = [(str(row["question"]), str(row["answer"])) for *_cell, row in picked]
    rb: ReadBack | None = read_back(lm, vector, items, result.readback_layer, tokens=True) if items else None
    out = []
    for j, (condition, lay, coef, frac, row) in enumerate(picked):
        out.append(
            {
                "condition": condition,
                "layer": lay,
                "coef": coef,
                "fraction": frac,
                "question": row["question"],
                "answer": row["answer"],
                "projection": row["projection"],
                "tokens": rb.tokens[j] if rb and rb.tokens else [],
                "token_projection": rb.token_projection[j] if rb and rb.token_projection else [],
            }
        )
    return out


def _example_rows(
    result: SweepResult, all_rows: _Measured
) -> list[tuple[str, int, float, float, dict[str, Any]]]:
    """(condition, layer, coef, fraction, first row) of the baselines and the chosen layer's cells."""
    amp = result.choice.get("amplify")
    layer = int(amp["layer"]) if amp else result.readback_layer
    if layer not in {c.layer for c in result.cells}:
        layer = result.cells[0].layer if result.cells else 0
    fractions = {(c.condition, c.layer, c.coef): c.fraction for c in result.cells}
    picked = [
        (condition, lay, coef, fractions.get((condition, lay, coef), 0.0), rows[0])
        for (condition, lay, coef), rows in all_rows.items()
        if rows and (lay == 0 or lay == layer)
    ]
    picked.sort(key=lambda p: (p[0], p[3]))
    return picked
