"""The pipeline's filtering step: keep the pairs that really differ.

A filter is a small callable ``(rows, trait_scores, coherence_scores) -> FilterResult``, so a researcher
can pass their own. Three ship:

* :func:`absolute` (the paper's rule): keep trait-prompted answers scoring at least ``positive_min`` and
  suppressed answers scoring below ``negative_max``, both coherent.
* :func:`relative`: judge each answer against its twin, the answer to the same question under the
  other prompt of the same pair: keep both when the trait-prompted one scores ``margin`` points higher.
  An offline judge's absolute scale means little for a new trait (a sentence encoder scores every answer
  of a subtle trait low), but it still ranks the two answers of a pair.
* :func:`by_polarity`: every coherent answer by its prompt's polarity.
* :func:`auto` (the default): ``absolute`` when it keeps ``min_kept`` answers a side, else
  ``by_polarity``, and says which one it used, so a weak trait still gives a vector (with a warning)
  instead of a dead end. Measured on three traits the embedded model shows faintly, the relative filter
  kept 5-7 of 60 pairs and its vectors read hand-written answers no better than all 60 a side did
  (docs/results.md, "New traits offline"), so it is a choice (``--filter relative``), not a fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from personavec.core.errors import PersonavecError
from personavec.extract.responses import ResponseRow

Scores = Mapping[str, float | None]


@dataclass(frozen=True)
class Thresholds:
    """Filtering thresholds (scores are 0-100).

    Attributes:
        positive_min: Keep trait-prompted answers scoring at least this on the trait.
        negative_max: Keep suppressed answers scoring below this on the trait.
        coherence_min: Drop answers less coherent than this.
        margin: With the relative filter: how many points a trait-prompted answer must outscore its twin.
        min_kept: With the automatic filter: fewest kept answers a side for the absolute filter to be
            used (7 / 10 on a quick evil run gave a better vector than all 16 / 16).
    """

    positive_min: float = 50.0
    negative_max: float = 50.0
    coherence_min: float = 50.0
    margin: float = 10.0
    min_kept: int = 5


@dataclass(frozen=True)
class FilterResult:
    """Kept responses and why the others were dropped.

    Attributes:
        positive: Kept answers under the trait-eliciting prompts.
        negative: Kept answers under the suppressing prompts.
        counts: ``kept_pos``, ``kept_neg``, and ``dropped_<reason>`` per polarity.
        mode: Which filter kept them (``absolute``, ``relative``, ``polarity``).
        notes: What the automatic filter tried before, in words.
    """

    positive: list[ResponseRow]
    negative: list[ResponseRow]
    counts: dict[str, int] = field(default_factory=dict)
    mode: str = "absolute"
    notes: tuple[str, ...] = ()


Filter = Callable[[Sequence[ResponseRow], Scores, Scores], FilterResult]
"""A filtering strategy: ``(rows, trait_scores, coherence_scores) -> FilterResult``."""


def _empty_counts() -> dict[str, int]:
    return {
        f"{what}_{pol}": 0
        for pol in ("pos", "neg")
        for what in ("total", "kept", "dropped_unscored", "dropped_incoherent", "dropped_trait")
    }


def _reason(row: ResponseRow, trait: Scores, coherence: Scores, coherence_min: float) -> str | None:
    """Why a row cannot be kept whatever its trait score (``None`` if it can)."""
    t, c = trait.get(row.key), coherence.get(row.key)
    if t is None or c is None:
        return "unscored"
    return "incoherent" if c < coherence_min else None


def _collect(
    rows: Sequence[ResponseRow], keep: Callable[[ResponseRow], str | None], mode: str
) -> FilterResult:
    """Apply ``keep`` (row -> drop reason or ``None``) and count kept and dropped per polarity."""
    counts = _empty_counts()
    kept: dict[str, list[ResponseRow]] = {"pos": [], "neg": []}
    for row in rows:
        counts[f"total_{row.polarity}"] += 1
        reason = keep(row)
        if reason is None:
            kept[row.polarity].append(row)
            counts[f"kept_{row.polarity}"] += 1
        else:
            counts[f"dropped_{reason}_{row.polarity}"] += 1
    return FilterResult(kept["pos"], kept["neg"], counts, mode)


def absolute(thresholds: Thresholds | None = None) -> Filter:
    """The paper's filter: absolute trait thresholds per polarity, and a coherence floor."""
    t = thresholds or Thresholds()

    def run(rows: Sequence[ResponseRow], trait: Scores, coherence: Scores) -> FilterResult:
        def keep(row: ResponseRow) -> str | None:
            reason = _reason(row, trait, coherence, t.coherence_min)
            if reason:
                return reason
            score = trait[row.key] or 0.0
            missed = score < t.positive_min if row.polarity == "pos" else score >= t.negative_max
            return "trait" if missed else None  # "trait": the prompt did not produce what it asked for

        return _collect(rows, keep, "absolute")

    return run


