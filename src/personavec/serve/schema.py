"""The request body of ``POST /v1/chat/completions``: OpenAI's chat completion plus ``steering``.

OpenAI fields we do not act on (``user``, ``tools`` ...) are ignored, as OpenAI-compatible servers do;
fields whose meaning we cannot honour (``n`` above 1, penalties other than 0) are refused with a 400, so a
client never silently gets something other than what it asked for. Non-finite numbers are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from personavec.core.errors import PersonavecError

# Requests are validated here, before anything reaches the engine; every message names the field.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
_OPENAI = ConfigDict(extra="ignore", allow_inf_nan=False)


class ContentPart(BaseModel):
    """One part of a message's content list (only ``text`` parts are read)."""

    model_config = _OPENAI
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = _OPENAI
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}`` with text parts joined and ``developer`` read as ``system``."""
        if isinstance(self.content, str):
            text = self.content
        else:
            parts = [p for p in self.content if p.type != "text" or p.text is None]
            if parts:
                raise PersonavecError(f"only text content is supported, got a '{parts[0].type}' part")
            text = "".join(p.text or "" for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Condition(BaseModel):
    """When a conditional steering entry applies: one reading of the prompt crossing a threshold.

    Attributes:
        z_above: The prompt's z-score (needs the vector's calibration) is above this.
        percentile_above: Its percentile among neutral prompts (0-100, needs a calibration) is above.
        raw_above: Its raw projection is above this.
        vector: Whose reading is tested (default: the entry's own vector).
    """

    model_config = _STRICT
    z_above: float | None = None
    percentile_above: float | None = Field(None, ge=0, le=100)
    raw_above: float | None = None
    vector: str | None = None

    @model_validator(mode="after")
    def _one_criterion(self) -> Condition:
        given = [x for x in (self.z_above, self.percentile_above, self.raw_above) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of z_above, percentile_above, raw_above")
        return self


class Threshold(BaseModel):
    """When a response is flagged for a vector: any given reading above its threshold.

    ``z_above``, ``percentile_above`` and ``raw_above`` test the prompt's reading (last prompt token);
    ``response_above`` tests the response-mean projection (raw: calibrations describe prompts only).
    """

    model_config = _STRICT
    z_above: float | None = None
    percentile_above: float | None = Field(None, ge=0, le=100)
    raw_above: float | None = None
    response_above: float | None = None

    @model_validator(mode="after")
    def _some_criterion(self) -> Threshold:
        if all(x is None for x in (self.z_above, self.percentile_above, self.raw_above, self.response_above)):
            raise ValueError("give at least one of z_above, percentile_above, raw_above, response_above")
        return self


class SteeringEntry(BaseModel):
    """One vector to steer with.

    Attributes:
        vector: A loaded vector's name (``GET /v1/vectors``).
        coef: Strength in vector units (negative steers away from the trait).
        strength: Strength as a signed fraction of the residual norm at the layer (as the sweep).
        layer: Block whose output is steered (``1..L``); default: the stored choice.
        positions: ``all`` (default), ``prompt`` or ``response``; conditional entries steer ``response``.
        when: Apply only when the prompt's reading crosses this condition (decided after the prompt).
    """

    model_config = _STRICT
    vector: str = Field(min_length=1)
    coef: float | None = None
    strength: float | None = None
    layer: int | None = None
    positions: Literal["all", "prompt", "response"] | None = None
    when: Condition | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SteeringEntry:
        if self.coef is not None and self.strength is not None:
            raise ValueError("give coef or strength, not both")
        if self.when is not None and self.positions in ("all", "prompt"):
            raise ValueError(
                "a conditional entry is decided after the prompt, so it can only steer response positions"
            )
        return self


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = _OPENAI
    include_usage: bool = False


class ChatRequest(BaseModel):
    """An OpenAI chat completion request with personavec's extra fields.

    Attributes:
        steering: Vectors to steer with (they compose).
        persona_thresholds: Per-vector thresholds that flag the response (override the server's).
        ignore_eos: Keep generating past the end-of-turn token (as vLLM's option; for benchmarks).
    """

    model_config = _OPENAI
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    steering: list[SteeringEntry] = Field(default_factory=list)
    persona_thresholds: dict[str, Threshold] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.n != 1:
            raise ValueError("n must be 1: send one request per answer")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them at 0)")
        if any(not s for s in self.stops()):
            raise ValueError("stop strings must not be empty")
        if len(self.stops()) > 4:
            raise ValueError("at most 4 stop strings")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def stops(self) -> list[str]:
        """The stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


def describe(error: ValidationError, limit: int = 3) -> str:
    """One line naming each invalid field (``steering.0.coef: ...``), for a 400 reply."""
    parts = []
    for e in error.errors()[:limit]:
        where = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    more = len(error.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
