"""The pipeline's judging step: score every response with a judge, cached and resumable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from personavec.core.store import JsonlStore, record_key
from personavec.extract.responses import ResponseRow
from personavec.judging.base import Judge, JudgeItem


def judge_responses(
    rows: Sequence[ResponseRow],
    judge: Judge,
    store: JsonlStore,
    *,
    kind: str,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, float | None]:
    """Score each response (0-100, ``None`` = unscored) and cache the scores in ``store``.

    Args:
        rows: Responses to score.
        judge: The judge (its ``name`` is part of the cache key).
        store: Score cache (``scores.jsonl``).
        kind: What is scored, ``trait`` or ``coherence`` (part of the cache key).
        batch_size: Answers per ``judge.score`` call; each finished batch is written at once.
        on_progress: Called with the number of rows finished (including cached ones).

    Returns:
        Response key -> score.
    """

    def key(row: ResponseRow) -> str:
        return record_key({"response": row.key, "judge": judge.name, "kind": kind})

    todo = [r for r in rows if key(r) not in store]
    if on_progress is not None and len(rows) > len(todo):
        on_progress(len(rows) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        scorable = [r for r in batch if r.answer.strip()]
        # An empty answer cannot be judged: it is recorded as unscored, not as 0.
        scores = (
            dict(
                zip(
                    [r.key for r in scorable],
                    judge.score([JudgeItem(r.question, r.answer) for r in scorable]),
                    strict=True,
                )
            )
            if scorable
            else {}
        )
        store.append(
            [
                {
                    "key": key(r),
                    "response_key": r.key,
                    "judge": judge.name,
                    "kind": kind,
                    "score": scores.get(r.key),
                }
                for r in batch
            ]
        )
        if on_progress is not None:
            on_progress(len(batch))
    out: dict[str, float | None] = {}
    for r in rows:
        rec = store.get(key(r))
        out[r.key] = None if rec is None or rec["score"] is None else float(rec["score"])
    return out
