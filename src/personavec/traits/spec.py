"""The trait spec: everything the pipeline needs to know about one trait, in a small validated file.

A spec holds a name and one-sentence description, contrastive system-prompt pairs (one eliciting the
trait, one suppressing it), extraction questions, separate held-out evaluation questions, a judge rubric
(a template with ``{question}`` and ``{answer}`` asking for a 0-100 score), and anchor sentences for the
offline embedding judge. Its :attr:`TraitSpec.hash` is recorded in every output made from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personavec.core.errors import PersonavecError


class PromptPair(BaseModel):
    """One contrastive pair of system prompts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    positive: str = Field(min_length=1, description="system prompt that elicits the trait")
    negative: str = Field(min_length=1, description="system prompt that suppresses the trait")


class Anchors(BaseModel):
    """Example sentences with and without the trait (for the embedding judge)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)


class TraitSpec(BaseModel):
    """A validated trait spec.

    Attributes:
        name: Lowercase identifier (``evil``).
        description: One sentence describing the trait.
        version: Integer bumped by hand when the text changes meaningfully.
        pairs: Contrastive system-prompt pairs (5 in built-ins).
        extraction_questions: Questions used to build the vector (20 in built-ins).
        evaluation_questions: Held-out questions for evaluation (20 in built-ins), none shared.
        rubric: Judge prompt with ``{question}`` and ``{answer}`` asking for a 0-100 score.
        anchors: Sentences with and without the trait, for the offline embedding judge.
        metadata: Free-form provenance (``author``, notes such as "made by the offline templates").
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    description: str = Field(min_length=1)
    version: int = 1
    pairs: list[PromptPair] = Field(min_length=1)
    extraction_questions: list[str] = Field(min_length=2)
    evaluation_questions: list[str] = Field(min_length=2)
    rubric: str
    anchors: Anchors
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extraction_questions", "evaluation_questions")
    @classmethod
    def _distinct(cls, questions: list[str]) -> list[str]:
        seen: set[str] = set()
        for q in questions:
            key = q.strip().lower()
            if not key:
                raise ValueError("questions must not be empty")
            if key in seen:
                raise ValueError(f"duplicate question: {q!r}")
            seen.add(key)
        return questions

    @field_validator("rubric")
    @classmethod
    def _rubric_placeholders(cls, rubric: str) -> str:
        for key in ("{question}", "{answer}"):
            if rubric.count(key) != 1:
                raise ValueError(f"must contain {key} exactly once")
        try:
            rubric.format(question="q", answer="a")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"has braces other than {{question}} and {{answer}} ({e})") from None
        return rubric

    @model_validator(mode="after")
    def _no_overlap(self) -> TraitSpec:
        shared = {q.strip().lower() for q in self.extraction_questions} & {
            q.strip().lower() for q in self.evaluation_questions
        }
        if shared:
            raise ValueError(f"evaluation_questions repeat extraction questions: {sorted(shared)[:3]}")
        return self

    @property
    def hash(self) -> str:
        """Short content hash of everything but ``metadata``; recorded in every output."""
        body = self.model_dump(exclude={"metadata"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def judge_prompt(self, question: str, answer: str) -> str:
        """The rubric filled in for one answer."""
        return self.rubric.format(question=question, answer=answer)

    def to_yaml(self) -> str:
        """The spec as YAML text (what ``trait new`` writes)."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True, width=100)


def validation_lines(error: ValidationError, source: str) -> list[str]:
    """One line per problem: ``source: field: what was expected``."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        lines.append(f"{source}: {field}: {problem['msg']}")
    return lines


def parse_spec(data: Any, source: str = "trait spec") -> TraitSpec:
    """Validate a parsed YAML/JSON object as a :class:`TraitSpec`.

    Raises:
        PersonavecError: With one line per problem, each naming the source, the field and the expectation.
    """
    try:
        return TraitSpec.model_validate(data)
    except ValidationError as e:
        raise PersonavecError("\n".join(validation_lines(e, source))) from None


def load_spec_file(path: str | Path) -> TraitSpec:
    """Read a trait spec from a YAML or JSON file.

    Raises:
        PersonavecError: If the file is missing, not YAML/JSON, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise PersonavecError(f"trait spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PersonavecError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    return parse_spec(data, str(path))
