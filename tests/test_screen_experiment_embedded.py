"""Integration: ``personavec screen-experiment --quick`` on the embedded model, from a fresh cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.models import load_model
from personavec.steer.demo import demo_vector

pytestmark = pytest.mark.integration


def test_quick_experiment_plants_screens_scores_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh answer cache, so the trait answers are generated here as on a CI machine.
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    vector = tmp_path / "cruel.safetensors"
    demo_vector(load_model(None)).save(vector)  # hand-written cruel-vs-kind contrasts, no extraction run
    out = tmp_path / "exp"
    args = ["screen-experiment", "evil", "--vector", f"{vector}@20", "--quick", "--out", str(out), "--json"]
    t0 = time.perf_counter()
    first = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - t0
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    counts = doc["counts"]
    assert counts["rows"] == counts["normal"] + counts["blatant"] + counts["subtle"]
    assert counts["normal"] == 32 and counts["blatant"] + counts["subtle"] >= 4
    for subset in ("all", "blatant", "subtle"):
        entry = doc["metrics"][subset]
        assert entry["k"] == entry["positives"]
        for method in ("projection_difference", "projection", "judge"):
            m = entry["methods"][method]
            assert m["auroc"] is None or 0.0 <= m["auroc"] <= 1.0
    assert doc["settings"]["trait_judge"].startswith("embedding:")
    for name in ("data.jsonl", "planted.jsonl", "report.html", "screen_experiment.png", "screen/report.html"):
        assert (out / name).is_file(), name
    # CI budget for --quick: 3 minutes on two quiet cores (more when other jobs share them).
    print(f"screen-experiment --quick: {seconds:.0f}s")

    again = CliRunner().invoke(app, args)  # resumes: every answer, score and reading is cached
    assert again.exit_code == 0, again.stderr
    redo = json.loads(again.stdout)
    assert redo["metrics"] == doc["metrics"]
    assert redo["screen"]["timing"]["own_answers_generated"] == 0
