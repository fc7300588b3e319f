"""Import and export persona vectors in other tools' formats.

Two formats are supported: the ``.pt`` tensors of the Persona Vectors paper's research code, and
GGUF control vectors as written by repeng and read by llama.cpp (``--control-vector``).

Which layer does GGUF ``direction.<k>`` steer? Evidence, read from the sources:

* llama.cpp ``common/common.cpp``, ``common_control_vector_load_one``: parses the tensor name as
  ``direction`` + ``std::stoi(suffix)``, rejects ``k < 0`` ("invalid/unparsable") and ``k == 0``
  ("invalid (zero) direction tensor layer index", which makes the *whole file* be skipped), and stores
  ``direction.k`` at ``data[n_embd * (k - 1)]`` ("layer 1 at [0]").
* llama.cpp ``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: for ``il = 1 .. n_layer - 1``
  copies ``data[n_embd * (il - 1)]`` into ``tensors[il]`` (``init`` pushes ``nullptr`` for il 0:
  "there's never a tensor for layer 0"); ``tensor_for(il)`` returns ``tensors[il]`` and ``apply_to``
  does ``cur = ggml_add(cur, tensors[il])``.
* llama.cpp ``src/llama-graph.cpp``, ``llm_graph_context::build_cvec(cur, il)`` calls ``apply_to``; the
  model graphs (e.g. ``src/models/llama.cpp``) call it at the end of the loop over 0-based block ``il``,
  right after the FFN residual add, and name the result ``l_out``: the block's output.
* repeng ``repeng/control.py``, ``ControlModel.set_raw_control`` / ``ControlModule.forward``: direction
  ``i`` is added to the output of ``model_layer_list(model)[i]`` (``model.model.layers[i]``, 0-based);
  ``repeng/extract.py`` ``batched_get_hiddens`` trains direction ``i`` on ``hidden_states[i + 1]``
  (the output of that same block), and ``ControlVector.export_gguf`` writes it as ``direction.{i}``.

So both tools agree: ``direction.k`` is added to the output of 0-based block ``k``, i.e. our block
``k + 1``, i.e. **row ``k + 1`` of our ``[L + 1, d]`` vector** (row ``l`` <-> ``direction.{l - 1}``).
Consequences: row 0 (embeddings) has no GGUF slot; row 1 would be ``direction.0``, which repeng applies
but llama.cpp rejects (discarding the file), so :func:`export_gguf` writes rows ``2..L``
(``direction.1 .. direction.{L-1}``, exactly the slots llama.cpp fills) and refuses rows 0 and 1;
:func:`import_gguf` accepts ``direction.0`` from repeng files as row 1.
(llama.cpp's own ``cvector-generator`` names the direction computed from block ``il``'s ``l_out`` as
``direction.{il + 1}`` (``tools/cvector-generator/pca.hpp``, ``run_pca``), one block later than where the
loader applies it; we follow the loader, since that is what steering with the file does.)
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers
from personavec.core.vectors import PersonaVector, VectorMeta

GGUF_ARCH = "controlvector"
_DIRECTION_RE = re.compile(r"direction\.(\d+)")

# The paper's code saves one file per pooling; the stem tells which of our poolings it corresponds to.
_PT_POOLINGS = {
    "response_avg_diff": "response_mean",
    "prompt_avg_diff": "prompt_mean",
    "prompt_last_diff": "last_prompt",
}

PT_LAST_ROW_NOTE = (
    "row L was averaged after the model's final norm (transformers hidden_states[L]); personavec's row L "
    "is the raw output of block L. Rows 0..L-1 match personavec one to one (their steering at layer l adds "
    "row l to the output of model.layers[l-1], as ours does)."
)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def import_research_pt(
    path: str | os.PathLike[str],
    *,
    trait: str,
    model_id: str = "unknown",
    model_fingerprint: str = "unknown",
) -> PersonaVector:
    """Import a vector saved by the Persona Vectors paper's research code.

    The file holds one tensor of shape ``[L + 1, d]`` indexed like ``transformers`` ``hidden_states``.
    It is loaded with ``weights_only=True``, so no arbitrary object is ever unpickled.

    Args:
        path: The ``.pt`` file (e.g. ``evil_response_avg_diff.pt``).
        trait: Trait name to record.
        model_id: Model the vector was made on, if known.
        model_fingerprint: Fingerprint of that model, if known.

    Returns:
        The vector, with ``method="imported:persona_vectors_pt"`` and a note in ``meta.extra`` that its
        last row was taken after the final norm.

    Raises:
        PersonavecError: If the file is missing, unreadable, holds anything but one 2-D floating-point
            tensor with at least two rows, or has non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise PersonavecError(f"vector file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError ...)
        raise PersonavecError(
            f"{path}: not a loadable tensor file with weights_only=True ({_first_line(e)})"
        ) from e
    if not isinstance(obj, torch.Tensor):
        raise PersonavecError(
            f"{path}: holds a {type(obj).__name__}, expected one tensor of shape [L + 1, d] from the "
            "persona vectors research code"
        )
    if obj.ndim != 2 or obj.shape[0] < 2 or obj.shape[1] < 1:
        raise PersonavecError(
            f"{path}: tensor has shape {list(obj.shape)}, expected [L + 1, d] with L >= 1 "
            "(row 0 = embeddings)"
        )
    stem = path.stem
    pooling = next((ours for theirs, ours in _PT_POOLINGS.items() if stem.endswith(theirs)), "unknown")
    meta = VectorMeta(
        trait=trait,
        model_id=model_id,
        model_fingerprint=model_fingerprint,
        n_blocks=int(obj.shape[0]) - 1,
        hidden_size=int(obj.shape[1]),
        method="imported:persona_vectors_pt",
        pooling=pooling,
        extra={
            "source_file": path.name,
            "last_row_after_final_norm": True,
            "note": PT_LAST_ROW_NOTE,
        },
    )
    return PersonaVector(obj, meta)


def export_gguf(
    vector: PersonaVector,
    path: str | os.PathLike[str],
    *,
    layers: Iterable[int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write a vector as a GGUF control vector for llama.cpp ``--control-vector`` and repeng.

    Row ``l`` is written as tensor ``direction.{l - 1}`` (see the module docstring for why).

    Args:
        vector: The vector to export.
        path: Destination ``.gguf`` file; written atomically.
        layers: Our layer indices to write, in ``2..L``; default all of them. Row 0 (embeddings) has no
            slot, and row 1 would be ``direction.0``, which llama.cpp rejects.
        model_hint: Value of ``controlvector.model_hint`` (repeng stores the model type there);
            default the vector's ``model_id``.

    Returns:
        The path written.

    Raises:
        PersonavecError: If a requested layer is out of range or not exportable, or the model has fewer
            than two blocks.
    """
    import gguf

    n_blocks = vector.meta.n_blocks
    if layers is None:
        if n_blocks < 2:
            raise PersonavecError(
                f"vector '{vector.meta.trait}' has {n_blocks} block(s): llama.cpp can only steer blocks "
                "2..L, so there is nothing to export"
            )
        wanted = list(range(2, n_blocks + 1))
    else:
        wanted = check_layers(layers, n_blocks, allow_embeddings=False)
        if 1 in wanted:
            raise PersonavecError(
                "layer 1 cannot be exported to GGUF: it would be direction.0, which llama.cpp rejects "
                f"(the whole file is then ignored); export layers 2..{n_blocks}"
            )
    hint = model_hint if model_hint is not None else vector.meta.model_id

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
        # repeng writes the number of direction tensors here; llama.cpp's loader does not read it.
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(wanted))
        for layer in wanted:
            row = np.ascontiguousarray(vector.data[layer].numpy(), dtype=np.float32)
            writer.add_tensor(f"direction.{layer - 1}", row)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _field_str(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    except (IndexError, TypeError, ValueError):
        return None


def import_gguf(
    path: str | os.PathLike[str],
    *,
    n_blocks: int,
    hidden_size: int,
    trait: str = "imported",
    model_id: str = "unknown",
    model_fingerprint: str = "unknown",
) -> PersonaVector:
    """Read a GGUF control vector (repeng or llama.cpp) into a persona vector.

    Tensor ``direction.k`` becomes row ``k + 1``; rows with no tensor in the file are zero. Several
    tensors for the same index are summed, as llama.cpp does.

    Args:
        path: The ``.gguf`` control-vector file.
        n_blocks: Decoder blocks ``L`` of the model the vector is for (the file does not record it).
        hidden_size: Residual width ``d`` of that model.
        trait: Trait name to record.
        model_id: Model id to record.
        model_fingerprint: Model fingerprint to record.

    Returns:
        The ``[L + 1, d]`` vector, with ``method="imported:gguf_control_vector"``.

    Raises:
        PersonavecError: If the file is missing, not GGUF or corrupt, not a control vector, has a tensor
            that is not an F32 ``direction.<k>``, a direction whose width is not ``hidden_size``, or an
            index ``k`` with ``k + 1 > n_blocks``.
    """
    import gguf

    path = Path(path)
    if n_blocks < 1 or hidden_size < 1:
        raise PersonavecError(f"n_blocks and hidden_size must be positive, got {n_blocks} and {hidden_size}")
    if not path.is_file():
        raise PersonavecError(f"control vector file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors ... on bad bytes
        raise PersonavecError(f"{path}: not a readable GGUF file ({_first_line(e)})") from e

    arch = _field_str(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise PersonavecError(
            f"{path}: not a control vector (general.architecture is {arch!r}, expected '{GGUF_ARCH}')"
        )

    data = torch.zeros(n_blocks + 1, hidden_size, dtype=torch.float32)
    found: set[int] = set()
    for t in reader.tensors:
        m = _DIRECTION_RE.fullmatch(t.name)
        if m is None:
            raise PersonavecError(
                f"{path}: unexpected tensor '{t.name}' (a control vector holds direction.<k>)"
            )
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise PersonavecError(f"{path}: {t.name} has type {t.tensor_type.name}, expected F32")
        width = int(t.n_elements)
        if width != int(t.shape[0]):
            shape = [int(x) for x in t.shape]
            raise PersonavecError(f"{path}: {t.name} has shape {shape}, expected [{hidden_size}]")
        if width != hidden_size:
            raise PersonavecError(
                f"{path}: {t.name} has width {width}, but the model's hidden size is {hidden_size}"
            )
        k = int(m.group(1))
        if k + 1 > n_blocks:
            raise PersonavecError(
                f"{path}: {t.name} steers block {k + 1}, but the model has {n_blocks} blocks "
                f"(valid: direction.0 .. direction.{n_blocks - 1})"
            )
        # Copy out of the memory map; the reader's arrays are views of the file.
        data[k + 1] += torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        found.add(k + 1)
    if not found:
        raise PersonavecError(f"{path}: control vector has no direction tensors")

    meta = VectorMeta(
        trait=trait,
        model_id=model_id,
        model_fingerprint=model_fingerprint,
        n_blocks=n_blocks,
        hidden_size=hidden_size,
        method="imported:gguf_control_vector",
        pooling="unknown",
        extra={
            "source_file": path.name,
            "model_hint": _field_str(reader, f"{GGUF_ARCH}.model_hint"),
            "layers": sorted(found),
            "note": "GGUF direction.k is row k + 1 (added to the output of 0-based block k); "
            "absent rows are zero",
        },
    )
    return PersonaVector(data, meta)
