"""Baking a vector into the weights: plain transformers loads a folder whose logits equal hook steering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel, load_model, resolve_spec
from personavec.core.steering import steer
from personavec.steer.bake import SIDECAR, bake, plan_bake, save_baked

from .conftest import VOCAB, make_model, make_tokenizer, tiny
from .helpers import random_vector

PROMPTS = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Hi"}],
]
BAKEABLE = ("llama", "qwen2", "mistral", "gpt2")


def _tiny_mistral(sliding_window: int | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=sliding_window,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)  # as conftest: make the blocks visibly change the stream
    return LoadedModel.from_hf(model, make_tokenizer(), model_id="tiny-mistral")


def _lm(arch: str) -> LoadedModel:
    return _tiny_mistral() if arch == "mistral" else tiny(arch)


def _logits(model: torch.nn.Module, lm: LoadedModel, prompt: list[dict[str, str]]) -> torch.Tensor:
    ids = torch.tensor([encode(lm.tokenizer, prompt).ids])
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def _plain(folder: Path) -> torch.nn.Module:
    """The folder loaded the way a server would: plain transformers, nothing of personavec."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _one_line(e: pytest.ExceptionInfo[PersonavecError]) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("arch", BAKEABLE)
def test_baked_folder_equals_hook_steering(arch: str, tmp_path: Path) -> None:
    lm = _lm(arch)
    vector = random_vector(lm, scale=2.0)
    before = _logits(lm.model, lm, PROMPTS[0])
    record = save_baked(lm, vector, tmp_path / "baked", layer=2, coef=-1.5, vector_path="v.safetensors")
    baked = _plain(tmp_path / "baked")
    for prompt in PROMPTS:
        with steer(lm, vector, layers=2, coef=-1.5, positions="all"):
            expected = _logits(lm.model, lm, prompt)
        torch.testing.assert_close(_logits(baked, lm, prompt), expected, atol=1e-4, rtol=0)
        assert not torch.allclose(expected, _logits(lm.model, lm, prompt), atol=1e-2)  # steering shows
    assert torch.equal(_logits(lm.model, lm, PROMPTS[0]), before)  # the loaded model is untouched
    side = json.loads((tmp_path / "baked" / SIDECAR).read_text())
    assert {k: side[k] for k in ("layer", "coef", "layer_source")} == {
        "layer": 2,
        "coef": -1.5,
        "layer_source": "given",
    }
    assert side["vector"]["path"] == "v.safetensors" and side["vector"]["trait"] == "test"
    assert (
        side["base_model"]["fingerprint"] == lm.info.fingerprint
        and side["base_model"]["architecture"] == arch
    )
    assert record["path"] == str(tmp_path / "baked") and record["baked_model"] == side["baked_model"]
    assert baked.config.model_type == ("gpt2" if arch == "gpt2" else "llama")


def test_overhead_is_the_bias_options_only(tmp_path: Path) -> None:
    lm = tiny("llama")
    lm.model.save_pretrained(tmp_path / "plain-llama")
    record = save_baked(lm, random_vector(lm), tmp_path / "b", layer=1)
    new = _tensor_names(tmp_path / "b") - _tensor_names(tmp_path / "plain-llama")
    assert new == {f"model.layers.{i}.mlp.{p}_proj.bias" for i in range(3) for p in ("gate", "up", "down")}
    # mlp_bias gives each of the 3 blocks gate/up biases (64 each) and a down bias (32).
    assert record["baked_model"]["added_parameters"] == 3 * (64 + 64 + 32)
    assert record["baked_model"]["added_bytes"] == 4 * 3 * (64 + 64 + 32)
    assert record["baked_model"]["config_changes"] == {"mlp_bias": True}
    gpt2 = tiny("gpt2")  # ties its head to the embeddings: the folder must keep one copy
    gpt2.model.save_pretrained(tmp_path / "plain")
    assert (
        save_baked(gpt2, random_vector(gpt2), tmp_path / "g", layer=1)["baked_model"]["added_parameters"] == 0
    )
    assert _tensor_names(tmp_path / "g") == _tensor_names(tmp_path / "plain")


def _tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_baked_generation_equals_steered_generation() -> None:
    lm = tiny("qwen2")
    vector = random_vector(lm, scale=2.0)
    baked = bake(lm, vector, layer=3, coef=2.0)
    ids = torch.tensor([encode(lm.tokenizer, PROMPTS[1]).ids])
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 256}
    with torch.no_grad(), steer(lm, vector, layers=3, coef=2.0):
        expected = lm.model.generate(ids, **kwargs)  # type: ignore[operator]
    with torch.no_grad():
        assert torch.equal(baked.generate(ids, **kwargs), expected)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("extra", "layer", "coef", "expected"),
    [
        (
            {"steering": {"amplify": {"layer": 2, "coef": -2.5}}, "recommended_layer": 1},
            None,
            None,
            (2, -2.5),
        ),
        ({"steering": {"amplify": {"layer": 2, "coef": -2.5}}}, None, 0.5, (2, 0.5)),
        ({"steering": {"amplify": {"layer": 2, "coef": -2.5}}}, 3, None, (3, 1.0)),
        ({"recommended_layer": 1}, None, None, (1, 1.0)),
        ({"recommended_layer": 1}, None, 3.0, (1, 3.0)),
    ],
)
def test_defaults_mirror_steer(
    extra: dict[str, object], layer: int | None, coef: float | None, expected: tuple[int, float]
) -> None:
    lm = tiny("llama")
    vector = random_vector(lm).with_meta(extra=extra)
    plan = plan_bake(lm, vector, layer, coef)
    assert (plan.layer, plan.coef) == expected
    with steer(lm, vector, layer, coef):
        steered = _logits(lm.model, lm, PROMPTS[0])
    torch.testing.assert_close(
        _logits(bake(lm, vector, layer, coef), lm, PROMPTS[0]), steered, atol=1e-4, rtol=0
    )


