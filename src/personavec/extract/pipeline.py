"""The whole extraction run: trait spec -> answers -> scores -> kept pairs -> vectors -> evaluation.

Each step is a public function of its own module (``traits.build_artifacts``,
``extract.responses.generate_responses``, ``judging.run.judge_responses``,
``extract.filtering.filter_responses``, ``extract.extraction.extract_vector`` and
``persona_direction``), so a researcher can swap
any of them; :func:`run_extraction` only wires them together and writes the run folder. Generation and
judging are cached in JSONL stores in that folder, so rerunning the same command after a crash resumes
where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from personavec import __version__
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel
from personavec.core.store import JsonlStore, write_json
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import (
    NEUTRAL_SYSTEM_PROMPTS,
    LayerEvaluation,
    capture_answers,
    evaluate_layers,
    extract_vector,
    persona_direction,
    prompt_contrast,
    require_kept,
    same_answer_contrast,
)
from personavec.extract.filtering import (
    Filter,
    FilterResult,
    Scores,
    Thresholds,
    absolute,
    auto,
    by_polarity,
    relative,
)
from personavec.extract.layer_choice import LayerChoice, choose_layer, persona_ladder, read_ladder
from personavec.extract.responses import ResponseRow, generate_responses
from personavec.monitor.monitoring import calibrate
from personavec.traits.spec import TraitSpec

# The run's main vector (``vector.safetensors``); the three poolings are saved beside it.
MAIN = "persona"

# A progress factory: given a stage label and its total, returns the callback that advances it.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class RunConfig:
    """Size and settings of an extraction run.

    Attributes:
        rollouts: Answers per (pair, polarity, extraction question).
        n_pairs: Prompt pairs used (None = all).
        n_questions: Extraction questions used (None = all).
        eval_questions: Held-out questions used for evaluation (None = all).
        sampling: Sampling parameters for the target model.
        thresholds: Filtering thresholds.
        candidate_layers: Layers the recommendation may choose from (None = 1..L).
        batch_size: Prompts per generation / capture batch.
        filter: The filtering strategy (None = :func:`~personavec.extract.filtering.auto` with
            ``thresholds``).
    """

    rollouts: int = 1
    n_pairs: int | None = None
    n_questions: int | None = None
    eval_questions: int | None = None
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(64, 0.7, 0.9, 0))
    thresholds: Thresholds = field(default_factory=Thresholds)
    candidate_layers: Sequence[int] | None = None
    batch_size: int = 16
    filter: Filter | None = None


QUICK = RunConfig(
    rollouts=1, n_pairs=2, n_questions=8, eval_questions=10, sampling=SamplingParams(40, 0.7, 0.9, 0)
)
# A trait written by the offline templates is one the embedded model may show only faintly, so its
# vector needs more answers: with 16 a side (QUICK) hand-written answers read at AUROC 0.38-0.66, with
# 60 a side (3 pairs x 20 questions) at 0.87-0.96 (docs/results.md, "New traits offline").
QUICK_NEW_TRAIT = replace(QUICK, n_pairs=3, n_questions=20)


def quick_config(spec: TraitSpec) -> RunConfig:
    """The ``--quick`` run size for this spec: larger for a trait written by the offline templates."""
    return QUICK_NEW_TRAIT if spec.metadata.get("author") == "template" else QUICK


@dataclass(frozen=True)
class RunResult:
    """What an extraction run produced.

    Attributes:
        out_dir: The run folder.
        vectors: Pooling name -> vector (``response_mean`` is the main one).
        summary: The summary written to ``summary.json``.
    """

    out_dir: Path
    vectors: dict[str, PersonaVector]
    summary: dict[str, Any]


def _noop_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def heldout_groups(
    rows: Sequence[ResponseRow], trait: Scores, coherence: Scores, t: Thresholds
) -> tuple[list[ResponseRow], list[ResponseRow], str]:
    """Held-out answers to separate: judge-confirmed if there are enough, else by prompt polarity."""
    labels = {
        "absolute": "judge-confirmed (trait and coherence thresholds)",
        "relative": "judge-confirmed relative to the twin answer (trait margin and coherence)",
        "polarity": "system-prompt polarity (coherent answers; too few judge-confirmed)",
    }
    for make in (absolute, relative, by_polarity):
        kept = make(t)(rows, trait, coherence)
        if len(kept.positive) >= 3 and len(kept.negative) >= 3:
            return kept.positive, kept.negative, labels[kept.mode]
    return (
        [r for r in rows if r.polarity == "pos"],
        [r for r in rows if r.polarity == "neg"],
        "system-prompt polarity (all answers; too few coherent)",
    )


def _plan_sizes(spec: TraitSpec, cfg: RunConfig) -> tuple[int, int, int]:
    """Pairs, extraction questions and held-out questions the run uses."""
    n_pairs = min(cfg.n_pairs or len(spec.pairs), len(spec.pairs))
    n_q = min(cfg.n_questions or len(spec.extraction_questions), len(spec.extraction_questions))
    n_eval = min(cfg.eval_questions or len(spec.evaluation_questions), len(spec.evaluation_questions))
    return n_pairs, n_q, n_eval


def generate_run_answers(
    lm: LoadedModel, spec: TraitSpec, store: JsonlStore, cfg: RunConfig, bar: ProgressFactory
) -> tuple[list[ResponseRow], list[ResponseRow]]:
    """Step 1: extraction answers (every pair x question x polarity) and held-out answers (resumable)."""
    n_pairs, n_q, n_eval = _plan_sizes(spec, cfg)
    rows = generate_responses(
        lm,
        spec,
        store,
        split="extraction",
        rollouts=cfg.rollouts,
        params=cfg.sampling,
        n_pairs=n_pairs,
        n_questions=n_q,
        batch_size=cfg.batch_size,
        on_progress=bar("generating answers", n_pairs * n_q * 2 * cfg.rollouts),
    )
    eval_rows = generate_responses(
        lm,
        spec,
        store,
        split="evaluation",
        rollouts=1,
        params=cfg.sampling,
        n_pairs=n_pairs,
        n_questions=n_eval,
        one_pair_per_question=True,
        batch_size=cfg.batch_size,
        on_progress=bar("held-out answers", n_eval * 2),
    )
    return rows, eval_rows


def judge_run_answers(
    rows: Sequence[ResponseRow],
    trait_judge: Any,
    coherence_judge: Any,
    store: JsonlStore,
    bar: ProgressFactory,
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Step 2: trait and coherence scores of every answer (cached in ``scores.jsonl``)."""
    from personavec.judging.run import judge_responses

    scores = []
    for kind, judge in (("trait", trait_judge), ("coherence", coherence_judge)):
        label = f"judging {kind} ({judge.name.split(':')[0]})"
        scores.append(judge_responses(rows, judge, store, kind=kind, on_progress=bar(label, len(rows))))
    return scores[0], scores[1]


