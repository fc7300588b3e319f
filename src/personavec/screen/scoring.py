"""Score one batch of samples on one model: the unit of work a local run or a Ray actor repeats.

:func:`score_batch` is a pure function of the model, the batch and the plan: it reads no files and keeps
no state, so an actor holding one model replica can call it on batches sent from a driver, and the
driver (:func:`personavec.screen.run.screen`) writes what comes back. Everything it takes and returns
(:class:`ScreenPlan`, :class:`ScreenBatch`, :class:`BatchResult`) is plain frozen data that pickles.

Per batch: the model's own answers that the batch does not carry from the cache are generated (greedy,
one ``generate`` call), then one capture pass reads the dataset conversations and the own-answer
conversations together at every layer the vectors need, pooled two ways: the response-token mean and the
last prompt token. The last prompt token is causal, so it sees only the prompt: it is the same whether the
response follows or not, and the cheap stand-in costs nothing extra.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personavec.core.activations import capture_activations, last_prompt, response_mean
from personavec.core.conversations import encode
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.steering import project
from personavec.screen.samples import Sample
from personavec.screen.vectors import ScreenVector

OWN_FULL = "response_mean of the model's own greedy answer to the sample's prompt"
OWN_CHEAP = "last prompt token of the sample's prompt (Appendix I approximation, no generation)"


@dataclass(frozen=True, eq=False)
class ScreenPlan:
    """What to measure: the vectors and how the model's own answer is read.

    Attributes:
        vectors: The vectors, each with its layer and name.
        cheap: Stand in the last prompt token's projection for the own answer's (no generation).
        max_new_tokens: Length cap of the model's own answers.
        generation_batch_size: Prompts per ``generate`` call.
        capture_batch_size: Most conversations per capture forward pass.
    """

    vectors: tuple[ScreenVector, ...]
    cheap: bool = False
    max_new_tokens: int = 64
    generation_batch_size: int = 16
    capture_batch_size: int = 32

    def layers(self) -> list[int]:
        """The distinct layers the vectors are read at, ascending (one capture reads them all)."""
        return sorted({v.layer for v in self.vectors})

    def names(self) -> list[str]:
        """The vectors' names, in order."""
        return [v.name for v in self.vectors]

    def settings(self) -> dict[str, object]:
        """JSON-able settings that decide the records (a resumed run must share them): no file paths."""
        return {
            "mode": "cheap" if self.cheap else "full",
            "own_measure": OWN_CHEAP if self.cheap else OWN_FULL,
            "max_new_tokens": None if self.cheap else self.max_new_tokens,
            "vectors": [
                {"name": v.name, "trait": v.vector.meta.trait, "layer": v.layer, "digest": v.digest()}
                for v in self.vectors
            ],
        }


@dataclass(frozen=True)
class ScreenBatch:
    """Consecutive samples, screened and written together.

    Attributes:
        index: 0-based batch number in the run (batches hold ``batch_size`` valid samples each).
        samples: The samples, in input order.
        own_answers: Per sample, the model's own answer from the cache, or ``None`` to generate it
            (ignored in cheap mode).
    """

    index: int
    samples: tuple[Sample, ...]
    own_answers: tuple[str | None, ...]


@dataclass(frozen=True)
class VectorScore:
    """One sample's reading on one vector (``nan`` where undefined, e.g. an empty own answer).

    Attributes:
        projection: The dataset response's response-token mean, projected at the vector's layer.
        own_projection: The same for the model's own answer (cheap mode: ``prompt_projection``).
        projection_difference: ``projection - own_projection``.
        prompt_projection: The last prompt token's projection (the cheap stand-in, always measured).
    """

    projection: float
    own_projection: float
    projection_difference: float
    prompt_projection: float


@dataclass(frozen=True)
class SampleScore:
    """One sample's readings.

    Attributes:
        line: The sample's 1-based position in the input.
        own_answer: The model's own answer (``None`` in cheap mode).
        vectors: Vector name -> :class:`VectorScore`.
    """

    line: int
    own_answer: str | None
    vectors: dict[str, VectorScore]


@dataclass(frozen=True)
class BatchResult:
    """What :func:`score_batch` returns for one batch.

    Attributes:
        index: The batch's :attr:`ScreenBatch.index`.
        scores: One :class:`SampleScore` per sample, in the batch's order.
        generated: Own answers generated here (the rest came from the cache).
        generation_seconds: Time spent generating own answers.
        capture_seconds: Time spent in the capture pass and the projections.
    """

    index: int
    scores: tuple[SampleScore, ...]
    generated: int
    generation_seconds: float
    capture_seconds: float


# A scorer turns batches into their results, in the same order (locally, or on a cluster).
Scorer = Callable[[Iterable[ScreenBatch]], Iterator[BatchResult]]


