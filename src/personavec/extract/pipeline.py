"""The whole extraction run: trait spec -> answers -> scores -> kept pairs -> vectors -> evaluation.

Each step is a public function of its own module (``traits.build_artifacts``,
``extract.responses.generate_responses``, ``judging.run.judge_responses``,
``extract.filtering.filter_responses``, ``extract.extraction.extract_vector``), so a researcher can swap
any of them; :func:`run_extraction` only wires them together and writes the run folder. Generation and
judging are cached in JSONL stores in that folder, so rerunning the same command after a crash resumes
where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from personavec import __version__
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel
from personavec.core.store import JsonlStore
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import evaluate_layers, extract_vector, finite_or_low
from personavec.extract.filtering import Thresholds, filter_responses
from personavec.extract.responses import ResponseRow, generate_responses
from personavec.monitor.monitoring import calibrate
from personavec.traits.spec import TraitSpec

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
    """

    rollouts: int = 1
    n_pairs: int | None = None
    n_questions: int | None = None
    eval_questions: int | None = None
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(64, 0.7, 0.9, 0))
    thresholds: Thresholds = field(default_factory=Thresholds)
    candidate_layers: Sequence[int] | None = None
    batch_size: int = 16


QUICK = RunConfig(
    rollouts=1, n_pairs=2, n_questions=8, eval_questions=10, sampling=SamplingParams(40, 0.7, 0.9, 0)
)


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


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _noop_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def _heldout_groups(
    rows: Sequence[ResponseRow],
    trait: dict[str, float | None],
    coherence: dict[str, float | None],
    t: Thresholds,
) -> tuple[list[ResponseRow], list[ResponseRow], str]:
    """Held-out answers to separate: judge-confirmed if there are enough, else by prompt polarity."""
    kept = filter_responses(rows, trait, coherence, t)
    if len(kept.positive) >= 3 and len(kept.negative) >= 3:
        return kept.positive, kept.negative, "judge-confirmed (trait and coherence thresholds)"
    coherent = [r for r in rows if (coherence.get(r.key) or 0.0) >= t.coherence_min]
    pos = [r for r in coherent if r.polarity == "pos"]
    neg = [r for r in coherent if r.polarity == "neg"]
    if len(pos) >= 2 and len(neg) >= 2:
        return pos, neg, "system-prompt polarity (coherent answers; too few judge-confirmed)"
    return (
        [r for r in rows if r.polarity == "pos"],
        [r for r in rows if r.polarity == "neg"],
        "system-prompt polarity (all answers; too few coherent)",
    )


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
    caches), ``vector.safetensors`` (response-mean pooling), ``vector_prompt_mean.safetensors``,
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
    from personavec.judging.run import judge_responses

    cfg = config or RunConfig()
    bar = progress or _noop_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trait.yaml").write_text(spec.to_yaml(), encoding="utf-8")
    responses = JsonlStore(out / "responses.jsonl")
    scores = JsonlStore(out / "scores.jsonl")
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[], None]:
        t0 = time.perf_counter()
        return lambda: timings.__setitem__(name, round(time.perf_counter() - t0, 1))

    n_pairs = min(cfg.n_pairs or len(spec.pairs), len(spec.pairs))
    n_q = min(cfg.n_questions or len(spec.extraction_questions), len(spec.extraction_questions))
    n_eval = min(cfg.eval_questions or len(spec.evaluation_questions), len(spec.evaluation_questions))
    n_rows = n_pairs * n_q * 2 * cfg.rollouts

    done = stage("generate")
    rows = generate_responses(
        lm,
        spec,
        responses,
        split="extraction",
        rollouts=cfg.rollouts,
        params=cfg.sampling,
        n_pairs=n_pairs,
        n_questions=n_q,
        batch_size=cfg.batch_size,
        on_progress=bar("generating answers", n_rows),
    )
    eval_rows = generate_responses(
        lm,
        spec,
        responses,
        split="evaluation",
        rollouts=1,
        params=cfg.sampling,
        n_pairs=n_pairs,
        n_questions=n_eval,
        one_pair_per_question=True,
        batch_size=cfg.batch_size,
        on_progress=bar("held-out answers", n_eval * 2),
    )
    done()

    done = stage("judge")
    everything = [*rows, *eval_rows]
    trait_scores = judge_responses(
        everything,
        trait_judge,
        scores,
        kind="trait",
        on_progress=bar(f"judging trait ({trait_judge.name.split(':')[0]})", len(everything)),
    )
    coh_scores = judge_responses(
        everything,
        coherence_judge,
        scores,
        kind="coherence",
        on_progress=bar(f"judging coherence ({coherence_judge.name.split(':')[0]})", len(everything)),
    )
    done()

    kept = filter_responses(rows, trait_scores, coh_scores, cfg.thresholds)
    extra: dict[str, Any] = {
        "trait_hash": spec.hash,
        "trait_description": spec.description,
        "trait_judge": trait_judge.name,
        "coherence_judge": coherence_judge.name,
        "thresholds": asdict(cfg.thresholds),
        "filter_counts": kept.counts,
        "sampling": asdict(cfg.sampling),
        "rollouts": cfg.rollouts,
    }
    done = stage("capture")
    vectors = extract_vector(
        lm,
        kept.positive,
        kept.negative,
        trait=spec.name,
        extra=extra,
        batch_size=cfg.batch_size,
        on_progress=bar("capturing activations", len(kept.positive) + len(kept.negative)),
    )
    done()

    done = stage("evaluate")
    pos, neg, labels = _heldout_groups(eval_rows, trait_scores, coh_scores, cfg.thresholds)
    evaluation = evaluate_layers(lm, vectors, pos, neg, labels=labels, batch_size=cfg.batch_size)
    main_eval = evaluation["response_mean"]
    candidates = list(cfg.candidate_layers) if cfg.candidate_layers else main_eval.layers
    bad = [c for c in candidates if c not in main_eval.layers]
    if bad:
        raise PersonavecError(f"layer {bad[0]} is out of range: choose layers in 1..{lm.info.n_blocks}")
    recommended = max(
        candidates,
        key=lambda layer: (
            finite_or_low(main_eval.auroc[layer - 1]),
            finite_or_low(main_eval.effect_size[layer - 1]),
        ),
    )
    done()

    unscored = {
        kind: sum(1 for v in s.values() if v is None)
        for kind, s in (("trait", trait_scores), ("coherence", coh_scores))
    }
    evaluation_json = {name: ev.to_dict() for name, ev in evaluation.items()}
    rec = {
        "recommended_layer": recommended,
        "recommended_layer_auroc": main_eval.auroc[recommended - 1],
        "recommended_layer_effect_size": main_eval.effect_size[recommended - 1],
    }
    files: dict[str, str] = {}
    for pooling, vector in vectors.items():
        name = "vector.safetensors" if pooling == "response_mean" else f"vector_{pooling}.safetensors"
        ev = evaluation[pooling]
        best = {
            "recommended_layer": recommended,
            "evaluation_labels": ev.labels,
            "auroc_by_layer": ev.auroc,
            "best_layer_for_this_pooling": ev.best_layer,
        }
        vectors[pooling] = vector.with_meta(extra={**vector.meta.extra, **best})
        if pooling == "response_mean":
            # Monitoring reports z-scores and percentiles against neutral prompts; measuring them now
            # costs one forward pass over the built-in neutral prompts.
            vectors[pooling] = calibrate(lm, vectors[pooling], batch_size=cfg.batch_size)
        vectors[pooling].save(out / name)
        files[pooling] = name
    summary = {
        "trait": spec.name,
        "trait_hash": spec.hash,
        "model": lm.info.to_dict(),
        "personavec": __version__,
        "trait_judge": trait_judge.name,
        "coherence_judge": coherence_judge.name,
        "config": {**asdict(cfg), "candidate_layers": candidates},
        "counts": {"responses": len(rows), "heldout": len(eval_rows), **kept.counts, "unscored": unscored},
        **rec,
        "evaluation": evaluation_json,
        "files": files,
        "timings_s": timings,
    }
    _write_json(out / "summary.json", summary)
    try:
        from personavec.reports import write_report

        write_report(out, lm=lm)
    except Exception as e:  # the vectors and summary are saved; a plotting failure must only warn
        logging.getLogger(__name__).warning("report not written: %s", e)
    return RunResult(out, vectors, summary)
