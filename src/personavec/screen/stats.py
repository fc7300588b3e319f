"""Dataset-level scores from the records: means with bootstrap intervals, rankings, cheap/full agreement.

Everything is computed by streaming ``records.jsonl`` once; per vector only the finite projection
differences (and, in full mode, the cheap stand-in's differences) are kept as numpy arrays, plus the
``top_k`` records, so memory is a few numbers per sample and never a record per sample.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personavec.screen.records import iter_jsonl

BOOTSTRAP_RESAMPLES = 1000
HISTOGRAM_BINS = 40
# Bootstrap index draws held at once (resamples x samples), bounding memory on big datasets.
_DRAWS_AT_ONCE = 4_000_000


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of the finite values and its percentile bootstrap interval (seeded, so reproducible).

    Args:
        values: The numbers (``nan``/``inf`` are left out).
        resamples: Bootstrap resamples.
        seed: Seed of numpy's generator.
        level: Coverage of the interval.

    Returns:
        ``(mean, low, high)``; all ``nan`` without finite values, ``low == high == mean`` with one.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, min(resamples, _DRAWS_AT_ONCE // x.size))
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        means[start : start + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, float(low), float(high)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 0, tied values sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


@dataclass(frozen=True)
class Agreement:
    """How well one score agrees with another over the same samples.

    Attributes:
        pearson: Pearson correlation (``nan`` when undefined).
        spearman: Spearman rank correlation (``nan`` when undefined).
        n: Samples where both were finite.
    """

    pearson: float
    spearman: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``nan`` as ``None``)."""
        return {"pearson": _finite(self.pearson), "spearman": _finite(self.spearman), "n": self.n}


