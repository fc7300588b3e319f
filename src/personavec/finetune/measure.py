"""Base against tuned, for several vectors at once: what ``personavec shift`` prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.finetune.shift import JudgeFn, Measurement, base_reader, compare, measure
from personavec.finetune.tuned import open_tuned
from personavec.judging.base import JudgeItem


def judge_fn(spec: str | None, trait: Any, lm: LoadedModel) -> JudgeFn:
    """A trait judge (``make_trait_judge`` spec) as a function of ``(question, answer)`` pairs."""
    from personavec.judging import make_trait_judge

    judge = make_trait_judge(spec, trait, lm)
    return lambda items: judge.score([JudgeItem(q, a) for q, a in items])


def measure_shifts(
    lm: LoadedModel,
    tuned: str | Path,
    vector_paths: Sequence[str],
    *,
    trait: str | None = None,
    layer: int | None = None,
    judge: str | None = None,
    generate: bool = True,
    capability: bool = True,
    mmlu: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Measure each vector's finetuning shift (and expression, and capability) of ``tuned`` over ``lm``.

    Args:
        lm: The base model (an adapter is injected into it for the tuned measurements).
        tuned: Adapter folder or model folder.
        vector_paths: Persona vector files.
        trait: Trait name or spec whose evaluation questions to use (default: each vector's own).
        layer: Headline layer (default: each vector's recommended layer).
        judge: Trait judge spec for expression (``None``: the offline embedding judge).
        generate: Generate answers to measure trait expression.
        capability: Run the capability probe on both.
        mmlu: Local MMLU copy for the probe.
        log: Progress messages.

    Returns:
        A JSON-able report: ``vectors`` (one :meth:`ShiftReport.to_dict` each) and ``capability``.
    """
    from personavec.traits import trait_for_vector

    plans = []
    for path in vector_paths:
        vec = PersonaVector.load(path)
        vec.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
        at = layer if layer is not None else vec.require_recommended_layer()
        check_layers([at], lm.info.n_blocks, allow_embeddings=False)
        spec = trait_for_vector(str(vec.meta.trait), path, trait)
        plans.append(
            (vec, at, list(spec.evaluation_questions), judge_fn(judge, spec, lm) if generate else None)
        )
    log("measuring the base model ...")
    before = [_measure(lm, p, lm, None, generate) for p in plans]
    cap_before = _capability(lm, mmlu) if capability else None
    handle = open_tuned(lm, tuned)
    log(f"measuring the tuned model ({handle.kind}) ...")
    after = [_measure(handle.lm, p, lm, handle.base, generate) for p in plans]
    cap_after = _capability(handle.lm, mmlu) if capability else None
    reports = [compare(b, a, p[0].meta.trait, p[1]).to_dict() for b, a, p in zip(before, after, plans)]
    report: dict[str, Any] = {
        "base": lm.info.id,
        "tuned": str(tuned),
        "kind": handle.kind,
        "vectors": reports,
    }
    report["capability"] = {"base": cap_before, "tuned": cap_after} if capability else None
    return report


def _measure(
    target: LoadedModel, plan: tuple[Any, ...], base: LoadedModel, base_ctx: Any, generate: bool
) -> Measurement:
    vec, at, questions, jf = plan
    reader = base_reader(base, vec, at, base_ctx) if generate else None
    return measure(target, vec, questions, reader=reader, judge=jf)


def _capability(lm: LoadedModel, mmlu: Path | None) -> dict[str, Any]:
    from personavec.finetune.capability import capability_probe

    return capability_probe(lm, mmlu_path=mmlu).to_dict()
