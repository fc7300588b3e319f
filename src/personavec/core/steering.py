"""Add (or ablate) a persona vector in the residual stream, and project activations onto it.

Steering at layer ``l`` changes the output of decoder block ``l`` (layer convention of
:mod:`personavec.core.layers`), so everything downstream, including the KV cache, sees the change.

The hooks live exactly as long as the ``with steer(...)`` block, are removed on any exit (exceptions
included), never modify tensors in place, and so also work under autograd: fine-tuning can train through
them (preventative steering). They act on every thread's forward passes (a generation run in another
thread, as with a ``TextIteratorStreamer``, is steered), unless ``this_thread_only=True``: then only the
thread that entered the block is steered, so several threads can each steer their own batches on one
model at once (the sweep runs two such streams on a CPU).

Positions:

* ``"all"``: every token of every forward pass;
* ``"prompt"``: only tokens of the prompt (the first forward pass inside the block);
* ``"response"``: only tokens generated after the prompt. During ``generate`` with a KV cache these are
  the one-token decoding steps; without a cache, the positions past the prompt's length;
* a bool tensor ``[B, T]`` (or ``[T]``): exactly those positions of a forward pass of that shape, for
  teacher-forced training where the response span is known.

Projection convention (used by monitoring and screening too): ``project`` returns the scalar projection
``a . v_l / ||v_l||`` onto the *unit* direction, in the units of the residual stream itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector

# A mode maps (hidden [B, T, d], direction [d], coef, position mask [B, T, 1]) to the new hidden; coef is a
# float, or a [B, 1, 1] tensor when each row of the batch has its own strength.
Mode = Callable[[Tensor, Tensor, "float | Tensor", Tensor | None], Tensor]
Positions = str | Tensor
# One strength for the whole batch, or one per row (several strengths in one batched generate call).
Coef = float | Sequence[float]


def add(hidden: Tensor, direction: Tensor, coef: float | Tensor, mask: Tensor | None) -> Tensor:
    """Activation addition: ``h + coef * v`` at the selected positions."""
    delta = coef * direction
    return hidden + (delta if mask is None else mask * delta)


def ablate(hidden: Tensor, direction: Tensor, coef: float | Tensor, mask: Tensor | None) -> Tensor:
    """Directional ablation: remove the component of ``h`` along ``v`` (``coef`` is ignored)."""
    unit = direction / direction.norm().clamp(min=1e-12)
    removed = (hidden @ unit).unsqueeze(-1) * unit
    return hidden - (removed if mask is None else mask * removed)


@dataclass(frozen=True)
class SteeringSpec:
    """One vector applied at some layers.

    Attributes:
        vector: The persona vector.
        layers: Layer indices ``1..L`` whose block outputs are changed.
        coef: Strength; negative steers away from the trait. A sequence gives each batch row its own.
        positions: ``all``, ``prompt``, ``response`` or a bool mask.
        mode: :func:`add` (default) or :func:`ablate`, or any callable of that shape.
    """

    vector: PersonaVector
    layers: Sequence[int]
    coef: Coef = 1.0
    positions: Positions = "all"
    mode: Mode = field(default=add)


class _PositionTracker:
    """Decides, once per forward pass, which positions of that pass are prompt or response."""

    def __init__(self) -> None:
        self.prompt_len: int | None = None
        self.steps = 0
        self.length = 0
        self.past = 0  # tokens of this sequence before the current pass (KV-cached decoding)

    def update(self, seq_len: int) -> None:
        if self.prompt_len is not None and seq_len == 1:
            self.past, self.steps = self.prompt_len + self.steps, self.steps + 1
        elif self.prompt_len is not None and seq_len == self.prompt_len + self.steps + 1:
            self.past, self.steps = 0, self.steps + 1  # generation without a cache re-reads everything
        else:
            self.prompt_len, self.steps, self.past = seq_len, 0, 0  # a new prompt
        self.length = seq_len

    def mask(self, positions: Positions, shape: torch.Size, device: torch.device) -> Tensor | None:
        if isinstance(positions, Tensor):
            if positions.shape[-1] != shape[1] or (positions.ndim == 2 and positions.shape[0] != shape[0]):
                raise PersonavecError(
                    f"steering mask of shape {list(positions.shape)} does not fit a forward pass of "
                    f"{shape[0]} x {shape[1]} tokens"
                )
            return positions.to(device=device).unsqueeze(-1)
        if positions == "all":
            return None
        assert self.prompt_len is not None
        index = torch.arange(self.past, self.past + self.length, device=device)
        is_prompt = index < self.prompt_len
        chosen = is_prompt if positions == "prompt" else ~is_prompt
        return chosen.view(1, -1, 1)


def check_positions(positions: Positions) -> Positions:
    """Validate a steering ``positions`` argument and return it unchanged.

    Raises:
        PersonavecError: If it is neither ``all``, ``prompt``, ``response`` nor a bool mask.
    """
    if isinstance(positions, str) and positions not in ("all", "prompt", "response"):
        raise PersonavecError(
            f"positions must be 'all', 'prompt', 'response' or a bool mask, not '{positions}'"
        )
    if isinstance(positions, Tensor) and positions.dtype != torch.bool:
        raise PersonavecError("a steering position mask must be a bool tensor")
    return positions


@contextmanager
def steer(
    lm: LoadedModel,
    vector: PersonaVector | Sequence[SteeringSpec],
    layers: int | Sequence[int] | None = None,
    coef: Coef | None = None,
    positions: Positions = "all",
    mode: Mode = add,
    *,
    this_thread_only: bool = False,
) -> Iterator[None]:
    """Steer a model inside a ``with`` block.

    Args:
        lm: The loaded model.
        vector: A persona vector, or several :class:`SteeringSpec` to apply together.
        layers: Layer index or indices (``1..L``); default: the layer a sweep chose and stored in the
            vector file (``meta.extra["steering"]["amplify"]``), else the vector's recommended layer.
        coef: Strength in vector units (ignored by :func:`ablate`); negative steers away from the trait.
            Default: the sweep's stored coefficient when ``layers`` is left out too, else 1.0. A
            sequence gives each row of the batch its own strength (its length must be the batch size).
        positions: ``all``, ``prompt``, ``response`` or a bool mask (see the module docstring).
        mode: :func:`add` or :func:`ablate` (or your own callable of the same shape).
        this_thread_only: Steer only forward passes run by the thread that enters the block; passes
            other threads run through the same model meanwhile are left alone.

    Yields:
        Nothing; the model is steered until the block exits.

    Raises:
        PersonavecError: On a vector/model mismatch, a bad layer, or bad positions.
    """
    if isinstance(vector, PersonaVector):
        specs = [_default_spec(vector, layers, coef, positions, mode)]
    else:
        specs = list(vector)
    plan = _plan(lm, specs)
    tracker = _PositionTracker()
    owner = threading.get_ident() if this_thread_only else None
    # Per plan entry, device and dtype: the direction and the strength, converted once.
    cache: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, float | Tensor]] = {}

    def pre_hook(_module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        if owner is not None and threading.get_ident() != owner:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        assert isinstance(hidden, Tensor)
        tracker.update(hidden.shape[1])

    def make_hook(i: int) -> Callable[..., object]:
        _layer, direction, c, pos, fn = plan[i]

        def hook(_module: torch.nn.Module, _args: object, output: object) -> object:
            if owner is not None and threading.get_ident() != owner:
                return None  # another thread's pass: its output stays as it is
            hidden = output if isinstance(output, Tensor) else output[0]  # type: ignore[index]
            key = (i, hidden.device, hidden.dtype)
            if key not in cache:
                strength = c.to(hidden.device, hidden.dtype) if isinstance(c, Tensor) else c
                cache[key] = (direction.to(hidden.device, hidden.dtype), strength)
            vec, strength = cache[key]
            if isinstance(strength, Tensor) and strength.shape[0] != hidden.shape[0]:
                raise PersonavecError(
                    f"{strength.shape[0]} per-row coefficients for a batch of {hidden.shape[0]} rows"
                )
            mask = tracker.mask(pos, hidden.shape, hidden.device)
            if mask is not None:
                mask = mask.to(hidden.dtype)
            new = fn(hidden, vec, strength, mask)
            if isinstance(output, Tensor):
                return new
            return (new, *output[1:])  # type: ignore[index]

        return hook

    handles = [lm.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for i, (layer, *_rest) in enumerate(plan):
            handles.append(lm.blocks[layer - 1].register_forward_hook(make_hook(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def _default_spec(
    vector: PersonaVector,
    layers: int | Sequence[int] | None,
    coef: Coef | None,
    positions: Positions,
    mode: Mode,
) -> SteeringSpec:
    """One vector's spec, filling the layer and strength a sweep stored (else the recommended layer, 1.0)."""
    chosen = (vector.meta.extra.get("steering") or {}).get("amplify") or {}
    if layers is None and chosen:
        layers = int(chosen["layer"])
        # The stored coefficient was measured at that layer, so it only applies together with it.
        coef = float(chosen["coef"]) if coef is None else coef
    elif layers is None:
        layers = vector.require_recommended_layer()
    strength = 1.0 if coef is None else coef
    return SteeringSpec(
        vector, [layers] if isinstance(layers, int) else list(layers), strength, positions, mode
    )


