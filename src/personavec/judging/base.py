"""What a judge is: something that gives answers a 0-100 score, or ``None`` when it cannot.

Two kinds are used by the pipeline: a *trait* judge (how strongly an answer shows the trait, from the
trait spec's rubric or anchors) and a *coherence* judge (how fluent and on-topic the answer is). Both
have the same shape, so any backend can play either role.

``None`` means *unscored* (no number in the reply, a refusal, out of range, an API failure after its
retries): it is recorded and counted, never silently turned into 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge.

    Attributes:
        question: The user question the answer replies to.
        answer: The model's answer.
    """

    question: str
    answer: str


@runtime_checkable
class Judge(Protocol):
    """A scorer of answers.

    Attributes:
        name: Stable identifier, recorded in caches and vector metadata (``embedding:all-MiniLM-L6-v2``,
            ``openai:gpt-4.1-mini``, ``perplexity:<model fingerprint>`` ...). Changing what a judge
            computes must change its name, so cached scores are never reused wrongly.
    """

    name: str

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        """Score each item 0-100 (``None`` = unscored), in input order."""
        ...
