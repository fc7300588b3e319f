"""Capture residual-stream activations of chat conversations, pooled per example.

One forward pass of the backbone (never the LM head) per batch, hooks on the decoder blocks, and a
pooling step inside the hook, so full hidden states never pile up: memory is bounded by the batch's
token budget, not by the size of the data. The pass stops right after the deepest requested block.

Layer indices follow :mod:`personavec.core.layers` (0 = embeddings, l = output of block l).

Batches are formed by length bucketing (longest first, then as many as fit in ``token_budget`` while
padding stays under ``max_padding``), so little compute is spent on padding. Each example's result does
not depend on its batch: position ids are derived from the attention mask, so left and right padding
give the same numbers as running it alone.

On a CPU two batches run at once, each in its own thread with half the intra-op threads (see
:mod:`personavec.core.parallel`); the hooks are registered once per call and each thread records into its
own slot, so concurrent passes never see each other's results.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from personavec.core.conversations import Conversation, Encoded, encode
from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel
from personavec.core.parallel import choose_workers, ordered_map


@dataclass(frozen=True)
class BatchLayout:
    """Where the prompt and response tokens of a padded batch are.

    Attributes:
        attention_mask: ``[B, T]``, 1 for real tokens.
        prompt_mask: ``[B, T]`` bool, prompt tokens.
        response_mask: ``[B, T]`` bool, response tokens.
        last_prompt: ``[B]`` index of each example's last prompt token.
    """

    attention_mask: Tensor
    prompt_mask: Tensor
    response_mask: Tensor
    last_prompt: Tensor


# A pooling maps one layer's hidden states ``[B, T, d]`` and the layout to ``[B, d]``.
Pooling = Callable[[Tensor, BatchLayout], Tensor]


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    # An example without response tokens gets NaN, not a silent zero vector.
    return (hidden * m).sum(1) / m.sum(1)


def response_mean(hidden: Tensor, layout: BatchLayout) -> Tensor:
    """Mean over response tokens (what persona vectors are built from)."""
    return _masked_mean(hidden, layout.response_mask)


def prompt_mean(hidden: Tensor, layout: BatchLayout) -> Tensor:
    """Mean over prompt tokens."""
    return _masked_mean(hidden, layout.prompt_mask)


def last_prompt(hidden: Tensor, layout: BatchLayout) -> Tensor:
    """The last prompt token, the position right before the model answers (the monitoring read-out)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), layout.last_prompt]


DEFAULT_POOLINGS: tuple[Pooling, ...] = (response_mean, prompt_mean, last_prompt)


@dataclass
class Activations:
    """Pooled activations for a list of conversations, in input order.

    Attributes:
        layers: The captured layer indices (row ``i`` of every tensor is layer ``layers[i]``).
        pooled: Pooling name -> ``[N, len(layers), d]`` float32 tensor.
        tokens: With ``tokens=True``, per example a ``[T_i, len(layers), d]`` tensor of every token.
        prompt_lens: Prompt length of each example, to split ``tokens`` into prompt and response.
    """

    layers: tuple[int, ...]
    pooled: dict[str, Tensor]
    tokens: list[Tensor] | None = None
    prompt_lens: list[int] = field(default_factory=list)

    def __getitem__(self, pooling: str) -> Tensor:
        if pooling not in self.pooled:
            raise KeyError(f"no pooling '{pooling}' captured (have: {', '.join(self.pooled)})")
        return self.pooled[pooling]

    def at(self, pooling: str, layer: int) -> Tensor:
        """``[N, d]`` activations of one pooling at one layer index."""
        if layer not in self.layers:
            raise PersonavecError(f"layer {layer} was not captured (captured: {list(self.layers)})")
        return self[pooling][:, self.layers.index(layer)]


@dataclass(frozen=True)
class ExampleActivations:
    """One example's result, as streamed by :func:`iter_activations`."""

    index: int
    pooled: dict[str, Tensor]  # name -> [len(layers), d]
    tokens: Tensor | None  # [T, len(layers), d]
    prompt_len: int


class _StopForward(Exception):
    """Raised by the deepest hook so the remaining blocks (and the LM head) never run."""


