"""Model loading and block discovery (tiny models; no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel, find_blocks, fingerprint, load_model

from .conftest import make_model, make_tokenizer


def _tiny_from_config(kind: str) -> torch.nn.Module:
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        MistralConfig,
        Phi3Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    configs = {
        "mistral": MistralConfig,
        "qwen3": Qwen3Config,
        "phi3": Phi3Config,
        "gemma2": Gemma2Config,
        "gemma3_text": Gemma3TextConfig,
    }
    extra = {"head_dim": 8} if kind in ("gemma2", "gemma3_text", "qwen3") else {}
    return AutoModelForCausalLM.from_config(configs[kind](**common, **extra))


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_find_blocks_known_architectures(kind: str) -> None:
    model = _tiny_from_config(kind)
    blocks, norm = find_blocks(model)
    assert len(blocks) == 2 and norm is not None
    assert blocks is model.model.layers


def test_generic_fallback_and_unknown_architecture() -> None:
    model = make_model("llama")
    model.config.model_type = "mystery"
    blocks, norm = find_blocks(model)
    assert blocks is model.model.layers and norm is None
    assert find_blocks(model, "model.layers")[0] is model.model.layers
    model.config.num_hidden_layers = 99
    with pytest.raises(PersonavecError, match="architecture 'mystery'.*blocks_path"):
        find_blocks(model)
    with pytest.raises(PersonavecError, match="does not exist"):
        find_blocks(model, "model.nothing")


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model = make_model("qwen2")
    tok = make_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.info.architecture == "qwen2" and lm.info.n_blocks == 3 and lm.info.hidden_size == 32
    assert lm.info.has_chat_template
    assert lm.info.fingerprint == fingerprint(model)
    other = make_model("qwen2", seed=1)
    assert fingerprint(other) != fingerprint(model)


def test_clear_errors_for_missing_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PersonavecError, match="model 'no-such-org/no-such-model' not found") as e:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(e.value)
    with pytest.raises(PersonavecError, match="model file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 this is not a model")
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PersonavecError, match="cannot read GGUF file"):
        load_model(str(bad))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-written
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonavecError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_from_hf_sets_pad_token() -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    lm = LoadedModel.from_hf(make_model("gpt2"), tok)
    assert lm.tokenizer.pad_token == tok.eos_token
