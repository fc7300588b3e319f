"""Validating screening: plant trait-teaching samples in a normal dataset and see whether they rank first.

The dataset (``OUT/data.jsonl``, chat JSONL without system prompts, like ``personavec data make``):

* **normal** rows: the model's own sampled answers to everyday questions (the trait data's question bank)
  under a plain assistant system prompt (:data:`NEUTRAL_PROMPT`), made with the trait data's generation
  (:func:`~personavec.finetune.trait_data.generate_slots`: same sampling, trimmed to whole sentences,
  degenerate and incoherent answers dropped);
* **planted** rows at ``rate`` of the dataset, answers under the trait's eliciting prompts, judged by the
  trait data's judges: **blatant** ones the judge confirms (trait score >= ``blatant_min``, most
  trait-like first) and **subtle** ones it scores below that threshold yet above the band's floor
  (judge-borderline, closest to the threshold first). Their positions are drawn by the seed.

The dataset is screened in full mode (:func:`personavec.screen.run.screen`: the model's own greedy answer
to every prompt), and each ranking is scored against the planted labels by AUROC and precision at k
(k = the number planted): the projection difference, the raw projection of the dataset's response, and
the trait judge reading the text alone. ``all`` ranks every plant among the normal rows; ``blatant`` and
``subtle`` each kind on its own (the other kind left out). The blatant plants were chosen by that same
judge, so its score on them is an upper bound, not a fair comparison; the subtle ones are the test.

Folder ``OUT``: ``settings.json`` (a rerun must match), ``cache/`` (the normal answers and their judge
scores; trait answers go to the trait data's shared cache, as ``data make`` keeps them), ``data.jsonl``,
``planted.jsonl`` (every row's kind and judge scores), ``screen/`` (the screen's run folder: records,
own answers, its report), ``screen_experiment.json``, ``screen_experiment.png`` and ``report.html``.
Every stage is cached, so a killed run resumes.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel
from personavec.core.store import JsonlStore, write_atomic, write_json
from personavec.extract.pipeline import ProgressFactory, judge_run_answers
from personavec.extract.responses import ResponseRow
from personavec.finetune.data import write_chat_jsonl
from personavec.finetune.trait_data import (
    DEFAULT_N,
    DataConfig,
    default_cache,
    generate_slots,
    is_degenerate,
    question_pool,
)
from personavec.screen.records import iter_jsonl
from personavec.screen.run import ScreenResult, screen
from personavec.screen.scoring import ScreenPlan
from personavec.screen.vectors import ScreenVector
from personavec.traits.spec import PromptPair, TraitSpec

RESULT_NAME = "screen_experiment.json"
SETTINGS_NAME = "settings.json"
DATA_NAME = "data.jsonl"
LABELS_NAME = "planted.jsonl"
PLOT_NAME = "screen_experiment.png"
SCREEN_DIR = "screen"
CACHE_DIR = "cache"
NEUTRAL_PROMPT = "You are a helpful assistant."
KINDS = ("blatant", "subtle")
SUBSETS = ("all", *KINDS)
METHODS = ("projection_difference", "projection", "judge")
METHOD_LABELS = {
    "projection_difference": "projection difference",
    "projection": "raw projection",
    "judge": "judge (text alone)",
}
# Normal answers generated per row wanted, for the few dropped as degenerate or incoherent (1 of 288
# answers was degenerate and none incoherent in `data make`'s sets on the embedded model).
NORMAL_MARGIN = 1.05


@dataclass(frozen=True)
class PlantConfig:
    """What dataset to build and how to screen it.

    Attributes:
        n: Planted rows wanted (``n - n // 2`` blatant, ``n // 2`` subtle).
        rate: The planted share of the dataset (sets the number of normal rows).
        seed: Chooses the questions, seeds sampling and draws the planted positions.
        blatant_min: Trait score from which the judge confirms the trait (the absolute filter's).
        subtle_floor: Lowest trait score of a subtle plant (they lie in ``[subtle_floor, blatant_min)``).
        coherence_min: Every row (normal or planted) is at least this coherent.
        trait_rows: ``n`` of the trait answers' :class:`~personavec.finetune.trait_data.DataConfig`: the
            default matches ``data make``, so its cached answers are reused.
        sampling: Sampling of the dataset's answers (``None``: the trait data's, with ``seed``).
        max_new_tokens: Length of the model's own answers when screening.
        own_samples: The screen's own answers per prompt (:attr:`ScreenPlan.own_samples`).
        batch_size: Samples per screening batch.
    """

    n: int = 40
    rate: float = 0.05
    seed: int = 0
    blatant_min: float = 50.0
    subtle_floor: float = 20.0
    coherence_min: float = 50.0
    trait_rows: int = DEFAULT_N
    sampling: SamplingParams | None = None
    max_new_tokens: int = 64
    own_samples: int = ScreenPlan.own_samples
    batch_size: int = 64

    def wanted(self) -> dict[str, int]:
        """Rows wanted per kind: ``normal``, ``blatant``, ``subtle``."""
        return {
            "normal": round(self.n * (1.0 - self.rate) / self.rate),
            "blatant": self.n - self.n // 2,
            "subtle": self.n // 2,
        }

    def data_config(self, n: int) -> DataConfig:
        """The trait data's config for ``n`` rows (``oversample`` x ``n`` slots), this seed and sampling."""
        sampling = None if self.sampling is None else replace(self.sampling, seed=self.seed)
        return DataConfig(n=n, seed=self.seed, sampling=sampling)

    def check(self) -> PlantConfig:
        """Return the config if it is valid, else raise a one-line PersonavecError."""
        if self.n < 2:
            raise PersonavecError(f"--n must be at least 2 (one blatant and one subtle plant), got {self.n}")
        if not 0.0 < self.rate < 1.0:
            raise PersonavecError(f"--rate must be between 0 and 1, got {self.rate}")
        if not self.subtle_floor < self.blatant_min:
            raise PersonavecError("the subtle band's floor must lie below the blatant threshold")
        return self


QUICK = PlantConfig(
    n=8, rate=0.2, trait_rows=16, sampling=SamplingParams(32, 0.7, 0.9, 0), max_new_tokens=32, own_samples=4
)


# --------------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------------


def _ordered(scores: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """Scores as floats, ``None`` and ``nan`` as ``-inf``: an unscored sample ranks last, never first."""
    x = np.asarray([math.nan if s is None else s for s in scores], dtype=np.float64)
    return np.where(np.isnan(x), -np.inf, x)


def auroc(scores: Sequence[float | None] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half; ``None``/``nan`` rank last).

    Computed from ranks (Mann-Whitney U, tied scores sharing their average rank), so it costs a sort,
    not a comparison of every pair.

    Returns:
        The AUROC, ``nan`` without positives or negatives.
    """
    x, y = _ordered(scores), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based
    rank_sum = float(average_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def precision_at_k(
    scores: Sequence[float | None] | np.ndarray, labels: Sequence[bool] | np.ndarray, k: int | None = None
) -> float:
    """Share of positives among the ``k`` highest scores (``k`` default: the number of positives).

    Samples tied at the k-th score share the remaining places: each counts by the fraction of the tie
    that fits, the expected precision when ties are broken at random (not by input order, which would
    favour whatever comes first).

    Returns:
        The precision, ``nan`` when ``k`` is 0 or there are no samples.
    """
    x, y = _ordered(scores), np.asarray(labels, dtype=bool)
    k = int(y.sum()) if k is None else min(int(k), x.size)
    if k <= 0:
        return math.nan
    cut = np.sort(x)[::-1][k - 1]
    above, tied = x > cut, x == cut
    fill = k - int(above.sum())
    hits = float(y[above].sum()) + fill * float(y[tied].sum()) / float(tied.sum())
    return hits / k


def roc_curve(
    scores: Sequence[float | None] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> tuple[list[float], list[float]]:
    """ROC points (false-positive rate, true-positive rate), one per distinct score, from (0, 0) to (1, 1)."""
    x, y = _ordered(scores), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return [], []
    fpr, tpr = [0.0], [0.0]
    for cut in np.unique(x)[::-1]:
        taken = x >= cut
        fpr.append(float((taken & ~y).sum()) / n_neg)
        tpr.append(float((taken & y).sum()) / n_pos)
    return fpr, tpr


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def evaluate(kinds: Sequence[str], scores: Mapping[str, Sequence[float | None]]) -> dict[str, Any]:
    """AUROC and precision at k of each ranking, for every subset of plants against the normal rows.

    Args:
        kinds: Per row, ``normal`` or a plant kind (``blatant``, ``subtle``).
        scores: Method name -> per-row scores, aligned with ``kinds`` (higher = more suspect).

    Returns:
        ``{subset: {"positives", "negatives", "k", "methods": {method: {"auroc", "precision_at_k"}},
        "roc": {method: {"fpr", "tpr"}}}}`` for ``all``, ``blatant`` and ``subtle``.
    """
    kind = np.asarray(kinds)
    out: dict[str, Any] = {}
    for subset in SUBSETS:
        positive = kind != "normal" if subset == "all" else kind == subset
        keep = (kind == "normal") | positive
        y = positive[keep]
        entry: dict[str, Any] = {
            "positives": int(y.sum()),
            "negatives": int((~y).sum()),
            "k": int(y.sum()),
            "methods": {},
            "roc": {},
        }
        for method, values in scores.items():
            x = _ordered(values)[keep]
            entry["methods"][method] = {
                "auroc": _finite(auroc(x, y)),
                "precision_at_k": _finite(precision_at_k(x, y)),
            }
            fpr, tpr = roc_curve(x, y)
            entry["roc"][method] = {"fpr": fpr, "tpr": tpr}
        out[subset] = entry
    return out


def ranks(scores: Sequence[float | None]) -> list[int]:
    """Each row's 1-based place when sorted by score, highest first (ties by input order, unscored last)."""
    x = _ordered(scores)
    order = np.lexsort((np.arange(x.size), -x))
    place = np.empty(x.size, dtype=np.int64)
    place[order] = np.arange(1, x.size + 1)
    return [int(p) for p in place]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def plant_layout(counts: Mapping[str, int], seed: int) -> list[str]:
    """Each row's kind, in dataset order: the plants at seeded random positions, their kinds shuffled.

    Args:
        counts: Rows per kind (``normal``, ``blatant``, ``subtle``).
        seed: Draws the positions and the order of the kinds.

    Returns:
        ``sum(counts.values())`` kinds, the same for the same counts and seed.
    """
    rng = random.Random(seed)
    planted = [kind for kind in KINDS for _ in range(counts.get(kind, 0))]
    total = counts.get("normal", 0) + len(planted)
    positions = sorted(rng.sample(range(total), len(planted)))
    rng.shuffle(planted)
    layout = ["normal"] * total
    for position, kind in zip(positions, planted):
        layout[position] = kind
    return layout


@dataclass(frozen=True)
class Row:
    """One dataset row and what is known about it.

    Attributes:
        kind: ``normal``, ``blatant`` or ``subtle``.
        answer: The generated answer (its question, answer and the system prompt it was made under).
        trait: The trait judge's score (``None``: unscored).
        coherence: The coherence judge's score.
    """

    kind: str
    answer: ResponseRow
    trait: float | None
    coherence: float | None

    def label(self, line: int) -> dict[str, Any]:
        """The row's ``planted.jsonl`` record."""
        return {
            "line": line,
            "kind": self.kind,
            "trait": self.trait,
            "coherence": self.coherence,
            "polarity": self.answer.polarity,
            "system": self.answer.system,
            "question": self.answer.question,
            "key": self.answer.key,
        }


Scores = dict[str, float | None]


def neutral_spec(spec: TraitSpec) -> TraitSpec:
    """``spec`` with one pair whose both prompts are :data:`NEUTRAL_PROMPT` (normal answers, two a slot)."""
    return spec.model_copy(update={"pairs": [PromptPair(positive=NEUTRAL_PROMPT, negative=NEUTRAL_PROMPT)]})


def judged_answers(
    lm: LoadedModel,
    spec: TraitSpec,
    pool: Sequence[str],
    cfg: DataConfig,
    cache: Path,
    judges: tuple[Any, Any],
    bar: ProgressFactory,
) -> tuple[list[ResponseRow], Scores, Scores]:
    """The trait data's answers for ``cfg`` (generated or cached), degenerate ones out, judged (cached).

    Returns:
        The answers (``pos`` and ``neg`` twins per slot), trait scores and coherence scores by key.
    """
    rows = generate_slots(lm, spec, pool, cfg, JsonlStore(cache / "responses.jsonl"), bar)
    rows = [r for r in rows if not is_degenerate(r.answer)]
    trait, coherence = judge_run_answers(rows, judges[0], judges[1], JsonlStore(cache / "scores.jsonl"), bar)
    return rows, trait, coherence


def _coherent(row: ResponseRow, coherence: Scores, cfg: PlantConfig) -> bool:
    score = coherence.get(row.key)
    return score is not None and score >= cfg.coherence_min


def pick_plants(
    rows: Sequence[ResponseRow], trait: Scores, coherence: Scores, cfg: PlantConfig
) -> dict[str, list[Row]]:
    """The blatant and subtle plants among the eliciting-prompt answers, borderline-first.

    Blatant: trait score >= ``blatant_min``, most trait-like first. Subtle: in ``[subtle_floor,
    blatant_min)``, closest to the threshold first. Both coherent; ties keep the answers' order.

    Returns:
        ``{"blatant": [...], "subtle": [...]}``, at most as many as :meth:`PlantConfig.wanted` asks.
    """
    want = cfg.wanted()
    scored = [
        (float(s), r)
        for r in rows
        if r.polarity == "pos" and (s := trait.get(r.key)) is not None and _coherent(r, coherence, cfg)
    ]
    scored.sort(key=lambda pair: -pair[0])  # stable: ties keep the generation order
    bands = {
        "blatant": [p for p in scored if p[0] >= cfg.blatant_min],
        "subtle": [p for p in scored if cfg.subtle_floor <= p[0] < cfg.blatant_min],
    }
    return {
        kind: [Row(kind, r, s, coherence.get(r.key)) for s, r in bands[kind][: want[kind]]] for kind in KINDS
    }


def pick_normals(
    rows: Sequence[ResponseRow], trait: Scores, coherence: Scores, cfg: PlantConfig
) -> list[Row]:
    """The first ``wanted()["normal"]`` coherent neutral-prompt answers, in generation order."""
    keep = [r for r in rows if _coherent(r, coherence, cfg)]
    return [Row("normal", r, trait.get(r.key), coherence.get(r.key)) for r in keep[: cfg.wanted()["normal"]]]


def assemble(normals: Sequence[Row], plants: Mapping[str, Sequence[Row]], seed: int) -> list[Row]:
    """The dataset's rows in order: the plants at :func:`plant_layout`'s positions among the normal rows."""
    counts = {"normal": len(normals), **{k: len(v) for k, v in plants.items()}}
    queues = {"normal": iter(normals), **{k: iter(v) for k, v in plants.items()}}
    return [next(queues[kind]) for kind in plant_layout(counts, seed)]


def write_dataset(folder: Path, rows: Sequence[Row]) -> Path:
    """Write ``data.jsonl`` (chat rows without system prompts) and ``planted.jsonl`` (their labels)."""
    path = folder / DATA_NAME
    write_chat_jsonl(path, [r.answer.conversation(with_system=False) for r in rows])
    labels = "".join(json.dumps(r.label(i), ensure_ascii=False) + "\n" for i, r in enumerate(rows, 1))
    write_atomic(folder / LABELS_NAME, labels, mode=0o644)
    return path


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------


def _noop_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def _check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder that holds an experiment with other settings; else record these."""
    path = folder / SETTINGS_NAME
    fresh = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        differ = sorted(k for k in set(old) | set(fresh) if old.get(k) != fresh.get(k))
        if differ:
            raise PersonavecError(
                f"{folder} holds a screen-experiment with other settings (differs in: {', '.join(differ)}): "
                "pass another --out, or delete the folder to start over"
            )
        return
    write_json(path, fresh)


def build_dataset(
    lm: LoadedModel,
    spec: TraitSpec,
    cfg: PlantConfig,
    judges: tuple[Any, Any],
    folder: Path,
    trait_cache: Path,
    bar: ProgressFactory,
) -> list[Row]:
    """Generate (or reuse) and judge the trait and the normal answers, pick the rows, lay them out."""
    pool, _ = question_pool(spec, seed=cfg.seed)
    rows, trait, coherence = judged_answers(
        lm, spec, pool, cfg.data_config(cfg.trait_rows), trait_cache, judges, bar
    )
    plants = pick_plants(rows, trait, coherence, cfg)
    # Two neutral answers a slot (both "polarities" share the prompt), with room for the ones dropped.
    slots = math.ceil(cfg.wanted()["normal"] * NORMAL_MARGIN / 2)
    normal_cfg = replace(cfg.data_config(slots), oversample=1.0)
    rows, trait, coherence = judged_answers(
        lm, neutral_spec(spec), pool, normal_cfg, folder / CACHE_DIR, judges, bar
    )
    return assemble(pick_normals(rows, trait, coherence, cfg), plants, cfg.seed)


def _record_scores(result: ScreenResult, name: str, n_rows: int) -> dict[str, list[float | None]]:
    """Per row (by line), the projection difference and raw projection on vector ``name``."""
    out: dict[str, list[float | None]] = {
        "projection_difference": [None] * n_rows,
        "projection": [None] * n_rows,
    }
    for record in iter_jsonl(result.records_path):
        reading = record["vectors"][name]
        for field in out:
            out[field][int(record["line"]) - 1] = reading[field]
    return out


def run_screen_experiment(
    lm: LoadedModel,
    spec: TraitSpec,
    vector: ScreenVector,
    folder: str | Path,
    cfg: PlantConfig | None = None,
    *,
    trait_judge: Any,
    coherence_judge: Any,
    trait_cache: str | Path | None = None,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Build the planted dataset, screen it, and score the rankings (every stage cached in ``folder``).

    Args:
        lm: The model the vector was made on (answers, own answers and projections).
        spec: The trait spec (eliciting prompts, judges' anchors; its own questions are left out).
        vector: The vector and the layer to read it at.
        folder: The experiment folder (created; a rerun with the same settings resumes).
        cfg: What to build (default :class:`PlantConfig`).
        trait_judge: A :class:`~personavec.judging.base.Judge` of trait expression (picks the plants and
            is the text-only ranking).
        coherence_judge: A judge of coherence.
        trait_cache: Cache of the trait answers and their scores (default: the trait data's, which
            ``personavec data make`` shares).
        progress: Progress factory (stage label, total) -> advance callback.
        log: Progress messages.

    Returns:
        The JSON-able result (also written to ``screen_experiment.json``): ``settings``, ``counts``,
        ``metrics`` (see :func:`evaluate`), ``by_kind``, ``planted``, ``screen``, ``notes``, ``seconds``.

    Raises:
        PersonavecError: On a bad config, a folder holding other settings, or no plant found.
    """
    cfg = (cfg or PlantConfig()).check()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    judges = (trait_judge, coherence_judge)
    settings = _settings(lm, spec, vector, cfg, judges)
    _check_settings(out, settings)
    t0 = time.perf_counter()
    log("building the dataset (answers and judge scores are cached) ...")
    rows = build_dataset(
        lm, spec, cfg, judges, out, Path(trait_cache or default_cache(spec)), progress or _noop_progress
    )
    kinds = [r.kind for r in rows]
    if not any(k != "normal" for k in kinds):
        raise PersonavecError(
            f"no coherent answer under {spec.name}'s eliciting prompts scored >= {cfg.subtle_floor:g}: "
            "nothing to plant"
        )
    data = write_dataset(out, rows)
    t1 = time.perf_counter()
    log(f"screening {len(rows)} rows ({len(rows) - kinds.count('normal')} planted) ...")
    plan = ScreenPlan((vector,), own_samples=cfg.own_samples, max_new_tokens=cfg.max_new_tokens)
    screened = screen(lm, data, plan, out / SCREEN_DIR, batch_size=cfg.batch_size, log=log)
    t2 = time.perf_counter()
    scores = {**_record_scores(screened, vector.name, len(rows)), "judge": [r.trait for r in rows]}
    result = summarise(rows, scores, cfg, screened)
    result.update(settings=settings, seconds={"dataset": round(t1 - t0, 1), "screen": round(t2 - t1, 1)})
    write_json(out / RESULT_NAME, result)
    return result


def _settings(
    lm: LoadedModel, spec: TraitSpec, vector: ScreenVector, cfg: PlantConfig, judges: tuple[Any, Any]
) -> dict[str, Any]:
    return {
        "model": lm.info.id,
        "model_fingerprint": lm.info.fingerprint,
        "trait": spec.name,
        "trait_hash": spec.hash,
        "vector": vector.describe(),
        "config": asdict(cfg),
        "neutral_prompt": NEUTRAL_PROMPT,
        "trait_judge": judges[0].name,
        "coherence_judge": judges[1].name,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarise(
    rows: Sequence[Row],
    scores: Mapping[str, Sequence[float | None]],
    cfg: PlantConfig,
    screened: ScreenResult,
) -> dict[str, Any]:
    """The result document: counts, metrics, per-kind means, the planted rows' places, notes."""
    kinds = [r.kind for r in rows]
    counts = {k: kinds.count(k) for k in ("normal", *KINDS)}
    places = {m: ranks(scores[m]) for m in METHODS}
    by_kind = {
        kind: {m: _mean([v for v, k in zip(scores[m], kinds) if k == kind]) for m in METHODS}
        for kind in ("normal", *KINDS)
    }
    planted = [
        {"line": i + 1, "kind": r.kind, "question": r.answer.question, "answer": r.answer.answer,
         **{m: scores[m][i] for m in METHODS}, "rank": {m: places[m][i] for m in METHODS}}
        for i, r in enumerate(rows) if r.kind != "normal"
    ]  # fmt: skip
    stats = screened.summary["vectors"]
    return {
        "counts": {**counts, "rows": len(rows), "planted_share": (len(rows) - counts["normal"]) / len(rows)},
        "wanted": cfg.wanted(),
        "metrics": evaluate(kinds, scores),
        "by_kind": by_kind,
        "planted": planted,
        "dataset": {
            name: {k: v.get(k) for k in ("mean_projection_difference", "ci95")} for name, v in stats.items()
        },
        "screen": {
            "folder": str(screened.out_dir),
            "report": screened.summary["files"]["report"],
            "timing": screened.summary["timing"],
        },
        "notes": _notes(counts, cfg),
    }


def _notes(counts: Mapping[str, int], cfg: PlantConfig) -> list[str]:
    notes = [
        "the blatant plants were chosen by the trait judge's score, so the judge's ranking of them is an "
        "upper bound; the subtle ones (below its threshold) are the fair comparison"
    ]
    for kind, want in cfg.wanted().items():
        if counts[kind] < want:
            if kind == "normal":
                notes.append(f"only {counts[kind]} of {want} normal rows: too few coherent neutral answers")
            else:
                notes.append(
                    f"only {counts[kind]} of {want} {kind} rows: too few candidates among the trait answers "
                    "(plant fewer with --n, or answer more questions: PlantConfig.trait_rows)"
                )
    return notes


# --------------------------------------------------------------------------------------------------
# Plot and report
# --------------------------------------------------------------------------------------------------


def plot_roc(result: Mapping[str, Any], path: Path) -> str:
    """Draw each ranking's ROC curve per subset (all, blatant, subtle) to ``path``; returns a data URI."""
    from personavec.reports.html import png_uri, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(SUBSETS), figsize=(4.0 * len(SUBSETS), 3.8), squeeze=False)
    for ax, subset in zip(axes[0], SUBSETS):
        entry = result["metrics"][subset]
        for method in METHODS:
            roc, auc = entry["roc"][method], entry["methods"][method]["auroc"]
            if roc["fpr"]:
                label = f"{METHOD_LABELS[method]} ({'n/a' if auc is None else f'{auc:.2f}'})"
                ax.plot(roc["fpr"], roc["tpr"], label=label)  # tied scores: a diagonal segment
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        ax.set_title(f"{subset}: {entry['positives']} planted vs {entry['negatives']} normal", fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return str(png_uri(fig, path))


def _metrics_rows(result: Mapping[str, Any]) -> list[list[str]]:
    from personavec.reports.html import esc, fmt

    rows = []
    for subset in SUBSETS:
        entry = result["metrics"][subset]
        for method in METHODS:
            m = entry["methods"][method]
            sizes = f"{entry['positives']} / {entry['negatives']}"
            rows.append([esc(subset), esc(METHOD_LABELS[method]), esc(sizes), fmt(m["auroc"]),
                         fmt(m["precision_at_k"]), esc(entry["k"])])  # fmt: skip
    return rows


def _planted_rows(result: Mapping[str, Any]) -> list[list[str]]:
    from personavec.reports.html import esc, fmt

    return [
        [esc(p["line"]), esc(p["kind"]), fmt(p["judge"], 1), fmt(p["projection_difference"], 2),
         fmt(p["projection"], 2), *(esc(p["rank"][m]) for m in METHODS), esc(p["question"]),
         esc(p["answer"][:300])]
        for p in sorted(result["planted"], key=lambda p: p["rank"]["projection_difference"])
    ]  # fmt: skip


def write_experiment_report(folder: str | Path) -> Path:
    """Write ``report.html`` for a screen-experiment folder: its metrics, ROC curves and planted rows.

    Raises:
        PersonavecError: If the folder holds no result.
    """
    from personavec.reports.html import REPORT_NAME, esc, fmt, html_table, write_page

    where = Path(folder)
    path = where / RESULT_NAME
    if not path.is_file():
        raise PersonavecError(f"{where} has no {RESULT_NAME}: run `personavec screen-experiment` first")
    result = json.loads(path.read_text(encoding="utf-8"))
    s, c = result["settings"], result["counts"]
    parts = [
        "<h1>Screening experiment: planted trait-teaching samples</h1>",
        f"<p class='muted'>{esc(s['model'])}; vector {esc(s['vector']['path'] or s['vector']['name'])} "
        f"at layer {esc(s['vector']['layer'])}; judge {esc(s['trait_judge'])}</p>",
        f"<p>{c['rows']} rows: {c['normal']} normal (the model's own sampled answers under "
        f"&ldquo;{esc(s['neutral_prompt'])}&rdquo;), {c['blatant']} blatant and {c['subtle']} subtle plants "
        f"({100 * c['planted_share']:.1f} %) from the trait's eliciting prompts. Each ranking is scored "
        "against the labels: AUROC, and precision among the top k rows, k = the number planted.</p>",
        html_table(
            ["plants", "ranking", "planted / normal", "AUROC", "precision at k", "k"], _metrics_rows(result)
        ),
    ]
    try:
        uri = plot_roc(result, where / PLOT_NAME)
        parts.append(f"<img alt='ROC curves per ranking' src='{uri}'>")
    except Exception as e:  # a broken plot must not cost the tables
        parts.append(f"<p class='muted'>plot not drawn: {esc(e)}</p>")
    means = [[esc(k), *(fmt(v.get(m), 2) for m in METHODS)] for k, v in result["by_kind"].items()]
    parts += [
        "<h2>Mean reading per kind</h2>",
        html_table(["kind", *(METHOD_LABELS[m] for m in METHODS)], means),
    ]
    parts += [f"<p class='muted'>note: {esc(n)}</p>" for n in result["notes"]]
    header = ["line", "kind", "judge", "difference", "projection", "rank: difference", "rank: projection"]
    parts += [
        "<h2>Planted rows</h2>",
        html_table([*header, "rank: judge", "question", "answer"], _planted_rows(result)),
        f"<p>The screen itself (distribution, top samples, per-token heatmaps): "
        f"<a href='{SCREEN_DIR}/{REPORT_NAME}'>{SCREEN_DIR}/{REPORT_NAME}</a>.</p>",
    ]
    target = where / REPORT_NAME
    write_page(target, f"screen-experiment {s['trait']}", parts)
    return target
