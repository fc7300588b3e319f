"""The pipeline's judging step: score every response with a judge, cached and resumable.

Each score is one record of the store (``scores.jsonl``): ``key``, ``response_key``, ``judge``, ``kind``
and ``score``. A judge that says how it read each reply (an API judge's ``methods``: ``"logprobs"`` or
``"text"`` when the server sends no logprobs) adds ``method`` to the records it scores; other judges,
and records written before the field existed, have none. :func:`score_methods` counts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from personavec.core.store import JsonlStore, record_key
from personavec.extract.responses import ResponseRow
from personavec.judging.base import Judge, JudgeItem


def _methods(judge: Judge, n: int) -> list[str | None] | None:
    """How the judge's last ``score`` call read each of its ``n`` items, if it says so for all of them."""
    methods = getattr(judge, "methods", None)
    if not isinstance(methods, Sequence) or isinstance(methods, str) or len(methods) != n:
        return None
    return [m if isinstance(m, str) else None for m in methods]


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

    When the judge exposes ``methods`` after each ``score`` call (one entry per item, as ``ApiJudge``
    does), each new record also gets a ``method`` field: how that score was read (``"logprobs"``,
    ``"text"``, or ``None`` when no reply was read: an empty answer, a failed request). It is not part of
    the cache key.

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
        scores: dict[str, float | None] = {}
        methods: dict[str, str | None] | None = None
        if scorable:
            keys = [r.key for r in scorable]
            scores = dict(
                zip(keys, judge.score([JudgeItem(r.question, r.answer) for r in scorable]), strict=True)
            )
            read = _methods(judge, len(scorable))
            methods = None if read is None else dict(zip(keys, read, strict=True))
        records = []
        for r in batch:
            record = {
                "key": key(r),
                "response_key": r.key,
                "judge": judge.name,
                "kind": kind,
                "score": scores.get(r.key),
            }
            if methods is not None:
                record["method"] = methods.get(r.key)
            records.append(record)
        store.append(records)
        if on_progress is not None:
            on_progress(len(batch))
    out: dict[str, float | None] = {}
    for r in rows:
        rec = store.get(key(r))
        out[r.key] = None if rec is None or rec["score"] is None else float(rec["score"])
    return out


def score_methods(store: JsonlStore, *, kind: str | None = None, judge: str | None = None) -> dict[str, int]:
    """Count how the stored scores were read, per method (``{"logprobs": 120, "text": 8}``).

    Only records with a ``method`` count: those of judges that report one (API judges). A reply that
    was read but gave no score (a refusal, no number) still counts under how it was read; records
    with ``method: None`` (no reply read), records of other judges and records written before the
    field existed are left out, so a store without any gives ``{}``.

    Args:
        store: Score cache (``scores.jsonl``) written by :func:`judge_responses`.
        kind: Count only this kind of score (``trait`` or ``coherence``); ``None`` counts all.
        judge: Count only this judge's scores (its ``name``); ``None`` counts all.

    Returns:
        Method -> number of records, methods in sorted order.
    """
    counts = Counter(
        str(rec["method"])
        for rec in store.records()
        if rec.get("method") is not None
        and (kind is None or rec.get("kind") == kind)
        and (judge is None or rec.get("judge") == judge)
    )
    return dict(sorted(counts.items()))
