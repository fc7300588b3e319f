"""Integration: the quick pipeline on the embedded model yields a vector that separates held-out answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.activations import capture_activations, response_mean
from personavec.core.models import load_model
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import auroc

pytestmark = pytest.mark.integration


HANDWRITTEN = Path(__file__).parent.parent / "bench" / "data" / "heldout" / "evil.jsonl"


def test_quick_extract_evil_separates_handwritten_answers(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["extract", "evil", "--quick", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    layer = summary["recommended_layer"]
    assert 12 <= layer <= 27  # the rule's default candidates: 40-90 % of 30 blocks
    assert summary["quality"]["filter"] == "absolute" and summary["layer_choice"]["layer"] == layer
    vector = PersonaVector.load(tmp_path / "run" / "vector.safetensors")
    # Independent ground truth: 12 + 12 hand-written answers (evil or kind), read without a system prompt.
    rows = [json.loads(line) for line in HANDWRITTEN.read_text().splitlines()]
    convs = [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in rows
    ]
    acts = capture_activations(load_model(), convs, layers=[layer], poolings=[response_mean])
    scores = acts.at("response_mean", layer) @ (vector.at(layer) / vector.at(layer).norm())
    # A quick vector from 7 + 10 kept answers: 0.80 when measured; chance is 0.5.
    assert auroc(scores, torch.tensor([r["label"] for r in rows])) >= 0.75
    assert vector.meta.trait == "evil" and vector.meta.extra["recommended_layer"] == layer
    assert vector.meta.n_positive >= 2 and vector.meta.n_negative >= 2
