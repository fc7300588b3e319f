"""The vectors a server has loaded: their names, what monitoring reads, and steering resolved to numbers.

A vector's name is its trait; when two loaded vectors share a trait, the file stem tells them apart (the
run folder's name for a run's ``vector.safetensors``), and a numeric suffix as a last resort.

Every vector is read at one *read layer*: its recommended layer, else a layer it was calibrated at on
this model, else the middle block. Readings there get a z-score and a percentile when the vector carries
a calibration for that layer (:func:`personavec.monitor.monitoring.score`).

Steering entries of a request become :class:`SteerPlan` values here, before the request is queued, so
every mistake in them is a 400 naming the entry, and the engine only ever sees numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.monitor.monitoring import calibration_for, score
from personavec.serve.schema import SteeringEntry, Threshold
from personavec.steer.sweep import (
    DEFAULT_STEER_FRACTION,
    coef_for_fraction,
    fraction_of_norm,
    readback_layer,
    residual_norms,
    steering_defaults,
    too_large,
)

RUN_VECTOR = "vector.safetensors"


@dataclass(frozen=True)
class Reading:
    """One projection of the last prompt token, with its calibrated scores when there is a calibration."""

    raw: float
    z: float | None
    percentile: float | None

    def to_dict(self) -> dict[str, float | None]:
        """Plain-JSON form."""
        return {"raw": self.raw, "z": self.z, "percentile": self.percentile}


@dataclass(frozen=True)
class Trigger:
    """A resolved ``when``: the vector whose prompt reading is tested, which score, and the threshold."""

    vector: str
    kind: Literal["z", "percentile", "raw"]
    threshold: float

    def fires(self, reading: Reading) -> bool:
        """Whether the reading is above the threshold (a missing score never fires)."""
        value = {"z": reading.z, "percentile": reading.percentile, "raw": reading.raw}[self.kind]
        return value is not None and value > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """The ``when`` object as a request would give it."""
        return {"vector": self.vector, f"{self.kind}_above": self.threshold}


@dataclass(frozen=True)
class SteerPlan:
    """One steering entry in numbers: add ``coef * v_layer`` at ``positions`` (if ``when`` fires)."""

    vector: str
    layer: int
    coef: float
    fraction: float
    positions: Literal["all", "prompt", "response"]
    when: Trigger | None = None

    def to_dict(self, applied: bool) -> dict[str, Any]:
        """What the response reports about this entry."""
        return {
            "vector": self.vector,
            "layer": self.layer,
            "coef": self.coef,
            "fraction": self.fraction,
            "positions": self.positions,
            "when": None if self.when is None else self.when.to_dict(),
            "applied": applied,
        }


@dataclass(frozen=True)
class Flag:
    """A resolved threshold: the response is flagged when any given reading is above its bound."""

    z_above: float | None = None
    percentile_above: float | None = None
    raw_above: float | None = None
    response_above: float | None = None

    def crosses(self, prompt: Reading, response_mean: float | None) -> bool:
        """Whether the prompt reading or the response mean crosses a bound."""
        pairs = (
            (prompt.z, self.z_above),
            (prompt.percentile, self.percentile_above),
            (prompt.raw, self.raw_above),
            (response_mean, self.response_above),
        )
        return any(v is not None and bound is not None and v > bound for v, bound in pairs)


@dataclass(frozen=True)
class ServedVector:
    """A loaded vector and what the server needs to read and steer with it.

    Attributes:
        name: The name requests use.
        vector: The persona vector.
        path: The file it came from, if any.
        read_layer: Layer the monitoring reads it at.
        calibration: The calibration entry at ``read_layer`` on this model, if any.
        note: Why there is no calibration (``None`` when there is one).
        default: The stored steering choice (``layer``, ``coef``, ``fraction``, ``source``).
    """

    name: str
    vector: PersonaVector
    path: Path | None
    read_layer: int
    calibration: Mapping[str, Any] | None
    note: str | None
    default: Mapping[str, Any]

    def reading(self, raw: float) -> Reading:
        """A raw read-layer projection with its z and percentile (``None`` without a calibration)."""
        z, pct = score(raw, self.calibration) if self.calibration is not None else (None, None)
        return Reading(raw, z, pct)

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/vectors`` says about this vector."""
        meta = self.vector.meta
        cal = meta.extra.get("calibration") or {}
        stored = (meta.extra.get("steering") or {}).get("amplify")
        return {
            "name": self.name,
            "trait": meta.trait,
            "path": None if self.path is None else str(self.path),
            "model_id": meta.model_id,
            "layers": {"min": 1, "max": meta.n_blocks},
            "recommended_layer": self.vector.recommended_layer,
            "read_layer": self.read_layer,
            "stored_choice": None
            if not stored
            else {
                "layer": stored.get("layer"),
                "coef": stored.get("coef"),
                "fraction": stored.get("coef_fraction_of_residual_norm"),
            },
            "default_steering": dict(self.default),
            "calibration": None
            if self.calibration is None
            else {
                "layer": self.read_layer,
                "prompt_set": cal.get("prompt_set"),
                "mean": self.calibration.get("mean"),
                "std": self.calibration.get("std"),
                "n": self.calibration.get("n"),
            },
            "note": self.note,
        }


