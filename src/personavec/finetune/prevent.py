"""Preventative steering and ablation during training, and the automatic preventative strength.

``--prevent VECTOR[@LAYER][:COEF]`` adds ``COEF * v_LAYER`` to the output of block ``LAYER`` in every
training forward pass; ``--ablate VECTOR[@LAYER]`` removes the component along ``v_LAYER`` instead. The layer
defaults to the vector's recommended layer.

Why the strength must be searched: steering supplies the push toward the trait that the data asks for,
so the weights need not learn it. Too little and the model still learns the trait; too much and it learns
to push the *other* way (measured by the issue's author: coefficient 1.0 turned a +2.6 shift into -13.9).
The right amount depends on the data, the vector's scale and the layer, so :func:`auto_coefficient`
searches for the strength whose shift ends at zero.

How it searches follows from two measurements on the embedded model (docs/results.md): short probe runs
misjudge the whole run's plain shift (probes that saw a third of the examples shifted two thirds as
much, so their zero was too weak), while the shift answers a change of strength within about four steps
(a run whose last sixth went plain ended where plain fine-tuning ends). So the search trains the real
run's first two thirds once and tries only its last third, from the same checkpoint, at two strengths;
the secant through their end shifts gives the strength the real last third uses. Measured against the
whole run, the trials see the same examples in the same order, and the search costs two thirds of a run.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.core.conversations import Encoded
from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.steering import SteeringSpec, ablate, add
from personavec.core.vectors import PersonaVector
from personavec.finetune.shift import projections
from personavec.finetune.training import StepCallback, TrainConfig, Trainee, train_steps


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
        coef: The strength of the run's last part (the one that was searched).
        trunk_coef: The strength from ``first_step`` to ``fork_step`` (0 before ``first_step``).
        first_step: Plain steps at the start, whose shift sets ``trunk_coef``.
        fork_step: Where the searched last part begins.
        probes: ``(coef, shift)`` of each trial last part, in order (shift at the vector's layer at the end
            of the run).
        note: Why the search stopped where it did.
    """

    coef: float
    trunk_coef: float
    first_step: int
    fork_step: int
    probes: list[tuple[float, float]]
    note: str

    def schedule(self, total: int) -> list[tuple[int, int, float]]:
        """``(from_step, to_step, strength)`` for the whole run."""
        return [(0, self.first_step, 0.0), (self.first_step, self.fork_step, self.trunk_coef),
                (self.fork_step, total, self.coef)]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "coef": self.coef,
            "trunk_coef": self.trunk_coef,
            "first_step": self.first_step,
            "fork_step": self.fork_step,
            "probes": [list(p) for p in self.probes],
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoSearch:
        """Inverse of :meth:`to_dict`."""
        probes = [(float(c), float(x)) for c, x in data["probes"]]
        return cls(float(data["coef"]), float(data["trunk_coef"]), int(data["first_step"]),
                   int(data["fork_step"]), probes, str(data["note"]))  # fmt: skip


TRUNK = "search_trunk"
TRIAL = "search_trial"
MAX_COEF = 4.0


