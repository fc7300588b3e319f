"""Preventative steering and ablation during training, and the automatic preventative strength.

``--prevent VECTOR[@LAYER][:COEF]`` adds ``COEF * v_LAYER`` to the output of block ``LAYER`` in every
training forward pass; ``--ablate VECTOR[@LAYER]`` removes the component along ``v_LAYER`` instead. The layer
defaults to the vector's recommended layer.

Why the strength must be searched: steering supplies the push toward the trait that the data asks for,
so the weights need not learn it. Too little and the model still learns the trait; too much and it learns
to push the *other* way (measured by the issue's author: coefficient 1.0 turned a +2.6 shift into -13.9).
The right amount depends on the data, the vector's scale and the layer, so :func:`auto_coefficient`
trains probes and solves for the strength whose shift is zero by the secant method on the measured
shifts. A probe takes as many optimizer steps as the real run but on a third of the batch, so three of
them cost about one run: the shift depends on how long the model trains (a probe of a third of the
steps that landed at +0.02 grew to +0.73 over the whole run), much less on how large each batch is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from personavec.core.conversations import Encoded
from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.steering import SteeringSpec, ablate, add
from personavec.core.vectors import PersonaVector
from personavec.finetune.shift import projections
from personavec.finetune.training import TrainConfig, Trainee, train_steps


@dataclass(frozen=True)
class Intervention:
    """A vector applied during training.

    Attributes:
        vector: The persona vector.
        path: Where it was read from (for the receipt).
        layer: Block whose output is changed (``1..L``).
        coef: Strength for ``prevent``; ``None`` = choose automatically. Ignored by ``ablate``.
        kind: ``prevent`` (add the vector) or ``ablate`` (remove its direction).
    """

    vector: PersonaVector
    path: str
    layer: int
    coef: float | None
    kind: str = "prevent"

    def spec(self, coef: float | None = None) -> SteeringSpec:
        """The steering spec for a training pass (``coef`` overrides the stored strength)."""
        strength = self.coef if coef is None else coef
        if self.kind == "ablate":
            return SteeringSpec(self.vector, [self.layer], 0.0, "all", ablate)
        if strength is None:
            raise PersonavecError(f"no strength chosen yet for the vector from {self.path}")
        return SteeringSpec(self.vector, [self.layer], strength, "all", add)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for the receipt."""
        return {
            "kind": self.kind,
            "path": self.path,
            "trait": self.vector.meta.trait,
            "layer": self.layer,
            "coef": self.coef,
            "vector_norm": float(self.vector.at(self.layer).norm()),
        }


def parse_intervention(text: str, kind: str, n_blocks: int, hidden_size: int, model_id: str) -> Intervention:
    """Parse ``VECTOR[@LAYER][:COEF]`` and load the vector, checking it fits the model.

    Raises:
        PersonavecError: On a missing file, a vector for another model, a layer out of range or a bad
            number (one line, naming the file).
    """
    rest, coef = text, None
    head, sep, tail = text.rpartition(":")
    if sep and kind == "prevent":
        try:
            coef = float(tail)
            rest = head
        except ValueError:
            pass  # a colon inside the path
    if coef is not None and not math.isfinite(coef):
        raise PersonavecError(f"--{kind} {text}: the strength must be a finite number")
    path, sep, layer_text = rest.rpartition("@")
    if not sep:
        path, layer_text = rest, ""
    if not Path(path).is_file():
        raise PersonavecError(f"--{kind}: vector file {path} not found")
    vector = PersonaVector.load(path)
    vector.check_model(n_blocks, hidden_size, model_id)
    try:
        layer = int(layer_text) if layer_text else vector.require_recommended_layer()
    except ValueError:
        raise PersonavecError(f"--{kind} {text}: '{layer_text}' is not a layer index") from None
    check_layers([layer], n_blocks, allow_embeddings=False)
    return Intervention(vector, path, layer, coef, kind)


