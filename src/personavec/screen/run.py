"""The screening driver: stream the data in batches, score them, write records in input order, resume.

:func:`screen` reads the data once, lazily, cuts it into batches of ``batch_size`` valid samples, hands
them to a :data:`~personavec.screen.scoring.Scorer` (in-process by default; a cluster scorer only has to
return the results in the order it got the batches) and appends each batch's records and new own answers
as whole, fsync'ed lines. Only the batches in flight are in memory.

Run folder ``OUT``:

* ``screen.json``: the settings; a rerun with the same settings resumes, other settings are refused;
* ``records.jsonl`` (schema in :mod:`personavec.screen.records`) and ``records.csv``;
* ``own_answers.jsonl``: the model's own answers (full mode), reused by a rerun;
* ``summary.json``: dataset scores per vector, ranking, agreement, timing; ``report.html``;
* with ``drop_top``: ``filtered.<ext>`` (or ``filtered/``) and ``dropped.jsonl``.

A rerun after a kill keeps the whole batches already written and screens the rest: no sample is lost or
written twice, and every file comes out as an uninterrupted run would have written it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.store import write_json
from personavec.finetune.data import data_format
from personavec.screen.filtering import DropSpec, write_filtered
from personavec.screen.records import (
    ANSWERS_NAME,
    RECORDS_CSV_NAME,
    RECORDS_NAME,
    AnswerCache,
    ResumePoint,
    append_lines,
    iter_jsonl,
    make_record,
    records_to_csv,
    resume_records,
)
from personavec.screen.samples import Sample, SkippedRow, iter_samples
from personavec.screen.scoring import (
    Scorer,
    ScreenBatch,
    ScreenPlan,
    TokenTrace,
    local_scorer,
    trace_tokens,
)
from personavec.screen.stats import BOOTSTRAP_RESAMPLES, DatasetScores, dataset_scores

SETTINGS_NAME = "screen.json"
SUMMARY_NAME = "summary.json"
DROPPED_NAME = "dropped.jsonl"
SHOWN_SKIPPED = 5  # malformed rows named in the log and the summary (all are counted)
SHOWN_DROPPED = 1000  # dropped lines listed in the summary (all are in dropped.jsonl)
TRACED = 5  # top samples per vector whose tokens the report colours


@dataclass(frozen=True)
class ScreenResult:
    """What :func:`screen` produced.

    Attributes:
        out_dir: The run folder.
        summary: The content of ``summary.json``.
        scores: The dataset-level scores.
        traces: Per vector, the per-token projections of its top samples (for the report).
    """

    out_dir: Path
    summary: dict[str, Any]
    scores: DatasetScores
    traces: dict[str, list[TokenTrace]]

    @property
    def records_path(self) -> Path:
        """``OUT/records.jsonl``."""
        return self.out_dir / RECORDS_NAME


def data_fingerprint(path: str | Path) -> str:
    """SHA-256 of the data's bytes (a folder: of its files, by relative name), read in blocks."""
    root = Path(path)
    # A datasets folder may gain cache-*.arrow files from readers; they are not the data.
    files = (
        sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("cache-"))
        if root.is_dir()
        else [root]
    )
    h = hashlib.sha256()
    for file in files:
        if root.is_dir():
            h.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def check_settings(out_dir: Path, settings: dict[str, Any]) -> bool:
    """Refuse to mix runs: ``OUT/screen.json`` must hold the same settings, or is written now.

    Returns:
        Whether the folder already held a run with these settings (a resume).

    Raises:
        PersonavecError: Naming the settings that differ (one line).
    """
    path = out_dir / SETTINGS_NAME
    if path.is_file():
        import json

        old = json.loads(path.read_text(encoding="utf-8"))
        fresh = json.loads(json.dumps(settings, default=str))
        differ = sorted(k for k in set(old) | set(fresh) if old.get(k) != fresh.get(k))
        if differ:
            raise PersonavecError(
                f"{out_dir} holds a screen with other settings (differs in: {', '.join(differ)}): "
                "pass another --out, or delete the folder to start over"
            )
        return True
    write_json(path, settings)
    return False


@dataclass
class _Reading:
    """Counts kept while the data streams past (mutable: the batch generator updates it)."""

    skipped: int = 0
    skipped_examples: list[str] | None = None
    valid: int = 0