def length_batches(
    lengths: Sequence[int], batch_size: int, token_budget: int, max_padding: float = 0.2
) -> list[list[int]]:
    """Group example indices into batches of similar length.

    Longest first; an example joins the current batch only while the batch stays within ``batch_size``
    examples and ``token_budget`` padded tokens, and padding stays under ``max_padding`` of the padded
    tokens (one wide batch of mixed lengths wastes more compute than several narrow ones).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for i in order:
        if batches:
            width, n = lengths[batches[-1][0]], len(batches[-1]) + 1
            if (
                n <= batch_size
                and n * width <= token_budget
                and real + lengths[i] >= (1 - max_padding) * n * width
            ):
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def default_max_padding(device: torch.device) -> float:
    """The share of padded tokens a batch may hold on ``device`` (see :func:`length_batches`)."""
    # On a CPU a padded token costs as much as a real one and batching gains little (SmolLM2-135M on
    # 2 cores: one 200-token example alone runs at 91% of a batch of 8), so padding is kept tight.
    # A GPU is starved by small batches, so there wider batches are worth more padding.
    return 0.05 if device.type == "cpu" else 0.25


def pad_batch(
    encoded: Sequence[Encoded], pad_id: int, padding_side: str, device: torch.device
) -> tuple[Tensor, BatchLayout, Tensor]:
    """Pad encoded conversations into ``input_ids``, a :class:`BatchLayout` and ``position_ids``.

    Position ids count real tokens only, so a left-padded example sees the same positions as when run
    alone.
    """
    if padding_side not in ("left", "right"):
        raise PersonavecError(f"padding_side must be 'left' or 'right', not '{padding_side}'")
    width = max(len(e.ids) for e in encoded)
    b = len(encoded)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    prompt = torch.zeros((b, width), dtype=torch.bool)
    resp = torch.zeros((b, width), dtype=torch.bool)
    last = torch.zeros(b, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.ids)
        start = width - n if padding_side == "left" else 0
        ids[row, start : start + n] = torch.tensor(e.ids)
        attn[row, start : start + n] = 1
        prompt[row, start : start + e.prompt_len] = True
        resp[row, start + e.prompt_len : start + n] = True
        last[row] = start + e.prompt_len - 1
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    layout = BatchLayout(attn.to(device), prompt.to(device), resp.to(device), last.to(device))
    return ids.to(device), layout, positions.to(device)


def forward_mask(layout: BatchLayout) -> Tensor | None:
    """The attention mask to pass to a forward pass over ``layout``'s batch, or ``None`` when it can go.

    When every example starts in column 0 (right padding, or no padding), causal attention alone keeps
    real tokens from seeing the padding after them, so the mask changes nothing we read; leaving it out
    lets SDPA take its causal fast path, which skips the upper triangle instead of masking it (measured
    on 2 CPU cores: attention took ~11% of a capture with the mask).
    """
    mask = layout.attention_mask
    return None if bool(mask[:, 0].all()) else mask


def _first_tensor(x: object) -> Tensor:
    # Decoder blocks return a tensor (transformers >= 5) or a tuple whose first item is one.
    return x if isinstance(x, Tensor) else x[0]  # type: ignore[index]


def iter_activations(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    *,
    layers: Sequence[int] | None = None,
    poolings: Sequence[Pooling] = DEFAULT_POOLINGS,
    tokens: bool = False,
    batch_size: int = 32,
    token_budget: int = 16384,
    max_padding: float | None = None,
    padding_side: str = "right",
    workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[ExampleActivations]:
    """Stream pooled activations example by example (in bucketed order, not input order).

    Args:
        lm: The loaded model.
        conversations: Chat conversations; a final assistant message is the response.
        layers: Layer indices to capture (default: all, ``0..L``).
        poolings: Pooling callables; each result is keyed by the function's ``__name__``.
        tokens: Also return every token's activations.
        batch_size: Most examples per forward pass.
        token_budget: Most padded tokens per forward pass (bounds memory).
        max_padding: Most padding per batch, as a share of its padded tokens (default: 0.05 on a CPU,
            0.25 on an accelerator, see :func:`default_max_padding`).
        padding_side: ``right`` or ``left``; results are the same either way.
        workers: Batches run at once, each in its own thread (default: 2 on a CPU, 1 on an
            accelerator; always 1 while the model carries other hooks, such as steering's, see
            :func:`personavec.core.parallel.choose_workers`).
        on_batch: Called with the number of examples after each batch (progress bars).

    Yields:
        One :class:`ExampleActivations` per conversation.

    Raises:
        PersonavecError: On an empty input, a bad layer, or a conversation without a response when
            ``response_mean`` is asked for.
    """
    if len(conversations) == 0:
        raise PersonavecError("no conversations given: the batch is empty")
    n_blocks = lm.info.n_blocks
    wanted = check_layers(range(n_blocks + 1) if layers is None else layers, n_blocks)
    need_response = any(p is response_mean for p in poolings)
    encoded = []
    for i, conv in enumerate(conversations):
        try:
            encoded.append(encode(lm.tokenizer, conv, require_response=need_response))
        except PersonavecError as e:
            raise PersonavecError(f"conversation {i}: {e}") from None
    pad_id = int(lm.tokenizer.pad_token_id)

    if max_padding is None:
        max_padding = default_max_padding(lm.device)
    batches = length_batches([len(e.ids) for e in encoded], batch_size, token_budget, max_padding)
    # Chosen before our own hooks go in: other hooks on the model keep capture on one stream.
    workers = choose_workers(lm, workers, len(batches))

    with layer_hooks(lm, wanted) as (slot, ours):

        def run(batch: list[int]) -> list[ExampleActivations]:
            return _run_batch(
                lm, slot, [encoded[i] for i in batch], batch, pad_id, padding_side, wanted, poolings, tokens
            )

        # closing(): leaving early stops the workers while the hooks are still in place.
        with contextlib.closing(ordered_map(run, batches, workers, model=lm.model, ours=ours)) as results:
            for batch, examples in zip(batches, results):
                yield from examples
                if on_batch is not None:
                    on_batch(len(batch))


@contextlib.contextmanager
def layer_hooks(lm: LoadedModel, wanted: list[int]) -> Iterator[tuple[threading.local, set[int]]]:
    """Hooks on the wanted layers (our convention) that record only for threads that ask to.

    A thread records by setting ``slot.record = fn`` (called as ``fn(layer, hidden)``); threads that
    have not set it (a caller's own forward passes between two yielded examples, another capture's
    workers, a server's other requests) pass through untouched. The hooks are removed on any exit.

    Args:
        lm: The model.
        wanted: Layer indices in ``0..L`` (0 hooks the input of block 1).

    Yields:
        The thread-local slot and the ids of the hooks (to tell them apart from a caller's).
    """
    slot = threading.local()

    def fire(layer: int, hidden: Tensor) -> None:
        record = getattr(slot, "record", None)
        if record is not None:
            record(layer, hidden)

    handles = []
    try:
        if 0 in wanted:
            handles.append(
                lm.blocks[0].register_forward_pre_hook(
                    lambda _m, args, kwargs: fire(0, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            )
        for layer in wanted:
            if layer >= 1:
                handles.append(
                    lm.blocks[layer - 1].register_forward_hook(
                        lambda _m, _a, out, layer=layer: fire(layer, _first_tensor(out))
                    )
                )
        yield slot, {h.id for h in handles}
    finally:
        for h in handles:
            h.remove()


def _run_batch(
    lm: LoadedModel,
    slot: threading.local,
    encoded: list[Encoded],
    indices: list[int],
    pad_id: int,
    padding_side: str,
    wanted: list[int],
    poolings: Sequence[Pooling],
    keep_tokens: bool,
) -> list[ExampleActivations]:
    """Pad one batch, run one backbone pass, and split the results into per-example records."""
    ids, layout, positions = pad_batch(encoded, pad_id, padding_side, lm.device)
    pooled: dict[int, dict[str, Tensor]] = {}
    hidden: dict[int, Tensor] = {}
    deepest = wanted[-1]

    def record(layer: int, h: Tensor) -> None:
        h = h.float()
        pooled[layer] = {p.__name__: p(h, layout) for p in poolings}
        if keep_tokens:
            hidden[layer] = h
        if layer == deepest:
            raise _StopForward

    slot.record = record
    try:
        with torch.inference_mode(), contextlib.suppress(_StopForward):
            lm.backbone(
                input_ids=ids, attention_mask=forward_mask(layout), position_ids=positions, use_cache=False
            )
    finally:
        slot.record = None

    names = [p.__name__ for p in poolings]
    out = []
    for row, (idx, enc) in enumerate(zip(indices, encoded)):
        tok = None
        if keep_tokens:
            valid = layout.attention_mask[row].bool()
            tok = torch.stack([hidden[layer][row][valid] for layer in wanted], dim=1).cpu()
        pooled_row = {
            name: torch.stack([pooled[layer][name][row] for layer in wanted]).cpu() for name in names
        }
        out.append(ExampleActivations(idx, pooled_row, tok, enc.prompt_len))
    return out


def capture_activations(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    *,
    layers: Sequence[int] | None = None,
    poolings: Sequence[Pooling] = DEFAULT_POOLINGS,
    tokens: bool = False,
    batch_size: int = 32,
    token_budget: int = 16384,
    max_padding: float | None = None,
    padding_side: str = "right",
    workers: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Activations:
    """Capture pooled activations for every conversation, returned in input order.

    Takes the same arguments as :func:`iter_activations`. With all layers (the default) each pooling
    gives an ``[N, L + 1, d]`` tensor, i.e. an ``[L + 1, d]`` matrix per example.

    Returns:
        The :class:`Activations`.
    """
    n = len(conversations)
    wanted = tuple(check_layers(range(lm.info.n_blocks + 1) if layers is None else layers, lm.info.n_blocks))
    pooled: dict[str, Tensor] = {}
    tok_list: list[Tensor | None] = [None] * n
    prompt_lens = [0] * n
    for ex in iter_activations(
        lm,
        conversations,
        layers=wanted,
        poolings=poolings,
        tokens=tokens,
        batch_size=batch_size,
        token_budget=token_budget,
        max_padding=max_padding,
        padding_side=padding_side,
        workers=workers,
        on_batch=on_batch,
    ):
        for name, t in ex.pooled.items():
            if name not in pooled:
                pooled[name] = torch.empty((n, *t.shape), dtype=torch.float32)
            pooled[name][ex.index] = t
        tok_list[ex.index] = ex.tokens
        prompt_lens[ex.index] = ex.prompt_len
    tok_out = [t for t in tok_list if t is not None] if tokens else None
    return Activations(wanted, pooled, tok_out, prompt_lens)
