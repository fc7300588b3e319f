"""Training data for fine-tuning (and screening): read chat datasets, write them back.

Four formats are read, all holding one conversation per row; :func:`iter_chat_rows` streams them row by
row (memory does not grow with the file), :func:`load_chat_dataset` collects the valid rows:

* **Chat JSONL** (``.jsonl``): one ``{"messages": [...]}`` object per line. Blank lines are ignored.
* **A datasets folder** written by ``Dataset.save_to_disk``. A ``DatasetDict`` must have a ``train``
  split, which is the one read.
* **Parquet** (``.parquet``) with a ``messages`` column.
* **CSV** (``.csv``, UTF-8 with a header row, read by Python's ``csv`` module; every cell is text) with
  ``prompt``/``response`` (or ``question``/``answer``) columns.

A conversation is an optional ``system`` message, then ``user`` and ``assistant`` messages taking turns
(multi-turn is fine), ending with the ``assistant`` message that is trained on. As a convenience a row may
instead hold ``{"prompt": ..., "response": ...}`` or ``{"question": ..., "answer": ...}``, read as one
user message and one assistant message. Other fields in a row are ignored.

A malformed row (bad JSON, no messages, an unknown or out-of-turn role, empty or non-string content, not
ending with the assistant) is skipped, never silently: it is kept in :attr:`ChatDataset.skipped` with
where it was (the 1-based line of a JSONL file, the 0-based row index of a datasets folder, parquet or CSV
file) and why, counted in :meth:`ChatDataset.summary`, and logged as a warning.

:attr:`ChatDataset.sha256` hashes the valid conversations only (canonical JSON of the role/content
messages, one per line), so the same data hashes the same whichever format it came in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.core.conversations import Conversation, validate
from personavec.core.errors import PersonavecError
from personavec.core.store import write_atomic

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
CSV_SUFFIXES = (".csv",)
# Convenience row shapes, read as [user, assistant].
PAIR_FIELDS = (("prompt", "response"), ("question", "answer"))
SHOWN_SKIPPED = 5  # skipped rows listed in summary() and in the warning


@dataclass(frozen=True)
class Skipped:
    """A row that was not read.

    Attributes:
        where: The 1-based line (JSONL) or 0-based row index (datasets folder, parquet, CSV).
        reason: Why it was skipped.
    """

    where: int
    reason: str


@dataclass(frozen=True)
class ChatDataset:
    """Valid conversations read from one source, and the rows that were skipped.

    Attributes:
        rows: The conversations, each a tuple of ``{"role", "content"}`` messages ending with the assistant.
        source: The path read.
        sha256: Content hash of the valid conversations (format-independent).
        skipped: The malformed rows, in file order.
        unit: What :attr:`Skipped.where` counts: ``"line"`` (JSONL) or ``"row"`` (datasets, parquet, CSV).
    """

    rows: tuple[tuple[dict[str, str], ...], ...]
    source: str
    sha256: str
    skipped: tuple[Skipped, ...] = ()
    unit: str = "line"

    def __len__(self) -> int:
        return len(self.rows)

    def conversations(self) -> list[list[dict[str, str]]]:
        """The conversations as fresh lists of dicts (safe to modify)."""
        return [[dict(m) for m in conv] for conv in self.rows]

    def skipped_lines(self) -> list[str]:
        """The first few skipped rows as ``"line 3: reason"`` strings."""
        return [f"{self.unit} {s.where}: {s.reason}" for s in self.skipped[:SHOWN_SKIPPED]]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description: source, counts, first skipped reasons and the hash."""
        return {
            "source": self.source,
            "n": len(self.rows),
            "skipped": len(self.skipped),
            "skipped_examples": self.skipped_lines(),
            "sha256": self.sha256,
        }


