"""Small builders shared by tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from personavec.core.conversations import encode
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector, VectorMeta


def random_vector(lm: LoadedModel, trait: str = "test", seed: int = 0, scale: float = 1.0) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(lm.info.n_blocks + 1, lm.info.hidden_size, generator=g) * scale
    meta = VectorMeta(
        trait=trait,
        model_id=lm.info.id,
        model_fingerprint=lm.info.fingerprint,
        n_blocks=lm.info.n_blocks,
        hidden_size=lm.info.hidden_size,
    )
    return PersonaVector(data, meta)


def reference_hidden_states(
    lm: LoadedModel, conversation: list[dict[str, str]]
) -> tuple[list[torch.Tensor], int]:
    """Run one example alone through transformers with output_hidden_states=True: states, prompt length."""
    enc = encode(lm.tokenizer, conversation)
    with torch.no_grad():
        out = lm.backbone(input_ids=torch.tensor([enc.ids]), output_hidden_states=True)
    return [h[0] for h in out.hidden_states], enc.prompt_len


def block_outputs(
    lm: LoadedModel,
) -> tuple[list[tuple[int, torch.Tensor]], list[torch.utils.hooks.RemovableHandle]]:
    """Record (layer, output) of every block on every forward pass; the caller removes the handles."""
    seen: list[tuple[int, torch.Tensor]] = []
    handles = []
    for i, block in enumerate(lm.blocks):

        def hook(_m, _a, out, layer=i + 1):  # type: ignore[no-untyped-def]
            seen.append((layer, (out if isinstance(out, torch.Tensor) else out[0]).detach().clone()))

        handles.append(block.register_forward_hook(hook))
    return seen, handles


@contextlib.contextmanager
def generate_threads(lm: LoadedModel) -> Iterator[list[int]]:
    """Which threads call ``lm.model.generate`` (a wrapper, not a hook: hooks would force one stream)."""
    seen: list[int] = []
    original: Callable[..., Any] = lm.model.generate  # type: ignore[assignment]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    lm.model.generate = wrapper  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del lm.model.generate
