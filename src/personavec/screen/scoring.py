"""Score one batch of samples on one model: the unit of work a local run or a Ray actor repeats.

:func:`score_batch` is a pure function of the model, the batch and the plan: it reads no files and keeps
no state, so an actor holding one model replica can call it on batches sent from a driver, and the
driver (:func:`personavec.screen.run.screen`) writes what comes back. Everything it takes and returns
(:class:`ScreenPlan`, :class:`ScreenBatch`, :class:`BatchResult`) is plain frozen data that pickles.

Per batch: the model's own answers that the batch does not carry from the cache are generated (several
sampled answers per distinct prompt, see :class:`ScreenPlan`), then one capture pass reads the dataset
conversations and the own-answer conversations together at every layer the vectors need, pooled two
ways: the response-token mean and the last prompt token. The last prompt token is causal, so it sees only
the prompt: it is the same whether the response follows or not, and the cheap stand-in costs nothing
extra.
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
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.steering import project
from personavec.core.store import record_key
from personavec.screen.samples import Sample
from personavec.screen.vectors import ScreenVector

OWN_GREEDY = "response_mean of the model's own greedy answer to the sample's prompt"
OWN_SAMPLED = "mean response_mean of {k} own answers to the sample's prompt, sampled at temperature {t}"
OWN_CHEAP = "last prompt token of the sample's prompt (Appendix I approximation, no generation)"


@dataclass(frozen=True, eq=False)
class ScreenPlan:
    """What to measure: the vectors and how the model's own answer is read.

    One answer is a noisy stand-in for what the model would say: on the embedded model, the projections of
    answers sampled for one prompt spread more (sd 6.1 for evil) than their means spread between prompts
    (4.5), so the difference against a single answer mostly adds noise. The default therefore averages
    several sampled answers per prompt (docs/results.md, "Screening training data").

    Attributes:
        vectors: The vectors, each with its layer and name.
        cheap: Stand in the last prompt token's projection for the own answer's (no generation).
        own_samples: Own answers per prompt, sampled at ``temperature``; their mean projection is the
            own projection. ``1`` reads the single greedy answer instead.
        temperature: Sampling temperature of the own answers (with ``own_samples > 1``).
        max_new_tokens: Length cap of the model's own answers.
        capture_batch_size: Most conversations per capture forward pass.
    """

    vectors: tuple[ScreenVector, ...]
    cheap: bool = False
    own_samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    capture_batch_size: int = 32

    def layers(self) -> list[int]:
        """The distinct layers the vectors are read at, ascending (one capture reads them all)."""
        return sorted({v.layer for v in self.vectors})

    def names(self) -> list[str]:
        """The vectors' names, in order."""
        return [v.name for v in self.vectors]

    def __post_init__(self) -> None:
        if self.own_samples < 1:
            raise PersonavecError(f"own_samples must be at least 1, got {self.own_samples}")
        if self.own_samples > 1 and self.temperature <= 0:
            raise PersonavecError(f"sampling {self.own_samples} own answers needs a temperature above 0")

    def own_measure(self) -> str:
        """What ``own_projection`` measures, in words (stored in the run's settings)."""
        if self.cheap:
            return OWN_CHEAP
        if self.own_samples == 1:
            return OWN_GREEDY
        return OWN_SAMPLED.format(k=self.own_samples, t=self.temperature)

    def generation(self) -> dict[str, object]:
        """What the own answers depend on besides the model and the prompt (their cache key)."""
        sampled = self.own_samples > 1
        return {
            "max_new_tokens": self.max_new_tokens,
            "own_samples": self.own_samples,
            "temperature": self.temperature if sampled else 0.0,
        }

    def settings(self) -> dict[str, object]:
        """JSON-able settings that decide the records (a resumed run must share them): no file paths."""
        return {
            "mode": "cheap" if self.cheap else "full",
            "own_measure": self.own_measure(),
            **({} if self.cheap else self.generation()),
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
        own_answers: Per sample, the model's own answers from the cache, or ``None`` to generate them
            (ignored in cheap mode).
    """

    index: int
    samples: tuple[Sample, ...]
    own_answers: tuple[tuple[str, ...] | None, ...]


@dataclass(frozen=True)
class VectorScore:
    """One sample's reading on one vector (``nan`` where undefined, e.g. an empty own answer).

    Attributes:
        projection: The dataset response's response-token mean, projected at the vector's layer.
        own_projection: The same for the model's own answers, averaged over them (cheap mode:
            ``prompt_projection``).
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
        own_answers: The model's own answers (``None`` in cheap mode).
        vectors: Vector name -> :class:`VectorScore`.
    """

    line: int
    own_answers: tuple[str, ...] | None
    vectors: dict[str, VectorScore]


@dataclass(frozen=True)
class BatchResult:
    """What :func:`score_batch` returns for one batch.

    Attributes:
        index: The batch's :attr:`ScreenBatch.index`.
        scores: One :class:`SampleScore` per sample, in the batch's order.
        generated: Samples whose own answers were generated here (the rest came from the cache).
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


