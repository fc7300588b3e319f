"""The vector value object and its safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from personavec.core.errors import PersonavecError
from personavec.core.vectors import PersonaVector, VectorMeta, mean_difference


def vec(seed: int = 0, n_blocks: int = 3, d: int = 8, trait: str = "evil") -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    meta = VectorMeta(trait=trait, model_id="tiny", model_fingerprint="abc", n_blocks=n_blocks, hidden_size=d)
    return PersonaVector(torch.randn(n_blocks + 1, d, generator=g), meta)


def test_arithmetic_and_similarity() -> None:
    a, b = vec(1), vec(2, trait="humorous")
    torch.testing.assert_close((a + b).data, a.data + b.data)
    torch.testing.assert_close((a - b).data, a.data - b.data)
    torch.testing.assert_close((2 * a).data, 2 * a.data)
    torch.testing.assert_close((a * 0.5).data, a.data / 2)
    torch.testing.assert_close((-a).data, -a.data)
    assert (a - b).meta.trait == "(evil - humorous)" and (a - b).meta.method == "arithmetic"
    unit = a.normalize()
    torch.testing.assert_close(unit.norms(), torch.ones(4))
    torch.testing.assert_close(a.cosine(a * 3.0), torch.ones(4))
    torch.testing.assert_close(a.cosine(-a), -torch.ones(4))
    manual = (a.data[2] @ b.data[2]) / (a.data[2].norm() * b.data[2].norm())
    torch.testing.assert_close(a.cosine(b)[2], manual)
    torch.testing.assert_close(a.at(2), a.data[2])
    with pytest.raises(PersonavecError, match="valid layers"):
        a.at(4)
    with pytest.raises(PersonavecError, match="do not match"):
        a + vec(n_blocks=4)


def test_save_load_round_trip(tmp_path: Path) -> None:
    a = vec(3).with_meta(extra={"recommended_layer": 2, "note": "x"}, n_positive=5)
    path = a.save(tmp_path / "sub" / "evil.safetensors")
    b = PersonaVector.load(path)
    assert torch.equal(a.data, b.data)
    assert b.meta == a.meta
    assert not list(path.parent.glob("*.tmp"))
    # Interoperable: a plain safetensors reader sees the tensor and JSON metadata.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["personavec"])
        assert meta["layer_convention"].startswith("index 0 = embeddings")
        assert f.get_tensor("persona_vector").shape == (4, 8)


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    good = vec()
    with pytest.raises(PersonavecError, match="not found"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(PersonavecError, match="not a readable safetensors file"):
        PersonaVector.load(corrupt)
    header = {"personavec": json.dumps({**good.meta.__dict__, "hidden_size": 9})}
    save_file({"persona_vector": good.data}, str(tmp_path / "shape.safetensors"), metadata=header)
    with pytest.raises(PersonavecError, match=r"expected \[4, 9\]"):
        PersonaVector.load(tmp_path / "shape.safetensors")
    bad = good.data.clone()
    bad[2, 0] = float("nan")
    header = {"personavec": json.dumps(good.meta.__dict__)}
    save_file({"persona_vector": bad}, str(tmp_path / "nan.safetensors"), metadata=header)
    with pytest.raises(PersonavecError, match=r"NaN or inf values at layer\(s\) \[2\]"):
        PersonaVector.load(tmp_path / "nan.safetensors")
    save_file({"persona_vector": good.data}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(PersonavecError, match="missing 'personavec' metadata"):
        PersonaVector.load(tmp_path / "nometa.safetensors")
    save_file(
        {"persona_vector": good.data.to(torch.int32)}, str(tmp_path / "int.safetensors"), metadata=header
    )
    with pytest.raises(PersonavecError, match="not floating point"):
        PersonaVector.load(tmp_path / "int.safetensors")


def test_model_mismatch_is_one_line() -> None:
    a = vec(n_blocks=3, d=8)
    with pytest.raises(PersonavecError) as err:
        a.check_model(30, 576, "smollm2")
    assert "\n" not in str(err.value)
    assert "3 blocks, hidden size 8" in str(err.value) and "30 blocks, hidden size 576" in str(err.value)


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = vec(1).save(tmp_path / "v.safetensors")
    before = path.read_bytes()

    def explode(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        vec(2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_mean_difference() -> None:
    pos = torch.randn(5, 4, 8)
    neg = torch.randn(3, 4, 8)
    meta = vec().meta
    v = mean_difference(pos, neg, meta)
    torch.testing.assert_close(v.data, pos.mean(0) - neg.mean(0))
    assert (v.meta.n_positive, v.meta.n_negative) == (5, 3)
    with pytest.raises(PersonavecError, match="0 positive and 3 negative"):
        mean_difference(pos[:0], neg, meta)