def content_hash(conversations: Sequence[Conversation]) -> str:
    """SHA-256 of conversations as canonical JSON, one conversation per line."""
    h = hashlib.sha256()
    for conv in conversations:
        messages = [{"role": m["role"], "content": m["content"]} for m in conv]
        line = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def check_turns(messages: list[dict[str, str]]) -> None:
    """Require an optional system message, then user/assistant turns ending with the assistant.

    Raises:
        PersonavecError: Naming the first message out of turn.
    """
    start = 1 if messages[0]["role"] == "system" else 0
    if len(messages) - start < 2:
        raise PersonavecError("needs a user message and then an assistant message")
    for i, m in enumerate(messages[start:], start):
        expected = ("user", "assistant")[(i - start) % 2]
        if m["role"] != expected:
            raise PersonavecError(f"message {i} should be '{expected}', not '{m['role']}'")
    if messages[-1]["role"] != "assistant":
        raise PersonavecError("last message must be 'assistant', not 'user'")


def row_to_conversation(row: Any) -> list[dict[str, str]]:
    """Read one row (``messages``, or a prompt/response or question/answer pair) as a conversation.

    Args:
        row: A parsed JSON object or a datasets/parquet row.

    Returns:
        The validated messages.

    Raises:
        PersonavecError: With the reason the row is malformed.
    """
    if not isinstance(row, Mapping):
        raise PersonavecError(f"expected an object, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = row["messages"]
    else:
        present = [(a, b) for a, b in PAIR_FIELDS if row.get(a) is not None or row.get(b) is not None]
        pair = present[0] if present else None
        if pair is None:
            raise PersonavecError("no 'messages' (or prompt/response, question/answer) field")
        user, assistant = row.get(pair[0]), row.get(pair[1])
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        for i, m in enumerate(messages):
            if isinstance(m, Mapping) and "content" in m and not isinstance(m["content"], str):
                raise PersonavecError(f"message {i} content is {type(m['content']).__name__}, not a string")
    out = validate(messages, where="messages")
    check_turns(out)
    return out


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    # (line number, parsed object or the PersonavecError saying why the line could not be parsed)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                yield number, PersonavecError("line is not UTF-8")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                row = PersonavecError(f"invalid JSON: {e.msg} (column {e.colno})")
            yield number, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise PersonavecError(f"cannot read parquet file {path}: {e}".replace("\n", " ")) from e
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _disk_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise PersonavecError(f"{path} is a folder but not a datasets folder written by save_to_disk") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(loaded.keys()) or "none"
            raise PersonavecError(f"{path} has no 'train' split (splits: {splits})")
        loaded = loaded["train"]
    yield from enumerate(loaded)


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import csv

    # The standard library's reader, row by row: every cell stays text ("007" is not the number 7), and a
    # row with a wrong number of cells is reported where it is instead of failing the whole file.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            width = len(reader.fieldnames or [])
            for index, row in enumerate(reader):
                if None in row:
                    yield index, PersonavecError(f"{width + len(row[None])} cells, the header has {width}")
                elif any(v is None for v in row.values()):
                    yield index, PersonavecError(f"fewer cells than the header's {width}")
                else:
                    yield index, row
        except (csv.Error, UnicodeDecodeError) as e:
            raise PersonavecError(f"cannot read CSV file {path} near line {reader.line_num}: {e}") from e


def data_format(path: str | Path) -> str:
    """The format of a training-data path: ``jsonl``, ``parquet``, ``csv`` or ``datasets`` (a folder).

    Raises:
        PersonavecError: On a missing path or an unknown format.
    """
    path = Path(path)
    if not path.exists():
        raise PersonavecError(f"training data not found: {path}")
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    for name, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("csv", CSV_SUFFIXES)):
        if suffix in suffixes:
            return name
    raise PersonavecError(
        f"unknown training data format: {path} (use chat .jsonl, .parquet, .csv or a datasets save_to_disk "
        "folder)"
    )


def _open_rows(path: Path) -> tuple[Iterator[tuple[int, Any]], str]:
    readers = {"datasets": _disk_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows, "csv": _csv_rows}
    fmt = data_format(path)
    return readers[fmt](path), "line" if fmt == "jsonl" else "row"