def vector_files(path: str | Path) -> list[Path]:
    """The vector files a ``--vectors`` argument names.

    A file is itself; a run folder (holding ``vector.safetensors``) is that file; any other folder is
    every ``.safetensors`` file in it plus every ``*/vector.safetensors`` one level down.

    Raises:
        PersonavecError: If the path does not exist or a folder holds no vector file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PersonavecError(f"vector path not found: {path}")
    if (path / RUN_VECTOR).is_file():
        return [path / RUN_VECTOR]
    found = sorted(path.glob("*.safetensors")) + sorted(path.glob(f"*/{RUN_VECTOR}"))
    if not found:
        raise PersonavecError(f"no .safetensors vector files in {path}")
    return found


def assign_names(vectors: Sequence[tuple[PersonaVector, Path | None]]) -> list[str]:
    """Names for loaded vectors: the trait; on a clash the file stem (or run folder), then a suffix."""
    traits = [v.meta.trait for v, _ in vectors]
    names: list[str] = []
    for (_v, path), trait in zip(vectors, traits):
        name = trait
        if traits.count(trait) > 1 and path is not None:
            name = path.parent.name if path.name == RUN_VECTOR else path.stem
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _read_layer(vector: PersonaVector, fingerprint: str) -> int:
    if vector.recommended_layer is not None:
        return vector.require_recommended_layer()
    cal = vector.meta.extra.get("calibration")
    if isinstance(cal, Mapping) and cal.get("model_fingerprint") == fingerprint and cal.get("layers"):
        return min(int(k) for k in cal["layers"])
    return readback_layer(vector)


class VectorRegistry:
    """The loaded vectors of one model, by name.

    Attributes:
        lm: The model.
        vectors: Name -> :class:`ServedVector`, in load order.
        norms: Mean residual norm per layer (what ``strength`` is a fraction of).
    """

    def __init__(self, lm: LoadedModel, vectors: Sequence[tuple[PersonaVector, Path | None]] = ()) -> None:
        self.lm = lm
        for v, _path in vectors:
            v.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
        # Measured once for every layer (one pass over a few reference answers), so any layer a request
        # names can be given a strength without a model pass in the request's path.
        self.norms: dict[int, float] = residual_norms(lm) if vectors else {}
        self.vectors: dict[str, ServedVector] = {}
        for name, (v, path) in zip(assign_names(vectors), vectors):
            layer = _read_layer(v, lm.info.fingerprint)
            if float(v.at(layer).norm()) == 0.0:
                raise PersonavecError(f"vector '{name}' is zero at its read layer {layer}")
            entry, note = calibration_for(v, layer, lm.info.fingerprint)
            default = steering_defaults(lm, v, self.norms)
            self.vectors[name] = ServedVector(name, v, path, layer, entry, note, default)

    @classmethod
    def from_paths(cls, lm: LoadedModel, paths: Sequence[str | Path]) -> VectorRegistry:
        """Load every vector file the paths name (see :func:`vector_files`)."""
        files = [f for p in paths for f in vector_files(p)]
        return cls(lm, [(PersonaVector.load(f), f) for f in files])

    def get(self, name: str, where: str = "vector") -> ServedVector:
        """The vector of that name, or a one-line error listing the loaded names."""
        if name not in self.vectors:
            have = ", ".join(self.vectors) or "none (start the server with --vectors)"
            raise PersonavecError(f"{where}: unknown vector '{name}'; loaded vectors: {have}")
        return self.vectors[name]

    def read_plan(self) -> dict[int, tuple[Tensor, tuple[str, ...]]]:
        """Per read layer, the ``[d, k]`` unit directions read there and the names of their columns."""
        by_layer: dict[int, list[ServedVector]] = {}
        for sv in self.vectors.values():
            by_layer.setdefault(sv.read_layer, []).append(sv)
        plan = {}
        for layer, svs in sorted(by_layer.items()):
            units = [sv.vector.at(layer) / sv.vector.at(layer).norm() for sv in svs]
            plan[layer] = (torch.stack(units, dim=1), tuple(sv.name for sv in svs))
        return plan

    def resolve(self, entries: Sequence[SteeringEntry]) -> tuple[SteerPlan, ...]:
        """Turn a request's steering entries into numbers (errors name the entry: ``steering[1]``)."""
        return tuple(self._resolve_one(f"steering[{i}]", e) for i, e in enumerate(entries))

    def _resolve_one(self, where: str, entry: SteeringEntry) -> SteerPlan:
        sv = self.get(entry.vector, where)
        n_blocks = self.lm.info.n_blocks
        layer = int(sv.default["layer"]) if entry.layer is None else entry.layer
        if not 1 <= layer <= n_blocks:
            raise PersonavecError(
                f"{where}: layer {layer} is out of range; steerable layers are 1..{n_blocks} "
                "(l = output of decoder block l)"
            )
        coef = self._coef(where, sv, layer, entry)
        fraction = fraction_of_norm(sv.vector, layer, coef, self.norms)
        if too_large(fraction):
            raise PersonavecError(
                f"{where}: coef {coef:g} adds {abs(fraction):.2f}x the residual norm at layer {layer}, "
                "far off the model's distribution; use a smaller coef or strength"
            )
        when = None if entry.when is None else self._trigger(where, sv, entry)
        positions = entry.positions or ("response" if when is not None else "all")
        return SteerPlan(sv.name, layer, coef, fraction, positions, when)

    def _coef(self, where: str, sv: ServedVector, layer: int, entry: SteeringEntry) -> float:
        if float(sv.vector.at(layer).norm()) == 0.0:
            raise PersonavecError(f"{where}: vector '{sv.name}' is zero at layer {layer}")
        if entry.coef is not None:
            coef = entry.coef
        elif entry.strength is not None:
            coef = coef_for_fraction(sv.vector, layer, entry.strength, self.norms)
        elif layer == int(sv.default["layer"]):
            coef = float(sv.default["coef"])  # the stored coefficient holds at its own layer only
        else:  # keep the stored choice's share of the residual norm at the layer asked for
            frac = sv.default.get("fraction")
            frac = DEFAULT_STEER_FRACTION if frac is None else float(frac)
            coef = coef_for_fraction(sv.vector, layer, frac, self.norms)
        if not math.isfinite(coef):
            raise PersonavecError(f"{where}: coef must be a finite number")
        return coef

    def _trigger(self, where: str, sv: ServedVector, entry: SteeringEntry) -> Trigger:
        assert entry.when is not None
        when = entry.when
        watched = self.get(when.vector, f"{where}.when") if when.vector else sv
        if when.z_above is not None:
            kind, threshold = "z", when.z_above
        elif when.percentile_above is not None:
            kind, threshold = "percentile", when.percentile_above
        else:
            assert when.raw_above is not None
            kind, threshold = "raw", when.raw_above
        if kind != "raw" and watched.calibration is None:
            raise PersonavecError(f"{where}.when: {kind}_above needs a calibration: {watched.note}")
        return Trigger(watched.name, kind, float(threshold))  # type: ignore[arg-type]

    def flags(self, thresholds: Mapping[str, Threshold]) -> dict[str, Flag]:
        """Per-vector thresholds in numbers (unknown names and missing calibrations are errors)."""
        out = {}
        for name, t in thresholds.items():
            sv = self.get(name, "persona_thresholds")
            if (t.z_above is not None or t.percentile_above is not None) and sv.calibration is None:
                raise PersonavecError(
                    f"persona_thresholds.{name}: z and percentile need a calibration: {sv.note}"
                )
            out[name] = Flag(t.z_above, t.percentile_above, t.raw_above, t.response_above)
        return out
