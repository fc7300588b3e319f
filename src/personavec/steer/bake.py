"""Bake a persona vector into a model's weights, so servers without hooks serve the steered model.

Steering at layer ``l`` adds ``coef * v_l`` to the output of decoder block ``l`` at every position
(:func:`personavec.core.steering.steer` with ``positions="all"``). When the last thing a block does is
``residual + W x`` (no norm after it), a bias ``b = coef * v_l`` on that final projection ``W`` adds
exactly the same constant, so the steering becomes part of the checkpoint:

* ``llama``: a bias on block ``l``'s MLP ``down_proj`` through the config's own ``mlp_bias`` option
  (which also gives ``gate_proj``/``up_proj`` and every other block biases: all set to zero);
* ``qwen2`` and ``mistral`` have no MLP bias option, but are Llama blocks plus (Qwen2) q/k/v biases or
  (Mistral) a sliding window. Without a sliding window they are rewritten as ``llama`` with
  ``mlp_bias`` (and, for Qwen2, ``attention_bias`` carrying its q/k/v biases, ``o_proj``'s at zero);
* ``gpt2``: the MLP ``c_proj`` has a bias already; ``coef * v_l`` is added to it.

Gemma 2/3 normalise the MLP output inside the block (``post_feedforward_layernorm``), so no bias there
equals adding to the block output; Gemma, Qwen3 and Phi-3 have no bias option on the MLP output. These
are refused with a one-line error rather than baked approximately.

The folder is a plain ``transformers`` checkpoint (config, safetensors, tokenizer, generation config)
plus ``personavec_bake.json`` recording what was baked.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personavec import __version__
from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel, fingerprint
from personavec.core.vectors import PersonaVector

SIDECAR = "personavec_bake.json"
SIDECAR_FORMAT = 1
SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")

# Why an architecture cannot be baked exactly (the rest get a generic line).
_REFUSALS = {
    "gemma": "Gemma's config has no bias option for the MLP output projection",
    "gemma2": "Gemma 2 normalises the MLP output inside the block (post_feedforward_layernorm), "
    "so no bias equals adding to the block output",
    "gemma3": "Gemma 3 normalises the MLP output inside the block (post_feedforward_layernorm), "
    "so no bias equals adding to the block output",
    "gemma3_text": "Gemma 3 normalises the MLP output inside the block (post_feedforward_layernorm), "
    "so no bias equals adding to the block output",
    "qwen3": "Qwen3's config has no bias option for the MLP output projection",
    "phi3": "Phi-3's config has no bias option for the MLP output projection",
}


@dataclass(frozen=True)
class BakePlan:
    """What baking a vector into a model will do, resolved and checked before any weight is copied.

    Attributes:
        architecture: ``model_type`` of the model baked into.
        baked_architecture: ``model_type`` the written folder declares (``llama`` for rewritten models).
        layer: Layer whose block output is steered (``1..L``).
        coef: Strength in vector units.
        layer_source: ``given``, ``sweep`` (the vector's stored choice) or ``recommended``.
        bias: Dotted name of the bias parameter that carries ``coef * v_layer``.
        config_changes: Config options switched on to get that bias (empty for GPT-2).
    """

    architecture: str
    baked_architecture: str
    layer: int
    coef: float
    layer_source: str
    bias: str
    config_changes: dict[str, bool]

    @property
    def how(self) -> str:
        """One line on how the steering is carried by the weights."""
        options = ", ".join(f"{k}=True" for k in self.config_changes)
        via = f" via {options}" if options else " (native)"
        rewrite = (
            f" after rewriting {self.architecture} as {self.baked_architecture}"
            if self.baked_architecture != self.architecture
            else ""
        )
        return f"bias {self.bias} = coef * v[{self.layer}]{via}{rewrite}"


def steering_choice(
    vector: PersonaVector, layer: int | None = None, coef: float | None = None
) -> tuple[int, float, str]:
    """The layer and strength :func:`~personavec.core.steering.steer` would use for these arguments.

    Args:
        vector: The persona vector.
        layer: Explicit layer, or ``None`` for the sweep's stored choice, else the recommended layer.
        coef: Explicit strength, or ``None`` for the stored coefficient (only together with the stored
            layer), else 1.0.

    Returns:
        ``(layer, coef, source)`` with ``source`` one of ``given``, ``sweep``, ``recommended``.

    Raises:
        PersonavecError: If no layer is given and the vector has no recommendation, or coef is not finite.
    """
    chosen = (vector.meta.extra.get("steering") or {}).get("amplify") or {}
    if layer is None and chosen:
        layer, source = int(chosen["layer"]), "sweep"
        # The stored coefficient was measured at that layer, so it only applies together with it.
        coef = float(chosen["coef"]) if coef is None else coef
    elif layer is None:
        layer, source = vector.require_recommended_layer(), "recommended"
    else:
        source = "given"
    strength = 1.0 if coef is None else float(coef)
    if not math.isfinite(strength):
        raise PersonavecError(f"coef must be finite, got {coef!r}")
    return int(layer), strength, source


def plan_bake(
    lm: LoadedModel, vector: PersonaVector, layer: int | None = None, coef: float | None = None
) -> BakePlan:
    """Resolve and check a bake without copying any weights.

    Args:
        lm: The model to bake into.
        vector: The persona vector.
        layer: Layer to steer; default as :func:`~personavec.core.steering.steer`.
        coef: Strength; default as :func:`~personavec.core.steering.steer`.

    Returns:
        The :class:`BakePlan`.

    Raises:
        PersonavecError: On an architecture that cannot carry the steering exactly, a vector made for a
            model of another shape, or a bad layer or coef.
    """
    config: Any = lm.model.config
    arch = str(config.model_type)
    _check_supported(arch, config)
    vector.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    chosen, strength, source = steering_choice(vector, layer, coef)
    check_layers([chosen], lm.info.n_blocks, allow_embeddings=False)
    i = chosen - 1
    if arch == "gpt2":
        return BakePlan(arch, arch, chosen, strength, source, f"transformer.h.{i}.mlp.c_proj.bias", {})
    changes = {"mlp_bias": True} if arch != "qwen2" else {"attention_bias": True, "mlp_bias": True}
    return BakePlan(arch, "llama", chosen, strength, source, f"model.layers.{i}.mlp.down_proj.bias", changes)


def _check_supported(arch: str, config: Any) -> None:
    supported = f"supported: {', '.join(SUPPORTED)}"
    if arch not in SUPPORTED:
        reason = _REFUSALS.get(arch, f"personavec knows no exact bias for the '{arch}' block")
        raise PersonavecError(f"cannot bake a vector into a {arch} model: {reason}; {supported}")
    window = _sliding_window(arch, config)
    if window is not None:
        raise PersonavecError(
            f"cannot bake a vector into this {arch} model: it uses a sliding attention window ({window}), "
            f"which the llama layout that carries the bias lacks; {supported} (without a sliding window)"
        )


def _sliding_window(arch: str, config: Any) -> int | None:
    """The sliding window a Qwen2/Mistral model really uses, or None."""
    window = getattr(config, "sliding_window", None)
    if arch == "mistral":
        return None if window is None else int(window)
    if arch == "qwen2":
        types = getattr(config, "layer_types", None) or []
        used = getattr(config, "use_sliding_window", False) or "sliding_attention" in types
        return int(window) if used and window is not None else None
    return None


def _baked_config(plan: BakePlan, config: Any) -> Any:
    """The config of the baked model: the same, with the bias options on (rewritten as Llama if needed)."""
    if plan.baked_architecture == plan.architecture:
        new = copy.deepcopy(config)
        for key, value in plan.config_changes.items():
            setattr(new, key, value)
        return new
    from transformers import LlamaConfig

    # Keep every option Llama understands (sizes, rope, norms, token ids, tying); the Qwen2/Mistral-only
    # ones left out are the sliding-window settings, refused above when in use.
    known = set(LlamaConfig().to_dict()) - {
        "model_type",
        "architectures",
        "transformers_version",
        "_name_or_path",
    }
    kept = {k: v for k, v in config.to_dict().items() if k in known}
    kept.update({"attention_bias": False, "mlp_bias": False, **plan.config_changes})
    return LlamaConfig(**kept, architectures=["LlamaForCausalLM"])


def _skip_init() -> contextlib.AbstractContextManager[Any]:
    """Skip random initialisation: every weight is overwritten (or zeroed) right after construction."""
    # transformers 5 keeps the switch in `initialization`, 4.x in `modeling_utils`.
    for name in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            factory = getattr(importlib.import_module(name), "no_init_weights", None)
        except ImportError:
            continue
        if factory is not None:
            return factory()
    return contextlib.nullcontext()


def bake(
    lm: LoadedModel, vector: PersonaVector, layer: int | None = None, coef: float | None = None
) -> nn.Module:
    """A copy of ``lm.model`` whose weights carry the steering ``steer(lm, vector, layer, coef)``.

    The copy's logits equal those of the original steered with ``positions="all"`` (up to float
    rounding); ``lm.model`` itself is left unchanged.

    Args:
        lm: The model to bake into.
        vector: The persona vector.
        layer: Layer to steer; default as :func:`~personavec.core.steering.steer`.
        coef: Strength; default as :func:`~personavec.core.steering.steer`.

    Returns:
        The baked ``*ForCausalLM`` in eval mode, on ``lm``'s device and dtype.

    Raises:
        PersonavecError: As :func:`plan_bake`.
    """
    return _build(lm, vector, plan_bake(lm, vector, layer, coef))[0]


def _build(lm: LoadedModel, vector: PersonaVector, plan: BakePlan) -> tuple[nn.Module, int]:
    """The baked model and how many parameters the bias options added."""
    from transformers import AutoModelForCausalLM

    source = lm.model.state_dict()
    dtype = next(lm.model.parameters()).dtype
    with _skip_init():
        model = AutoModelForCausalLM.from_config(_baked_config(plan, lm.model.config), dtype=dtype)
    # Skipping initialisation also skips tying; untied, a tied head would be saved as a second copy.
    model.tie_weights()
    new_keys = set(model.state_dict()) - set(source)
    result = model.load_state_dict(source, strict=False)
    if result.unexpected_keys or any(not k.endswith(".bias") for k in new_keys):
        # A transformers version whose layout differs from the one this rewrite was written for.
        odd = sorted(result.unexpected_keys or [k for k in new_keys if not k.endswith(".bias")])
        raise PersonavecError(
            f"cannot bake into {plan.architecture}: the {plan.baked_architecture} layout of this "
            f"transformers version does not match (e.g. '{odd[0]}'); please report it"
        )
    added = 0
    with torch.no_grad():
        for key in new_keys:
            param = model.get_parameter(key)
            param.zero_()
            added += param.numel()
        bias = model.get_parameter(plan.bias)
        bias.add_((plan.coef * vector.at(plan.layer)).to(bias.device, bias.dtype))
    model.generation_config = copy.deepcopy(lm.model.generation_config)
    model.to(lm.device)
    return model.eval(), added


def save_baked(
    lm: LoadedModel,
    vector: PersonaVector,
    out: str | os.PathLike[str],
    layer: int | None = None,
    coef: float | None = None,
    *,
    vector_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Bake a vector and write a standard transformers folder (model, tokenizer, ``personavec_bake.json``).

    The folder is written next to ``out`` and moved into place only when complete. An existing ``out``
    is replaced only if it is empty or an earlier bake (it holds ``personavec_bake.json``).

    Args:
        lm: The model to bake into.
        vector: The persona vector.
        out: Destination folder.
        layer: Layer to steer; default as :func:`~personavec.core.steering.steer`.
        coef: Strength; default as :func:`~personavec.core.steering.steer`.
        vector_path: Where the vector was read from, to record in the sidecar.

    Returns:
        The sidecar record (also written to ``out/personavec_bake.json``), with ``path`` added.

    Raises:
        PersonavecError: As :func:`plan_bake`, or if ``out`` cannot be written.
    """
    dest = Path(out)
    check_destination(dest)
    plan = plan_bake(lm, vector, layer, coef)
    model, added = _build(lm, vector, plan)
    record = _record(lm, vector, plan, model, added, vector_path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise PersonavecError(f"cannot write to {dest}: {e.strerror or e}") from e
    try:
        model.save_pretrained(tmp)  # type: ignore[operator]
        lm.tokenizer.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "path": str(dest)}


