"""Trait answers for extraction: every (pair, polarity, question, rollout) answered once, resumably."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, iter_generate
from personavec.core.models import LoadedModel
from personavec.core.store import JsonlStore, record_key
from personavec.traits.spec import TraitSpec


@dataclass(frozen=True)
class ResponseRow:
    """One generated answer of the pipeline, with everything that identifies it.

    Attributes:
        key: Stable identity (model, trait, split, pair, polarity, question, rollout, sampling).
        split: ``extraction`` or ``evaluation``.
        pair: Index of the system-prompt pair.
        polarity: ``pos`` (trait-eliciting prompt) or ``neg`` (suppressing prompt).
        question_index: Index within the split's questions.
        rollout: Rollout number.
        system: The system prompt used.
        question: The user question.
        answer: The model's answer.
    """

    key: str
    split: str
    pair: int
    polarity: str
    question_index: int
    rollout: int
    system: str
    question: str
    answer: str

    def conversation(self, *, with_system: bool = True) -> list[dict[str, str]]:
        """The chat (system, user, assistant), optionally without the system prompt."""
        msgs = [{"role": "system", "content": self.system}] if with_system else []
        return [
            *msgs,
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]

    @classmethod
    def from_record(cls, record: dict[str, object]) -> ResponseRow:
        """Rebuild a row from its stored JSON record."""
        names = cls.__dataclass_fields__
        return cls(**{k: record[k] for k in names})  # type: ignore[arg-type]


def planned_rows(
    lm: LoadedModel,
    spec: TraitSpec,
    split: str,
    *,
    rollouts: int,
    params: SamplingParams,
    n_pairs: int | None = None,
    n_questions: int | None = None,
    one_pair_per_question: bool = False,
) -> list[dict[str, object]]:
    """The rows a run will need, as records without answers (identity fields and key only).

    Args:
        lm: The target model (its fingerprint is part of every key).
        spec: The trait spec.
        split: ``extraction`` or ``evaluation`` (which question list to use).
        rollouts: Answers per (pair, polarity, question).
        params: Sampling parameters (part of every key).
        n_pairs: Use only the first pairs.
        n_questions: Use only the first questions.
        one_pair_per_question: Cycle through the pairs instead of crossing every pair with every question
            (cheaper; used for evaluation).

    Returns:
        Records in a fixed order.
    """
    if split not in ("extraction", "evaluation"):
        raise PersonavecError(f"split must be 'extraction' or 'evaluation', not '{split}'")
    questions = spec.extraction_questions if split == "extraction" else spec.evaluation_questions
    questions = questions[:n_questions] if n_questions else questions
    pairs = spec.pairs[:n_pairs] if n_pairs else spec.pairs
    rows: list[dict[str, object]] = []
    for qi, question in enumerate(questions):
        pair_ids = [qi % len(pairs)] if one_pair_per_question else list(range(len(pairs)))
        for pi in pair_ids:
            for polarity in ("pos", "neg"):
                system = pairs[pi].positive if polarity == "pos" else pairs[pi].negative
                for r in range(rollouts):
                    ident = {
                        "model": lm.info.fingerprint,
                        "trait": spec.hash,
                        "split": split,
                        "pair": pi,
                        "polarity": polarity,
                        "question": question,
                        "rollout": r,
                        "sampling": asdict(params),
                    }
                    rows.append(
                        {
                            "key": record_key(ident),
                            "split": split,
                            "pair": pi,
                            "polarity": polarity,
                            "question_index": qi,
                            "rollout": r,
                            "system": system,
                            "question": question,
                        }
                    )
    return rows


def generate_responses(
    lm: LoadedModel,
    spec: TraitSpec,
    store: JsonlStore,
    *,
    split: str = "extraction",
    rollouts: int = 1,
    params: SamplingParams | None = None,
    n_pairs: int | None = None,
    n_questions: int | None = None,
    one_pair_per_question: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[ResponseRow]:
    """Answer the trait's questions under its positive and negative system prompts (resumable).

    Rows already in ``store`` are reused; the rest are generated in batches and appended to the store
    as each batch finishes, so a killed run loses at most the batches in flight.

    Args:
        lm: The target model.
        spec: The trait spec.
        store: Where finished rows are kept (``responses.jsonl``).
        split: ``extraction`` or ``evaluation``.
        rollouts: Answers per (pair, polarity, question).
        params: Sampling parameters (default: temperature 0.7, top-p 0.9, 64 tokens).
        n_pairs: Use only the first pairs.
        n_questions: Use only the first questions.
        one_pair_per_question: Cycle pairs over questions instead of crossing them.
        batch_size: Prompts per ``generate`` call.
        workers: Batches generated at once (see :func:`generate`).
        on_progress: Called with the number of rows finished (including reused ones).

    Returns:
        All planned rows with their answers, in plan order.
    """
    params = params or SamplingParams(temperature=0.7, top_p=0.9)
    plan = planned_rows(
        lm,
        spec,
        split,
        rollouts=rollouts,
        params=params,
        n_pairs=n_pairs,
        n_questions=n_questions,
        one_pair_per_question=one_pair_per_question,
    )
    todo = [r for r in plan if str(r["key"]) not in store]
    if on_progress is not None and len(plan) > len(todo):
        on_progress(len(plan) - len(todo))
    if not todo:
        return [ResponseRow.from_record(store.get(str(r["key"])) or {}) for r in plan]
    convs = [
        [{"role": "system", "content": str(r["system"])}, {"role": "user", "content": str(r["question"])}]
        for r in todo
    ]
    # The row seed comes from the key, so a row's answer is the same whatever batch it lands in.
    seeds = [int(str(r["key"])[:8], 16) for r in todo]
    batches = iter_generate(lm, convs, params, seeds=seeds, batch_size=batch_size, workers=workers)
    for start, answers in zip(range(0, len(todo), batch_size), batches):
        batch = todo[start : start + batch_size]
        store.append([{**r, "answer": a} for r, a in zip(batch, answers, strict=True)])
        if on_progress is not None:
            on_progress(len(batch))
    return [ResponseRow.from_record(store.get(str(r["key"])) or {}) for r in plan]
