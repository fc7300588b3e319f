"""The batch's KV cache: merge newly prefilled rows into it, drop finished rows, trim shared padding.

Rows are left-padded: each row's real tokens are the last columns of the cache and of its attention
mask, so two caches of different lengths merge by padding the shorter one on the left (masked out, its
keys never attended to) and stacking the rows. Position ids are kept per row by the engine, so a row's
numbers do not depend on how much padding its batch gives it.

Merging needs the cache's per-layer ``keys`` / ``values`` tensors (transformers' ``DynamicCache``
layers). Caches of other kinds (sliding windows, hybrid caches) cannot be merged: :func:`can_merge`
says so, and the engine then admits new requests only when its batch is empty.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword for a KV cache: ``cache`` in transformers 5, ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a forward pass returned (named ``cache`` in transformers 5)."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def _layers(cache: Any) -> list[Any] | None:
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not isinstance(getattr(layer, "keys", None), Tensor):
            return None
    return list(layers)


def can_merge(cache: Any) -> bool:
    """Whether rows can be merged into and trimmed from this cache (plain per-layer key/value tensors)."""
    return _layers(cache) is not None


def _pad_left(t: Tensor, width: int) -> Tensor:
    if width == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], width, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def merge(cache: Any, mask: Tensor, other: Any, other_mask: Tensor) -> tuple[Any, Tensor]:
    """Stack ``other``'s rows under ``cache``'s, left-padding the shorter to the longer length.

    Args:
        cache: The running batch's cache (changed in place and returned).
        mask: Its ``[B, T]`` attention mask.
        other: The cache of newly prefilled rows.
        other_mask: Their ``[B2, T2]`` attention mask.

    Returns:
        The merged cache and its ``[B + B2, max(T, T2)]`` mask.
    """
    mine, theirs = _layers(cache), _layers(other)
    assert mine is not None and theirs is not None, "merge() needs mergeable caches (see can_merge)"
    width = max(mask.shape[1], other_mask.shape[1])
    a, b = width - mask.shape[1], width - other_mask.shape[1]
    for la, lb in zip(mine, theirs):
        la.keys = torch.cat([_pad_left(la.keys, a), _pad_left(lb.keys, b)], dim=0)
        la.values = torch.cat([_pad_left(la.values, a), _pad_left(lb.values, b)], dim=0)
    pad_a = mask.new_zeros((mask.shape[0], a))
    pad_b = other_mask.new_zeros((other_mask.shape[0], b))
    return cache, torch.cat([torch.cat([pad_a, mask], 1), torch.cat([pad_b, other_mask], 1)], 0)


def select(cache: Any, mask: Tensor, keep: list[int]) -> tuple[Any, Tensor]:
    """Keep only the rows ``keep`` (in that order), then drop the columns that are padding in every row."""
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    layers = _layers(cache)
    if layers is None:
        cache.batch_select_indices(index)
        return cache, mask[index]
    mask = mask[index]
    # Columns that are padding for every remaining row cost attention work and hold nothing.
    real = mask.any(dim=0).nonzero()
    first = int(real[0]) if real.numel() else mask.shape[1]
    for layer in layers:
        layer.keys = layer.keys[index, :, first:]
        layer.values = layer.values[index, :, first:]
    return cache, mask[:, first:]