def check_destination(out: str | os.PathLike[str]) -> None:
    """Refuse an ``out`` that :func:`save_baked` would not replace (a file, or a folder with other things).

    Raises:
        PersonavecError: If ``out`` is a file or a non-empty folder that is not an earlier bake.
    """
    dest = Path(out)
    if dest.is_file():
        raise PersonavecError(f"--out {dest} is a file: give a folder for the baked model")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / SIDECAR).is_file():
        raise PersonavecError(
            f"--out {dest} is a non-empty folder that is not an earlier bake: "
            "choose another folder or empty it"
        )


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Swap the finished folder in, so a crash never leaves a half-written model at ``dest``."""
    old: Path | None = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _record(
    lm: LoadedModel,
    vector: PersonaVector,
    plan: BakePlan,
    model: nn.Module,
    added: int,
    vector_path: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    direction = vector.at(plan.layer)
    element = next(model.parameters()).element_size()
    base_params = sum(p.numel() for p in lm.model.parameters())
    return {
        "format": SIDECAR_FORMAT,
        "personavec_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vector": {
            "path": None if vector_path is None else str(vector_path),
            "trait": vector.meta.trait,
            "model_id": vector.meta.model_id,
            "model_fingerprint": vector.meta.model_fingerprint,
            "sha256": hashlib.sha256(vector.data.numpy().tobytes()).hexdigest(),
        },
        "layer": plan.layer,
        "coef": plan.coef,
        "layer_source": plan.layer_source,
        "equivalent_to": "personavec steer, mode add, positions all, at this layer and coef",
        "base_model": {
            "id": lm.info.id,
            "architecture": plan.architecture,
            "fingerprint": lm.info.fingerprint,
            "dtype": lm.info.dtype,
            "parameters": base_params,
        },
        "baked_model": {
            "architecture": plan.baked_architecture,
            "fingerprint": fingerprint(model),
            "bias": plan.bias,
            "config_changes": plan.config_changes,
            "how": plan.how,
            "bias_norm": float(abs(plan.coef) * direction.norm()),
            "added_parameters": added,
            "added_bytes": added * element,
            "added_fraction": added / base_params,
        },
    }
