"""The pipeline's filtering step: keep the pairs that really differ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from personavec.extract.responses import ResponseRow


@dataclass(frozen=True)
class Thresholds:
    """Filtering thresholds (scores are 0-100).

    Attributes:
        positive_min: Keep trait-prompted answers scoring at least this on the trait.
        negative_max: Keep suppressed answers scoring below this on the trait.
        coherence_min: Drop answers less coherent than this.
    """

    positive_min: float = 50.0
    negative_max: float = 50.0
    coherence_min: float = 50.0


@dataclass(frozen=True)
class FilterResult:
    """Kept responses and why the others were dropped.

    Attributes:
        positive: Kept answers under the trait-eliciting prompts.
        negative: Kept answers under the suppressing prompts.
        counts: ``kept_pos``, ``kept_neg``, and ``dropped_<reason>`` per polarity.
    """

    positive: list[ResponseRow]
    negative: list[ResponseRow]
    counts: dict[str, int] = field(default_factory=dict)


def filter_responses(
    rows: Sequence[ResponseRow],
    trait_scores: Mapping[str, float | None],
    coherence_scores: Mapping[str, float | None],
    thresholds: Thresholds | None = None,
) -> FilterResult:
    """Keep trait-prompted answers that show the trait and suppressed ones that do not, both coherent.

    Args:
        rows: Responses of both polarities.
        trait_scores: Response key -> trait score (``None`` = unscored).
        coherence_scores: Response key -> coherence score (``None`` = unscored).
        thresholds: The thresholds (defaults: 50 / 50 / 50).

    Returns:
        The kept responses and counts of kept and dropped, per reason and polarity.
    """
    t = thresholds or Thresholds()
    counts = {
        f"{what}_{pol}": 0
        for pol in ("pos", "neg")
        for what in ("total", "kept", "dropped_unscored", "dropped_incoherent", "dropped_trait")
    }
    kept: dict[str, list[ResponseRow]] = {"pos": [], "neg": []}
    for row in rows:
        pol = row.polarity
        counts[f"total_{pol}"] += 1
        trait, coh = trait_scores.get(row.key), coherence_scores.get(row.key)
        if trait is None or coh is None:
            reason = "unscored"
        elif coh < t.coherence_min:
            reason = "incoherent"
        elif (pol == "pos" and trait < t.positive_min) or (pol == "neg" and trait >= t.negative_max):
            reason = "trait"  # the prompt did not produce the behaviour it asked for
        else:
            kept[pol].append(row)
            counts[f"kept_{pol}"] += 1
            continue
        counts[f"dropped_{reason}_{pol}"] += 1
    return FilterResult(kept["pos"], kept["neg"], counts)