def _batches(
    data: Path,
    batch_size: int,
    keep: int,
    keep_last_line: int | None,
    cache: AnswerCache | None,
    reading: _Reading,
    log: Callable[[str], None],
) -> Iterator[ScreenBatch]:
    """Batches of ``batch_size`` valid samples after the first ``keep`` (already screened) ones."""
    reading.skipped_examples = []
    current: list[Sample] = []

    def make(samples: list[Sample]) -> ScreenBatch:
        answers = tuple(cache.lookup(s) for s in samples) if cache is not None else (None,) * len(samples)
        return ScreenBatch((reading.valid - 1) // batch_size, tuple(samples), answers)

    for item in iter_samples(data):
        if isinstance(item, SkippedRow):
            reading.skipped += 1
            if len(reading.skipped_examples) < SHOWN_SKIPPED:
                reading.skipped_examples.append(item.describe())
                log(f"skipped {item.describe()}")
            continue
        reading.valid += 1
        if reading.valid <= keep:
            if reading.valid == keep and item.line != keep_last_line:
                raise PersonavecError(
                    f"records.jsonl ends at line {keep_last_line} but sample {keep} of the data is at line "
                    f"{item.line}: the data changed; pass another --out"
                )
            continue
        current.append(item)
        if len(current) == batch_size:
            yield make(current)
            current = []
    if current:
        yield make(current)


@dataclass
class _Totals:
    """What the batches of this run added up to."""

    screened: int = 0
    generated: int = 0
    generation_s: float = 0.0
    capture_s: float = 0.0


def _score_stream(
    batches: Iterator[ScreenBatch],
    scorer: Scorer,
    records: Path,
    cache: AnswerCache | None,
    primary: str,
    first_index: int,
    on_batch: Callable[[int], None],
) -> _Totals:
    """Feed the batches to the scorer and write each result (answers first, then records) in order."""
    in_flight: dict[int, ScreenBatch] = {}

    def remembered() -> Iterator[ScreenBatch]:
        # The scorer may run ahead; the driver keeps the batches it handed out until their results return.
        for batch in batches:
            in_flight[batch.index] = batch
            yield batch

    totals = _Totals()
    expected = first_index
    for result in scorer(remembered()):
        if result.index != expected:
            raise PersonavecError(f"the scorer returned batch {result.index} where batch {expected} was due")
        expected += 1
        batch = in_flight.pop(result.index)
        if cache is not None:
            cache.store([(s, sc.own_answers or ()) for s, sc in zip(batch.samples, result.scores)])
        append_lines(records, [make_record(s, sc, primary) for s, sc in zip(batch.samples, result.scores)])
        totals.screened += len(batch.samples)
        totals.generated += result.generated
        totals.generation_s += result.generation_seconds
        totals.capture_s += result.capture_seconds
        on_batch(totals.screened)
    return totals


def _fetch_samples(data: Path, lines: set[int]) -> dict[int, Sample]:
    """The samples at ``lines`` (a handful), by streaming the data again."""
    found: dict[int, Sample] = {}
    if not lines:
        return found
    for item in iter_samples(data):
        if isinstance(item, Sample) and item.line in lines:
            found[item.line] = item
            if len(found) == len(lines):
                break
    return found


def _write_dropped(records: Path, drop_lines: np.ndarray, target: Path) -> None:
    """The dropped samples' records, streamed into ``target`` in input order."""
    wanted = set(int(x) for x in drop_lines)
    target.unlink(missing_ok=True)
    chunk: list[dict[str, Any]] = []
    for r in iter_jsonl(records):
        if int(r["line"]) in wanted:
            chunk.append(r)
            if len(chunk) == 4096:
                append_lines(target, chunk)
                chunk = []
    append_lines(target, chunk)
    target.touch()


def screen(
    lm: LoadedModel,
    data: str | Path,
    plan: ScreenPlan,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    rank_by: str | None = None,
    drop_top: DropSpec | None = None,
    top_k: int = 10,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    scorer: Scorer | None = None,
    report: bool = True,
    on_progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> ScreenResult:
    """Screen a dataset with persona vectors: per-sample records, dataset scores, ranking, report.

    The summary's ``timing`` sums the batches' generation and capture seconds, so with a scorer running
    several workers at once they can exceed the wall time (``screen_seconds``).

    Args:
        lm: The model (scores the batches unless ``scorer`` is given; traces the top samples).
        data: Chat JSONL, parquet, CSV (prompt/response columns) or a datasets ``save_to_disk`` folder.
        plan: The vectors and the mode (:class:`~personavec.screen.scoring.ScreenPlan`).
        out_dir: The run folder (created; a rerun with the same settings resumes).
        batch_size: Valid samples per batch (the unit written at once, and sent to a scorer).
        rank_by: The vector that ranks samples (default: the first).
        drop_top: Write the data without its top-ranked samples.
        top_k: Top samples listed per vector.
        resamples: Bootstrap resamples for the dataset intervals.
        seed: Bootstrap seed.
        scorer: Turns batches into results, in order (default: ``scoring.local_scorer``).
        report: Trace the top samples' tokens and write ``report.html``.
        on_progress: Called after each batch with the number of samples screened so far.
        log: Progress messages (stderr in the CLI).

    Returns:
        The :class:`ScreenResult` (its ``summary`` is what ``summary.json`` holds).

    Raises:
        PersonavecError: On bad data or settings, a folder holding another screen, or no valid sample.
    """
    t_start = time.perf_counter()
    source = Path(data)
    fmt = data_format(source)
    names, primary = _check_options(plan, batch_size, rank_by)
    folder = Path(out_dir)
    settings = _start_run(lm, source, fmt, plan, folder)
    records = folder / RECORDS_NAME
    resume = _resume(records, batch_size, log)
    reading, totals, loop_s = _screen_rest(
        lm, source, plan, folder, resume, batch_size, primary, scorer, on_progress, log
    )
    scores = dataset_scores(
        records, names, primary, cheap=plan.cheap, top_k=top_k, resamples=resamples, seed=seed
    )
    drop_info = _drop(source, folder, records, scores, drop_top, log) if drop_top is not None else None
    traces = _traces(lm, source, plan, scores) if report else {}
    records_to_csv(records, folder / RECORDS_CSV_NAME, names)
    timing = _timing(plan, totals, time.perf_counter() - t_start, loop_s)
    summary = {
        "data": str(source),
        **settings,
        **_summary(lm, plan, scores, reading, resume, batch_size, primary),
        "timing": timing,
        "drop": drop_info,
        "notes": _notes(plan, scores, timing),
        "files": _files(folder, report),
    }
    _write_summary(folder, summary, scores, traces, report)
    return ScreenResult(folder, summary, scores, traces)


def _check_options(plan: ScreenPlan, batch_size: int, rank_by: str | None) -> tuple[list[str], str]:
    """The vectors' names and the ranking one; refuse a batch size under 1 or an unknown --rank-by."""
    if batch_size < 1:
        raise PersonavecError(f"batch size must be at least 1, got {batch_size}")
    names = plan.names()
    primary = rank_by or names[0]
    if primary not in names:
        raise PersonavecError(f"--rank-by {primary!r} is not one of the vectors: {', '.join(names)}")
    return names, primary


def _start_run(lm: LoadedModel, source: Path, fmt: str, plan: ScreenPlan, folder: Path) -> dict[str, Any]:
    """Create the run folder and return its settings, refusing a folder that holds other settings."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "data_sha256": data_fingerprint(source),
        "format": fmt,
        "model_fingerprint": lm.info.fingerprint,
        **plan.settings(),
    }
    check_settings(folder, settings)
    return settings


def _resume(records: Path, batch_size: int, log: Callable[[str], None]) -> ResumePoint:
    """Where a rerun picks up: the whole batches already in ``records`` (the rest is screened again)."""
    resume = resume_records(records, batch_size)
    if resume.kept:
        log(
            f"resuming: {resume.kept} samples already screened"
            + (f", {resume.dropped} of an unfinished batch screened again" if resume.dropped else "")
        )
    return resume


def _screen_rest(
    lm: LoadedModel,
    source: Path,
    plan: ScreenPlan,
    folder: Path,
    resume: ResumePoint,
    batch_size: int,
    primary: str,
    scorer: Scorer | None,
    on_progress: Callable[[int], None] | None,
    log: Callable[[str], None],
) -> tuple[_Reading, _Totals, float]:
    """Score the samples after ``resume``; return the reading counts, the totals and the loop's seconds."""
    cache = None
    if not plan.cheap:
        cache = AnswerCache(
            folder / ANSWERS_NAME,
            {"model": lm.info.fingerprint, **plan.generation()},
        )
    reading = _Reading()
    t_loop = time.perf_counter()
    totals = _score_stream(
        _batches(source, batch_size, resume.kept, resume.last_line, cache, reading, log),
        scorer if scorer is not None else local_scorer(lm, plan),
        folder / RECORDS_NAME,
        cache,
        primary,
        resume.kept // batch_size,
        lambda done: on_progress(resume.kept + done) if on_progress is not None else None,
    )
    loop_s = time.perf_counter() - t_loop
    _check_reading(reading, resume.kept, source, log)
    return reading, totals, loop_s


def _write_summary(
    folder: Path,
    summary: dict[str, Any],
    scores: DatasetScores,
    traces: dict[str, list[TokenTrace]],
    report: bool,
) -> None:
    """Write ``summary.json`` and, with ``report``, ``report.html``."""
    write_json(folder / SUMMARY_NAME, summary)
    if report:
        from personavec.screen.report import write_screen_report

        write_screen_report(folder, summary, scores, traces)


def _check_reading(reading: _Reading, kept: int, source: Path, log: Callable[[str], None]) -> None:
    """Refuse data that shrank under a resumed run, or held no valid sample; count the skipped rows."""
    if reading.valid < kept:
        raise PersonavecError(
            f"records.jsonl holds {kept} samples but the data has {reading.valid}: the data changed; "
            "pass another --out"
        )
    if reading.valid == 0:
        raise PersonavecError(
            f"no valid samples in {source}: {reading.skipped} rows skipped"
            + (f" (first: {reading.skipped_examples[0]})" if reading.skipped_examples else "")
        )
    if reading.skipped > SHOWN_SKIPPED:
        log(f"skipped {reading.skipped} malformed rows in all")


def _summary(
    lm: LoadedModel,
    plan: ScreenPlan,
    scores: DatasetScores,
    reading: _Reading,
    resume: ResumePoint,
    batch_size: int,
    primary: str,
) -> dict[str, Any]:
    """The summary's description of the model, the rows read and each vector's dataset scores."""
    return {
        "model": {"id": lm.info.id, "fingerprint": lm.info.fingerprint},
        "rank_by": primary,
        "batch_size": batch_size,
        "rows": {
            "screened": scores.n_records,
            "skipped": reading.skipped,
            "skipped_examples": reading.skipped_examples or [],
        },
        "vectors": {v.name: {**v.describe(), **scores.vectors[v.name].to_dict()} for v in plan.vectors},
        "resumed": {"kept": resume.kept, "screened_again": resume.dropped},
    }


def _files(folder: Path, report: bool) -> dict[str, str | None]:
    return {
        "records": str(folder / RECORDS_NAME),
        "records_csv": str(folder / RECORDS_CSV_NAME),
        "summary": str(folder / SUMMARY_NAME),
        "report": str(folder / "report.html") if report else None,
    }


def _drop(
    source: Path,
    folder: Path,
    records: Path,
    scores: DatasetScores,
    drop_top: DropSpec,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write the data without its top-ranked samples (and those samples' records); describe it."""
    k = drop_top.resolve(scores.n_records)
    drop_lines = scores.ranking[:k]
    target = write_filtered(source, drop_lines, folder)
    _write_dropped(records, drop_lines, folder / DROPPED_NAME)
    log(f"dropped {k} top-ranked samples: wrote {target}")
    return {
        "spec": drop_top.describe(),
        "count": int(k),
        "path": str(target),
        "lines": sorted(int(x) for x in drop_lines[:SHOWN_DROPPED]),
    }


def _traces(
    lm: LoadedModel, source: Path, plan: ScreenPlan, scores: DatasetScores
) -> dict[str, list[TokenTrace]]:
    """Per-token projections of each vector's top samples, re-read from the data (for the report)."""
    wanted = {int(r["line"]) for st in scores.vectors.values() for r in st.top[:TRACED]}
    found = _fetch_samples(source, wanted)
    traces: dict[str, list[TokenTrace]] = {}
    for v in plan.vectors:
        top = [int(r["line"]) for r in scores.vectors[v.name].top[:TRACED]]
        traces[v.name] = trace_tokens(lm, [found[line] for line in top if line in found], v)
    return traces


def _timing(plan: ScreenPlan, totals: _Totals, total_s: float, loop_s: float) -> dict[str, Any]:
    """Where the time went (generation and capture are summed over batches, see :func:`screen`)."""
    return {
        "seconds": round(total_s, 3),
        "screen_seconds": round(loop_s, 3),
        "samples_screened_now": totals.screened,
        "samples_per_second": round(totals.screened / loop_s, 3) if loop_s > 0 and totals.screened else None,
        "generation_seconds": round(totals.generation_s, 3),
        "capture_seconds": round(totals.capture_s, 3),
        "other_seconds": round(max(0.0, loop_s - totals.generation_s - totals.capture_s), 3),
        "own_answers_generated": totals.generated,
        "own_answers_from_cache": 0 if plan.cheap else totals.screened - totals.generated,
    }


def _notes(plan: ScreenPlan, scores: DatasetScores, timing: dict[str, Any]) -> list[str]:
    notes = []
    if plan.cheap:
        notes.append(
            "cheap mode: own_projection is the projection of the prompt's last token, not of a generated "
            "answer; differences rank samples like the full measure only as far as the two agree (a full "
            "run reports that agreement), and their mean carries the model's offset between last-prompt "
            "and answer-mean projections, so compare cheap scores with cheap scores only"
        )
    else:
        gen, cap = timing["generation_seconds"], timing["capture_seconds"]
        if gen > cap and gen > 0:
            share = 100.0 * gen / max(1e-9, gen + cap + timing["other_seconds"])
            notes.append(
                f"generating the model's own answers took {share:.0f}% of the screening time; they are "
                "cached in own_answers.jsonl, and --cheap skips them"
            )
    for name, st in scores.vectors.items():
        if st.undefined:
            notes.append(f"{name}: {st.undefined} samples have no difference (an empty own answer)")
    return notes
