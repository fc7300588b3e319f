"""Supervised fine-tuning (LoRA by default) with persona vectors applied during training.

The loop is deliberately plain: teacher-forced chat data, loss on the assistant tokens only, AdamW, a
fixed number of epochs. What it adds over a generic trainer:

* **interventions**: :class:`~personavec.core.steering.SteeringSpec` s that are active during every
  *training* forward pass and never at inference. Adding the trait's vector is *preventative steering*
  (the data's push toward the trait is already supplied, so the weights need not learn it); ablating
  it is the CAFT-style comparison (the weights cannot use that direction while training).
* **resumable**: the trainable weights, the optimizer state and the step are checkpointed (safetensors and
  JSON, no pickle) every few steps; running the same command again continues from the last one.
* **standard output**: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base, DIR)`` loads with no personavec code, or with ``full=True`` a
  transformers model folder; plus ``personavec_finetune.json``, the receipt.

The model is changed in place: LoRA layers are injected into ``lm.model``'s modules, so every personavec
function (capture, read-back, steering) sees the tuned model through the same :class:`LoadedModel`, and
:func:`adapters_disabled` gives the base model back for comparisons.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from personavec.core.activations import pad_batch
from personavec.core.conversations import Conversation, Encoded, encode
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.steering import SteeringSpec, steer
from personavec.core.store import record_key, write_json

RECEIPT = "personavec_finetune.json"
CHECKPOINT = "checkpoint"
# Called after every optimizer step with (step, total steps, loss).
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune.

    Attributes:
        epochs: Passes over the data.
        lr: AdamW learning rate (constant after a short warm-up).
        batch_size: Conversations per optimizer step.
        lora_r: LoRA rank (ignored with ``full``).
        lora_alpha: LoRA scaling numerator.
        full: Train every weight instead of a LoRA adapter.
        max_tokens: Longest conversation in tokens; longer answers are cut at the end.
        seed: Seeds the adapter's initialisation and the data order.
        checkpoint_every: Optimizer steps between checkpoints (0: none).
        max_steps: Stop after this many steps (the automatic strength search trains short probes).
    """

    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    full: bool = False
    max_tokens: int = 512
    seed: int = 0
    checkpoint_every: int = 4
    max_steps: int | None = None

    def steps(self, n_examples: int) -> int:
        """Optimizer steps for ``n_examples`` conversations."""
        total = self.epochs * math.ceil(n_examples / self.batch_size)
        return min(total, self.max_steps) if self.max_steps is not None else total


@dataclass(frozen=True)
class TrainResult:
    """What a training run did.

    Attributes:
        steps: Optimizer steps taken in total (including any before a resume).
        losses: Mean assistant-token loss per step.
        resumed_from: The step a checkpoint resumed from (0 for a fresh run).
        seconds: Wall time of this process's part of the run.
    """

    steps: int
    losses: list[float]
    resumed_from: int
    seconds: float


