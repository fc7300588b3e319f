"""The data to screen, streamed: one :class:`Sample` per valid row, a :class:`Skipped` per malformed one.

Rows are read by :func:`personavec.finetune.data.iter_chat_rows` (chat JSONL, parquet, CSV, a datasets
folder), one at a time, so memory does not grow with the file. Every position is the row's 1-based
``line`` in the input: the JSONL line, else the row number (row index + 1; for CSV the header is not a
row, and a quoted cell spanning several lines is still one row).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from personavec.finetune.data import Skipped, data_format, iter_chat_rows, split_prompt_response

T = TypeVar("T")
PREVIEW_CHARS = 160


@dataclass(frozen=True)
class Sample:
    """One sample to screen: the prompt messages and the dataset's response (plain values, picklable).

    Attributes:
        line: 1-based position in the input (see the module docstring).
        prompt: The prompt messages as ``(role, content)`` pairs (optional system, then user/assistant
            turns ending with a user turn).
        response: The dataset's final assistant message.
    """

    line: int
    prompt: tuple[tuple[str, str], ...]
    response: str

    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (what the model answers on its own)."""
        return [{"role": role, "content": content} for role, content in self.prompt]

    def conversation(self, response: str | None = None) -> list[dict[str, str]]:
        """The prompt followed by ``response`` (default: the dataset's response) as the assistant turn."""
        answer = self.response if response is None else response
        return [*self.prompt_messages(), {"role": "assistant", "content": answer}]

    def prompt_preview(self) -> str:
        """The last prompt message, on one line and cut to :data:`PREVIEW_CHARS`."""
        return preview(self.prompt[-1][1])

    def response_preview(self) -> str:
        """The dataset's response, on one line and cut to :data:`PREVIEW_CHARS`."""
        return preview(self.response)


@dataclass(frozen=True)
class SkippedRow:
    """A malformed row: where it is and why it was skipped.

    Attributes:
        line: 1-based position in the input.
        reason: Why the row could not be read.
    """

    line: int
    reason: str

    def describe(self) -> str:
        """``"line 3: reason"``."""
        return f"line {self.line}: {self.reason}"


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` with runs of whitespace as one space, cut to ``limit`` characters (ending with "…")."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def iter_samples(path: str | Path) -> Iterator[Sample | SkippedRow]:
    """Stream a chat dataset as samples to screen, in input order.

    Args:
        path: Chat ``.jsonl``, ``.parquet``, ``.csv`` (prompt/response columns) or a ``save_to_disk`` folder.

    Yields:
        A :class:`Sample` per valid row, a :class:`SkippedRow` per malformed one.

    Raises:
        PersonavecError: On a missing path, an unknown format or an unreadable file.
    """
    data_format(path)  # fail on a bad path now, not at the first next()
    for line, item in iter_chat_rows(path):
        if isinstance(item, Skipped):
            yield SkippedRow(line, item.reason)
            continue
        prompt, response = split_prompt_response(item)
        yield Sample(line, tuple((m["role"], m["content"]) for m in prompt), response)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), pulled lazily from ``items``."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def count_rows(path: str | Path) -> int | None:
    """The number of rows in ``path`` when it is cheap to know (for progress bars), else ``None``.

    Chat JSONL counts non-blank lines (one pass over the bytes), parquet and datasets folders read their
    metadata; CSV gives ``None`` (quoted cells may span lines, so only parsing would tell).
    """
    fmt = data_format(path)
    if fmt == "jsonl":
        n = 0
        with open(path, "rb") as f:
            for raw in f:
                n += bool(raw.strip())
        return n
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception:  # an unreadable file is reported by the reader itself
            return None
    if fmt == "datasets":
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            return None
        if isinstance(loaded, datasets.DatasetDict):
            return len(loaded["train"]) if "train" in loaded else None
        return len(loaded)
    return None
