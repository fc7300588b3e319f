"""Batched chat generation (left-padded, as decoder-only generation needs).

Steering composes with it by wrapping the call in :func:`personavec.steering.steer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personavec.activations import pad_batch
from personavec.conversations import Conversation, encode
from personavec.errors import PersonavecError
from personavec.models import LoadedModel


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
        max_new_tokens: Most tokens per answer.
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass.
        seed: Seed for the random generator (same seed, same answers).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def generate(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    params: SamplingParams | None = None,
    *,
    batch_size: int = 16,
) -> list[str]:
    """Answer each conversation (its last message should be a user turn).

    Args:
        lm: The loaded model.
        conversations: Prompts as chat conversations.
        params: Sampling parameters (greedy, 64 tokens by default).
        batch_size: Conversations per ``generate`` call.

    Returns:
        One answer string per conversation, in input order.

    Raises:
        PersonavecError: On an empty input or a malformed conversation.
    """
    params = params or SamplingParams()
    if not conversations:
        raise PersonavecError("no prompts given: the batch is empty")
    encoded = [encode(lm.tokenizer, c) for c in conversations]
    if any(e.response_len for e in encoded):
        raise PersonavecError("a prompt ends with an assistant message: remove it to generate a new answer")
    pad_id = int(lm.tokenizer.pad_token_id)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, layout, _ = pad_batch(chunk, pad_id, "left", lm.device)
        torch.manual_seed(params.seed + start)
        sampling = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        with torch.inference_mode():
            out = lm.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=layout.attention_mask,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=pad_id,
                **sampling,
            )
        for row in out[:, ids.shape[1] :]:
            answers.append(lm.tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
