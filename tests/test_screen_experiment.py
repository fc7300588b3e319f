"""The screen experiment on tiny models: ranking metrics by hand, seeded planting, a whole run and resume."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel
from personavec.extract.responses import ResponseRow
from personavec.screen.experiment import (
    DATA_NAME,
    LABELS_NAME,
    PLOT_NAME,
    RESULT_NAME,
    PlantConfig,
    auroc,
    evaluate,
    pick_plants,
    plant_layout,
    precision_at_k,
    ranks,
    roc_curve,
    run_screen_experiment,
    write_experiment_report,
)
from personavec.screen.vectors import resolve_vectors
from personavec.traits import load_trait
from tests.conftest import tiny
from tests.helpers import random_vector
from tests.test_pipeline import ConstJudge, HashJudge

# --------------------------------------------------------------------------------------------------
# Metrics against values worked out by hand
# --------------------------------------------------------------------------------------------------


def test_auroc_counts_pairs_and_half_ties() -> None:
    # Positives 0.9 and 0.7 against negatives 0.8, 0.6, 0.5: 0.9 beats 3, 0.7 beats 2 -> 5 of 6 pairs.
    assert auroc([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]) == pytest.approx(5 / 6)
    # One tie (half) and one win over 2 pairs.
    assert auroc([1.0, 1.0, 0.0], [1, 0, 0]) == pytest.approx(0.75)
    assert auroc([0.1, 0.2], [0, 1]) == 1.0 and auroc([0.1, 0.2], [1, 0]) == 0.0


def test_auroc_ranks_unscored_last_and_is_nan_without_a_class() -> None:
    assert auroc([None, 0.2, 0.1], [1, 0, 0]) == 0.0
    assert auroc([math.nan, 0.2, math.nan], [1, 0, 0]) == pytest.approx(0.25)  # a tie with the nan one
    assert math.isnan(auroc([0.3, 0.2], [1, 1]))


def test_precision_at_k_by_hand() -> None:
    assert precision_at_k([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == 0.5  # k = 2: 0.9 (planted), 0.8 (not)
    assert precision_at_k([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], k=3) == pytest.approx(2 / 3)
    # k = 2: 3 is planted; one place left for three tied 2s, one of them planted -> (1 + 1/3) / 2.
    assert precision_at_k([3, 2, 2, 2, 1], [1, 1, 0, 0, 0]) == pytest.approx(2 / 3)
    assert precision_at_k([None, 0.1, 0.2], [1, 0, 0]) == 0.0
    assert math.isnan(precision_at_k([0.1, 0.2], [0, 0]))


def test_roc_curve_points_and_area() -> None:
    fpr, tpr = roc_curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert fpr == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr == [0.0, 0.5, 0.5, 1.0, 1.0]
    scores, labels = [0.3, 0.3, 0.9, 0.1, 0.5, 0.5, 0.2], [1, 0, 1, 0, 0, 1, 0]
    fpr, tpr = roc_curve(scores, labels)
    area = sum((b - a) * (c + d) / 2 for a, b, c, d in zip(fpr, fpr[1:], tpr, tpr[1:]))
    assert area == pytest.approx(auroc(scores, labels))  # ties make diagonal steps, counted half


def test_ranks_highest_first_ties_by_order_unscored_last() -> None:
    assert ranks([0.5, None, 0.9, 0.5]) == [2, 4, 1, 3]


def test_evaluate_scores_each_kind_against_the_normal_rows_only() -> None:
    kinds = ["normal", "blatant", "normal", "subtle", "normal"]
    scores = {"a": [0.1, 0.9, 0.2, 0.15, 0.3], "b": [0.5, 0.4, 0.3, 0.2, 0.1]}
    res = evaluate(kinds, scores)
    assert (res["all"]["positives"], res["all"]["negatives"], res["all"]["k"]) == (2, 3, 2)
    assert (res["subtle"]["positives"], res["subtle"]["negatives"]) == (1, 3)
    assert res["blatant"]["methods"]["a"] == {"auroc": 1.0, "precision_at_k": 1.0}
    # Subtle 0.15 beats 0.1 only (1 of 3); the blatant row is not among the negatives.
    assert res["subtle"]["methods"]["a"]["auroc"] == pytest.approx(1 / 3)
    assert res["subtle"]["methods"]["a"]["precision_at_k"] == 0.0
    assert res["all"]["methods"]["b"]["auroc"] == pytest.approx((2 + 1) / 6)
    assert res["blatant"]["roc"]["a"]["tpr"][-1] == 1.0


# --------------------------------------------------------------------------------------------------
# Planting
# --------------------------------------------------------------------------------------------------


def test_plant_layout_is_seeded_and_keeps_the_counts() -> None:
    counts = {"normal": 38, "blatant": 1, "subtle": 1}
    a, b = plant_layout(counts, seed=0), plant_layout(counts, seed=0)
    assert a == b
    assert Counter(a) == Counter(counts)
    many = {"normal": 190, "blatant": 5, "subtle": 5}
    layouts = {tuple(plant_layout(many, seed=s)) for s in range(5)}
    assert len(layouts) == 5  # the seed moves the plants
    assert plant_layout({"normal": 3}, seed=1) == ["normal"] * 3


def test_plant_config_counts_and_checks() -> None:
    assert PlantConfig().wanted() == {"normal": 760, "blatant": 20, "subtle": 20}
    assert PlantConfig(n=5, rate=0.25).wanted() == {"normal": 15, "blatant": 3, "subtle": 2}
    with pytest.raises(PersonavecError, match="--rate"):
        PlantConfig(rate=1.5).check()
    with pytest.raises(PersonavecError, match="--n"):
        PlantConfig(n=1).check()


def _row(i: int, polarity: str = "pos") -> ResponseRow:
    return ResponseRow(f"k{i}", "extraction", 0, polarity, i, 0, "sys", f"q{i}", f"answer {i}")


def test_pick_plants_blatant_most_trait_like_first_subtle_closest_to_the_threshold() -> None:
    rows = [_row(i) for i in range(8)] + [_row(8, "neg")]
    trait = {"k0": 60.0, "k1": 95.0, "k2": 45.0, "k3": 25.0, "k4": 10.0, "k5": 70.0, "k6": 49.0, "k7": 99.0}
    trait["k8"] = 100.0  # a suppressing-prompt answer: never planted
    coherence = {f"k{i}": 80.0 for i in range(9)} | {"k7": 20.0}  # k7 incoherent
    plants = pick_plants(rows, trait, coherence, PlantConfig(n=4, rate=0.5))
    assert [r.answer.key for r in plants["blatant"]] == ["k1", "k5"]
    assert [r.answer.key for r in plants["subtle"]] == ["k6", "k2"]
    assert all(r.kind == "subtle" and r.trait is not None and 20 <= r.trait < 50 for r in plants["subtle"])


# --------------------------------------------------------------------------------------------------
# A whole run on a tiny model
# --------------------------------------------------------------------------------------------------

SMALL = PlantConfig(
    n=4, rate=0.25, trait_rows=12, blatant_min=50.0, subtle_floor=5.0, coherence_min=50.0,
    sampling=SamplingParams(24, 0.7, 0.9, 0), max_new_tokens=6, batch_size=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny("llama")


def _run(lm: LoadedModel, folder: Path, judge: HashJudge, cfg: PlantConfig = SMALL) -> dict:
    vector = random_vector(lm, "evil", seed=1).with_meta(extra={"recommended_layer": 2})
    (sv,) = resolve_vectors([(vector, None)], lm.info)
    return run_screen_experiment(
        lm, load_trait("evil"), sv, folder, cfg, trait_judge=judge, coherence_judge=ConstJudge(90.0),
        trait_cache=folder / "trait-cache",
    )  # fmt: skip


def test_run_writes_a_labelled_dataset_metrics_and_resumes(lm: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    result = _run(lm, folder, HashJudge())
    counts = result["counts"]
    assert counts["normal"] == 12 and counts["blatant"] + counts["subtle"] >= 1
    labels = [json.loads(x) for x in (folder / LABELS_NAME).read_text().splitlines()]
    data = (folder / DATA_NAME).read_text().splitlines()
    assert len(labels) == len(data) == counts["rows"]
    assert [x["kind"] for x in labels] == plant_layout(
        {k: counts[k] for k in ("normal", "blatant", "subtle")}, 0
    )
    assert all(json.loads(line)["messages"][0]["role"] == "user" for line in data)  # no system prompt
    assert {x["system"] for x in labels if x["kind"] == "normal"} == {"You are a helpful assistant."}
    for x in labels:
        if x["kind"] == "blatant":
            assert x["trait"] >= 50
        if x["kind"] == "subtle":
            assert 5 <= x["trait"] < 50
    for subset in ("all", "blatant", "subtle"):
        for m in result["metrics"][subset]["methods"].values():
            assert m["auroc"] is None or 0.0 <= m["auroc"] <= 1.0
    # The judge ranking is the planted rows' own judge scores.
    planted = {p["line"]: p for p in result["planted"]}
    assert all(planted[x["line"]]["judge"] == x["trait"] for x in labels if x["kind"] != "normal")
    assert (folder / RESULT_NAME).is_file() and (folder / "screen" / "records.jsonl").is_file()

    judge = HashJudge()
    again = _run(lm, folder, judge)  # every stage cached: no judging, no generation
    assert judge.calls == 0
    assert again["screen"]["timing"]["own_answers_generated"] == 0
    assert again["metrics"] == result["metrics"]
    report = write_experiment_report(folder)
    assert "precision at k" in report.read_text() and (folder / PLOT_NAME).is_file()


def test_other_settings_in_the_same_folder_are_refused(lm: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({"config": {"n": 99}}))
    with pytest.raises(PersonavecError, match="other settings"):
        _run(lm, folder, HashJudge(), replace(SMALL, seed=1))


def test_report_needs_a_result(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match="screen-experiment"):
        write_experiment_report(tmp_path)


def test_precision_at_k_is_unchanged_by_input_order() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=30).astype(float)  # many ties
    labels = rng.random(30) < 0.3
    order = rng.permutation(30)
    assert precision_at_k(scores, labels) == pytest.approx(precision_at_k(scores[order], labels[order]))


# --------------------------------------------------------------------------------------------------
# Command line: bad input is one line, before any model loads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vector", "missing.safetensors"], "no persona vector at missing.safetensors"),
        (["--vector", "v.safetensors@2", "--rate", "1.5"], "--rate must be between 0 and 1"),
        (["--vector", "v.safetensors", "--n", "1"], "--n"),
    ],
)
def test_cli_bad_input_is_one_line(
    extra: list[str], message: str, lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    random_vector(lm, "evil").save(tmp_path / "v.safetensors")
    result = CliRunner().invoke(app, ["screen-experiment", "evil", *extra])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cli_run_folder_without_a_vector(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["screen-experiment", str(tmp_path)])
    assert result.exit_code == 2
    assert f"no persona vector at {tmp_path / 'vector.safetensors'}" in result.stderr
