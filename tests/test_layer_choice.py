"""Filtering strategies, the layer-choice rule and the quality signal (tiny models, hand-made scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from scipy.stats import spearmanr
from typer.testing import CliRunner

from personavec.cli import app
from personavec.cli.extract import summary_table
from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import LayerEvaluation, cohens_d
from personavec.extract.filtering import (
    FilterResult,
    Thresholds,
    absolute,
    auto,
    by_polarity,
    make_filter,
    relative,
)
from personavec.extract.layer_choice import LadderReading, choose_layer, persona_ladder, read_ladder, smooth
from personavec.extract.pipeline import RunConfig, assess_quality, run_extraction
from personavec.extract.responses import ResponseRow
from personavec.traits import load_trait

from .conftest import tiny
from .helpers import random_vector
from .test_pipeline import SAMPLED, ConstJudge


def _twins(n: int, pos_scores: list[float], neg_scores: list[float]) -> tuple[list[ResponseRow], dict, dict]:
    """n matched pairs (same question and rollout), with given trait scores; all coherent."""
    rows, trait = [], {}
    for i in range(n):
        for pol, score in (("pos", pos_scores[i]), ("neg", neg_scores[i])):
            key = f"{pol}{i}"
            rows.append(ResponseRow(key, "extraction", 0, pol, i, 0, f"sys {pol}", f"q{i}?", f"a {key}"))
            trait[key] = score
    return rows, trait, {r.key: 90.0 for r in rows}


def test_relative_filter_keeps_pairs_that_differ_by_the_margin() -> None:
    # A subtle trait: every absolute score is low, but the trait-prompted answer wins most pairs.
    rows, trait, coh = _twins(4, [20, 15, 12, 30], [5, 10, 11, 2])
    res = relative(Thresholds(margin=6))(rows, trait, coh)
    assert [r.key for r in res.positive] == ["pos0", "pos3"] and [r.key for r in res.negative] == [
        "neg0",
        "neg3",
    ]
    assert res.mode == "relative" and res.counts["dropped_trait_pos"] == 2
    # An incoherent twin takes its partner with it: there is nothing left to compare against.
    coh["neg0"] = 10.0
    res = relative(Thresholds(margin=6))(rows, trait, coh)
    assert [r.key for r in res.positive] == ["pos3"]
    assert res.counts["dropped_incoherent_neg"] == 1 and res.counts["dropped_trait_pos"] == 3


def test_auto_falls_back_to_polarity_and_says_why() -> None:
    rows, trait, coh = _twins(10, [60.0] * 10, [10.0] * 10)
    assert auto(Thresholds(min_kept=5))(rows, trait, coh).mode == "absolute"
    rows, trait, coh = _twins(10, [60.0] * 4 + [25.0] * 6, [5.0] * 10)  # only 4 pass 50: too few
    res = auto(Thresholds(min_kept=5))(rows, trait, coh)
    assert res.mode == "polarity" and len(res.positive) == len(res.negative) == 10
    assert res.notes == ("the absolute filter kept only 4 positive and 10 negative answers (want 5 a side)",)
    assert by_polarity()(rows, trait, coh).counts == res.counts
    assert relative()(rows, trait, coh).mode == "relative"  # a choice, not a fallback


def test_make_filter_names_and_errors() -> None:
    rows, trait, coh = _twins(3, [60.0] * 3, [10.0] * 3)
    assert make_filter("absolute")(rows, trait, coh).mode == "absolute"
    with pytest.raises(PersonavecError, match="unknown filter 'strict': choose one of auto, absolute"):
        make_filter("strict")


def _evaluation(aucs: list[float]) -> LayerEvaluation:
    layers = list(range(1, len(aucs) + 1))
    return LayerEvaluation(layers, aucs, [1.0] * len(aucs), 5, 5, "judge-confirmed", 1)


def test_choose_layer_takes_the_candidate_that_orders_the_ladder_best() -> None:
    aucs = [1.0, 1.0, 0.80, 0.97, 0.96, 0.99]
    rho = [0.95, 0.2, 0.5, 0.9, 0.7, 0.9]
    sep = [3.0, 0.1, 4.0, 2.0, 2.5, 2.2]
    choice = choose_layer(_evaluation(aucs), LadderReading(rho, sep), candidates=range(2, 7))
    # Layer 3 separates the two ends most (d 4.0) but orders the rungs worse than 4 and 6, which tie on
    # Spearman; the smoothed separation breaks the tie: 4 has (4.0 + 2.0 + 2.5) / 3, 6 (2.5 + 2.2) / 2.
    assert choice.layer == 4 and "the given layers" in choice.rule
    assert choice.scores["ladder_spearman"] == rho and choice.scores["prompt_separation"] == sep
    assert choice.scores["smoothed_separation"][3] == pytest.approx((4.0 + 2.0 + 2.5) / 3)
    assert choice.scores["heldout_auroc"] == aucs  # recorded beside, not voting
    assert choose_layer(_evaluation(aucs), LadderReading(rho, sep), candidates=[1, 2]).layer == 1
    # By default only the middle-to-late blocks compete: 40-90 % of 6 blocks is layers 3-5.
    default = choose_layer(_evaluation(aucs), LadderReading(rho, sep))
    assert default.candidates == [3, 4, 5] and default.layer == 4
    assert "layers 3-5 (40%-90% of the depth)" in default.rule
    # An undefined Spearman never wins; AUROC breaks a tie of both.
    flat = LadderReading([None, None, 0.5, 0.5, 0.5, None], [1.0] * 6)
    assert choose_layer(_evaluation(aucs), flat, candidates=[1, 3, 4, 5]).layer == 4
    with pytest.raises(PersonavecError, match="layer 9 is out of range"):
        choose_layer(_evaluation(aucs), LadderReading(rho, sep), candidates=[9])


def test_persona_ladder_rises_from_suppressing_to_eliciting_prompts() -> None:
    spec = load_trait("impolite")
    rungs = persona_ladder(spec, n_pairs=2)
    assert rungs[0] == [p.negative for p in spec.pairs[:2]] and rungs[-1] == [
        p.positive for p in spec.pairs[:2]
    ]
    assert rungs[2:4] == [["You are a slightly impolite assistant."], ["You are a very impolite assistant."]]
    assert len(persona_ladder(spec)[0]) == len(spec.pairs)


def test_smooth_skips_missing_values() -> None:
    assert smooth([1.0, None, 3.0]) == [1.0, 2.0, 3.0]
    assert smooth([None]) == [None]


def test_read_ladder_matches_transformers_hidden_states() -> None:
    lm = tiny("qwen2")
    v = random_vector(lm, seed=4)
    rungs = [["You are kind."], ["You are a helpful assistant.", "You are plain."], ["You are cruel."]]
    questions = ["Question one?", "Question two?"]
    got = read_ladder(lm, v, rungs, questions)
    # Ground truth: the last prompt token of each (system, user) prompt, from transformers' own output.
    proj, levels = [], []
    for level, rung in enumerate(rungs):
        for system in rung:
            for q in questions:
                enc = encode(
                    lm.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": q}]
                )
                with torch.no_grad():
                    out = lm.backbone(input_ids=torch.tensor([enc.ids]), output_hidden_states=True)
                hs = out.hidden_states
                proj.append(
                    [
                        float(hs[layer][0, enc.prompt_len - 1] @ v.at(layer) / v.at(layer).norm())
                        for layer in (1, 2)
                    ]
                )
                levels.append(level)
    ends = [i for i, lv in enumerate(levels) if lv in (0, 2)]
    for i, layer in enumerate((1, 2)):  # l < L: our index equals hidden_states[l]
        column = [p[i] for p in proj]
        assert got.spearman[layer - 1] == pytest.approx(spearmanr(levels, column).statistic, abs=1e-6)
        want_d = cohens_d(
            torch.tensor([column[j] for j in ends]), torch.tensor([levels[j] // 2 for j in ends])
        )
        assert got.separation[layer - 1] == pytest.approx(want_d, rel=1e-4, abs=1e-4)
    assert len(got.spearman) == len(got.separation) == lm.info.n_blocks
    with pytest.raises(PersonavecError, match="two or more non-empty rungs"):
        read_ladder(lm, v, [["You are kind."], []], questions)


def test_quality_levels_and_warnings() -> None:
    rows, _, _ = _twins(12, [0] * 12, [0] * 12)
    pos, neg = [r for r in rows if r.polarity == "pos"], [r for r in rows if r.polarity == "neg"]
    strong = LayerEvaluation([1, 2], [0.7, 0.96], [0.5, 2.0], 6, 6, "judge-confirmed (thresholds)", 2)
    good = assess_quality(FilterResult(pos, neg, mode="absolute"), strong, 2)
    assert (
        good["level"] == "good"
        and good["warnings"] == []
        and good["kept"] == {"positive": 12, "negative": 12}
    )
    fell_back = FilterResult(pos[:5], neg[:5], mode="relative", notes=("the absolute filter kept only 0",))
    q = assess_quality(fell_back, strong, 2)
    assert q["level"] == "usable" and q["filter"] == "relative"
    text = " ".join(q["warnings"])
    assert "absolute filter kept only 0" in text and "relative filter" in text and "raise --rollouts" in text
    weak = assess_quality(FilterResult(pos, neg, mode="polarity"), strong, 1)
    assert weak["level"] == "weak" and any("AUROC 0.70" in w for w in weak["warnings"])


def test_a_weak_trait_still_gives_a_vector_with_a_warning(tmp_path: Path) -> None:
    """Absolute scores never pass 50 (the judge barely sees the trait): a vector anyway, with a warning."""
    lm = tiny("llama")
    spec = load_trait("evil")
    config = RunConfig(n_pairs=1, n_questions=10, eval_questions=4, sampling=SAMPLED,
                       thresholds=Thresholds(coherence_min=0, min_kept=5))  # fmt: skip

    class TwinJudge:
        name = "twin"

        def score(self, items: list) -> list[float | None]:  # type: ignore[type-arg]
            return [30.0 if i.answer in pos_answers else 5.0 for i in items]

    from personavec.core.store import JsonlStore
    from personavec.extract.pipeline import generate_run_answers

    rows, eval_rows = generate_run_answers(
        lm, spec, JsonlStore(tmp_path / "run" / "responses.jsonl"), config, lambda _l, _n: lambda _k: None
    )
    pos_answers = {r.answer for r in [*rows, *eval_rows] if r.polarity == "pos"}
    pos_answers -= {r.answer for r in [*rows, *eval_rows] if r.polarity == "neg"}
    result = run_extraction(
        lm, spec, tmp_path / "run", trait_judge=TwinJudge(), coherence_judge=ConstJudge(80.0), config=config
    )
    s = result.summary
    assert s["counts"]["filter"] == "polarity" and s["quality"]["filter"] == "polarity"
    assert any("absolute filter kept only 0 positive" in w for w in s["quality"]["warnings"])
    assert s["layer_choice"]["layer"] == s["recommended_layer"]
    scores = s["layer_choice"]["scores"]
    assert len(scores["ladder_spearman"]) == len(scores["prompt_separation"]) == lm.info.n_blocks
    saved = PersonaVector.load(tmp_path / "run" / "vector.safetensors")
    assert saved.recommended_layer == s["recommended_layer"] and "ladder" in saved.meta.extra["layer_rule"]
    assert saved.meta.extra["filter"] == "polarity"
    # Held-out labels still use the judge where they can: each answer against its twin.
    assert s["evaluation"]["response_mean"]["labels"].startswith("judge-confirmed relative")
    # With the paper's filter alone the same run dead-ends, and the error names the flags to change.
    with pytest.raises(PersonavecError, match="--min-trait / --max-trait"):
        run_extraction(
            lm, spec, tmp_path / "run", trait_judge=TwinJudge(), coherence_judge=ConstJudge(80.0),
            config=RunConfig(**{**config.__dict__, "filter": absolute(config.thresholds)}),
        )  # fmt: skip


def test_cli_extract_rejects_an_unknown_filter() -> None:
    res = CliRunner().invoke(app, ["extract", "evil", "--filter", "strict"])
    assert res.exit_code == 2
    assert "unknown filter 'strict'" in res.output and len(res.output.strip().splitlines()) == 1


def test_summary_json_is_plain_json(tmp_path: Path) -> None:
    lm = tiny("gpt2")
    config = RunConfig(n_pairs=1, n_questions=4, eval_questions=4, sampling=SAMPLED,
                       thresholds=Thresholds(coherence_min=0, min_kept=1))  # fmt: skip
    run_extraction(lm, load_trait("humorous"), tmp_path / "r", trait_judge=ConstJudge(60.0),
                   coherence_judge=ConstJudge(80.0), config=config)  # fmt: skip
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "filter" not in s["config"] and s["quality"]["level"] in ("good", "usable", "weak")
    # The table `extract` prints without --json: kept counts with the filter, the layer, quality, warnings.
    console = Console(record=True, width=200)
    console.print(summary_table(s, "humorous on tiny", tmp_path / "r"))
    text = console.export_text()
    assert "(polarity filter)" in text and f"{s['recommended_layer']} (why: layer_choice" in text
    assert "quality" in text and all(w[:40] in text for w in s["quality"]["warnings"])
