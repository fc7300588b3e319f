"""Which vectors to screen with, at which layer, under which name.

``VECTOR[@LAYER]``: without ``@LAYER`` a vector is read at its recommended layer (the layer monitoring and
read-back use), else at the layer a sweep stored for steering; a vector with neither needs ``@LAYER``.
Layer indices follow :mod:`personavec.core.layers` (0 = embeddings, l = output of block l).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.models import ModelInfo
from personavec.core.vectors import PersonaVector


@dataclass(frozen=True, eq=False)
class ScreenVector:
    """One vector to screen with (picklable: plain values and a CPU tensor).

    Attributes:
        name: Key of this vector's scores in the records (the trait, made unique).
        vector: The persona vector.
        layer: Layer index the projections are read at.
        path: The file it came from (for the summary), or ``""``.
    """

    name: str
    vector: PersonaVector
    layer: int
    path: str = ""

    def digest(self) -> str:
        """Short hash of the direction at :attr:`layer` (tells a resumed run it reads the same vector)."""
        row = self.vector.at(self.layer).contiguous().numpy().tobytes()
        return hashlib.sha256(row).hexdigest()[:16]

    def describe(self) -> dict[str, object]:
        """JSON-able description: name, trait, layer, file and digest."""
        return {
            "name": self.name,
            "trait": self.vector.meta.trait,
            "layer": self.layer,
            "path": self.path,
            "model_id": self.vector.meta.model_id,
            "digest": self.digest(),
        }


def default_layer(vector: PersonaVector) -> int:
    """The layer to read ``vector`` at when none is given: recommended, else the sweep's steering layer.

    Raises:
        PersonavecError: If the vector has neither (one line, asking for ``@LAYER``).
    """
    if vector.recommended_layer is not None:
        return vector.require_recommended_layer()
    chosen = (vector.meta.extra.get("steering") or {}).get("amplify") or {}
    if chosen.get("layer") is not None:
        return int(chosen["layer"])
    raise PersonavecError(f"vector '{vector.meta.trait}' has no recommended layer: pass one as VECTOR@LAYER")


def _split_spec(spec: str) -> tuple[str, str]:
    path, sep, layer_text = spec.rpartition("@")
    # "@" inside a file name (no layer after it) is part of the path.
    if not sep or not layer_text.strip().lstrip("-").isdigit():
        return spec, ""
    return path, layer_text


def resolve_vectors(
    specs: Sequence[str | tuple[PersonaVector, int | None]], info: ModelInfo
) -> tuple[ScreenVector, ...]:
    """Load ``VECTOR[@LAYER]`` specs (or ``(vector, layer)`` pairs), check each fits the model, name them.

    Args:
        specs: File specs ``path.safetensors`` or ``path.safetensors@17``, or ``(vector, layer or None)``.
        info: The model screening runs on (``lm.info``).

    Returns:
        One :class:`ScreenVector` per spec, in order. Names are the traits; a trait given twice is
        told apart by its layer (``evil@12``), then by its position.

    Raises:
        PersonavecError: On no specs, a missing file, a vector for another model (one line) or a bad layer.
    """
    if not specs:
        raise PersonavecError("no vectors given: pass at least one --vector VECTOR[@LAYER]")
    loaded: list[tuple[PersonaVector, int, str]] = []
    for spec in specs:
        if isinstance(spec, str):
            path, layer_text = _split_spec(spec)
            if not Path(path).is_file():
                raise PersonavecError(f"--vector: vector file {path} not found")
            vector = PersonaVector.load(path)
            vector.check_model(info.n_blocks, info.hidden_size, info.id)
            layer = int(layer_text) if layer_text else default_layer(vector)
        else:
            vector, at = spec
            path = ""
            vector.check_model(info.n_blocks, info.hidden_size, info.id)
            layer = default_layer(vector) if at is None else int(at)
        check_layers([layer], info.n_blocks)
        if float(vector.at(layer).norm()) == 0.0:
            raise PersonavecError(
                f"vector '{vector.meta.trait}' is zero at layer {layer}: nothing to project on"
            )
        loaded.append((vector, layer, path))
    traits = [str(v.meta.trait) for v, _l, _p in loaded]
    names: list[str] = []
    for vector, layer, _path in loaded:
        name = str(vector.meta.trait)
        if traits.count(name) > 1:
            name = f"{name}@{layer}"
        while name in names:
            name = f"{name}#{len(names) + 1}"
        names.append(name)
    return tuple(ScreenVector(n, v, layer, p) for n, (v, layer, p) in zip(names, loaded))
