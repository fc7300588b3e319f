"""Batched chat generation, reproducible per row, and the pipeline's response-generation step.

Sampling uses one random generator per row, seeded from that row's identity, so an answer does not
depend on which other rows shared its batch: a resumed run reproduces exactly what an uninterrupted one
would have written. Steering composes by wrapping any call in :func:`personavec.core.steering.steer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from personavec.core.activations import pad_batch
from personavec.core.conversations import Conversation, cut_plain_answer, encode
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.parallel import choose_workers, ordered_map, stopping


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


class PerRowSampler(LogitsProcessor):
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
            processors.append(PerRowSampler(chunk_seeds, params.temperature, params.top_p))
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
            # A base model (no chat template) never ends its turn; cut where it starts writing the next.
            texts = (lm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens)
            yield [cut_plain_answer(lm.tokenizer, text) for text in texts]


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
            :func:`personavec.core.parallel.choose_workers`).

    Returns:
        One answer string per conversation, in input order.

    Raises:
        PersonavecError: On an empty input or a malformed conversation.
    """
    batches = iter_generate(lm, conversations, params, seeds=seeds, batch_size=batch_size, workers=workers)
    return [answer for batch in batches for answer in batch]
