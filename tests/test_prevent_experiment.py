"""The preventative-steering experiment on a tiny model: every condition, resume, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from personavec.core.models import LoadedModel
from personavec.finetune.capability import load_questions, multiple_choice, perplexity
from personavec.finetune.data import write_chat_jsonl
from personavec.finetune.experiment import RESULT_NAME, PreventConfig, checks, pearson, run_prevent_experiment
from personavec.finetune.training import TrainConfig
from personavec.reports import write_prevent_report
from personavec.traits import load_trait
from tests.conftest import tiny
from tests.helpers import random_vector

CFG = PreventConfig(
    n=6, train=TrainConfig(epochs=1, batch_size=3, lora_r=2, lr=1e-2), datasets=("strong", "control"),
    fixed=(0.5,), questions=2, max_new_tokens=3,
)  # fmt: skip


def _small_probe(lm: LoadedModel) -> dict[str, object]:
    """The capability probe on a few questions and texts: the full one is slow on byte-level tokens."""
    mc = multiple_choice(lm, load_questions()[:4])
    return {"mc": mc.to_dict(), "perplexity": perplexity(lm, ["A short text.", "Another plain line."])}


def _maker(folder: Path, made: list[str]):  # type: ignore[no-untyped-def]
    def make(kind: str) -> Path:
        made.append(kind)
        path = folder / f"{kind}.jsonl"
        word = "cruel" if kind == "strong" else "kind"
        convs = [
            [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A {word} reply {i}."}]
            for i in range(6)
        ]
        write_chat_jsonl(path, convs)
        return path

    return make


def test_every_condition_is_measured_and_a_rerun_resumes(tmp_path: Path) -> None:
    lm: LoadedModel = tiny("llama")
    vec = random_vector(lm, trait="evil", scale=0.3).with_meta(extra={"recommended_layer": 2})
    made: list[str] = []
    spec = load_trait("evil")
    res = run_prevent_experiment(
        lm, spec, vec, "v.safetensors", tmp_path / "x", _maker(tmp_path, made), CFG, capability=_small_probe
    )
    names = [
        "base",
        "plain:control",
        "plain:strong",
        "prevent:auto",
        "prevent:0.5",
        "ablate",
        "steer:inference",
    ]
    assert list(res["conditions"]) == names
    assert set(res["table"]) == set(names) and res["table"]["base"]["shift"] == 0
    assert res["table"]["prevent:0.5"]["coef"] == 0.5 and res["conditions"]["prevent:auto"]["auto_search"]
    assert res["table"]["steer:inference"]["coef"] <= 0
    for name in names[1:-1]:
        assert (tmp_path / "x" / "adapters" / name.replace(":", "-") / "adapter_config.json").is_file()
    # The model is the base model again: no LoRA layers left behind.
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    # A rerun with the same settings measures nothing again.
    again = run_prevent_experiment(
        lm, spec, vec, "v.safetensors", tmp_path / "x", _maker(tmp_path, made), CFG
    )
    assert again["table"] == res["table"]
    assert json.loads((tmp_path / "x" / RESULT_NAME).read_text())["table"] == res["table"]
    # Choosing fewer conditions keeps the finished ones (only settings that change a measurement reset).
    n_made = len(made)
    fewer = replace(CFG, prevent=False, ablate=False)
    kept = run_prevent_experiment(
        lm, spec, vec, "v.safetensors", tmp_path / "x", _maker(tmp_path, made), fewer
    )
    assert kept["table"] == res["table"] and len(made) == n_made
    page = write_prevent_report(tmp_path / "x").read_text(encoding="utf-8")
    assert "prevent:auto" in page and "data:image/png;base64," in page


def test_checks_and_pearson_from_a_table() -> None:
    rows = {
        "plain:strong": {"shift": 4.0, "expression": 10.0, "perplexity": 5.0, "mc_prob": 0.4},
        "plain:control": {"shift": 0.5, "expression": 1.0, "perplexity": 5.0, "mc_prob": 0.4},
        "prevent:auto": {"shift": 0.5, "expression": 3.0, "perplexity": 5.2, "mc_prob": 0.4},
        "steer:inference": {"shift": -2.0, "expression": 3.0, "perplexity": 7.0, "mc_prob": 0.3},
    }
    c = checks(rows)
    assert c["trait_set_beats_control"] and c["auto_shift_within_half"]
    assert c["auto_expression_gain_cut"] == pytest.approx(0.7)
    assert c["auto_perplexity_ratio"] == pytest.approx(1.04)
    assert c["prevent_keeps_capability_better"]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2], [2, 4]) is None and pearson([1, 1, 1], [1, 2, 3]) is None