@dataclass
class Trainee:
    """A model prepared for training: the wrapped model and the parameters that train.

    Attributes:
        lm: The loaded model (its modules now hold the LoRA layers).
        peft_model: The ``PeftModel`` wrapper (``None`` for full fine-tuning).
        params: Trainable parameters by name.
        initial: A copy of the trainable weights before any step (to start again from scratch).
    """

    lm: LoadedModel
    peft_model: Any
    params: dict[str, torch.nn.Parameter]
    initial: dict[str, Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        """Put the trainable weights back to where training started."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.initial[name])


def prepare(lm: LoadedModel, cfg: TrainConfig) -> Trainee:
    """Make ``lm`` trainable: inject a LoRA adapter (or unfreeze everything with ``cfg.full``).

    Args:
        lm: The model; changed in place.
        cfg: Training settings (rank, alpha, seed).

    Returns:
        The :class:`Trainee`.
    """
    torch.manual_seed(cfg.seed)
    peft_model = None
    if cfg.full:
        for p in lm.model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(lm.model, config)
    params = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in params.items()}
    return Trainee(lm, peft_model, params, initial)


@contextmanager
def adapters_disabled(trainee: Trainee) -> Iterator[None]:
    """Run the base model inside the block (LoRA only; full fine-tuning has no base to return to)."""
    if trainee.peft_model is None:
        raise PersonavecError(
            "full fine-tuning changed the weights themselves: load the base model separately"
        )
    with trainee.peft_model.disable_adapter():
        yield


def encode_examples(lm: LoadedModel, conversations: Sequence[Conversation], max_tokens: int) -> list[Encoded]:
    """Tokenise chat examples for training, cutting over-long answers at ``max_tokens``.

    Raises:
        PersonavecError: If an example's prompt alone is longer than ``max_tokens``.
    """
    encoded: list[Encoded] = []
    for i, conv in enumerate(conversations):
        enc = encode(lm.tokenizer, conv, require_response=True)
        if enc.prompt_len >= max_tokens:
            raise PersonavecError(
                f"example {i + 1}: the prompt has {enc.prompt_len} tokens, more than max_tokens={max_tokens}"
            )
        encoded.append(Encoded(enc.ids[:max_tokens], enc.prompt_len))
    return encoded


def batch_order(n: int, cfg: TrainConfig) -> list[list[int]]:
    """Every step's example indices: a fresh shuffle per epoch, the same for the same seed."""
    order: list[list[int]] = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        order += [perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return order[: cfg.steps(n)]


def assistant_loss(lm: LoadedModel, batch: Sequence[Encoded]) -> Tensor:
    """Mean cross-entropy over the assistant tokens of a right-padded batch."""
    ids, layout, positions = pad_batch(batch, int(lm.tokenizer.pad_token_id), "right", lm.device)
    logits = lm.model(input_ids=ids, position_ids=positions, use_cache=False).logits
    # Token t is predicted from position t - 1; only response tokens count.
    target = layout.response_mask[:, 1:]
    pred = logits[:, :-1][target]
    return torch.nn.functional.cross_entropy(pred.float(), ids[:, 1:][target])


def make_optimizer(trainee: Trainee, cfg: TrainConfig, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable weights, with a linear warm-up over the first tenth of ``total`` steps."""
    opt = torch.optim.AdamW(list(trainee.params.values()), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return opt, sched


def train_steps(
    trainee: Trainee,
    encoded: Sequence[Encoded],
    cfg: TrainConfig,
    *,
    interventions: Sequence[SteeringSpec] = (),
    checkpoint_dir: Path | None = None,
    on_step: StepCallback | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train ``trainee`` on encoded examples, steering every training pass with ``interventions``.

    Args:
        trainee: From :func:`prepare`.
        encoded: From :func:`encode_examples`.
        cfg: Training settings.
        interventions: Vectors added (or ablated) in every training forward pass, never at inference.
        checkpoint_dir: Where to save and resume checkpoints (``None``: no checkpoints).
        on_step: Progress callback.
        stop_at: Stop after this step of the run (a checkpoint is saved there); the run can be continued
            later from that checkpoint, with other interventions if wanted.

    Returns:
        The :class:`TrainResult`.
    """
    t0 = time.perf_counter()
    lm = trainee.lm
    order = batch_order(len(encoded), cfg)
    opt, sched = make_optimizer(trainee, cfg, len(order))
    losses: list[float] = []
    start = load_checkpoint(trainee, opt, sched, checkpoint_dir, losses) if checkpoint_dir else 0
    stop = len(order) if stop_at is None else min(stop_at, len(order))
    lm.model.train()
    try:
        for step in range(start, stop):
            with steer(lm, interventions) if interventions else nullcontext():
                loss = assistant_loss(lm, [encoded[i] for i in order[step]])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, len(order), losses[-1])
            last = step + 1 == stop
            if checkpoint_dir and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or last):
                save_checkpoint(trainee, opt, sched, checkpoint_dir, step + 1, losses)
    finally:
        lm.model.eval()
    return TrainResult(max(stop, start), losses, start, time.perf_counter() - t0)


def save_checkpoint(
    trainee: Trainee, opt: torch.optim.Optimizer, sched: Any, folder: Path, step: int, losses: list[float]
) -> None:
    """Write weights, optimizer moments and progress to ``folder`` (replaced as a whole, atomically)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {n: p.detach().contiguous() for n, p in trainee.params.items()}, str(tmp / "weights.safetensors")
    )
    names = list(trainee.params)
    moments: dict[str, Tensor] = {}
    steps: dict[str, float] = {}
    for name, p in trainee.params.items():
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                moments[f"{name}::{key}"] = state[key].contiguous()
        if "step" in state:
            steps[name] = float(state["step"])
    save_file(moments or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
    write_json(
        tmp / "state.json",
        {
            "step": step,
            "losses": losses,
            "adam_steps": steps,
            "params": names,
            "scheduler": sched.state_dict(),
        },
    )
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    trainee: Trainee, opt: torch.optim.Optimizer, sched: Any, folder: Path, losses: list[float]
) -> int:
    """Restore a :func:`save_checkpoint` checkpoint; returns the step to continue from (0: none)."""
    if not (folder / "state.json").is_file():
        return 0
    state = json.loads((folder / "state.json").read_text())
    if state["params"] != list(trainee.params):
        raise PersonavecError(f"checkpoint {folder} holds other trainable weights: delete it to start again")
    weights = load_file(str(folder / "weights.safetensors"))
    moments = load_file(str(folder / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in trainee.params.items():
            p.copy_(weights[name])
            if name in state["adam_steps"]:
                opt.state[p] = {
                    "step": torch.tensor(state["adam_steps"][name]),
                    "exp_avg": moments[f"{name}::exp_avg"].clone(),
                    "exp_avg_sq": moments[f"{name}::exp_avg_sq"].clone(),
                }
    sched.load_state_dict(state["scheduler"])
    losses.extend(state["losses"])
    return int(state["step"])


def settings_key(data_sha: str, cfg: TrainConfig, interventions: Sequence[dict[str, Any]]) -> str:
    """A key for 'the same run': a checkpoint only resumes a run with the same data and settings."""
    return record_key({"data": data_sha, "config": asdict(cfg), "interventions": list(interventions)})


def save_output(trainee: Trainee, out: Path, receipt: dict[str, Any]) -> None:
    """Write the adapter (or full model) folder and its receipt; remove the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    if trainee.peft_model is not None:
        trainee.peft_model.save_pretrained(str(out))
    else:
        model: Any = trainee.lm.model
        model.save_pretrained(str(out))
        trainee.lm.tokenizer.save_pretrained(str(out))
    write_json(out / RECEIPT, receipt)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
