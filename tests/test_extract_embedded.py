"""Integration: the quick pipeline on the embedded model yields a vector that separates held-out answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.vectors import PersonaVector

pytestmark = pytest.mark.integration


def test_quick_extract_evil_separates_heldout_answers(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["extract", "evil", "--quick", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    layer = summary["recommended_layer"]
    assert 1 <= layer <= 30
    assert summary["recommended_layer_auroc"] >= 0.8, summary["evaluation"]["response_mean"]
    vector = PersonaVector.load(tmp_path / "run" / "vector.safetensors")
    assert vector.meta.trait == "evil" and vector.meta.extra["recommended_layer"] == layer
    assert vector.meta.n_positive >= 2 and vector.meta.n_negative >= 2