def assess_quality(kept: FilterResult, evaluation: LayerEvaluation, layer: int) -> dict[str, Any]:
    """How far to trust the vector: a level (good / usable / weak), the numbers behind it, and warnings.

    Args:
        kept: The filtering result the vector was made from.
        evaluation: Held-out evaluation of the main vector.
        layer: The recommended layer.

    Returns:
        ``{"level", "warnings", "kept", "heldout_auroc", "heldout_effect_size", "filter", "labels"}``.
    """
    auc = evaluation.auroc[layer - 1]
    d = evaluation.effect_size[layer - 1]
    warnings = [f"{note}; kept answers by their prompts' polarity instead" for note in kept.notes]
    if kept.mode != "absolute":
        warnings.append(
            f"the trait judge rarely confirmed the trait in absolute terms, so answers were kept by the "
            f"{kept.mode} filter: check the example answers, or use a stronger judge (--judge openai:MODEL)"
        )
    n_kept = min(len(kept.positive), len(kept.negative))
    if n_kept < 10:
        warnings.append(f"only {n_kept} answers on the smaller side: raise --rollouts for a steadier vector")
    judged = evaluation.labels.startswith("judge-confirmed")
    if not judged:
        warnings.append("held-out labels come from the prompts, not the judge: the AUROC is optimistic")
    auc_ok = auc == auc
    if auc_ok and auc < 0.75:
        warnings.append(
            f"the model's own held-out answers separate weakly at layer {layer} (AUROC {auc:.2f}): it may "
            "rarely show the trait; check the vector on answers you write (see bench/layer_choice.py)"
        )
    if auc_ok and auc >= 0.9 and kept.mode == "absolute" and judged and n_kept >= 10:
        level = "good"
    elif auc_ok and auc >= 0.75:
        level = "usable"
    else:
        level = "weak"
    return {
        "level": level,
        "warnings": warnings,
        "kept": {"positive": len(kept.positive), "negative": len(kept.negative)},
        "heldout_auroc": auc if auc_ok else None,
        "heldout_effect_size": d if d == d else None,
        "filter": kept.mode,
        "labels": evaluation.labels,
    }