def auto_coefficient(
    trainee: Trainee,
    encoded: Sequence[Encoded],
    cfg: TrainConfig,
    target: Intervention,
    questions: Sequence[str],
    folder: Path,
    *,
    others: Sequence[SteeringSpec] = (),
    state: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] = lambda _s: None,
    on_probe: Callable[[float, float], None] | None = None,
    on_step: StepCallback | None = None,
) -> AutoSearch:
    """Choose the preventative strength whose fine-tuning shift along ``target``'s vector ends at zero.

    The run is trained once up to two thirds of its steps (the *trunk*: a sixth plain, whose shift gives
    a first strength, then that strength), and its last third is tried from there at two strengths; the
    secant through the two trial shifts gives the strength of the real last third, which
    :func:`~personavec.finetune.run.finetune` then trains from the trunk's checkpoint. The whole search
    costs two thirds of a run on top of the run. It works because the shift answers a change of
    strength within a few steps (see the module docstring): the last third decides where it ends.

    Args:
        trainee: The prepared model (left holding the last trial's weights; the real run reloads the trunk).
        encoded: The training examples.
        cfg: The run's settings.
        target: The ``prevent`` intervention to choose a strength for.
        questions: Questions the shift is read on (the trait's evaluation questions).
        folder: Scratch folder for the trunk's and the trials' checkpoints (``folder/search_trunk`` is
            left for the real run to continue from).
        others: Other interventions active in the same run.
        state: What an interrupted search already found (from ``save_state``).
        save_state: Called with the search's progress after each phase, to resume a killed run.
        on_probe: Called with ``(coef, shift)`` after each trial.
        on_step: Progress per optimizer step (a trial counts the run's last steps again).

    Returns:
        The :class:`AutoSearch`.
    """
    total = cfg.steps(len(encoded))
    if total < 2:
        raise PersonavecError("the automatic strength needs at least 2 training steps: add data or epochs")
    first = max(1, total // 6)
    fork = min(max(first, round(total * 2 / 3)), total - 1)
    found = dict(state or {})
    base = found.get("base")
    if base is None:
        base = found["base"] = projections(trainee.lm, target.vector, questions)[target.layer]
        save_state(found)
    norm = float(target.vector.at(target.layer).norm())

    def shift() -> float:
        return float(projections(trainee.lm, target.vector, questions)[target.layer]) - float(base)

    def trial(coef: float) -> float:
        shutil.rmtree(folder / TRIAL, ignore_errors=True)
        shutil.copytree(folder / TRUNK, folder / TRIAL)
        specs = [*others, target.spec(coef)]
        train_steps(
            trainee, encoded, cfg, interventions=specs, checkpoint_dir=folder / TRIAL, on_step=on_step
        )
        value = shift()
        shutil.rmtree(folder / TRIAL, ignore_errors=True)
        if on_probe is not None:
            on_probe(coef, value)
        return value

    trunk = folder / TRUNK
    if "trunk_coef" not in found:
        train_steps(
            trainee, encoded, cfg, interventions=others, checkpoint_dir=trunk, stop_at=first, on_step=on_step
        )
        # Hand the model, as steering, the shift plain training would reach by the end (extrapolated).
        found["trunk_coef"] = min(max(shift() * total / first / max(norm, 1e-6), 0.0), MAX_COEF)
        save_state(found)
    c0 = float(found["trunk_coef"])
    specs = [*others, target.spec(c0)] if c0 else list(others)
    train_steps(
        trainee, encoded, cfg, interventions=specs, checkpoint_dir=trunk, stop_at=fork, on_step=on_step
    )
    probes = [(float(c), float(x)) for c, x in found.get("probes", [])]
    while len(probes) < 2:
        if probes and probes[0][0] == 0 and probes[0][1] <= 0:
            break  # unsteered, the run does not move toward the trait
        if not probes:
            coef = c0
        else:  # the same "hand over the shift" step, from the first trial's end
            c, x = probes[0]
            coef = min(max(c + x / max(norm, 1e-6), 0.0), MAX_COEF)
            if abs(coef - c) < 1e-6:  # clamped: move anyway, so the two trials give a slope
                coef = c * 1.5 + 1e-3 if x > 0 else c * 0.5
        probes.append((coef, trial(coef)))
        found["probes"] = probes
        save_state(found)
    if len(probes) == 1:
        note = "plain fine-tuning does not move the model toward the trait: no steering needed"
        return AutoSearch(0.0, c0, first, fork, probes, note)
    coef = min(max(secant_step(probes), 0.0), MAX_COEF)
    return AutoSearch(coef, c0, first, fork, probes, "secant through two trials of the last third")


def secant_step(probes: Sequence[tuple[float, float]]) -> float:
    """Secant step toward shift 0 from the probes that bracket it best (never negative).

    When every probe is on the same side of zero, it extrapolates along the slope of the two probes
    nearest the zero, bounded so that one noisy probe cannot send the next far past it.
    """
    below = [p for p in probes if p[1] <= 0]
    above = [p for p in probes if p[1] > 0]
    if below and above:
        lo = max(above, key=lambda p: p[0])  # the strongest strength that was still too weak
        hi = min(below, key=lambda p: p[0])  # the weakest strength that overshot
        return lo[0] + (hi[0] - lo[0]) * lo[1] / (lo[1] - hi[1])
    ordered = sorted(probes, key=lambda p: p[0])
    (c0, s0), (c1, s1) = ordered[-2:] if above else ordered[:2]
    slope = (s1 - s0) / (c1 - c0) if c1 != c0 else 0.0
    if above:  # still short of zero: stronger
        return 2 * c1 if slope >= 0 else min(max(c1 - s1 / slope, 1.05 * c1), 4 * c1)
    # every probe overshot: weaker
    return c0 / 2 if slope >= 0 else max(min(c0 - s0 / slope, 0.95 * c0), c0 / 4)
