"""An append-only JSONL store of finished work, keyed, so any run can be killed and resumed.

Every record is one JSON line with a ``key``. A record is appended (and flushed to disk) as soon as it is
finished; on open, the file is read back, a torn last line (the process was killed mid-write) is cut
off, and the keys already present are skipped by the caller. Nothing is lost, duplicated or recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Write ``text`` through a temp file in the same folder and ``os.replace``.

    A reader never sees half a file, and a crash leaves the old file (or none) in place.

    Args:
        path: The file to write (its folder is created).
        text: The content (UTF-8).
        mode: File permissions to set (the temp file is private by default).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> bool:
    """Move a finished folder into place with ``os.replace``, accepting one a concurrent writer put first.

    Two processes that fill the same cache on first use (two ``extract`` runs started together) both
    build a folder; the second ``os.replace`` onto a non-empty folder fails. Their contents are the
    same, so the loser keeps the winner's folder instead of crashing.

    Args:
        tmp: The finished folder, in the same file system as ``dest``.
        dest: Where it belongs.

    Returns:
        True if ``tmp`` was moved into place, False if ``dest`` already held a folder (``tmp`` is left
        for the caller to remove).

    Raises:
        OSError: If the move failed for another reason.
    """
    try:
        os.replace(tmp, dest)
    except OSError:
        if Path(dest).is_dir() and any(Path(dest).iterdir()):
            return False
        raise
    return True


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """:func:`write_atomic` of ``obj`` as indented JSON (values JSON cannot hold become strings)."""
    write_atomic(path, json.dumps(obj, indent=2, default=str))


def record_key(fields: dict[str, Any]) -> str:
    """A stable key for the fields that identify a piece of work."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


class JsonlStore:
    """Keyed records in one JSONL file.

    Args:
        path: The file (created with its folder if missing).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn write from a killed process: drop it below
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            self._records.setdefault(record["key"], record)
            good_end += len(line)
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        """The record with this key, if stored."""
        return self._records.get(key)

    def records(self) -> Iterator[dict[str, Any]]:
        """All records, in the order they were first written."""
        return iter(self._records.values())

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write finished records (each must have a ``key``); keys already stored are skipped."""
        fresh = [r for r in records if r["key"] not in self._records]
        if not fresh:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a finished record must survive a kill right after this call
        for r in fresh:
            self._records[r["key"]] = r