def test_unsupported_architectures_are_refused() -> None:
    lm = tiny("gemma")
    with pytest.raises(PersonavecError) as e:
        bake(lm, random_vector(lm), layer=1)
    message = _one_line(e)
    assert (
        "gemma" in message
        and "no bias option" in message
        and "supported: gpt2, llama, mistral, qwen2" in message
    )
    windowed = _tiny_mistral(sliding_window=16)
    with pytest.raises(PersonavecError) as e:
        bake(windowed, random_vector(windowed), layer=1)
    assert "sliding attention window (16)" in _one_line(e)


def test_bad_layer_coef_or_vector_is_one_line() -> None:
    lm = tiny("llama")
    vector = random_vector(lm)
    for layer in (0, 4):
        with pytest.raises(PersonavecError) as e:
            bake(lm, vector, layer=layer)
        assert f"layer {layer} is out of range" in _one_line(e) and "1..3" in _one_line(e)
    with pytest.raises(PersonavecError) as e:
        bake(lm, vector, layer=1, coef=float("nan"))
    assert "coef must be finite" in _one_line(e)
    with pytest.raises(PersonavecError) as e:
        bake(lm, vector)
    assert "no recommended layer" in _one_line(e)
    other = random_vector(tiny("llama", n_layers=4))
    with pytest.raises(PersonavecError) as e:
        bake(lm, other, layer=1)
    assert "was made for" in _one_line(e) and "4 blocks" in _one_line(e)


def test_destination_rules(tmp_path: Path) -> None:
    lm = tiny("gpt2")
    vector = random_vector(lm)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PersonavecError, match="is a file"):
        save_baked(lm, vector, tmp_path / "file", layer=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(PersonavecError, match="not an earlier bake"):
        save_baked(lm, vector, tmp_path / "full", layer=1)
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    save_baked(lm, vector, tmp_path / "out", layer=1)
    save_baked(lm, vector, tmp_path / "out", layer=2)  # an earlier bake is replaced
    assert json.loads((tmp_path / "out" / SIDECAR).read_text())["layer"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "out"]  # no leftovers


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_cli_bake(model_folder: Path, tmp_path: Path) -> None:
    lm = load_model(str(model_folder))
    vector = random_vector(lm, scale=2.0).with_meta(
        extra={"steering": {"amplify": {"layer": 2, "coef": 1.25}}}
    )
    vec_path = vector.save(tmp_path / "evil.safetensors")
    out = tmp_path / "baked"
    args = ["vector", "bake", str(vec_path), "--model", str(model_folder), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["layer"], doc["coef"], doc["layer_source"]) == (2, 1.25, "sweep")
    assert doc["path"] == str(out) and doc["vector"]["path"] == str(vec_path)
    with steer(lm, vector):
        expected = _logits(lm.model, lm, PROMPTS[1])
    torch.testing.assert_close(_logits(_plain(out), lm, PROMPTS[1]), expected, atol=1e-4, rtol=0)
    table = CliRunner().invoke(app, [*args, "--coef", "-1"])
    assert table.exit_code == 0, table.stderr
    assert "down_proj.bias" in table.stdout and "llama -> llama" in table.stdout
    assert json.loads((out / SIDECAR).read_text())["coef"] == -1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "9"], "layer 9 is out of range"),
        (["--layer", "1", "--out", "FILE"], "is a file"),
        ([], "no recommended layer"),
    ],
)
def test_cli_errors_are_one_line(
    extra: list[str], message: str, model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file")
    vec = random_vector(load_model(str(model_folder))).save(tmp_path / "v.safetensors")
    out = ["--out", "baked"] if "--out" not in extra else []
    result = CliRunner().invoke(app, ["vector", "bake", str(vec), "--model", str(model_folder), *out, *extra])
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # nothing after it, no traceback


@pytest.mark.integration
def test_bake_embedded_model(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from personavec.steer.demo import demo_vector

    lm = load_model()
    vector = demo_vector(lm).with_meta(trait="cruel", extra={"recommended_layer": 17})
    record = save_baked(lm, vector, tmp_path / "baked", coef=4.0)
    assert (record["layer"], record["coef"], record["layer_source"]) == (17, 4.0, "recommended")
    # The only growth of the checkpoint is the bias options' zeros (the tied head stays shared).
    size = (tmp_path / "baked" / "model.safetensors").stat().st_size
    base_size = (Path(resolve_spec(None)[1]) / "model.safetensors").stat().st_size
    assert abs(size - base_size - record["baked_model"]["added_bytes"]) < 50_000
    baked = _plain(tmp_path / "baked")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "baked"))
    for prompt in PROMPTS[:2]:
        assert encode(tokenizer, prompt).ids == encode(lm.tokenizer, prompt).ids
        with steer(lm, vector, coef=4.0):
            expected = _logits(lm.model, lm, prompt)
        torch.testing.assert_close(_logits(baked, lm, prompt), expected, atol=1e-4, rtol=0)
