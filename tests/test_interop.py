"""Interop formats: the paper's ``.pt`` files and GGUF control vectors (repeng / llama.cpp)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from personavec.core.errors import PersonavecError
from personavec.core.interop import export_gguf, import_gguf, import_research_pt
from personavec.core.vectors import PersonaVector, VectorMeta

L, D = 5, 16


def make_vector(n_blocks: int = L, d: int = D, seed: int = 0) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    meta = VectorMeta(
        trait="evil", model_id="org/model", model_fingerprint="fp", n_blocks=n_blocks, hidden_size=d
    )
    return PersonaVector(torch.randn(n_blocks + 1, d, generator=g), meta)


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> Path:
    """A GGUF file written the way repeng's ``ControlVector.export_gguf`` does."""
    w = gguf.GGUFWriter(path, arch)
    w.add_string(f"{arch}.model_hint", "llama")
    w.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_steering(path: Path, n_layer: int) -> dict[int, np.ndarray]:
    """Which vector llama.cpp adds to the output of each 0-based block, transcribed from its C++.

    ``common_control_vector_load_one`` (common/common.cpp) puts ``direction.k`` at ``data[n_embd*(k-1)]``
    and rejects k == 0; ``llama_adapter_cvec::apply`` (src/llama-adapter.cpp) copies
    ``data[n_embd*(il-1)]`` into ``tensors[il]`` for il in 1..n_layer-1, and ``build_cvec(cur, il)`` adds
    ``tensors[il]`` to block il's output ``l_out``.
    """
    reader = gguf.GGUFReader(path)
    n_embd = -1
    data: list[float] = []
    for t in reader.tensors:
        prefix, _, suffix = t.name.partition(".")
        k = int(suffix) if prefix == "direction" and suffix.lstrip("-").isdigit() else -1
        assert k > 0, f"llama.cpp would reject the whole file because of tensor {t.name}"
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
        n_embd = int(t.n_elements) if n_embd == -1 else n_embd
        assert int(t.n_elements) == n_embd
        if len(data) < n_embd * k:
            data.extend([0.0] * (n_embd * k - len(data)))
        for j, x in enumerate(np.asarray(t.data, dtype=np.float32)):
            data[n_embd * (k - 1) + j] += float(x)
    out: dict[int, np.ndarray] = {}
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= len(data):
            out[il] = np.asarray(data[off : off + n_embd], dtype=np.float32)
    return out


# -- .pt from the paper's research code ---------------------------------------------------------------


def test_pt_round_trip(tmp_path: Path) -> None:
    raw = torch.randn(L + 1, D)
    p = tmp_path / "evil_response_avg_diff.pt"
    torch.save(raw, p)
    v = import_research_pt(p, trait="evil", model_id="Qwen/Qwen2.5-7B-Instruct")
    assert torch.equal(v.data, raw)
    assert (v.meta.n_blocks, v.meta.hidden_size) == (L, D)
    assert v.meta.trait == "evil" and v.meta.model_id == "Qwen/Qwen2.5-7B-Instruct"
    assert v.meta.method == "imported:persona_vectors_pt"
    assert v.meta.pooling == "response_mean"
    assert v.meta.extra["last_row_after_final_norm"] is True
    assert "final norm" in v.meta.extra["note"]


def test_pt_half_precision_is_converted(tmp_path: Path) -> None:
    raw = torch.randn(L + 1, D).to(torch.bfloat16)
    p = tmp_path / "v.pt"
    torch.save(raw, p)
    v = import_research_pt(p, trait="evil")
    assert v.data.dtype == torch.float32
    assert torch.equal(v.data, raw.float())
    assert v.meta.pooling == "unknown"


def test_pt_dict_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "dict.pt"
    torch.save({"vector": torch.randn(L + 1, D)}, p)
    with pytest.raises(PersonavecError, match="holds a dict"):
        import_research_pt(p, trait="evil")


