"""Open a fine-tuned model beside its base: a PEFT adapter folder or a full transformers model folder."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel, load_model


@dataclass
class Tuned:
    """A tuned model and a way back to its base.

    Attributes:
        lm: The tuned model.
        base: Context manager factory that yields the base model (for an adapter: the same object with
            the adapter switched off inside the block).
        kind: ``adapter`` or ``model``.
        path: Where it was read from.
    """

    lm: LoadedModel
    base: Callable[[], AbstractContextManager[LoadedModel]]
    kind: str
    path: Path


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder."""
    return (path / "adapter_config.json").is_file()


def attach_adapter(base: LoadedModel, path: Path) -> Any:
    """Load the adapter at ``path`` onto ``base`` in place; returns the ``PeftModel``.

    Raises:
        PersonavecError: If the adapter does not fit this base model (one line naming the folder).
    """
    from peft import PeftModel

    declared = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    problem = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(base.model, str(path))
        except Exception as e:  # peft raises size mismatches and missing modules as several error types
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # A base with more blocks than the adapter's loads with only a warning: not the model it was made for.
    missing = [w for w in caught if "missing adapter keys" in str(w.message)]
    if missing and not problem:
        problem = "the base has modules the adapter has no weights for"
    if problem:
        raise PersonavecError(
            f"adapter {path} does not fit {base.info.id} (it was trained on {declared}): {problem[:200]}"
        )
    return peft_model


def open_tuned(base: LoadedModel, path: str | Path) -> Tuned:
    """Open ``path`` (adapter or model folder) as the tuned counterpart of ``base``.

    For an adapter, ``base`` itself becomes the tuned model (the adapter is injected into its modules) and
    the base is reached by switching the adapter off; a full model is loaded beside ``base``.

    Raises:
        PersonavecError: If ``path`` is neither, or does not fit ``base``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise PersonavecError(f"tuned model {folder} not found: give an adapter folder or a model folder")
    if is_adapter(folder):
        peft_model = attach_adapter(base, folder)

        @contextmanager
        def adapter_off() -> Iterator[LoadedModel]:
            with peft_model.disable_adapter():
                yield base

        return Tuned(base, adapter_off, "adapter", folder)
    if not (folder / "config.json").is_file():
        raise PersonavecError(f"{folder} holds neither adapter_config.json nor config.json")
    tuned = load_model(str(folder))
    if (tuned.info.n_blocks, tuned.info.hidden_size) != (base.info.n_blocks, base.info.hidden_size):
        raise PersonavecError(f"model {folder} is not a fine-tune of {base.info.id}: other shape")

    @contextmanager
    def as_is() -> Iterator[LoadedModel]:
        yield base

    return Tuned(tuned, as_is, "model", folder)
