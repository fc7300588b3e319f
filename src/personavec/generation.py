"""Batched chat generation, reproducible per row, and the pipeline's response-generation step.

Sampling uses one random generator per row, seeded from that row's identity, so an answer does not
depend on which other rows shared its batch: a resumed run reproduces exactly what an uninterrupted one
would have written. Steering composes by wrapping any call in :func:`personavec.steering.steer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from personavec.activations import pad_batch
from personavec.conversations import Conversation, encode
from personavec.errors import PersonavecError
from personavec.models import LoadedModel
from personavec.parallel import choose_workers, ordered_map, stopping
from personavec.store import JsonlStore, record_key
from personavec.traits.spec import TraitSpec


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
        max_new_tokens: Most tokens per answer.
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass.
        seed: Base seed; each row's generator is seeded from it and the row's own seed.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class _PerRowSampler(LogitsProcessor):
    """Samples each row with its own generator, then leaves only that token for greedy search to pick.

    ``generate`` shares one random stream across the batch; this gives every row its own, so results do
    not depend on batch composition.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        chosen = torch.stack(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
        ).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen, 0.0)
        return out  # type: ignore[return-value]


class _StopWithStream(StoppingCriteria):
    """Ends a batch at its next step once its stream is being closed (see ``parallel.stopping``)."""

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        done = torch.full((input_ids.shape[0],), stopping(), dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]


def iter_generate(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    params: SamplingParams | None = None,
    *,
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
    workers: int | None = None,
) -> Iterator[list[str]]:
    """Answer conversations batch by batch, yielding each batch's answers in input order.

    Takes the same arguments as :func:`generate`; a caller that saves each batch as it comes loses at
    most the batches in flight when something fails.

    Yields:
        The answers to ``conversations[i : i + batch_size]``, for i = 0, batch_size, ...
    """
    params = params or SamplingParams()
    if not conversations:
        raise PersonavecError("no prompts given: the batch is empty")
    if seeds is not None and len(seeds) != len(conversations):
        raise PersonavecError(f"got {len(seeds)} seeds for {len(conversations)} prompts")
    encoded = [encode(lm.tokenizer, c) for c in conversations]
    if any(e.response_len for e in encoded):
        raise PersonavecError("a prompt ends with an assistant message: remove it to generate a new answer")
    row_seeds = list(seeds) if seeds is not None else list(range(len(conversations)))
    pad_id = int(lm.tokenizer.pad_token_id)
    starts = list(range(0, len(encoded), batch_size))
    # Steered or monitored generation (hooks on the model) stays on one stream: see choose_workers.
    streams = choose_workers(lm, workers, len(starts))

    def run(start: int) -> torch.Tensor:
        chunk = encoded[start : start + batch_size]
        ids, layout, _ = pad_batch(chunk, pad_id, "left", lm.device)
        processors = LogitsProcessorList()
        if params.temperature > 0:
            chunk_seeds = [params.seed * 1_000_003 + s for s in row_seeds[start : start + batch_size]]
            processors.append(_PerRowSampler(chunk_seeds, params.temperature, params.top_p))
        with torch.inference_mode():
            out = lm.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=layout.attention_mask,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=pad_id,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_StopWithStream()]),
            )
        return out[:, ids.shape[1] :]

    with contextlib.closing(ordered_map(run, starts, streams, model=lm.model)) as results:
        for new_tokens in results:
            # Decoding here, in the caller's thread, keeps the tokenizer out of the worker threads.
            yield [lm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]


def generate(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    params: SamplingParams | None = None,
    *,
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
    workers: int | None = None,
) -> list[str]:
    """Answer each conversation (its last message should be a user turn).

    Args:
        lm: The loaded model.
        conversations: Prompts as chat conversations.
        params: Sampling parameters (greedy, 64 tokens by default).
        seeds: One seed per conversation for sampling (default: its index); ignored when greedy.
        batch_size: Conversations per ``generate`` call.
        workers: Batches generated at once, each in its own thread (default: 2 on a CPU, 1 on an
            accelerator; always 1 while the model carries hooks, e.g. inside ``steer``, see
            :func:`personavec.parallel.choose_workers`).

    Returns:
        One answer string per conversation, in input order.

    Raises:
        PersonavecError: On an empty input or a malformed conversation.
    """
    batches = iter_generate(lm, conversations, params, seeds=seeds, batch_size=batch_size, workers=workers)
    return [answer for batch in batches for answer in batch]


@dataclass(frozen=True)
class ResponseRow:
    """One generated answer of the pipeline, with everything that identifies it.

    Attributes:
        key: Stable identity (model, trait, split, pair, polarity, question, rollout, sampling).
        split: ``extraction`` or ``evaluation``.
        pair: Index of the system-prompt pair.
        polarity: ``pos`` (trait-eliciting prompt) or ``neg`` (suppressing prompt).
        question_index: Index within the split's questions.
        rollout: Rollout number.
        system: The system prompt used.
        question: The user question.
        answer: The model's answer.
    """

    key: str
    split: str
    pair: int
    polarity: str
    question_index: int
    rollout: int
    system: str
    question: str
    answer: str

    def conversation(self, *, with_system: bool = True) -> list[dict[str, str]]:
        """The chat (system, user, assistant), optionally without the system prompt."""
        msgs = [{"role": "system", "content": self.system}] if with_system else []
        return [
            *msgs,
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]

    @classmethod
    def from_record(cls, record: dict[str, object]) -> ResponseRow:
        """Rebuild a row from its stored JSON record."""
        names = cls.__dataclass_fields__
        return cls(**{k: record[k] for k in names})  # type: ignore[arg-type]


