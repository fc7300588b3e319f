"""How far fine-tuning moved a model along a persona vector.

The *finetuning shift* (the paper's measure) is the mean last-prompt-token projection onto the vector's unit
direction over the trait's evaluation questions (asked with no system prompt), tuned minus base. It is
read before a single token is generated, so it predicts the trait before the tuned model shows it.

*Trait expression* is what the model then says: answers to the same questions are generated (greedy) and
re-read by the **base** model (the read-back of :mod:`personavec.steer.readback`), and optionally scored by
a judge. Both are measured for base and tuned the same way, so their difference is the fine-tuning's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from personavec.core.activations import capture_activations, last_prompt
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.steer.readback import read_back


def user_prompts(questions: Sequence[str]) -> list[list[dict[str, str]]]:
    """The questions as one-turn chats without a system prompt (how the shift is read)."""
    return [[{"role": "user", "content": q}] for q in questions]


def projections(lm: LoadedModel, vector: PersonaVector, questions: Sequence[str]) -> list[float]:
    """Mean last-prompt projection over ``questions`` at every layer ``0..L`` (unit direction per layer)."""
    vector.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    acts = capture_activations(lm, user_prompts(questions), poolings=[last_prompt])["last_prompt"]
    units = vector.data / vector.norms().clamp(min=1e-12).unsqueeze(-1)
    return torch.einsum("nld,ld->l", acts, units.to(acts.dtype)).div(len(questions)).tolist()


@dataclass(frozen=True)
class Expression:
    """How strongly a model's answers show the trait.

    Attributes:
        readback: Mean response-mean projection of its answers, re-read by the reader model.
        judge: Mean judge score (0-100) of its answers, if a judge was given.
        answers: The answers, in question order.
    """

    readback: float
    judge: float | None
    answers: list[str]


# Scores (question, answer) pairs 0-100; None means the judge could not score one.
JudgeFn = Callable[[Sequence[tuple[str, str]]], Sequence[float | None]]


def answer_questions(lm: LoadedModel, questions: Sequence[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to ``questions`` with no system prompt."""
    return generate(lm, user_prompts(questions), SamplingParams(max_new_tokens=max_new_tokens))


def expression(
    answers: Sequence[str],
    questions: Sequence[str],
    reader: LoadedModel,
    vector: PersonaVector,
    layer: int,
    judge: JudgeFn | None = None,
) -> Expression:
    """Read answers back with ``reader`` (the base model) at ``layer`` and, optionally, judge them.

    Call it with the reader in its base state (e.g. inside
    :func:`personavec.finetune.training.adapters_disabled`).
    """
    items = list(zip(questions, answers))
    rb = read_back(reader, vector, items, layer).mean_projection()
    return Expression(rb, mean_judge(judge, items), list(answers))


def mean_judge(judge: JudgeFn | None, items: Sequence[tuple[str, str]]) -> float | None:
    """Mean judge score over the items it could score (``None`` without a judge or scores)."""
    if judge is None:
        return None
    vals = [s for s in judge(items) if s is not None and math.isfinite(s)]
    return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class ShiftReport:
    """One vector's shift between a base and a tuned model.

    Attributes:
        trait: The vector's trait.
        layer: The layer the headline figures are read at.
        shift: Tuned minus base mean last-prompt projection at ``layer``.
        per_layer: That difference at every layer ``0..L``.
        base_expression: Base model's answers, measured.
        tuned_expression: Tuned model's answers, measured.
    """

    trait: str
    layer: int
    shift: float
    per_layer: list[float]
    base_expression: Expression | None = None
    tuned_expression: Expression | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (answers left out)."""

        def expr(e: Expression | None) -> dict[str, Any] | None:
            return None if e is None else {"readback": e.readback, "judge": e.judge}

        out: dict[str, Any] = {"trait": self.trait, "layer": self.layer, "shift": self.shift}
        out["per_layer"] = self.per_layer
        out["expression"] = {"base": expr(self.base_expression), "tuned": expr(self.tuned_expression)}
        if self.base_expression and self.tuned_expression:
            out["expression"]["readback_change"] = (
                self.tuned_expression.readback - self.base_expression.readback
            )
            if self.base_expression.judge is not None and self.tuned_expression.judge is not None:
                out["expression"]["judge_change"] = self.tuned_expression.judge - self.base_expression.judge
        return out


def shift_between(base: Sequence[float], tuned: Sequence[float], trait: str, layer: int) -> ShiftReport:
    """A :class:`ShiftReport` (without expression) from two :func:`projections` results."""
    per_layer = [t - b for b, t in zip(base, tuned)]
    return ShiftReport(trait, layer, per_layer[layer], per_layer)


# Re-reads (answers, questions) with the base model; returns the mean read-back.
ReaderFn = Callable[[Sequence[str], Sequence[str]], float]


@dataclass(frozen=True)
class Measurement:
    """One model measured against one vector.

    Attributes:
        projections: Mean last-prompt projection over the questions at every layer ``0..L``.
        expression: Its answers' trait expression (``None`` when answers were not generated).
    """

    projections: list[float]
    expression: Expression | None


def measure(
    lm: LoadedModel,
    vector: PersonaVector,
    questions: Sequence[str],
    *,
    reader: ReaderFn | None = None,
    judge: JudgeFn | None = None,
    max_new_tokens: int = 64,
) -> Measurement:
    """Measure ``lm`` along ``vector``: last-prompt projections and (with a reader) answer expression.

    Args:
        lm: The model to measure (base or tuned).
        vector: The persona vector.
        questions: The trait's evaluation questions.
        reader: Re-reads answers with the base model (see :func:`base_reader`); ``None`` skips generation.
        judge: Optional judge for the answers.
        max_new_tokens: Answer length.

    Returns:
        The :class:`Measurement`.
    """
    proj = projections(lm, vector, questions)
    if reader is None:
        return Measurement(proj, None)
    answers = answer_questions(lm, questions, max_new_tokens)
    score = mean_judge(judge, list(zip(questions, answers)))
    return Measurement(proj, Expression(reader(answers, questions), score, answers))


def base_reader(
    base: LoadedModel, vector: PersonaVector, layer: int, context: Callable[[], Any] | None = None
) -> ReaderFn:
    """A :data:`ReaderFn` that reads answers back with ``base`` at ``layer``.

    Args:
        base: The base model (for a LoRA-tuned model, the same object, read inside ``context``).
        vector: The persona vector.
        layer: Read-back layer.
        context: Makes ``base`` the base model while reading (e.g. ``peft_model.disable_adapter``).
    """

    def read(answers: Sequence[str], questions: Sequence[str]) -> float:
        with context() if context is not None else nullcontext():
            return read_back(base, vector, list(zip(questions, answers)), layer).mean_projection()

    return read


def compare(base: Measurement, tuned: Measurement, trait: str, layer: int) -> ShiftReport:
    """The :class:`ShiftReport` between two measurements of the same vector and questions."""
    report = shift_between(base.projections, tuned.projections, trait, layer)
    return ShiftReport(trait, layer, report.shift, report.per_layer, base.expression, tuned.expression)
