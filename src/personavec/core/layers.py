"""The layer convention, written down once.

personavec numbers the residual stream of a model with ``L`` decoder blocks by ``0..L``:

* index ``0`` is the embedding output, i.e. the input of decoder block 1 (for Gemma this already
  includes the ``sqrt(d)`` embedding scale, for GPT-2 the position embeddings);
* index ``l`` (``1 <= l <= L``) is the output of decoder block ``l`` (blocks counted from 1).

So a persona vector has ``L + 1`` rows, row ``l`` lives at index ``l``, and steering "at layer ``l``"
adds row ``l`` to the output of block ``l``. Index ``0`` can be read but not steered (there is no block
0 whose output we hook).

The one place this differs from ``transformers``' ``output_hidden_states=True``: for the architectures
we support, ``hidden_states[L]`` has the model's final norm applied (``norm``/``ln_f``), while our index
``L`` is the *raw* output of block ``L``, the tensor a steering hook at ``L`` actually changes. For
``l < L`` the two agree exactly. This keeps "capture at l" and "steer at l" the same tensor everywhere;
``tests/test_activations.py`` checks both statements against ``transformers`` for several architectures.

Vectors imported from the paper's research code (row ``l`` = ``hidden_states[l]``) therefore match ours
row for row, except that their last row was averaged after the final norm; the importer records this.
"""

from __future__ import annotations

from collections.abc import Iterable

from personavec.core.errors import PersonavecError


def check_layers(layers: Iterable[int], n_blocks: int, *, allow_embeddings: bool = True) -> list[int]:
    """Validate layer indices against the convention and return them sorted and de-duplicated.

    Args:
        layers: Indices in ``0..n_blocks`` (``1..n_blocks`` when ``allow_embeddings`` is false).
        n_blocks: Number of decoder blocks ``L`` of the model.
        allow_embeddings: Whether index 0 (the embedding output) is acceptable.

    Returns:
        The sorted unique layer indices.

    Raises:
        PersonavecError: If the list is empty or an index is out of range.
    """
    low = 0 if allow_embeddings else 1
    out = sorted(set(int(x) for x in layers))
    if not out:
        raise PersonavecError("no layers given: pass at least one layer index")
    bad = [x for x in out if not low <= x <= n_blocks]
    if bad:
        raise PersonavecError(
            f"layer {bad[0]} is out of range: valid layers for this model are {low}..{n_blocks} "
            f"(0 = embeddings, l = output of decoder block l)"
        )
    return out