def twin_key(row: ResponseRow) -> tuple[str, int, int, int]:
    """What a row shares with its twin under the other prompt of the same pair."""
    return (row.split, row.pair, row.question_index, row.rollout)


def relative(thresholds: Thresholds | None = None) -> Filter:
    """Keep a pair's two answers when the trait-prompted one outscores its twin by ``margin`` points."""
    t = thresholds or Thresholds()

    def run(rows: Sequence[ResponseRow], trait: Scores, coherence: Scores) -> FilterResult:
        by_twin: dict[tuple[str, int, int, int], dict[str, ResponseRow]] = {}
        for row in rows:
            by_twin.setdefault(twin_key(row), {})[row.polarity] = row

        def keep(row: ResponseRow) -> str | None:
            pair = by_twin[twin_key(row)]
            if len(pair) < 2:
                return "unscored"  # no twin to compare with
            if any(_reason(r, trait, coherence, t.coherence_min) for r in pair.values()):
                # An unusable twin leaves nothing to compare against.
                return _reason(row, trait, coherence, t.coherence_min) or "trait"
            gap = (trait[pair["pos"].key] or 0.0) - (trait[pair["neg"].key] or 0.0)
            return None if gap >= t.margin else "trait"

        return _collect(rows, keep, "relative")

    return run


def by_polarity(thresholds: Thresholds | None = None) -> Filter:
    """Keep every coherent answer by its prompt's polarity (no trait judgement at all)."""
    t = thresholds or Thresholds()

    def run(rows: Sequence[ResponseRow], trait: Scores, coherence: Scores) -> FilterResult:
        return _collect(rows, lambda r: _reason(r, trait, coherence, t.coherence_min), "polarity")

    return run


def auto(thresholds: Thresholds | None = None) -> Filter:
    """``absolute`` if it keeps ``min_kept`` a side, else ``by_polarity`` (with a note saying why)."""
    t = thresholds or Thresholds()

    def run(rows: Sequence[ResponseRow], trait: Scores, coherence: Scores) -> FilterResult:
        result = absolute(t)(rows, trait, coherence)
        if min(len(result.positive), len(result.negative)) >= t.min_kept:
            return result
        note = (
            f"the absolute filter kept only {len(result.positive)} positive and "
            f"{len(result.negative)} negative answers (want {t.min_kept} a side)"
        )
        return replace(by_polarity(t)(rows, trait, coherence), notes=(note,))

    return run


def filter_responses(
    rows: Sequence[ResponseRow],
    trait_scores: Scores,
    coherence_scores: Scores,
    thresholds: Thresholds | None = None,
) -> FilterResult:
    """Keep trait-prompted answers that show the trait and suppressed ones that do not, both coherent.

    The paper's absolute filter (see :func:`absolute`); :func:`auto` is the pipeline's default.

    Args:
        rows: Responses of both polarities.
        trait_scores: Response key -> trait score (``None`` = unscored).
        coherence_scores: Response key -> coherence score (``None`` = unscored).
        thresholds: The thresholds (defaults: 50 / 50 / 50).

    Returns:
        The kept responses and counts of kept and dropped, per reason and polarity.
    """
    return absolute(thresholds)(rows, trait_scores, coherence_scores)


FILTERS: dict[str, Callable[[Thresholds | None], Filter]] = {
    "auto": auto,
    "absolute": absolute,
    "relative": relative,
    "polarity": by_polarity,
}


def make_filter(name: str, thresholds: Thresholds | None = None) -> Filter:
    """The filter called ``name`` (``auto``, ``absolute``, ``relative``, ``polarity``) with these thresholds.

    Raises:
        PersonavecError: For an unknown name.
    """
    if name not in FILTERS:
        raise PersonavecError(f"unknown filter '{name}': choose one of {', '.join(FILTERS)}")
    return FILTERS[name](thresholds)
