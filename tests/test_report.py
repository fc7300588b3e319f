"""The HTML report: optional summary keys (vector quality, layer choice) render when present."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from personavec.reports import write_report

LAYERS = [1, 2, 3, 4]
WARNINGS = ["only 12 positive answers kept (< 20)", "held-out AUROC is 0.71: the trait separates weakly"]


def _summary(**extra: Any) -> dict[str, Any]:
    ev = {"layers": LAYERS, "auroc": [0.5, 0.8, 0.7, 0.6], "effect_size": [0.1, 1.2, 0.9, 0.4], "labels": "t"}
    return {
        "trait": "evil",
        "model": {"id": "tiny-llama"},
        "counts": {"total_pos": 20, "kept_pos": 12, "total_neg": 20, "kept_neg": 19},
        "recommended_layer": 2,
        "evaluation": {"response_mean": ev},
        "trait_judge": "embedding",
        "coherence_judge": "perplexity",
        **extra,
    }


def _report(tmp_path: Path, summary: dict[str, Any]) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return write_report(tmp_path).read_text(encoding="utf-8")


def test_report_shows_quality_and_layer_choice(tmp_path: Path) -> None:
    quality = {
        "level": "weak",
        "warnings": WARNINGS,
        "kept": {"positive": 12, "negative": 19},
        "heldout_auroc": 0.7123,
        "heldout_effect_size": None,
        "filter": "trait score >= 50 and coherence >= 50",
    }
    layer_choice = {
        "rule": "The layer with the largest held-out effect size among the middle third.",
        "layer": 2,
        "candidates": [2, 3],
        "scores": {"effect_size": [0.1, 1.2, 0.9, None], "auroc": [0.5, 0.8, 0.7, 0.6]},
    }
    page = _report(tmp_path, _summary(quality=quality, layer_choice=layer_choice))
    box = page[page.index("id='quality'") : page.index("id='trait'")]  # near the top, before the trait
    assert ">weak</span>" in box and "#c62828" in box  # the level, in red
    for text in WARNINGS:
        assert f"<li>{text.replace('<', '&lt;')}</li>" in box
    assert "12 positive, 19 negative" in box and "AUROC 0.712" in box and "effect size -" in box
    assert "trait score &gt;= 50 and coherence &gt;= 50" in box
    assert layer_choice["rule"] in page and "candidates: 2, 3" in page
    assert re.search(r"<img alt='layer choice scores' src='data:image/png;base64,[A-Za-z0-9+/=]+'>", page)
    assert (tmp_path / "layer_choice.png").stat().st_size > 1000
    assert page.count("data:image/png;base64,") == 2  # with the per-layer separation plot

    # Other levels get their own colour; a box with only a level still renders.
    assert "#2e7d32" in _report(tmp_path / "good", _summary(quality={"level": "good"}))
    assert "#b26a00" in _report(tmp_path / "usable", _summary(quality={"level": "usable"}))


def test_report_without_quality_or_layer_choice(tmp_path: Path) -> None:
    page = _report(tmp_path, _summary())
    assert "id='separation'" in page and "id='dose-response'" in page
    assert "id='quality'" not in page and "id='layer-choice'" not in page
    assert "Vector quality" not in page and not (tmp_path / "layer_choice.png").exists()
    assert page.count("data:image/png;base64,") == 1