def agreement(
    reference: Sequence[float] | np.ndarray, approximation: Sequence[float] | np.ndarray
) -> Agreement:
    """Pearson and Spearman correlation of two scores over the samples where both are finite.

    Both are unchanged by scaling or shifting either score, so they measure whether the approximation
    orders and spaces samples like the reference, not whether it shares its units.

    Args:
        reference: E.g. the full projection differences.
        approximation: E.g. the cheap ones, aligned with ``reference``.

    Returns:
        The :class:`Agreement`.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(approximation, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores of different lengths: {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    return Agreement(_pearson(a, b), _pearson(_ranks(a), _ranks(b)), int(a.size))


def linear_fit(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Least-squares line ``y ~ slope * x + intercept`` over the pairs where both are finite.

    Returns:
        ``{"slope", "intercept", "pearson"}`` (``None`` where undefined: fewer than two points, or no
        spread in ``x``).
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or float(a.std()) == 0.0:
        return {"slope": None, "intercept": None, "pearson": None}
    slope, intercept = np.polyfit(a, b, 1)
    return {"slope": float(slope), "intercept": float(intercept), "pearson": _finite(_pearson(a, b))}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class VectorStats:
    """One vector's dataset-level reading.

    Attributes:
        name: The vector's name.
        n: Samples with a finite projection difference.
        undefined: Samples without one (e.g. an empty own answer).
        mean_projection: Mean projection of the dataset's responses.
        mean_own_projection: Mean projection of the model's own answers (or the cheap stand-in).
        mean_projection_difference: Mean projection difference, the dataset's score.
        ci95: Seeded percentile-bootstrap 95% interval of that mean.
        std_projection_difference: Standard deviation of the differences.
        cheap_agreement: In a full run, agreement of the cheap difference (``projection -
            prompt_projection``) with the full one; ``None`` in a cheap run.
        raw_agreement: In a full run, agreement of the raw ``projection`` (nothing subtracted) with the
            full difference: what subtracting the model's own answer adds.
        own_fit: In a full run, the least-squares line ``own_projection ~ slope * prompt_projection +
            intercept`` (and its Pearson r): how the cheap stand-in's scale relates to the own answer's.
        top: The ``top_k`` records with the largest difference, largest first.
        histogram: ``(counts, bin edges)`` of the differences.
    """

    name: str
    n: int
    undefined: int
    mean_projection: float
    mean_own_projection: float
    mean_projection_difference: float
    ci95: tuple[float, float]
    std_projection_difference: float
    cheap_agreement: Agreement | None
    raw_agreement: Agreement | None = None
    own_fit: dict[str, float | None] | None = None
    top: tuple[dict[str, Any], ...] = ()
    histogram: tuple[tuple[int, ...], tuple[float, ...]] = field(default=((), ()))

    def to_dict(self, *, with_top: bool = True) -> dict[str, Any]:
        """JSON-able form."""
        out: dict[str, Any] = {
            "n": self.n,
            "undefined": self.undefined,
            "mean_projection": _finite(self.mean_projection),
            "mean_own_projection": _finite(self.mean_own_projection),
            "mean_projection_difference": _finite(self.mean_projection_difference),
            "ci95": [_finite(self.ci95[0]), _finite(self.ci95[1])],
            "std_projection_difference": _finite(self.std_projection_difference),
            "cheap_agreement": None if self.cheap_agreement is None else self.cheap_agreement.to_dict(),
            "raw_agreement": None if self.raw_agreement is None else self.raw_agreement.to_dict(),
            "own_fit": self.own_fit,
        }
        if with_top:
            out["top"] = list(self.top)
        return out


@dataclass(frozen=True)
class DatasetScores:
    """Every vector's :class:`VectorStats` and the ranking used for dropping.

    Attributes:
        n_records: Records read.
        vectors: Name -> stats, in the vectors' order.
        ranking: Input lines ordered by the ranking vector's difference, largest first (undefined last).
    """

    n_records: int
    vectors: dict[str, VectorStats]
    ranking: np.ndarray


class _Column:
    """Values of one reading over the records (a growing float array, not a list of objects)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.buffer: list[float] = []

    def add(self, value: float | None) -> None:
        self.buffer.append(math.nan if value is None else float(value))
        if len(self.buffer) >= 65536:
            self.parts.append(np.asarray(self.buffer, dtype=np.float64))
            self.buffer = []

    def array(self) -> np.ndarray:
        return np.concatenate([*self.parts, np.asarray(self.buffer, dtype=np.float64)])


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def dataset_scores(
    records: str | Path,
    names: Sequence[str],
    primary: str,
    *,
    cheap: bool,
    top_k: int = 10,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> DatasetScores:
    """Read ``records.jsonl`` once and score the dataset per vector.

    Args:
        records: The records file.
        names: The vector names.
        primary: The ranking vector (its order gives :attr:`DatasetScores.ranking`).
        cheap: Whether the run was cheap (then there is no cheap/full agreement to measure).
        top_k: Records kept per vector, largest difference first.
        resamples: Bootstrap resamples for the intervals.
        seed: Bootstrap seed.

    Returns:
        The :class:`DatasetScores`.
    """
    columns = {name: {f: _Column() for f in ("projection", "own", "difference", "prompt")} for name in names}
    lines = _Column()
    heaps: dict[str, list[tuple[float, int, dict[str, Any]]]] = {name: [] for name in names}
    n = 0
    for r in iter_jsonl(Path(records)):
        n += 1
        lines.add(r["line"])
        for name in names:
            vs = r["vectors"][name]
            column = columns[name]
            column["projection"].add(vs["projection"])
            column["own"].add(vs["own_projection"])
            column["difference"].add(vs["projection_difference"])
            column["prompt"].add(vs["prompt_projection"])
            diff = vs["projection_difference"]
            if diff is None or top_k <= 0:
                continue
            # Ties go to the earlier line: -line is larger for it.
            item = (float(diff), -int(r["line"]), r)
            heap = heaps[name]
            if len(heap) < top_k:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
    stats: dict[str, VectorStats] = {}
    ranking = np.zeros(0, dtype=np.int64)
    line_arr = lines.array().astype(np.int64)
    for name in names:
        values = {k: c.array() for k, c in columns[name].items()}
        diff = values["difference"]
        finite = np.isfinite(diff)
        mean, low, high = bootstrap_mean_ci(diff, resamples=resamples, seed=seed)
        counts, edges = (np.zeros(0), np.zeros(0))
        if finite.any():
            counts, edges = np.histogram(diff[finite], bins=HISTOGRAM_BINS)
        cheap_diff = values["projection"] - values["prompt"]
        stats[name] = VectorStats(
            name=name,
            n=int(finite.sum()),
            undefined=int((~finite).sum()),
            mean_projection=_nanmean(values["projection"]),
            mean_own_projection=_nanmean(values["own"]),
            mean_projection_difference=mean,
            ci95=(low, high),
            std_projection_difference=float(diff[finite].std(ddof=1)) if finite.sum() > 1 else math.nan,
            cheap_agreement=None if cheap else agreement(diff, cheap_diff),
            raw_agreement=None if cheap else agreement(diff, values["projection"]),
            own_fit=None if cheap else linear_fit(values["prompt"], values["own"]),
            top=tuple(item[2] for item in sorted(heaps[name], key=lambda t: (-t[0], -t[1]))),
            histogram=(tuple(int(c) for c in counts), tuple(float(e) for e in edges)),
        )
        if name == primary:
            # Largest difference first, ties by input order, undefined readings last.
            order_key = np.where(finite, -diff, np.inf)
            ranking = line_arr[np.lexsort((line_arr, order_key))]
    return DatasetScores(n, stats, ranking)