class _Payload:
    """Unpickling this runs ``os.mkdir(target)``: a stand-in for a malicious .pt file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.target,))


def test_pt_pickled_object_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    p = tmp_path / "evil.pt"
    torch.save(_Payload(str(marker)), p)
    with pytest.raises(PersonavecError) as err:
        import_research_pt(p, trait="evil")
    assert "\n" not in str(err.value)
    assert not marker.exists(), "the importer unpickled an arbitrary object"
    # Control: the payload is live, so the assertion above would catch an unsafe torch.load.
    torch.load(p, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("shape", [(D,), (1, D), (2, 3, D)])
def test_pt_wrong_shape_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    p = tmp_path / "v.pt"
    torch.save(torch.randn(*shape), p)
    with pytest.raises(PersonavecError, match="expected \\[L \\+ 1, d\\]"):
        import_research_pt(p, trait="evil")


def test_pt_garbage_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"this is not a torch file at all")
    with pytest.raises(PersonavecError, match="not a loadable tensor file"):
        import_research_pt(p, trait="evil")
    with pytest.raises(PersonavecError, match="not found"):
        import_research_pt(tmp_path / "nope.pt", trait="evil")


# -- GGUF control vectors -----------------------------------------------------------------------------


def test_gguf_round_trip_default_layers(tmp_path: Path) -> None:
    v = make_vector()
    p = export_gguf(v, tmp_path / "v.gguf")
    back = import_gguf(p, n_blocks=L, hidden_size=D, trait="evil")
    assert torch.equal(back.data[2:], v.data[2:])
    assert not back.data[:2].any(), "rows 0 and 1 are not exported, so they must come back as zero"
    assert back.meta.extra["layers"] == list(range(2, L + 1))
    assert back.meta.extra["model_hint"] == "org/model"
    assert back.meta.method == "imported:gguf_control_vector"


def test_gguf_round_trip_selected_layers(tmp_path: Path) -> None:
    v = make_vector()
    p = export_gguf(v, tmp_path / "v.gguf", layers=[4, 2], model_hint="qwen2")
    back = import_gguf(p, n_blocks=L, hidden_size=D)
    for layer in range(L + 1):
        if layer in (2, 4):
            assert torch.equal(back.data[layer], v.data[layer])
        else:
            assert not back.data[layer].any()
    assert back.meta.extra["model_hint"] == "qwen2"


def test_gguf_file_matches_llama_cpp_layout(tmp_path: Path) -> None:
    v = make_vector()
    p = export_gguf(v, tmp_path / "v.gguf", layers=[2, 3, 5])
    r = gguf.GGUFReader(p)
    # our row l is direction.{l-1}
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.2", "direction.4"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(x) for x in t.shape] == [D]
    arch = r.get_field("general.architecture")
    assert arch is not None and arch.contents() == "controlvector"
    hint = r.get_field("controlvector.model_hint")
    assert hint is not None and hint.contents() == "org/model"
    count = r.get_field("controlvector.layer_count")
    assert count is not None and count.types == [gguf.GGUFValueType.UINT32] and count.contents() == 3


def test_gguf_llama_cpp_adds_row_l_to_block_l(tmp_path: Path) -> None:
    """Replay llama.cpp's loader on our file: block il (0-based) must get our row il + 1."""
    v = make_vector()
    p = export_gguf(v, tmp_path / "v.gguf")
    steer = llama_cpp_steering(p, n_layer=L)
    assert sorted(steer) == list(range(1, L)), "every block llama.cpp can steer gets a direction"
    for il, added in steer.items():
        np.testing.assert_array_equal(added, v.data[il + 1].numpy())