def make_vectors(
    lm: LoadedModel,
    spec: TraitSpec,
    kept: FilterResult,
    extra: dict[str, Any],
    cfg: RunConfig,
    bar: ProgressFactory,
) -> dict[str, PersonaVector]:
    """Step 3: the three poolings' difference of means, and the main vector built from them.

    The main vector (``persona``, saved as ``vector.safetensors``) joins the response-mean vector, the
    spec prompts' last-prompt contrast and the kept answers' same-answer contrast, minus persona
    intensity (:func:`~personavec.extract.extraction.persona_direction`); beyond the paper's capture it
    costs one forward pass per (prompt, extraction question), three plain prompts per question, and
    one more read of every kept answer (under its pair's other prompt), with no generation. The
    same-answer contrast is also saved on its own (``same_answer``).
    """
    n_pairs, n_q, _ = _plan_sizes(spec, cfg)
    require_kept(kept.positive, kept.negative)
    answers = [*kept.positive, *kept.negative]
    acts = capture_answers(lm, answers, cfg.batch_size, bar("capturing activations", len(answers)))
    vectors = extract_vector(lm, kept.positive, kept.negative, trait=spec.name, extra=extra, captures=acts)
    pairs = [(p.positive, p.negative) for p in spec.pairs]
    prompts = prompt_contrast(lm, pairs[:n_pairs], spec.extraction_questions[:n_q], batch_size=cfg.batch_size)
    same = same_answer_contrast(
        lm, answers, pairs, own=acts["response_mean"], batch_size=cfg.batch_size,
        on_progress=bar("reading answers under the other prompt", len(answers)),
    )  # fmt: skip
    response = vectors["response_mean"]
    main = persona_direction(response, prompts, same)
    direction = {
        "direction": "response_mean + spec prompts' last-prompt contrast + same-answer contrast, "
        "orthogonal to persona intensity",
        "prompt_contrast_prompts": prompts.n_prompts,
        "same_answer_reads": len(answers),
        "neutral_system_prompts": list(NEUTRAL_SYSTEM_PROMPTS),
    }
    same_vector = PersonaVector(same.to(response.data), response.meta.replace(method="same_answer"))
    return {
        MAIN: main.with_meta(extra={**main.meta.extra, **direction}),
        **vectors,
        "same_answer": same_vector,
    }


def choose_run_layer(
    lm: LoadedModel, spec: TraitSpec, vector: PersonaVector, evaluation: LayerEvaluation, cfg: RunConfig
) -> LayerChoice:
    """Step 4: the recommended layer, from the spec's persona ladder on the run's held-out questions."""
    n_pairs, _, n_eval = _plan_sizes(spec, cfg)
    ladder = read_ladder(
        lm,
        vector,
        persona_ladder(spec, n_pairs),
        spec.evaluation_questions[:n_eval],
        batch_size=cfg.batch_size,
    )
    return choose_layer(evaluation, ladder, cfg.candidate_layers)


def save_vectors(
    lm: LoadedModel,
    out: Path,
    vectors: dict[str, PersonaVector],
    evaluation: dict[str, LayerEvaluation],
    choice: LayerChoice,
    batch_size: int,
) -> dict[str, str]:
    """Step 5: record the recommendation in each vector, calibrate the main one, and write the files."""
    files: dict[str, str] = {}
    for pooling, vector in vectors.items():
        name = "vector.safetensors" if pooling == MAIN else f"vector_{pooling}.safetensors"
        ev = evaluation[pooling]
        best = {
            "recommended_layer": choice.layer,
            "layer_rule": choice.rule,
            "evaluation_labels": ev.labels,
            "auroc_by_layer": ev.auroc,
            "best_layer_for_this_pooling": ev.best_layer,
        }
        vectors[pooling] = vector.with_meta(extra={**vector.meta.extra, **best})
        if pooling == MAIN:
            # Monitoring reports z-scores and percentiles against neutral prompts; measuring them now
            # costs one forward pass over the built-in neutral prompts.
            vectors[pooling] = calibrate(lm, vectors[pooling], batch_size=batch_size)
        vectors[pooling].save(out / name)
        files[pooling] = name
    return files