def _plan(
    lm: LoadedModel, specs: Sequence[SteeringSpec]
) -> list[tuple[int, Tensor, float | Tensor, Positions, Mode]]:
    """Check every spec against the model and list (layer, direction, strength, positions, mode)."""
    n_blocks, d = lm.info.n_blocks, lm.info.hidden_size
    plan: list[tuple[int, Tensor, float | Tensor, Positions, Mode]] = []
    for spec in specs:
        spec.vector.check_model(n_blocks, d, lm.info.id)
        pos = check_positions(spec.positions)
        value = _strength(spec.coef)
        for layer in check_layers(spec.layers, n_blocks, allow_embeddings=False):
            plan.append((layer, spec.vector.at(layer), value, pos, spec.mode))
    return plan


def _strength(coef: Coef) -> float | Tensor:
    """A float, or per-row strengths as a ``[B, 1, 1]`` tensor; both checked for finite values."""
    if isinstance(coef, int | float):
        if not math.isfinite(coef):
            raise PersonavecError(f"coef must be finite, got {coef!r}")
        return float(coef)
    try:
        values = torch.tensor([float(c) for c in coef], dtype=torch.float32)
    except (TypeError, ValueError):
        raise PersonavecError(f"coef must be a number or a list of numbers, not {coef!r}") from None
    if values.numel() == 0:
        raise PersonavecError("coef is an empty list: give one strength per batch row")
    if not bool(torch.isfinite(values).all()):
        raise PersonavecError(f"coef must be finite, got {coef!r}")
    return values.view(-1, 1, 1)


def project(activations: Tensor, vector: PersonaVector, layer: int) -> Tensor:
    """Scalar projection onto the unit direction of ``vector`` at ``layer``.

    Args:
        activations: ``[..., d]`` activations taken at that layer index.
        vector: The persona vector.
        layer: Layer index (0 = embeddings, l = output of block l).

    Returns:
        ``[...]`` projections ``a . v_l / ||v_l||``.

    Raises:
        PersonavecError: If the widths differ or the row is zero.
    """
    direction = vector.at(layer)
    if activations.shape[-1] != direction.shape[0]:
        raise PersonavecError(
            f"activations have width {activations.shape[-1]} but vector '{vector.meta.trait}' "
            f"has {direction.shape[0]}"
        )
    norm = direction.norm()
    if float(norm) == 0.0:
        raise PersonavecError(f"vector '{vector.meta.trait}' is zero at layer {layer}: nothing to project on")
    return activations.float() @ (direction.to(activations.device) / norm)