def test_gguf_repeng_direction_zero_is_row_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d0, d3 = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    p = write_gguf(tmp_path / "repeng.gguf", {"direction.0": d0, "direction.3": d3})
    back = import_gguf(p, n_blocks=L, hidden_size=D)
    np.testing.assert_array_equal(back.data[1].numpy(), d0)  # repeng adds direction.0 to model.layers[0]
    np.testing.assert_array_equal(back.data[4].numpy(), d3)
    assert not back.data[[0, 2, 3, 5]].any()
    assert back.meta.extra["model_hint"] == "llama"


def test_gguf_export_refuses_unexpressible_layers(tmp_path: Path) -> None:
    v = make_vector()
    with pytest.raises(PersonavecError, match=r"direction\.0"):
        export_gguf(v, tmp_path / "v.gguf", layers=[1, 2])
    with pytest.raises(PersonavecError, match="out of range"):
        export_gguf(v, tmp_path / "v.gguf", layers=[0])
    with pytest.raises(PersonavecError, match="out of range"):
        export_gguf(v, tmp_path / "v.gguf", layers=[L + 1])
    with pytest.raises(PersonavecError, match="nothing to export"):
        export_gguf(make_vector(n_blocks=1), tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_export_is_atomic_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "v.gguf"
    target.write_bytes(b"old")
    export_gguf(make_vector(seed=1), target)
    assert [x.name for x in tmp_path.iterdir()] == ["v.gguf"], "no temp file may be left behind"
    back = import_gguf(target, n_blocks=L, hidden_size=D)
    assert torch.equal(back.data[2:], make_vector(seed=1).data[2:])


def test_gguf_wrong_width(tmp_path: Path) -> None:
    p = export_gguf(make_vector(), tmp_path / "v.gguf")
    with pytest.raises(PersonavecError, match="width 16, but the model's hidden size is 32"):
        import_gguf(p, n_blocks=L, hidden_size=32)


def test_gguf_index_out_of_range(tmp_path: Path) -> None:
    p = export_gguf(make_vector(), tmp_path / "v.gguf")  # direction.1 .. direction.4
    with pytest.raises(PersonavecError, match=r"direction\.4 steers block 5, but the model has 4 blocks"):
        import_gguf(p, n_blocks=4, hidden_size=D)


def test_gguf_corrupt_or_not_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(PersonavecError, match="not a readable GGUF file"):
        import_gguf(junk, n_blocks=L, hidden_size=D)
    good = export_gguf(make_vector(), tmp_path / "v.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 3])
    with pytest.raises(PersonavecError, match="not a readable GGUF file"):
        import_gguf(truncated, n_blocks=L, hidden_size=D)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(PersonavecError, match="not a readable GGUF file"):
        import_gguf(empty, n_blocks=L, hidden_size=D)
    with pytest.raises(PersonavecError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", n_blocks=L, hidden_size=D)


def test_gguf_not_a_control_vector(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "model.gguf", {"direction.1": np.zeros(D, np.float32)}, arch="llama")
    with pytest.raises(PersonavecError, match=r"not a control vector .*'llama'"):
        import_gguf(p, n_blocks=L, hidden_size=D)
    q = write_gguf(tmp_path / "weights.gguf", {"blk.0.attn_q.weight": np.zeros(D, np.float32)})
    with pytest.raises(PersonavecError, match=r"unexpected tensor 'blk\.0\.attn_q\.weight'"):
        import_gguf(q, n_blocks=L, hidden_size=D)
    e = write_gguf(tmp_path / "empty_cv.gguf", {})
    with pytest.raises(PersonavecError, match="no direction tensors"):
        import_gguf(e, n_blocks=L, hidden_size=D)


def test_gguf_non_f32_direction_is_refused(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "f16.gguf", {"direction.1": np.ones(D, np.float16)})
    with pytest.raises(PersonavecError, match="expected F32"):
        import_gguf(p, n_blocks=L, hidden_size=D)


def test_gguf_errors_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(PersonavecError) as err:
        import_gguf(junk, n_blocks=L, hidden_size=D)
    assert "\n" not in str(err.value)