def run_extraction(
    lm: LoadedModel,
    spec: TraitSpec,
    out_dir: str | os.PathLike[str],
    *,
    trait_judge: Any,
    coherence_judge: Any,
    config: RunConfig | None = None,
    progress: ProgressFactory | None = None,
) -> RunResult:
    """Run the whole pipeline for one trait and write the run folder.

    The folder gets ``trait.yaml`` (the spec used), ``responses.jsonl`` and ``scores.jsonl`` (resumable
    caches), ``vector.safetensors`` (the main vector, see :func:`make_vectors`),
    ``vector_response_mean.safetensors`` (the paper's vector), ``vector_prompt_mean.safetensors``,
    ``vector_last_prompt.safetensors``, and ``summary.json``.

    Args:
        lm: The target model.
        spec: The trait spec.
        out_dir: The run folder (created; reused to resume).
        trait_judge: A :class:`~personavec.judging.base.Judge` for trait expression.
        coherence_judge: A judge for coherence.
        config: Run size and settings (defaults: all pairs and questions, 1 rollout).
        progress: Progress factory for bars (stage label, total) -> advance callback.

    Returns:
        The vectors and the summary.

    Raises:
        PersonavecError: If too few answers survive filtering (with counts and what to change).
    """
    cfg = config or RunConfig()
    bar = progress or _noop_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trait.yaml").write_text(spec.to_yaml(), encoding="utf-8")
    scores = JsonlStore(out / "scores.jsonl")
    timer = _Timer()

    with timer("generate"):
        rows, eval_rows = generate_run_answers(lm, spec, JsonlStore(out / "responses.jsonl"), cfg, bar)
    with timer("judge"):
        trait_scores, coh_scores = judge_run_answers(
            [*rows, *eval_rows], trait_judge, coherence_judge, scores, bar
        )
    kept = (cfg.filter or auto(cfg.thresholds))(rows, trait_scores, coh_scores)
    extra: dict[str, Any] = {
        "trait_hash": spec.hash,
        "trait_description": spec.description,
        "trait_judge": trait_judge.name,
        "coherence_judge": coherence_judge.name,
        "thresholds": asdict(cfg.thresholds),
        "filter": kept.mode,
        "filter_counts": kept.counts,
        "sampling": asdict(cfg.sampling),
        "rollouts": cfg.rollouts,
    }
    with timer("capture"):
        vectors = make_vectors(lm, spec, kept, extra, cfg, bar)
    with timer("evaluate"):
        pos, neg, labels = heldout_groups(eval_rows, trait_scores, coh_scores, cfg.thresholds)
        evaluation = evaluate_layers(lm, vectors, pos, neg, labels=labels, batch_size=cfg.batch_size)
        choice = choose_run_layer(lm, spec, vectors[MAIN], evaluation[MAIN], cfg)
    files = save_vectors(lm, out, vectors, evaluation, choice, cfg.batch_size)
    summary = _summary(lm, spec, cfg, trait_judge, coherence_judge, rows, eval_rows, kept, evaluation, choice)
    summary.update(files=files, timings_s=timer.timings, score_methods=score_methods_by_kind(scores))
    write_json(out / "summary.json", summary)
    try:
        from personavec.reports import write_report

        write_report(out, lm=lm)
    except Exception as e:  # the vectors and summary are saved; a plotting failure must only warn
        logging.getLogger(__name__).warning("report not written: %s", e)
    return RunResult(out, vectors, summary)


def _summary(
    lm: LoadedModel,
    spec: TraitSpec,
    cfg: RunConfig,
    trait_judge: Any,
    coherence_judge: Any,
    rows: Sequence[ResponseRow],
    eval_rows: Sequence[ResponseRow],
    kept: FilterResult,
    evaluation: dict[str, LayerEvaluation],
    choice: LayerChoice,
) -> dict[str, Any]:
    main = evaluation[MAIN]
    layer = choice.layer
    config = {k: v for k, v in asdict(cfg).items() if k != "filter"}
    return {
        "trait": spec.name,
        "trait_hash": spec.hash,
        "model": lm.info.to_dict(),
        "personavec": __version__,
        "trait_judge": trait_judge.name,
        "coherence_judge": coherence_judge.name,
        "config": {**config, "candidate_layers": choice.candidates},
        "counts": {"responses": len(rows), "heldout": len(eval_rows), **kept.counts, "filter": kept.mode},
        "recommended_layer": layer,
        "recommended_layer_auroc": main.auroc[layer - 1],
        "recommended_layer_effect_size": main.effect_size[layer - 1],
        "layer_choice": choice.to_dict(),
        "quality": assess_quality(kept, main, layer),
        "evaluation": {name: ev.to_dict() for name, ev in evaluation.items()},
    }


class _Timer:
    """Wall time per named stage, as a context manager per stage."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 1)


def score_methods_by_kind(store: JsonlStore) -> dict[str, dict[str, int]]:
    """How each kind of score was read (API judges: ``logprobs`` or ``text``); empty for offline judges."""
    from personavec.judging.run import score_methods

    return {k: m for k in ("trait", "coherence") if (m := score_methods(store, kind=k))}