def prompt_seed(sample: Sample) -> int:
    """A seed from the prompt's text alone, so that equal prompts get the same own answers anywhere."""
    return int(record_key({"prompt": sample.prompt})[:8], 16)


def own_answers(lm: LoadedModel, samples: Sequence[Sample], plan: ScreenPlan) -> list[tuple[str, ...]]:
    """The model's own answers to the samples' prompts: ``plan.own_samples`` each (one greedy if 1).

    Each distinct prompt is answered once, in a ``generate`` batch of its own (its ``own_samples``
    copies, seeded from the prompt's text): no padding, and no neighbour, can change its answers, so they
    are a function of the prompt and the plan alone, whatever batch, run or Ray worker makes them.
    Samples that share a prompt share its answers.
    """
    k = plan.own_samples
    distinct = list({s.prompt: s for s in samples}.values())
    conversations = [s.prompt_messages() for s in distinct for _ in range(k)]
    seeds = [prompt_seed(s) + j for s in distinct for j in range(k)]
    temperature = plan.temperature if k > 1 else 0.0
    params = SamplingParams(max_new_tokens=plan.max_new_tokens, temperature=temperature)
    flat = generate(lm, conversations, params, seeds=seeds, batch_size=k)
    by_prompt = {s.prompt: tuple(flat[i * k : (i + 1) * k]) for i, s in enumerate(distinct)}
    return [by_prompt[s.prompt] for s in samples]


def _own_answers(batch: ScreenBatch, lm: LoadedModel, plan: ScreenPlan) -> tuple[list[tuple[str, ...]], int]:
    """The batch's own answers, from the cache where it has them; and how many samples needed new ones."""
    own: list[tuple[str, ...] | None] = (
        list(batch.own_answers) if batch.own_answers else [None] * len(batch.samples)
    )
    missing = [i for i, a in enumerate(own) if a is None]
    if missing:
        for i, answers in zip(missing, own_answers(lm, [batch.samples[i] for i in missing], plan)):
            own[i] = answers
    return [a for a in own if a is not None], len(missing)


def _mean_by_owner(values: Tensor, owners: Sequence[int], n: int) -> list[float]:
    """Per owner ``0..n-1``, the mean of its ``values`` (``nan`` for an owner with none)."""
    sums = [0.0] * n
    counts = [0] * n
    for owner, value in zip(owners, values.tolist()):
        sums[owner] += value
        counts[owner] += 1
    return [total / count if count else math.nan for total, count in zip(sums, counts)]


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
    own: list[tuple[str, ...]] = []
    generated = 0
    if not plan.cheap:
        own, generated = _own_answers(batch, lm, plan)
    t1 = time.perf_counter()
    # Samples that share a prompt share its answers: each distinct prompt's answers are read once. An empty
    # answer has no tokens to average over: it is left out, and a prompt with no non-empty answer reads
    # nan, not a silent zero.
    first = {s.prompt: i for i, s in reversed(list(enumerate(samples)))} if own else {}
    owned = [(i, a) for i in sorted(first.values()) for a in own[i] if a.strip()]
    conversations = [s.conversation() for s in samples] + [samples[i].conversation(a) for i, a in owned]
    acts = capture_activations(
        lm,
        conversations,
        layers=plan.layers(),
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
            by_first = _mean_by_owner(project(resp[n:], v.vector, v.layer), [i for i, _ in owned], n)
            own_proj = [by_first[first[s.prompt]] for s in samples]
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