def planned_rows(
    lm: LoadedModel,
    spec: TraitSpec,
    split: str,
    *,
    rollouts: int,
    params: SamplingParams,
    n_pairs: int | None = None,
    n_questions: int | None = None,
    one_pair_per_question: bool = False,
) -> list[dict[str, object]]:
    """The rows a run will need, as records without answers (identity fields and key only).

    Args:
        lm: The target model (its fingerprint is part of every key).
        spec: The trait spec.
        split: ``extraction`` or ``evaluation`` (which question list to use).
        rollouts: Answers per (pair, polarity, question).
        params: Sampling parameters (part of every key).
        n_pairs: Use only the first pairs.
        n_questions: Use only the first questions.
        one_pair_per_question: Cycle through the pairs instead of crossing every pair with every question
            (cheaper; used for evaluation).

    Returns:
        Records in a fixed order.
    """
    if split not in ("extraction", "evaluation"):
        raise PersonavecError(f"split must be 'extraction' or 'evaluation', not '{split}'")
    questions = spec.extraction_questions if split == "extraction" else spec.evaluation_questions
    questions = questions[:n_questions] if n_questions else questions
    pairs = spec.pairs[:n_pairs] if n_pairs else spec.pairs
    rows: list[dict[str, object]] = []
    for qi, question in enumerate(questions):
        pair_ids = [qi % len(pairs)] if one_pair_per_question else list(range(len(pairs)))
        for pi in pair_ids:
            for polarity in ("pos", "neg"):
                system = pairs[pi].positive if polarity == "pos" else pairs[pi].negative
                for r in range(rollouts):
                    ident = {
                        "model": lm.info.fingerprint,
                        "trait": spec.hash,
                        "split": split,
                        "pair": pi,
                        "polarity": polarity,
                        "question": question,
                        "rollout": r,
                        "sampling": asdict(params),
                    }
                    rows.append(
                        {
                            "key": record_key(ident),
                            "split": split,
                            "pair": pi,
                            "polarity": polarity,
                            "question_index": qi,
                            "rollout": r,
                            "system": system,
                            "question": question,
                        }
                    )
    return rows


def generate_responses(
    lm: LoadedModel,
    spec: TraitSpec,
    store: JsonlStore,
    *,
    split: str = "extraction",
    rollouts: int = 1,
    params: SamplingParams | None = None,
    n_pairs: int | None = None,
    n_questions: int | None = None,
    one_pair_per_question: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[ResponseRow]:
    """Answer the trait's questions under its positive and negative system prompts (resumable).

    Rows already in ``store`` are reused; the rest are generated in batches and appended to the store
    as each batch finishes, so a killed run loses at most the batches in flight.

    Args:
        lm: The target model.
        spec: The trait spec.
        store: Where finished rows are kept (``responses.jsonl``).
        split: ``extraction`` or ``evaluation``.
        rollouts: Answers per (pair, polarity, question).
        params: Sampling parameters (default: temperature 0.7, top-p 0.9, 64 tokens).
        n_pairs: Use only the first pairs.
        n_questions: Use only the first questions.
        one_pair_per_question: Cycle pairs over questions instead of crossing them.
        batch_size: Prompts per ``generate`` call.
        workers: Batches generated at once (see :func:`generate`).
        on_progress: Called with the number of rows finished (including reused ones).

    Returns:
        All planned rows with their answers, in plan order.
    """
    params = params or SamplingParams(temperature=0.7, top_p=0.9)
    plan = planned_rows(
        lm,
        spec,
        split,
        rollouts=rollouts,
        params=params,
        n_pairs=n_pairs,
        n_questions=n_questions,
        one_pair_per_question=one_pair_per_question,
    )
    todo = [r for r in plan if str(r["key"]) not in store]
    if on_progress is not None and len(plan) > len(todo):
        on_progress(len(plan) - len(todo))
    if not todo:
        return [ResponseRow.from_record(store.get(str(r["key"])) or {}) for r in plan]
    convs = [
        [{"role": "system", "content": str(r["system"])}, {"role": "user", "content": str(r["question"])}]
        for r in todo
    ]
    # The row seed comes from the key, so a row's answer is the same whatever batch it lands in.
    seeds = [int(str(r["key"])[:8], 16) for r in todo]
    batches = iter_generate(lm, convs, params, seeds=seeds, batch_size=batch_size, workers=workers)
    for start, answers in zip(range(0, len(todo), batch_size), batches):
        batch = todo[start : start + batch_size]
        store.append([{**r, "answer": a} for r, a in zip(batch, answers, strict=True)])
        if on_progress is not None:
            on_progress(len(batch))
    return [ResponseRow.from_record(store.get(str(r["key"])) or {}) for r in plan]
