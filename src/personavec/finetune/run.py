"""One fine-tuning run from data to adapter folder: the steps behind ``personavec finetune``."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from personavec import __version__
from personavec.core.conversations import Conversation
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.store import write_json
from personavec.finetune.prevent import TRUNK, AutoSearch, Intervention, auto_coefficient
from personavec.finetune.shift import projections
from personavec.finetune.training import (
    CHECKPOINT,
    RECEIPT,
    StepCallback,
    TrainConfig,
    Trainee,
    TrainResult,
    encode_examples,
    prepare,
    save_output,
    settings_key,
    train_steps,
)

# Beside the checkpoint (which is replaced as a whole): which run the folder belongs to, and its search.
RUN_STATE = "run_state.json"


@dataclass(frozen=True)
class FinetuneResult:
    """A finished run.

    Attributes:
        out: The adapter (or model) folder.
        trainee: The trained model (still loaded; LoRA adapters active).
        interventions: What was applied during training, with chosen strengths.
        search: The automatic strength search, if one ran.
        train: The training loop's result.
        receipt: What was written to ``personavec_finetune.json``.
    """

    out: Path
    trainee: Trainee
    interventions: list[Intervention]
    search: AutoSearch | None
    train: TrainResult
    receipt: dict[str, Any]


def _check_out(out: Path, key: str) -> None:
    """Refuse to resume (or overwrite) a folder that holds another run's checkpoint or result."""
    marker = out / RUN_STATE
    if marker.is_file() and json.loads(marker.read_text()).get("key") != key:
        raise PersonavecError(
            f"{out} holds an unfinished run with other data or settings: use another --out, or delete "
            f"{out} to start again"
        )
    if (out / RECEIPT).is_file() and not marker.is_file():
        raise PersonavecError(f"{out} already holds a finished fine-tuning run: use another --out")


def _choose_strengths(
    trainee: Trainee,
    encoded: Sequence[Any],
    cfg: TrainConfig,
    interventions: list[Intervention],
    questions: Sequence[str] | None,
    out: Path,
    on_probe: Callable[[float, float], None] | None,
    on_step: StepCallback | None,
) -> tuple[list[Intervention], AutoSearch | None]:
    """Fill in an automatic strength (at most one per run), resuming a search a killed run started."""
    auto = [i for i, iv in enumerate(interventions) if iv.kind == "prevent" and iv.coef is None]
    if not auto:
        return interventions, None
    if len(auto) > 1:
        raise PersonavecError("only one --prevent may leave its strength to the automatic search")
    if not questions:
        raise PersonavecError("the automatic strength needs the trait's evaluation questions")
    state = json.loads((out / RUN_STATE).read_text())
    if state.get("search", {}).get("coef") is not None:  # a killed run finished its search: reuse it
        search = AutoSearch.from_dict(state["search"])
    else:

        def save(progress: dict[str, Any]) -> None:
            write_json(out / RUN_STATE, {**state, "search": progress})

        target = interventions[auto[0]]
        others = [iv.spec() for j, iv in enumerate(interventions) if j != auto[0]]
        search = auto_coefficient(
            trainee, encoded, cfg, target, questions, out, others=others, state=state.get("search"),
            save_state=save, on_probe=on_probe, on_step=on_step,
        )  # fmt: skip
        write_json(out / RUN_STATE, {**state, "search": search.to_dict()})
    chosen = list(interventions)
    chosen[auto[0]] = replace(interventions[auto[0]], coef=search.coef)
    return chosen, search


def _continue_from_trunk(out: Path, search: AutoSearch) -> None:
    """Start the real run's checkpoint from the search's trunk (unless a killed run got further)."""
    trunk, ckpt = out / TRUNK, out / CHECKPOINT
    state = ckpt / "state.json"
    if trunk.is_dir() and (not state.is_file() or json.loads(state.read_text())["step"] < search.fork_step):
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(trunk, ckpt)
    shutil.rmtree(trunk, ignore_errors=True)


def finetune(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    interventions: Sequence[Intervention] = (),
    questions: Sequence[str] | None = None,
    data_info: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
    on_probe: Callable[[float, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``lm`` on chat examples, with vectors added or ablated during training.

    Killed and run again with the same arguments, it resumes from the last checkpoint in ``out``.

    Args:
        lm: The model (changed in place: LoRA layers are injected, or all weights train with ``cfg.full``).
        conversations: Chat examples ending in the assistant answer to learn.
        out: Output folder: a PEFT adapter (or transformers model) plus ``personavec_finetune.json``.
        cfg: Training settings.
        interventions: ``prevent`` / ``ablate`` vectors; a ``prevent`` with ``coef=None`` gets its
            strength from :func:`~personavec.finetune.prevent.auto_coefficient` (which trains the run's
            first two thirds; the receipt's ``auto_search.schedule`` says which strength ran when).
        questions: The trait's evaluation questions (needed by the automatic strength; the receipt
            records the shift they show).
        data_info: Where the data came from (recorded; ``sha256`` keys the resume).
        on_step: Progress per optimizer step.
        on_probe: Progress per strength probe.

    Returns:
        The :class:`FinetuneResult`.
    """
    cfg = cfg or TrainConfig()
    out = Path(out)
    t0 = time.perf_counter()
    encoded = encode_examples(lm, conversations, cfg.max_tokens)
    if not encoded:
        raise PersonavecError("no training examples")
    info = dict(data_info or {})
    key = settings_key(str(info.get("sha256", "")), cfg, [iv.to_dict() for iv in interventions])
    _check_out(out, key)
    if not (out / RUN_STATE).is_file():
        write_json(out / RUN_STATE, {"key": key})
    base = {iv.path: projections(lm, iv.vector, questions) for iv in interventions} if questions else {}
    trainee = prepare(lm, cfg)
    chosen, search = _choose_strengths(
        trainee, encoded, cfg, list(interventions), questions, out, on_probe, on_step
    )
    if search is not None:
        _continue_from_trunk(out, search)
    specs = [iv.spec() for iv in chosen]
    result = train_steps(
        trainee, encoded, cfg, interventions=specs, checkpoint_dir=out / CHECKPOINT, on_step=on_step
    )
    shifts = {
        iv.path: projections(lm, iv.vector, questions)[iv.layer] - base[iv.path][iv.layer]
        for iv in chosen
        if questions
    }
    receipt = {
        "personavec": __version__,
        "base_model": lm.info.to_dict(),
        "data": info,
        "config": asdict(cfg),
        "interventions": [iv.to_dict() for iv in chosen],
        "auto_search": {**search.to_dict(), "schedule": search.schedule(result.steps)} if search else None,
        "shift_at_layer": shifts,
        "losses": result.losses,
        "resumed_from_step": result.resumed_from,
        "seconds": time.perf_counter() - t0,
        "format": "full model" if cfg.full else "peft adapter",
    }
    save_output(trainee, out, receipt)
    (out / RUN_STATE).unlink(missing_ok=True)
    return FinetuneResult(out, trainee, chosen, search, result, receipt)
