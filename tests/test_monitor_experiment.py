"""The monitoring experiments: ladder, many-shot prompts, Pearson r, resuming, report and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.activations import capture_activations, last_prompt
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.monitor.experiment import (
    MIN_LADDER,
    ExperimentConfig,
    check_ladder,
    many_shot_conversation,
    pearson,
    run_monitor_experiment,
    template_ladder,
    trait_examples,
)
from personavec.monitor.monitoring import monitor
from personavec.reports import write_report
from personavec.traits import load_trait
from tests.conftest import make_model, make_tokenizer
from tests.helpers import random_vector

CFG = ExperimentConfig(n_questions=2, rollouts=1, sampling=SamplingParams(3, 0.7, 0.9, 0), shots=(0, 1, 2))


def _vector(lm: LoadedModel) -> PersonaVector:
    return random_vector(lm, trait="evil").with_meta(extra={"recommended_layer": 2})


def test_ladder_is_ordered_and_ends_with_the_strongest_prompt() -> None:
    for name in ("evil", "humorous", "sycophantic"):
        spec = load_trait(name)
        ladder = template_ladder(spec)
        assert len(ladder) >= MIN_LADDER and len(set(ladder)) == len(ladder)
        assert ladder[-1] == spec.pairs[0].positive and ladder[0] == spec.pairs[0].negative
        desc = spec.description.rstrip(".").lower()
        assert ladder[1] == spec.pairs[1].negative and ladder[-2] == spec.pairs[1].positive
        assert all(desc[5:40] in p.lower() for p in ladder[4:7])
        assert not any("never" in p.lower() or "avoid" in p.lower() for p in ladder[2:7])  # persona rungs
    with pytest.raises(PersonavecError, match="at least 8"):
        check_ladder([f"p{i}" for i in range(7)])
    with pytest.raises(PersonavecError, match="repeats"):
        check_ladder(["a"] * 8)


def test_pearson_on_known_data() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    y = [1.0, 3.0, 2.0, 5.0, 4.0]
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert pearson(x, y) == pytest.approx(0.8)  # by hand: sum(dx*dy) = 8, sum(dx^2) = sum(dy^2) = 10
    assert pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    # Missing values are dropped pairwise, not treated as zero.
    assert pearson([*x, 9.0], [*y, None]) == pytest.approx(0.8)
    assert pearson([*x, 9.0], [*y, math.nan]) == pytest.approx(0.8)
    assert pearson([1.0, 2.0], [1.0, 2.0]) is None and pearson(x, [1.0] * 5) is None


def test_many_shot_has_exactly_k_exchanges(tmp_path: Path) -> None:
    spec = load_trait("evil")
    examples, source = trait_examples(spec, None, 8)
    assert len(examples) == 8 and "anchor" in source
    assert examples[0][1] == spec.anchors.positive[0]
    for k in (0, 1, 2, 4, 8):
        conv = many_shot_conversation(examples, "Q?", k)
        assert [m["role"] for m in conv] == ["user", "assistant"] * k + ["user"]
        assert conv[-1]["content"] == "Q?"
        assert [m["content"] for m in conv[1::2]][:k] == [a for _q, a in examples[:k]]
    with pytest.raises(PersonavecError):
        many_shot_conversation(examples, "Q?", 9)
    # Kept positive answers of a run folder come first: trait >= 50 and coherent only.
    rows = [
        {"key": "a", "split": "extraction", "polarity": "pos", "question": "q1", "answer": "bad one"},
        {"key": "b", "split": "extraction", "polarity": "pos", "question": "q2", "answer": "low trait"},
        {"key": "c", "split": "extraction", "polarity": "neg", "question": "q3", "answer": "negative"},
    ]
    scores = [
        {"key": "s1", "response_key": "a", "kind": "trait", "score": 90.0},
        {"key": "s2", "response_key": "b", "kind": "trait", "score": 10.0},
        {"key": "s3", "response_key": "c", "kind": "trait", "score": 90.0},
    ]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    examples, source = trait_examples(spec, tmp_path, 3)
    assert examples[0] == ("q1", "bad one") and examples[1][1] == spec.anchors.positive[0]
    assert source.startswith("1 kept positive")


class _CountingJudge:
    name = "count:v1"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, items: list) -> list[float | None]:  # type: ignore[type-arg]
        self.calls += 1
        return [float(len(it.answer)) for it in items]


def test_experiment_records_monitor_projection_and_resumes(
    tmp_path: Path, llama_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_trait("evil")
    vec = _vector(llama_lm)
    judge = _CountingJudge()
    result = run_monitor_experiment(llama_lm, spec, vec, tmp_path, config=CFG, judge=judge)
    ladder, ms = result["ladder"], result["many_shot"]
    assert len(ladder["samples"]) == len(template_ladder(spec)) * 2 and len(ms["samples"]) == 3 * 2
    assert result["measure"].startswith("read-back and judge")
    # Ground truth: capture_activations' last_prompt pooling projected on the unit direction.
    convs = [
        [{"role": "system", "content": ladder["prompts"][s["level"]]}, {"role": "user", "content": q}]
        for s in ladder["samples"]
        for q in [spec.evaluation_questions[s["question_index"]]]
    ]
    acts = capture_activations(llama_lm, convs, layers=[2], poolings=(last_prompt,))
    unit = vec.at(2) / vec.at(2).norm()
    truth = (acts.at("last_prompt", 2).float() @ unit).tolist()
    got = [s["projection"] for s in ladder["samples"]]
    assert got == pytest.approx(truth, abs=1e-4)
    assert got == pytest.approx([r.projection for r in monitor(llama_lm, vec, convs)], abs=1e-5)
    assert np.std(got) > 0, "different system prompts must give different projections"
    # r values are recomputed from the samples, and merged into summary.json.
    r = ladder["r"]["readback"]["samples"]
    assert r == pytest.approx(pearson(got, [s["readback"] for s in ladder["samples"]]))
    assert ladder["r"]["judge"]["samples"] == pytest.approx(
        pearson(got, [s["judge_score"] for s in ladder["samples"]])
    )
    # Within questions: each question's own mean removed from both numbers before correlating.
    qs = np.array([s["question_index"] for s in ladder["samples"]])
    rb = np.array([s["readback"] for s in ladder["samples"]])
    x = np.array(got)
    for q in set(qs.tolist()):
        x[qs == q] -= x[qs == q].mean()
        rb[qs == q] -= rb[qs == q].mean()
    assert ladder["r"]["readback"]["within_questions"] == pytest.approx(float(np.corrcoef(x, rb)[0, 1]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["monitoring"]["ladder"] == ladder["r"]
    assert (tmp_path / "monitor_ladder.png").stat().st_size > 1000
    assert (tmp_path / "monitor_many_shot.png").is_file()

    # Resume: nothing is generated, projected or judged again, and the numbers are identical.
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("recomputed a cached sample")

    monkeypatch.setattr("personavec.monitor.experiment.generate", boom)
    monkeypatch.setattr("personavec.monitor.experiment.monitor", boom)
    calls = judge.calls
    again = run_monitor_experiment(llama_lm, spec, vec, tmp_path, config=CFG, judge=judge)
    assert judge.calls == calls and again["ladder"]["samples"] == ladder["samples"]
    # Another sampling setting is new work.
    with pytest.raises(AssertionError, match="recomputed"):
        run_monitor_experiment(
            llama_lm, spec, vec, tmp_path, config=ExperimentConfig(n_questions=2, sampling=SamplingParams(4))
        )


def test_report_gets_a_monitoring_section(tmp_path: Path, llama_lm: LoadedModel) -> None:
    spec = load_trait("evil")
    run_monitor_experiment(llama_lm, spec, _vector(llama_lm), tmp_path, config=CFG)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "id='monitoring'" in page and "graded" in page
    assert page.count("data:image/png;base64,") >= 2
    assert "http://" not in page and "https://" not in page


def test_cli_json_on_a_tiny_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    lm = LoadedModel.from_hf(make_model("llama"), make_tokenizer(), model_id=str(folder))
    run = tmp_path / "run"
    _vector(lm).with_meta(model_id=str(folder)).save(run / "vector.safetensors")
    args = ["monitor-experiment", str(run), "--model", str(folder), "--questions", "2"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layer"] == 2 and doc["measure"] == "read-back"
    assert set(doc["ladder"]["r"]) == {"readback"} and len(doc["many_shot"]["levels"]) == 5
    assert all(isinstance(s["projection"], float) for s in doc["ladder"]["samples"])
    assert (run / "monitor_experiment.json").is_file()
    # No vector: one clear line telling what to run.
    result = CliRunner().invoke(app, ["monitor-experiment", str(tmp_path / "nothing"), "--json"])
    assert result.exit_code == 2
    assert "personavec extract" in result.stderr and "first" in result.stderr


def test_zero_spread_vector_is_refused(llama_lm: LoadedModel, tmp_path: Path) -> None:
    vec = PersonaVector(torch.zeros_like(_vector(llama_lm).data), _vector(llama_lm).meta)
    with pytest.raises(PersonavecError, match="zero"):
        run_monitor_experiment(llama_lm, load_trait("evil"), vec, tmp_path, config=CFG)


def test_llm_author_is_validated_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from personavec.core.llm import Completion
    from personavec.monitor.experiment import llm_ladder

    replies = [
        json.dumps({"prompts": [f"rung {i}" for i in range(7)]}),  # too short: sent back with the problem
        json.dumps({"prompts": [f"rung {i}" for i in range(9)]}),
    ]
    seen: list[list[dict[str, str]]] = []

    class Fake:
        name = "openai:fake"

        def complete(self, messages: list[dict[str, str]], **_k: object) -> Completion:
            seen.append(list(messages))
            return Completion(replies[len(seen) - 1])

    monkeypatch.setattr("personavec.core.llm.make_client", lambda _spec: Fake())
    ladder = llm_ladder(load_trait("evil"), "openai:fake")
    assert ladder == [f"rung {i}" for i in range(9)]
    assert "at least 8" in seen[1][-1]["content"]