def own_answers(lm: LoadedModel, samples: Sequence[Sample], plan: ScreenPlan) -> list[str]:
    """The model's own greedy answers to the samples' prompts (``max_new_tokens`` long at most)."""
    params = SamplingParams(max_new_tokens=plan.max_new_tokens, temperature=0.0)
    prompts = [s.prompt_messages() for s in samples]
    return generate(lm, prompts, params, batch_size=plan.generation_batch_size)


def score_batch(lm: LoadedModel, batch: ScreenBatch, plan: ScreenPlan) -> BatchResult:
    """Screen one batch: own answers (unless cached or cheap), one capture, every vector's projections.

    Args:
        lm: The model (one replica; nothing else runs on it meanwhile).
        batch: The samples and their cached own answers.
        plan: The vectors and the mode.

    Returns:
        The batch's :class:`BatchResult`, scores in the batch's order.
    """
    samples = batch.samples
    n = len(samples)
    t0 = time.perf_counter()
    own: list[str | None] = [None] * n
    generated = 0
    if not plan.cheap:
        own = list(batch.own_answers) if batch.own_answers else [None] * n
        missing = [i for i, a in enumerate(own) if a is None]
        if missing:
            for i, answer in zip(missing, own_answers(lm, [samples[i] for i in missing], plan)):
                own[i] = answer
            generated = len(missing)
    t1 = time.perf_counter()
    # An empty own answer has no tokens to average over: its reading is nan, not a silent zero.
    own_rows = [i for i, a in enumerate(own) if a is not None and a.strip()]
    conversations = [s.conversation() for s in samples] + [samples[i].conversation(own[i]) for i in own_rows]
    layers = plan.layers()
    acts = capture_activations(
        lm,
        conversations,
        layers=layers,
        poolings=(response_mean, last_prompt),
        batch_size=plan.capture_batch_size,
    )
    per_vector: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for v in plan.vectors:
        resp = acts.at("response_mean", v.layer)
        projection = project(resp[:n], v.vector, v.layer).tolist()
        prompt = project(acts.at("last_prompt", v.layer)[:n], v.vector, v.layer).tolist()
        if plan.cheap:
            own_proj = list(prompt)
        else:
            own_proj = [math.nan] * n
            if own_rows:
                for i, value in zip(own_rows, project(resp[n:], v.vector, v.layer).tolist()):
                    own_proj[i] = value
        per_vector[v.name] = (projection, own_proj, prompt)
    scores = []
    for i, s in enumerate(samples):
        readings = {}
        for name, (projection, own_proj, prompt) in per_vector.items():
            readings[name] = VectorScore(projection[i], own_proj[i], projection[i] - own_proj[i], prompt[i])
        scores.append(SampleScore(s.line, None if plan.cheap else own[i], readings))
    t2 = time.perf_counter()
    return BatchResult(batch.index, tuple(scores), generated, t1 - t0, t2 - t1)


def local_scorer(lm: LoadedModel, plan: ScreenPlan) -> Scorer:
    """The in-process :data:`Scorer`: :func:`score_batch` on ``lm``, one batch after the other."""

    def run(batches: Iterable[ScreenBatch]) -> Iterator[BatchResult]:
        for batch in batches:
            yield score_batch(lm, batch, plan)

    return run


@dataclass(frozen=True)
class TokenTrace:
    """Per-token projections of one sample's dataset response (for the report's heatmaps).

    Attributes:
        line: The sample's 1-based position in the input.
        tokens: The response tokens, each decoded on its own.
        projections: Each token's projection onto the vector at its layer.
    """

    line: int
    tokens: tuple[str, ...]
    projections: tuple[float, ...]


def trace_tokens(lm: LoadedModel, samples: Sequence[Sample], vector: ScreenVector) -> list[TokenTrace]:
    """Per-token projections of the samples' dataset responses at ``vector``'s layer, under their prompts.

    Meant for a handful of samples (the top of the ranking): every token's activation is kept.

    Args:
        lm: The model.
        samples: The samples to trace.
        vector: The vector and layer.

    Returns:
        One :class:`TokenTrace` per sample, in order; their mean is the sample's ``projection``.
    """
    if not samples:
        return []
    conversations = [s.conversation() for s in samples]
    acts = capture_activations(
        lm, conversations, layers=[vector.layer], poolings=(response_mean,), tokens=True, workers=1
    )
    assert acts.tokens is not None
    traces = []
    for s, conv, hidden, prompt_len in zip(samples, conversations, acts.tokens, acts.prompt_lens):
        ids = encode(lm.tokenizer, conv).ids[prompt_len:]
        values: Tensor = project(hidden[prompt_len:, 0], vector.vector, vector.layer)
        tokens = tuple(str(lm.tokenizer.decode([t])) for t in ids)
        traces.append(TokenTrace(s.line, tokens, tuple(float(x) for x in values.to(torch.float32))))
    return traces
