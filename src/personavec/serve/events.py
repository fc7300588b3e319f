"""What goes into the engine (a :class:`Job`) and what comes out of it (events, then a persona report).

A job's events arrive in this order: one :class:`Prefilled` (the prompt's readings and which steering
entries apply), one :class:`Token` per generated token, then :class:`Finished`; or :class:`Failed` at
any point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from personavec.serve.registry import Flag, Reading, SteerPlan


@dataclass(frozen=True)
class Job:
    """One request, in tokens and numbers.

    Attributes:
        prompt_ids: The encoded prompt (chat template and generation prompt included).
        max_tokens: Most tokens to generate.
        temperature: 0 is greedy.
        top_p: Nucleus sampling mass.
        seed: Seed of this row's own generator (a random one when ``None``).
        stop: Strings that end the answer (not included in it).
        ignore_eos: Keep going past the end-of-turn token.
        logprobs: ``None`` for none; else how many alternatives to report per token (0 = chosen only).
        steering: Resolved steering entries.
        flags: Per-vector thresholds that flag the response.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    steering: tuple[SteerPlan, ...] = ()
    flags: Mapping[str, Flag] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives (before temperature)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class VectorReport:
    """One vector's reading of one request.

    Attributes:
        layer: The read layer.
        prompt: The last prompt token's reading.
        response_mean: Mean projection of the generated tokens (``None`` before or without any).
        note: Why z and percentile are missing, if they are.
    """

    layer: int
    prompt: Reading
    response_mean: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "layer": self.layer,
            "prompt": self.prompt.to_dict(),
            "response_mean": self.response_mean,
            "note": self.note,
        }


@dataclass(frozen=True)
class PersonaReport:
    """The ``persona`` object of a response.

    Attributes:
        vectors: Name -> reading, for every loaded vector.
        steering: Each steering entry and whether it was applied (conditional entries may not be).
        flagged: Names whose thresholds the response crossed (``None`` until the answer is done).
    """

    vectors: Mapping[str, VectorReport]
    steering: tuple[tuple[SteerPlan, bool], ...] = ()
    flagged: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        out: dict[str, Any] = {
            "vectors": {name: r.to_dict() for name, r in self.vectors.items()},
            "steering": [plan.to_dict(applied) for plan, applied in self.steering],
        }
        if self.flagged is not None:
            out["flagged"] = list(self.flagged)
        return out


@dataclass(frozen=True)
class Prefilled:
    """The prompt has been read: its readings, and which steering entries apply to the answer."""

    prompt_tokens: int
    persona: PersonaReport


@dataclass(frozen=True)
class Token:
    """One generated token.

    Attributes:
        index: 0 for the first generated token.
        token_id: Its id.
        token: The token decoded on its own.
        delta: Text to append to the answer now (may be empty: held back, or a special token).
        projections: Name -> projection of this token's own activation at the vector's read layer.
        logprob: Its log-probability, when the job asked for them.
    """

    index: int
    token_id: int
    token: str
    delta: str
    projections: Mapping[str, float]
    logprob: TokenLogprob | None = None


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Finished:
    """The answer is complete.

    Attributes:
        reason: ``stop`` (end of turn or a stop string), ``length`` or ``cancelled``.
        text: The whole answer.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated (the end-of-turn token excluded).
        persona: The final report, with response means and flags.
        tail: The end of the answer not streamed yet (held back for a stop string that never came).
    """

    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    persona: PersonaReport
    tail: str = ""


@dataclass(frozen=True)
class Failed:
    """The job could not be completed (the message says why)."""

    message: str


Event = Prefilled | Token | Finished | Failed
