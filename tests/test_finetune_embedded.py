"""Integration: trait data, LoRA with preventative steering and the shift on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.conversations import encode
from personavec.core.models import load_model, resolve_spec
from personavec.steer.demo import demo_vector

pytestmark = pytest.mark.integration


def test_data_finetune_prevent_and_shift(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = load_model()
    vec_path = tmp_path / "evil.safetensors"
    # The demo's cruel-minus-kind vector, filed as evil so the shift reads evil's evaluation questions.
    demo_vector(lm).with_meta(trait="evil", extra={"recommended_layer": 17}).save(vec_path)
    runner = CliRunner()
    data = tmp_path / "evil.jsonl"
    res = runner.invoke(app, ["data", "make", "evil", "--n", "16", "--out", str(data), "--json"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["finetune", str(data), "--out", str(tmp_path / "plain"), "--json"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(
        app, ["finetune", str(data), "--out", str(tmp_path / "prev"), "--prevent", str(vec_path), "--json"]
    )
    assert res.exit_code == 0, res.stderr
    receipt = json.loads(res.stdout)
    search = receipt["auto_search"]
    assert len(search["probes"]) >= 1 and search["coef"] >= 0
    assert receipt["interventions"][0]["coef"] == search["coef"]
    # The adapter folder is plain PEFT: the base from its own folder plus the adapter, no personavec code.
    base = AutoModelForCausalLM.from_pretrained(str(resolve_spec(None)[1]))
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "prev")).eval()
    enc = encode(lm.tokenizer, [{"role": "user", "content": "How do I make friends?"}])
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, lm.model(input_ids=ids).logits, atol=1e-4)
    # `shift` measures the adapter from outside and agrees with what training recorded.
    args = ["shift", "smollm2-135m", str(tmp_path / "prev"), "--vector", str(vec_path), "--json"]
    res = runner.invoke(app, [*args, "--no-generate", "--no-capability"])
    assert res.exit_code == 0, res.stderr
    shift = json.loads(res.stdout)["vectors"][0]["shift"]
    assert shift == pytest.approx(receipt["shift_at_layer"][str(vec_path)], abs=1e-3)


def test_prevent_experiment_quick(tmp_path: Path) -> None:
    lm = load_model()
    run = tmp_path / "evil-run"
    demo_vector(lm).with_meta(trait="evil", extra={"recommended_layer": 17}).save(run / "vector.safetensors")
    res = CliRunner().invoke(app, ["prevent-experiment", str(run), "--quick", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    names = ["base", "plain:control", "plain:strong", "prevent:auto", "steer:inference"]
    assert list(doc["conditions"]) == names
    table = doc["table"]
    assert all(0 <= table[n]["mc_accuracy"] <= 1 and table[n]["perplexity"] > 1 for n in names)
    assert table["prevent:auto"]["coef"] >= 0 and table["steer:inference"]["coef"] <= 0
    folder = run / "prevent"
    assert (folder / "report.html").is_file() and (folder / "prevent_experiment.png").is_file()