def iter_chat_rows(path: str | Path) -> Iterator[tuple[int, list[dict[str, str]] | Skipped]]:
    """Stream a chat dataset row by row, valid or not, without holding it in memory.

    Args:
        path: A chat ``.jsonl`` file, a ``.parquet`` or ``.csv`` file or a ``save_to_disk`` folder.

    Yields:
        ``(line, item)`` per row in file order: ``line`` is the row's 1-based position in the input (the
        JSONL line; else the row index + 1), ``item`` the validated conversation, or a :class:`Skipped`
        saying why the row is malformed (its ``where`` as in :attr:`ChatDataset.skipped`).

    Raises:
        PersonavecError: On a missing path, an unknown format, an unreadable file or a DatasetDict
            without ``train`` (when iteration starts).
    """
    rows, unit = _open_rows(Path(path))
    for where, row in rows:
        line = where if unit == "line" else where + 1
        try:
            if isinstance(row, PersonavecError):
                raise row
            yield line, row_to_conversation(row)
        except PersonavecError as e:  # a malformed row: report it and go on
            yield line, Skipped(where, str(e))


def load_chat_dataset(path: str | Path, *, limit: int | None = None) -> ChatDataset:
    """Read chat training data, skipping (and reporting) malformed rows.

    Args:
        path: A chat ``.jsonl`` file, a ``.parquet`` or ``.csv`` file or a ``save_to_disk`` folder.
        limit: Stop after this many valid conversations.

    Returns:
        The valid conversations, the skipped rows and the content hash.

    Raises:
        PersonavecError: On a missing path, an unknown format, a DatasetDict without ``train``, or no
            valid conversation.
    """
    if limit is not None and limit < 1:
        raise PersonavecError(f"limit must be at least 1, got {limit}")
    path = Path(path)
    unit = "line" if data_format(path) == "jsonl" else "row"
    good: list[tuple[dict[str, str], ...]] = []
    skipped: list[Skipped] = []
    for _line, item in iter_chat_rows(path):
        if limit is not None and len(good) >= limit:
            break
        if isinstance(item, Skipped):
            skipped.append(item)
        else:
            good.append(tuple(item))
    data = ChatDataset(tuple(good), str(path), content_hash(good), tuple(skipped), unit)
    if skipped:
        log.warning("%s: skipped %d malformed rows: %s", path, len(skipped), "; ".join(data.skipped_lines()))
    if not good:
        first = f" (first: {data.skipped_lines()[0]})" if skipped else ""
        raise PersonavecError(f"no valid conversations in {path}: {len(skipped)} rows skipped{first}")
    return data


def write_chat_jsonl(
    path: str | Path, conversations: Sequence[Conversation], extra: list[dict[str, Any]] | None = None
) -> None:
    """Write conversations atomically as chat JSONL, one ``{"messages": [...]}`` per line.

    Args:
        path: The file to write (its folder is created).
        conversations: The conversations (each is validated).
        extra: Optional per-conversation fields written next to ``messages`` (same length).

    Raises:
        PersonavecError: On a malformed conversation, or ``extra`` of the wrong length or with ``messages``.
    """
    if extra is not None and len(extra) != len(conversations):
        raise PersonavecError(f"extra has {len(extra)} entries for {len(conversations)} conversations")
    lines = []
    for i, conv in enumerate(conversations):
        fields = extra[i] if extra is not None else {}
        if "messages" in fields:
            raise PersonavecError(f"extra[{i}] must not hold 'messages'")
        record = {"messages": validate(conv, where=f"conversation {i}"), **fields}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomic(path, "".join(lines), mode=0o644)  # training data is meant to be shared


def split_prompt_response(conversation: Conversation) -> tuple[list[dict[str, str]], str]:
    """Split a conversation into its prompt messages and the final assistant message's content.

    Args:
        conversation: Messages ending with an assistant message.

    Returns:
        Everything but the last message, and the last message's content.

    Raises:
        PersonavecError: If the conversation is malformed or does not end with the assistant.
    """
    messages = validate(conversation)
    if messages[-1]["role"] != "assistant":
        raise PersonavecError(f"conversation ends with '{messages[-1]['role']}', not 'assistant'")
    return messages[:-1], messages[-1]["content"]


__all__ = [
    "ChatDataset",
    "Skipped",
    "check_turns",
    "content_hash",
    "data_format",
    "iter_chat_rows",
    "load_chat_dataset",
    "row_to_conversation",
    "split_prompt_response",
    "write_chat_jsonl",
]