@dataclass(frozen=True)
class AutoSearch:
    """The automatic strength search.

    Attributes:
        coef: The chosen strength.
        probes: ``(coef, shift)`` per probe, in order (shift of a probe-length run at the vector's layer).
        probe_steps: Optimizer steps per probe.
        probe_batch: Examples per step in a probe.
        note: Why the search stopped where it did.
    """

    coef: float
    probes: list[tuple[float, float]]
    probe_steps: int
    probe_batch: int
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "coef": self.coef,
            "probes": [list(p) for p in self.probes],
            "probe_steps": self.probe_steps,
            "probe_batch": self.probe_batch,
            "note": self.note,
        }


def auto_coefficient(
    trainee: Trainee,
    encoded: Sequence[Encoded],
    cfg: TrainConfig,
    target: Intervention,
    questions: Sequence[str],
    *,
    others: Sequence[SteeringSpec] = (),
    n_probes: int = 3,
    on_probe: Callable[[float, float], None] | None = None,
) -> AutoSearch:
    """Choose the preventative strength whose fine-tuning shift along ``target``'s vector is zero.

    Every probe starts from the untrained weights and takes the run's number of steps with
    ``1 / n_probes`` of its batch size, so the whole search costs about one extra run. The shift is the
    change in mean last-prompt projection over ``questions`` at ``target.layer``.

    Args:
        trainee: The prepared model (its weights are reset before each probe and after the search).
        encoded: The training examples.
        cfg: The run's settings.
        target: The ``prevent`` intervention to choose a strength for.
        questions: Questions the shift is read on (the trait's evaluation questions).
        others: Other interventions active in the same run.
        n_probes: Probe runs (the first is plain fine-tuning).
        on_probe: Called with ``(coef, shift)`` after each probe.

    Returns:
        The :class:`AutoSearch`.
    """
    total = cfg.steps(len(encoded))
    small = max(1, cfg.batch_size // n_probes)
    probe_cfg = replace(
        cfg, batch_size=small, epochs=cfg.epochs * n_probes, max_steps=total, checkpoint_every=0
    )
    base = projections(trainee.lm, target.vector, questions)[target.layer]
    norm = float(target.vector.at(target.layer).norm())

    def probe(coef: float) -> float:
        trainee.reset()
        specs = [*others, target.spec(coef)] if coef else list(others)
        train_steps(trainee, encoded, probe_cfg, interventions=specs)
        shift = projections(trainee.lm, target.vector, questions)[target.layer] - base
        if on_probe is not None:
            on_probe(coef, shift)
        return shift

    probes = [(0.0, probe(0.0))]
    try:
        if probes[0][1] <= 0:
            return AutoSearch(
                0.0,
                probes,
                probe_cfg.steps(len(encoded)),
                small,
                "plain fine-tuning does not move the model toward the trait: no steering needed",
            )
        # First guess: adding c * v moves the residual stream at that layer by c * |v| along the unit
        # direction, so c = shift / |v| hands the model the shift the data would otherwise teach it.
        coef = min(probes[0][1] / max(norm, 1e-6), 4.0)
        while len(probes) < n_probes:
            probes.append((coef, probe(coef)))
            coef = secant_step(probes)
        steps = probe_cfg.steps(len(encoded))
        return AutoSearch(coef, probes, steps, small, "secant on the probes' shifts")
    finally:
        trainee.reset()


def secant_step(probes: Sequence[tuple[float, float]]) -> float:
    """Secant step toward shift 0 from the two probes that bracket it best (never negative)."""
    below = [p for p in probes if p[1] <= 0]
    above = [p for p in probes if p[1] > 0]
    if not below:  # still short of zero: follow the slope of the two strongest probes
        (c0, s0), (c1, s1) = sorted(probes, key=lambda p: p[0])[-2:]
        slope = (s1 - s0) / (c1 - c0) if c1 != c0 else 0.0
        if slope >= 0:
            return 2 * c1  # no sign of progress: double
        # Bounded, so one noisy probe cannot send the next one far past the zero.
        return min(max(c1 - s1 / slope, 1.05 * c1), 4 * c1)
    lo = max(above, key=lambda p: p[0])  # the strongest strength that was still too weak
    hi = min(below, key=lambda p: p[0])  # the weakest strength that overshot
    return lo[0] + (hi[0] - lo[0]) * lo[1] / (lo[1] - hi[1])
