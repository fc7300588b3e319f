"""The screen's files on disk: per-sample records and the own-answer cache, both append-only JSONL.

Both are written in input order, a batch at a time, as whole lines followed by ``fsync``: a process
killed mid-write leaves at most one torn last line, which the next run cuts off (:func:`repair_tail`).
Neither is ever read whole into memory: resuming scans them line by line.

Record schema (``records.jsonl``, one object per screened sample, in input order)::

    {"line": 12,                      # 1-based position in the input (JSONL line, else row number)
     "projection": 1.93, "own_projection": 0.41, "projection_difference": 1.52,   # the ranking vector
     "prompt": "...", "response": "...", "own_answer": "..." | null,            # previews
     # (own_answer: the first of the model's own answers; own_answers.jsonl keeps them all)
     "vectors": {"evil": {"projection": 1.93, "own_projection": 0.41,
                          "projection_difference": 1.52, "prompt_projection": 0.77}, ...}}

The top-level numbers repeat the ranking vector's (the first ``--vector`` unless ``rank_by`` says
otherwise), so a one-vector screen can be read without the nesting; ``vectors`` always holds every
vector's, keyed by name. A reading that is undefined (an empty own answer) is ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.core.errors import PersonavecError
from personavec.core.store import record_key
from personavec.screen.samples import Sample, preview
from personavec.screen.scoring import SampleScore

RECORDS_NAME = "records.jsonl"
RECORDS_CSV_NAME = "records.csv"
ANSWERS_NAME = "own_answers.jsonl"
FIELDS = ("projection", "own_projection", "projection_difference", "prompt_projection")
DIGITS = 6  # enough for any ranking; fewer bytes and no float noise in the files


def _number(x: float) -> float | None:
    return round(x, DIGITS) if math.isfinite(x) else None


def make_record(sample: Sample, score: SampleScore, primary: str) -> dict[str, Any]:
    """One sample's record (schema in the module docstring).

    Args:
        sample: The sample.
        score: Its readings.
        primary: The ranking vector's name (its numbers are repeated at the top level).

    Returns:
        The JSON-able record.
    """
    vectors = {name: {f: _number(getattr(vs, f)) for f in FIELDS} for name, vs in score.vectors.items()}
    top = vectors[primary]
    return {
        "line": sample.line,
        "projection": top["projection"],
        "own_projection": top["own_projection"],
        "projection_difference": top["projection_difference"],
        "prompt": sample.prompt_preview(),
        "response": sample.response_preview(),
        "own_answer": preview(score.own_answers[0]) if score.own_answers else None,
        "vectors": vectors,
    }


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no final newline) off a JSONL file written by a killed process.

    Returns:
        The number of bytes removed (0 when the file ends cleanly or does not exist).
    """
    if not path.is_file():
        return 0
    size = path.stat().st_size
    with open(path, "r+b") as f:
        end = size
        block = 65536
        # Scan backwards for the last newline; everything after it is the torn line.
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def append_lines(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows as JSON lines in one write, then ``fsync`` (a finished batch survives a kill)."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: Path, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream the objects of a JSONL file (up to byte ``end``), one line at a time.

    Raises:
        PersonavecError: On a line that is not JSON (the file was edited or damaged by hand).
    """
    if not path.is_file():
        return
    with open(path, "rb") as f:
        read = 0
        for number, raw in enumerate(f, 1):
            read += len(raw)
            if end is not None and read > end:
                return
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                raise PersonavecError(
                    f"{path} line {number} is not JSON: delete the folder to start the screen over"
                ) from None


@dataclass(frozen=True)
class ResumePoint:
    """Where a screen continues.

    Attributes:
        kept: Records kept from the earlier run (a whole number of batches).
        last_line: The input line of the last kept record, or ``None``.
        dropped: Records of an unfinished batch that were cut off to be screened again.
    """

    kept: int
    last_line: int | None
    dropped: int


def resume_records(path: Path, batch_size: int) -> ResumePoint:
    """Repair ``records.jsonl`` and keep whole batches only, so a resumed run batches as a fresh one would.

    A kill can leave a torn line, or (if a batch's single write was cut short) part of a batch; both are
    cut off and screened again. Keeping whole batches means every sample is screened in the same batch as
    in an uninterrupted run, so the files come out identical.

    Args:
        path: The records file (need not exist).
        batch_size: Samples per batch.

    Returns:
        The :class:`ResumePoint`.
    """
    repair_tail(path)
    if not path.is_file():
        return ResumePoint(0, None, 0)
    count = 0
    with open(path, "rb") as f:
        for raw in f:
            count += bool(raw.strip())
    keep = count - count % batch_size
    last_line = None
    offset = 0
    seen = 0
    with open(path, "rb") as f:
        for raw in f:
            if seen == keep:
                break
            offset += len(raw)
            if raw.strip():
                seen += 1
                try:
                    last_line = int(json.loads(raw)["line"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise PersonavecError(
                        f"{path} record {seen} is damaged: delete the folder to start the screen over"
                    ) from None
    if keep < count:
        with open(path, "r+b") as f:
            f.truncate(offset)
            os.fsync(f.fileno())
    return ResumePoint(keep, last_line, count - keep)


MEMO_PROMPTS = 4096  # distinct prompts whose answers are kept in memory for later samples that repeat them


class AnswerCache:
    """The model's own answers, by input line, in ``own_answers.jsonl`` (read with a forward cursor).

    Lines are looked up in increasing order, as the driver streams the data, so the file is read once,
    alongside the input, and never held whole in memory. Each entry carries a key of the prompt and the
    generation settings: an answer is used only for the prompt and settings it was made for. Answers are
    a function of that key alone (see :func:`personavec.screen.scoring.own_answers`), so a sample whose
    prompt came earlier reuses that prompt's answers from a bounded in-memory memo instead of generating
    them again; the file still gets a line for every sample.

    Args:
        path: The cache file (created on the first answer).
        settings: What else an answer depends on (model fingerprint, :meth:`ScreenPlan.generation`).
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        repair_tail(path)
        self._end = path.stat().st_size if path.is_file() else 0
        self._last_line = 0
        for entry in iter_jsonl(path, self._end):
            self._last_line = max(self._last_line, int(entry["line"]))
        self._cursor = iter_jsonl(path, self._end)
        self._next: dict[str, Any] | None = None
        self._memo: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def key(self, sample: Sample) -> str:
        """The key of ``sample``'s answers: its prompt and the generation settings."""
        return record_key({"prompt": sample.prompt, **self.settings})

    def _remember(self, key: str, answers: tuple[str, ...]) -> None:
        if key not in self._memo:
            self._memo[key] = answers
            if len(self._memo) > MEMO_PROMPTS:
                self._memo.popitem(last=False)

    def lookup(self, sample: Sample) -> tuple[str, ...] | None:
        """The cached answers for ``sample``'s prompt, or ``None`` (call with increasing lines)."""
        key = self.key(sample)
        while self._next is None or int(self._next["line"]) < sample.line:
            self._next = next(self._cursor, None)
            if self._next is None:
                break
            self._remember(str(self._next["key"]), tuple(str(a) for a in self._next["answers"]))
        if self._next is not None and int(self._next["line"]) == sample.line and self._next["key"] == key:
            return tuple(str(a) for a in self._next["answers"])
        return self._memo.get(key)

    def store(self, answers: Sequence[tuple[Sample, Sequence[str]]]) -> None:
        """Append new answers (lines already in the file are not written again)."""
        for s, a in answers:
            self._remember(self.key(s), tuple(a))
        fresh = [(s, a) for s, a in answers if s.line > self._last_line]
        append_lines(self.path, [{"line": s.line, "key": self.key(s), "answers": list(a)} for s, a in fresh])
        if fresh:
            self._last_line = fresh[-1][0].line


def records_to_csv(records: Path, target: Path, names: Sequence[str]) -> Path:
    """Write ``records.jsonl`` as a CSV table, streaming (one column per vector and reading).

    Args:
        records: The records file.
        target: The CSV file to write (replaced atomically).
        names: The vector names (column order).

    Returns:
        ``target``.
    """
    header = ["line", "prompt", "response", "own_answer"]
    header += [f"{name}.{field}" for name in names for field in FIELDS]
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in iter_jsonl(records):
            row = [r["line"], r["prompt"], r["response"], r.get("own_answer") or ""]
            for name in names:
                vs = r["vectors"][name]
                row += ["" if vs[field] is None else vs[field] for field in FIELDS]
            writer.writerow(row)
    os.replace(tmp, target)
    return target
