"""The persona vector: an ``[L + 1, d]`` tensor plus what is needed to trust and reuse it.

Row ``l`` is the direction at layer index ``l`` (see :mod:`personavec.core.layers`: 0 = embeddings,
l = output of block l). Vectors are values: arithmetic returns new vectors.

File format: one ``.safetensors`` file with a single float32 tensor ``persona_vector`` of shape
``[L + 1, d]`` and the metadata as JSON under the header key ``personavec``. Any safetensors reader can
open it; no pickle is involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personavec import __version__
from personavec.core.errors import PersonavecError
from personavec.core.layers import check_layers

TENSOR_KEY = "persona_vector"
HEADER_KEY = "personavec"
FORMAT_VERSION = 1
LAYER_CONVENTION = "index 0 = embeddings, index l = output of decoder block l"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class VectorMeta:
    """Metadata stored with every vector.

    Attributes:
        trait: Trait name (``evil``), or an expression for derived vectors (``evil - humorous``).
        model_id: Model the vector was made on.
        model_fingerprint: :func:`personavec.core.models.fingerprint` of that model.
        n_blocks: Decoder blocks ``L`` of that model.
        hidden_size: Residual width ``d``.
        method: How it was made (``mean_diff``, ``imported:...``, ``arithmetic``).
        pooling: Token pooling the means were taken over (``response_mean`` ...).
        n_positive: Samples behind the positive mean.
        n_negative: Samples behind the negative mean.
        layer_convention: The convention of :mod:`personavec.core.layers`, spelled out.
        created: ISO-8601 UTC creation time.
        version: personavec version that made it.
        extra: Free-form JSON-able details (trait hash, judge, thresholds, recommendations ...).
    """

    trait: str
    model_id: str
    model_fingerprint: str
    n_blocks: int
    hidden_size: int
    method: str = "mean_diff"
    pooling: str = "response_mean"
    n_positive: int = 0
    n_negative: int = 0
    layer_convention: str = LAYER_CONVENTION
    created: str = field(default_factory=lambda: _now())
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> VectorMeta:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_values(data: Tensor, n_blocks: int, hidden_size: int, where: str) -> None:
    if data.ndim != 2 or tuple(data.shape) != (n_blocks + 1, hidden_size):
        raise PersonavecError(
            f"{where}: tensor has shape {list(data.shape)}, expected [{n_blocks + 1}, {hidden_size}] "
            f"(n_blocks + 1 layers x hidden size)"
        )
    if not torch.is_floating_point(data):
        raise PersonavecError(f"{where}: tensor dtype {data.dtype} is not floating point")
    if not bool(torch.isfinite(data).all()):
        bad = (~torch.isfinite(data)).any(dim=1).nonzero().flatten().tolist()
        raise PersonavecError(f"{where}: vector has NaN or inf values at layer(s) {bad[:8]}")


@dataclass(frozen=True, eq=False)
class PersonaVector:
    """A per-layer direction for one trait on one model.

    Attributes:
        data: ``[L + 1, d]`` float32 tensor; row ``l`` is layer index ``l``.
        meta: The :class:`VectorMeta`.
    """

    data: Tensor
    meta: VectorMeta

    def __post_init__(self) -> None:
        _check_values(self.data, self.meta.n_blocks, self.meta.hidden_size, f"vector '{self.meta.trait}'")
        object.__setattr__(self, "data", self.data.detach().to("cpu", torch.float32))

    # -- access ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of rows, ``L + 1``."""
        return int(self.data.shape[0])

    def at(self, layer: int) -> Tensor:
        """The ``[d]`` direction at layer index ``layer`` (0 = embeddings, l = output of block l)."""
        check_layers([layer], self.meta.n_blocks)
        return self.data[layer]

    def norms(self) -> Tensor:
        """``[L + 1]`` L2 norm of each layer's row."""
        return self.data.norm(dim=-1)

    @property
    def recommended_layer(self) -> int | None:
        """The layer extraction recommends for monitoring, read-back and default steering, if any.

        Steering uses the layer a sweep chose (``meta.extra["steering"]["amplify"]``) when there is one;
        everything else reads at this layer. The rule that picked it is in ``meta.extra["layer_rule"]``.
        """
        rec = self.meta.extra.get("recommended_layer")
        return None if rec is None else int(rec)

    def require_recommended_layer(self) -> int:
        """:attr:`recommended_layer`, or a one-line error asking for an explicit layer."""
        rec = self.recommended_layer
        if rec is None:
            raise PersonavecError(
                f"vector '{self.meta.trait}' has no recommended layer: "
                "pass a layer (--layer on the command line)"
            )
        check_layers([rec], self.meta.n_blocks)
        return rec

    # -- arithmetic -----------------------------------------------------------------------------
    def _compatible(self, other: PersonaVector) -> None:
        a, b = self.meta, other.meta
        if (a.n_blocks, a.hidden_size) != (b.n_blocks, b.hidden_size):
            raise PersonavecError(
                f"vectors do not match: '{a.trait}' is for {a.n_blocks} blocks x {a.hidden_size}, "
                f"'{b.trait}' for {b.n_blocks} blocks x {b.hidden_size}"
            )

    def _derived(self, data: Tensor, trait: str) -> PersonaVector:
        return PersonaVector(data, self.meta.replace(trait=trait, method="arithmetic", created=_now()))

    def __add__(self, other: PersonaVector) -> PersonaVector:
        self._compatible(other)
        return self._derived(self.data + other.data, f"({self.meta.trait} + {other.meta.trait})")

    def __sub__(self, other: PersonaVector) -> PersonaVector:
        self._compatible(other)
        return self._derived(self.data - other.data, f"({self.meta.trait} - {other.meta.trait})")

    def __mul__(self, scale: float) -> PersonaVector:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            return NotImplemented
        return self._derived(self.data * float(scale), f"{scale:g} * {self.meta.trait}")

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> PersonaVector:
        return self * (1.0 / scale)

    def __neg__(self) -> PersonaVector:
        return self._derived(-self.data, f"-{self.meta.trait}")

    def normalize(self) -> PersonaVector:
        """Each layer's row scaled to unit norm (zero rows stay zero)."""
        n = self.norms().clamp(min=1e-12).unsqueeze(-1)
        unit = torch.where(self.norms().unsqueeze(-1) > 0, self.data / n, self.data)
        return self._derived(unit, f"unit({self.meta.trait})")

    def cosine(self, other: PersonaVector) -> Tensor:
        """``[L + 1]`` cosine similarity per layer (0 where either row is zero)."""
        self._compatible(other)
        return torch.nn.functional.cosine_similarity(self.data, other.data, dim=-1, eps=1e-12)

    def with_meta(self, **changes: Any) -> PersonaVector:
        """The same tensor with some metadata fields changed."""
        return PersonaVector(self.data, self.meta.replace(**changes))

    def check_model(self, n_blocks: int, hidden_size: int, model_id: str = "this model") -> None:
        """Raise a one-line error if the vector was made for a model of another shape."""
        if (self.meta.n_blocks, self.meta.hidden_size) != (n_blocks, hidden_size):
            raise PersonavecError(
                f"vector '{self.meta.trait}' was made for {self.meta.model_id} ({self.meta.n_blocks} blocks, "
                f"hidden size {self.meta.hidden_size}) but {model_id} has {n_blocks} blocks, "
                f"hidden size {hidden_size}"
            )

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the vector as ``.safetensors`` with its metadata in the header (atomically).

        Args:
            path: Destination file.

        Returns:
            The path written.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {HEADER_KEY: json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self.meta)})}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({TENSOR_KEY: self.data.contiguous()}, tmp, metadata=header)
            os.replace(tmp, path)  # readers never see a truncated file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PersonaVector:
        """Read and validate a vector file written by :meth:`save`.

        Raises:
            PersonavecError: If the file is missing, not safetensors, lacks metadata, or holds a tensor of
                the wrong shape, dtype or with non-finite values.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise PersonavecError(f"vector file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if TENSOR_KEY not in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    raise PersonavecError(f"{path}: no '{TENSOR_KEY}' tensor; not a personavec vector file")
                data = f.get_tensor(TENSOR_KEY)
        except (SafetensorError, OSError, ValueError) as e:
            raise PersonavecError(
                f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})"
            ) from e
        if HEADER_KEY not in header:
            raise PersonavecError(f"{path}: missing '{HEADER_KEY}' metadata; not a personavec vector file")
        try:
            raw = json.loads(header[HEADER_KEY])
            raw.pop("format", None)
            known = {f.name for f in dataclasses.fields(VectorMeta)}
            meta = VectorMeta(**{k: v for k, v in raw.items() if k in known})
        except (json.JSONDecodeError, TypeError) as e:
            raise PersonavecError(f"{path}: corrupt metadata ({e})") from e
        _check_values(data, meta.n_blocks, meta.hidden_size, str(path))
        return cls(data, meta)


def mean_difference(positive: Tensor, negative: Tensor, meta: VectorMeta) -> PersonaVector:
    """Per-layer difference of means, the persona vector of the paper.

    Args:
        positive: ``[N_pos, L + 1, d]`` pooled activations of trait-expressing samples.
        negative: ``[N_neg, L + 1, d]`` pooled activations of trait-suppressing samples.
        meta: Metadata; ``n_positive``/``n_negative`` are filled in here.

    Returns:
        ``mean(positive) - mean(negative)`` as a :class:`PersonaVector`.

    Raises:
        PersonavecError: If either side is empty.
    """
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise PersonavecError(
            f"cannot take a difference of means with {positive.shape[0]} positive and {negative.shape[0]} "
            "negative samples: both sides need at least one"
        )
    data = positive.float().mean(0) - negative.float().mean(0)
    return PersonaVector(
        data, meta.replace(n_positive=int(positive.shape[0]), n_negative=int(negative.shape[0]))
    )
