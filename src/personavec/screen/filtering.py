"""``--drop-top K|P%``: write the dataset without its top-ranked samples, in the format it came in.

The input is streamed again and every row is copied except the dropped lines (JSONL lines byte for
byte; CSV rows cell for cell through Python's ``csv`` module; parquet batch by batch with its own schema;
a datasets folder through ``select``). Malformed rows are not samples, so they are never dropped: they
stay in the output, which the fine-tuning reader will report and skip as it did the original.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from personavec.core.errors import PersonavecError
from personavec.finetune.data import data_format

FILTERED_STEM = "filtered"


@dataclass(frozen=True)
class DropSpec:
    """How many top-ranked samples to drop: a count, or a percentage of the screened samples.

    Attributes:
        count: Samples to drop, or ``None``.
        percent: Percentage of screened samples to drop (rounded to the nearest sample), or ``None``.
    """

    count: int | None = None
    percent: float | None = None

    def resolve(self, n: int) -> int:
        """The number of samples to drop out of ``n`` screened ones (at most ``n``)."""
        if self.count is not None:
            return min(self.count, n)
        assert self.percent is not None
        return min(n, math.floor(n * self.percent / 100.0 + 0.5))

    def describe(self) -> str:
        """``"10"`` or ``"5%"``, as given."""
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


def parse_drop(text: str) -> DropSpec:
    """Parse ``K`` (a count) or ``P%`` (a percentage, 0-100).

    Raises:
        PersonavecError: On anything else.
    """
    raw = text.strip()
    try:
        if raw.endswith("%"):
            percent = float(raw[:-1])
            if not 0.0 <= percent <= 100.0:
                raise ValueError
            return DropSpec(percent=percent)
        count = int(raw)
        if count < 0:
            raise ValueError
        return DropSpec(count=count)
    except ValueError:
        raise PersonavecError(
            f"--drop-top {text!r}: give a number of samples (10) or a percentage (5%)"
        ) from None


def filtered_path(data: str | Path, out_dir: str | Path) -> Path:
    """Where :func:`write_filtered` writes: ``OUT/filtered.<ext>``, or ``OUT/filtered/`` for a folder."""
    fmt = data_format(data)
    suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "csv": ".csv", "datasets": ""}[fmt]
    return Path(out_dir) / f"{FILTERED_STEM}{suffix}"


def _keep_mask(rows: np.ndarray, drop: np.ndarray) -> np.ndarray:
    return ~np.isin(rows, drop)


def write_filtered(data: str | Path, drop_lines: np.ndarray | list[int], out_dir: str | Path) -> Path:
    """Write ``data`` without the rows at ``drop_lines`` (1-based input positions), in its own format.

    Args:
        data: The screened dataset (chat JSONL, parquet, CSV or a datasets folder).
        drop_lines: The lines to leave out (the screen's ``line`` numbers).
        out_dir: The output folder.

    Returns:
        The written file or folder (see :func:`filtered_path`); written through a temporary name, so
        a kill never leaves half a dataset under the final name.
    """
    fmt = data_format(data)
    target = filtered_path(data, out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    drop = np.unique(np.asarray(drop_lines, dtype=np.int64))
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    if fmt == "jsonl":
        _filter_jsonl(Path(data), drop, tmp)
    elif fmt == "parquet":
        _filter_parquet(Path(data), drop, tmp)
    elif fmt == "csv":
        _filter_csv(Path(data), drop, tmp)
    else:
        _filter_datasets(Path(data), drop, tmp)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _filter_jsonl(source: Path, drop: np.ndarray, tmp: Path) -> None:
    dropped = set(int(x) for x in drop)  # at most the K dropped lines
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        for number, raw in enumerate(src, 1):
            if number not in dropped:
                dst.write(raw)


def _filter_parquet(source: Path, drop: np.ndarray, tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(source)
    with pq.ParquetWriter(tmp, reader.schema_arrow) as writer:
        start = 1
        for batch in reader.iter_batches(batch_size=4096):
            rows = np.arange(start, start + batch.num_rows)
            start += batch.num_rows
            writer.write_batch(batch.filter(pa.array(_keep_mask(rows, drop))))


def _filter_csv(source: Path, drop: np.ndarray, tmp: Path) -> None:
    import csv

    dropped = set(int(x) for x in drop)
    with (
        open(source, newline="", encoding="utf-8-sig") as src,
        open(tmp, "w", newline="", encoding="utf-8") as dst,
    ):
        reader = csv.reader(src)
        writer = csv.writer(dst, lineterminator="\n")
        header = next(reader, None)
        if header is not None:
            writer.writerow(header)
        number = 0
        for row in reader:
            if not row:
                continue  # a blank line is not a row (the reader skips it too)
            number += 1
            if number not in dropped:
                writer.writerow(row)


def _filter_datasets(source: Path, drop: np.ndarray, tmp: Path) -> None:
    import datasets
    from datasets.utils import logging as ds_logging

    loaded = datasets.load_from_disk(str(source))
    train = loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    keep = np.flatnonzero(_keep_mask(np.arange(1, len(train) + 1), drop))
    kept = train.select(keep)
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # the screen's own progress is on stderr
    try:
        if isinstance(loaded, datasets.DatasetDict):
            # The other splits are not screened: they are written back as they are.
            datasets.DatasetDict({**loaded, "train": kept}).save_to_disk(str(tmp))
        else:
            kept.save_to_disk(str(tmp))
    finally:
        if bars:
            ds_logging.enable_progress_bar()
