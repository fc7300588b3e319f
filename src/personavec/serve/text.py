"""Turn a row's generated token ids into text deltas for streaming, honouring stop strings.

A delta is sent only when it cannot change any more: text that might be the start of a stop string, and
an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives), are held back until the
next token settles them. Leading whitespace of the answer is dropped, as
:func:`personavec.core.generation.generate` strips it, so streamed and library answers read the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` may still turn into a stop string or a full character."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    if text.endswith(REPLACEMENT):
        hold = max(hold, len(text) - len(text.rstrip(REPLACEMENT)))
    return hold


class TextStream:
    """Incremental decoding of one answer.

    Attributes:
        text: The answer so far (cut at a stop string once one appeared).
        stopped: Whether a stop string appeared.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be sent now (maybe empty)."""
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True).lstrip()
        cuts = [i for i in (full.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.text, self.stopped = full[: min(cuts)], True
            return self.flush()
        self.text = full
        safe = len(full) - _held_back(full, self._stops)
        if safe <= self._sent:
            return ""
        delta, self._sent = full[self._sent : safe], safe
        return delta

    def flush(self) -> str:
        """Everything not sent yet (at the end of the answer)."""
        delta = self.text[self._sent :]
        self._sent = max(self._sent, len(self.text))
        return delta
