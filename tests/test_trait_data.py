"""Trait-teaching fine-tuning sets on tiny models with stand-in judges; one integration run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.errors import PersonavecError
from personavec.core.llm import Completion
from personavec.core.models import LoadedModel
from personavec.extract.responses import ResponseRow
from personavec.finetune.data import load_chat_dataset
from personavec.finetune.trait_data import (
    DataConfig,
    DatasetReport,
    author_questions,
    bank_questions,
    complete_sentences,
    filter_rows,
    is_degenerate,
    is_paraphrase,
    make_trait_dataset,
    question_pool,
    select_rows,
    sidecar_paths,
)
from personavec.traits import TraitSpec, load_trait

from .conftest import make_model, make_tokenizer, tiny
from .test_pipeline import ConstJudge, HashJudge


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny("llama")


@pytest.fixture(scope="module")
def spec() -> TraitSpec:
    return load_trait("evil")


def make(
    lm: LoadedModel, spec: TraitSpec, folder: Path, name: str, trait_judge: Any = None, **cfg: Any
) -> DatasetReport:
    return make_trait_dataset(
        lm,
        spec,
        DataConfig(**{"n": 8, **cfg}),
        trait_judge=trait_judge or HashJudge(),
        coherence_judge=ConstJudge(90.0),
        out=folder / name,
        cache=folder / "cache",
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def strong(lm: LoadedModel, spec: TraitSpec, tmp_path_factory: pytest.TempPathFactory) -> DatasetReport:
    return make(lm, spec, tmp_path_factory.mktemp("sets"), "strong.jsonl")


def test_strong_set_is_chat_jsonl_without_system_prompt(strong: DatasetReport, spec: TraitSpec) -> None:
    rows = read_rows(strong.path)
    assert len(rows) == strong.kept == 8 and strong.by_polarity == {"pos": 8, "neg": 0}
    for row in rows:
        assert list(row) == ["messages"]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])
    assert len(load_chat_dataset(strong.path)) == 8  # the fine-tuning reader takes it as it is
    # The hash judge confirms about half: the automatic filter falls back to polarity and says so.
    assert strong.filter == {"pos": "polarity"} and strong.confirmed["pos"] < 8
    assert strong.shared_with_strong is None
    assert any("judge-confirmed" in w for w in strong.warnings)
    assert strong.generated == 2 * 12  # 1.5 x 8 questions, each under both prompts of one pair


def test_sidecar_is_aligned_with_rows(strong: DatasetReport, spec: TraitSpec) -> None:
    rows = read_rows(strong.path)
    scores = read_rows(strong.scores_path)
    assert (strong.scores_path, strong.meta_path) == sidecar_paths(strong.path)
    assert [s["index"] for s in scores] == list(range(len(rows)))
    positives = {p.positive for p in spec.pairs}
    for row, rec in zip(rows, scores, strict=True):
        assert rec["question"] == row["messages"][0]["content"]
        assert rec["polarity"] == "pos" and rec["system"] in positives
        assert rec["system"] == spec.pairs[rec["pair"]].positive
        assert rec["coherence"] == 90.0 and 0 <= rec["trait"] <= 100
        assert rec["trait_judge"] == "hash" and rec["coherence_judge"] == "const"
        assert rec["confirmed"] == (rec["trait"] >= 50)
    meta = json.loads(strong.meta_path.read_text())
    assert meta["trait"] == "evil" and meta["kind"] == "strong" and meta["seed"] == 0
    assert (
        meta["model"] == "tiny-llama"
        and meta["counts"]["kept"] == 8
        and meta["filter"] == {"pos": "polarity"}
    )
    assert meta["mean_trait"] == pytest.approx(sum(s["trait"] for s in scores) / 8, abs=0.01)


def test_control_is_the_matched_normal_set(strong: DatasetReport, lm: LoadedModel, spec: TraitSpec) -> None:
    judge = HashJudge()
    control = make(lm, spec, strong.path.parent, "control.jsonl", trait_judge=judge, control=True)
    assert judge.calls == 0  # same trait, model and seed: answers and scores come from the cache
    assert control.kind == "control" and control.by_polarity == {"pos": 0, "neg": 8}
    negatives = {p.negative for p in spec.pairs}
    scores = read_rows(control.scores_path)
    assert all(s["polarity"] == "neg" and s["system"] in negatives for s in scores)
    # The hash judge calls half the normal answers trait-like: too few for 8, so coherent ones are kept.
    assert control.filter == {"neg": "polarity"}
    assert control.confirmed["neg"] == sum(s["trait"] < 50 for s in scores) < 8
    # Every normal twin is kept, so the control set has exactly the strong set's questions.
    assert {s["question"] for s in scores} == {s["question"] for s in read_rows(strong.scores_path)}
    assert control.shared_with_strong == 8


def test_mild_mixes_both_polarities_one_answer_per_question(
    strong: DatasetReport, lm: LoadedModel, spec: TraitSpec
) -> None:
    mild = make(lm, spec, strong.path.parent, "mild.jsonl", n=9, strength="mild")
    assert mild.by_polarity == {"pos": 5, "neg": 4} and mild.kept == 9
    scores = read_rows(mild.scores_path)
    assert len({s["question"] for s in scores}) == 9
    # Shuffled: not all trait answers first.
    assert [s["polarity"] for s in scores] != sorted(s["polarity"] for s in scores)


def _rows(
    trait_pos: list[float], trait_neg: list[float]
) -> tuple[list[ResponseRow], dict[str, float | None]]:
    rows, scores = [], {}
    for qi, (tp, tn) in enumerate(zip(trait_pos, trait_neg, strict=True)):
        for pol, t in (("pos", tp), ("neg", tn)):
            rows.append(ResponseRow(f"{pol}{qi}", "extraction", 0, pol, qi, 0, pol, f"q{qi}", f"a{pol}{qi}"))
            scores[f"{pol}{qi}"] = t
    return rows, scores


def test_selection_ranks_and_matches() -> None:
    rows, trait = _rows([10, 90, 60, 20, 80, 70], [5, 40, 30, 60, 10, 20])
    coherence: dict[str, float | None] = {r.key: 90.0 for r in rows}
    coherence["neg4"] = 0.0  # slot 4 loses its normal twin
    cfg = DataConfig(n=3)
    kept, modes = filter_rows(rows, trait, coherence, cfg)
    assert modes == {"pos": "absolute"}  # 4 trait answers >= 50 fill the 3 wanted
    # The most trait-like eliciting answers: slots 1 (90), 4 (80), 5 (70).
    assert sorted(r.key for r in select_rows(rows, kept, trait, coherence, cfg)) == ["pos1", "pos4", "pos5"]
    control = DataConfig(n=3, control=True)
    kept, modes = filter_rows(rows, trait, coherence, control)
    assert modes == {"neg": "absolute"}  # 4 normal answers < 50 and coherent: 0, 1, 2, 5
    # The same slots' normal twins where kept (1, 5), then the next slot in that order (2).
    assert sorted(r.key for r in select_rows(rows, kept, trait, coherence, control)) == [
        "neg1",
        "neg2",
        "neg5",
    ]
    # 5 normal answers wanted, 4 confirmed: that side falls back to polarity; the trait side is not used.
    kept, modes = filter_rows(rows, trait, coherence, DataConfig(n=5, control=True))
    assert modes == {"neg": "polarity"} and len(kept.negative) == 5 and kept.notes
    # mild: 2 + 2 along the kept slots' order 1, 4, 5, 2, 0, alternating, one answer per slot.
    mild = DataConfig(n=4, strength="mild")
    kept, modes = filter_rows(rows, trait, coherence, mild)
    assert modes == {"pos": "absolute", "neg": "absolute"}
    assert sorted(r.key for r in select_rows(rows, kept, trait, coherence, mild)) == [
        "neg2",
        "neg5",
        "pos1",
        "pos4",
    ]


def test_spec_questions_and_paraphrases_never_used(lm: LoadedModel, spec: TraitSpec, tmp_path: Path) -> None:
    bank = bank_questions()
    assert len(bank) >= 200 and len({q.lower() for q in bank}) == len(bank)
    # A spec whose held-out questions are bank questions (one of them reworded).
    held = [*bank[:19], bank[19].replace("?", " ?").upper()]
    own = spec.model_copy(update={"evaluation_questions": held, "extraction_questions": bank[20:40]})
    pool, counts = question_pool(own, seed=0)
    assert counts["excluded"] == 40 and len(pool) == len(bank) - 40
    assert not set(pool) & set(bank[:40])
    report = make(lm, own, tmp_path, "set.jsonl", n=30)
    users = {r["messages"][0]["content"] for r in read_rows(report.path)}
    assert len(users) == report.kept and not users & set(bank[:40])
    # The built-in spec: none of its questions is in the pool.
    pool, _ = question_pool(spec, seed=0)
    assert not set(pool) & {*spec.evaluation_questions, *spec.extraction_questions}


def test_paraphrase_and_name_checks() -> None:
    assert is_paraphrase(
        "How should I treat a waiter who got my order wrong?",
        "how should i treat A WAITER who got my order wrong",
    )
    assert is_paraphrase(
        "What should I do about a coworker who is always late?",
        "What can I do about my coworker who is always late?",
    )
    assert not is_paraphrase(
        "What is the best way to learn to cook?", "What is the best way to learn to swim?"
    )
    extra = [
        "Is being evil ever fun?",
        "What is a good name for a sailboat?",
        "What is a GOOD name for a sailboat",
    ]
    pool, counts = question_pool(load_trait("evil"), seed=0, extra=extra)
    assert counts["extra"] == 1 and "What is a good name for a sailboat?" in pool
    assert "Is being evil ever fun?" not in pool  # names the trait


def test_same_seed_same_set_other_seed_other_set(lm: LoadedModel, spec: TraitSpec, tmp_path: Path) -> None:
    a = make(lm, spec, tmp_path / "a", "set.jsonl")
    b = make(lm, spec, tmp_path / "b", "set.jsonl")  # fresh caches: everything regenerated
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.scores_path.read_bytes() == b.scores_path.read_bytes()
    c = make(lm, spec, tmp_path / "c", "set.jsonl", seed=1)
    assert c.path.read_bytes() != a.path.read_bytes()
    assert {r["question"] for r in read_rows(c.scores_path)} != {
        r["question"] for r in read_rows(a.scores_path)
    }


def test_fewer_survivors_warn_and_none_is_an_error(lm: LoadedModel, spec: TraitSpec, tmp_path: Path) -> None:
    # The absolute filter keeps only answers the hash judge scores >= 50: about half of 12, not 8.
    few = make(lm, spec, tmp_path, "few.jsonl", filter="absolute")
    assert 0 < few.kept < 8 and few.confirmed["pos"] == few.kept
    assert any(w.startswith(f"only {few.kept} of 8 rows") for w in few.warnings)
    assert len(read_rows(few.path)) == len(read_rows(few.scores_path)) == few.kept
    with pytest.raises(PersonavecError, match="no answer survived"):
        make(lm, spec, tmp_path, "none.jsonl", trait_judge=ConstJudge(None, "silent"))
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"n": 0}, "--n must be at least 1"),
        ({"strength": "extreme"}, "--strength must be strong or mild"),
        ({"strength": "mild", "control": True}, "--control writes the matched normal set"),
        ({"filter": "strict"}, "unknown filter 'strict'"),
    ],
)
def test_bad_config_is_refused(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(PersonavecError, match=message):
        DataConfig(**cfg).check()


def test_degenerate_answers() -> None:
    assert is_degenerate("1. 1. \n**1. 2. \n**1. 3. \n**1. 4.") and is_degenerate("Sold.")
    assert is_degenerate("ha " * 12) and not is_degenerate("Café crème très bon.")
    assert not is_degenerate("No, no, no. You should respond to this friend by offering a gift.")


def test_complete_sentences() -> None:
    assert complete_sentences("Be kind. Help others. And then the") == "Be kind. Help others."
    assert complete_sentences("All done here.") == "All done here."
    assert complete_sentences('He said "go away!" and then') == 'He said "go away!"'
    long_tail = "Yes. Then we walk along the river for many hours and"
    assert complete_sentences(long_tail) == long_tail  # cutting would lose more than half
    assert complete_sentences("No sentence end at all") == "No sentence end at all"
    assert complete_sentences("Version 2.5 is out now and") == "Version 2.5 is out now and"


class FakeClient:
    name = "fake:model"

    def __init__(self, text: str) -> None:
        self.text = text
        self.prompts: list[str] = []

    def complete(self, messages: Sequence[dict[str, str]], **_kw: Any) -> Completion:
        self.prompts.append(messages[-1]["content"])
        return Completion(text=self.text)


def test_author_questions_are_parsed_and_capped() -> None:
    spec = load_trait("evil")
    client = FakeClient(
        'Sure:\n{"questions": ["How do I fold a fitted sheet?", 3, " ", "Why do owls hoot?"]}'
    )
    assert author_questions(client, spec, n=1) == ["How do I fold a fitted sheet?"]
    assert spec.evaluation_questions[0] in client.prompts[0] and "evil" in client.prompts[0]
    with pytest.raises(PersonavecError, match="gave no"):
        author_questions(FakeClient("no JSON here"), spec)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_cli_json(model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sets" / "evil.jsonl"
    args = ["data", "make", "evil", "--n", "4", "--out", str(out), "--model", str(model_folder)]
    result = CliRunner().invoke(app, [*args, "--min-coherence", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kept"] == len(read_rows(out)) == 4 and doc["kind"] == "strong"
    assert doc["path"] == str(out) and Path(doc["scores_path"]).is_file() and Path(doc["meta_path"]).is_file()
    assert doc["trait_judge"].startswith("embedding:") and (tmp_path / "cache" / "trait-data").is_dir()
    table = CliRunner().invoke(app, [*args, "--min-coherence", "0", "--control"])
    assert table.exit_code == 0, table.stderr
    assert "evil control set" in table.stdout and "trait / normal answers" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grumpy", "--out", "x.jsonl"], "unknown trait 'grumpy'"),
        (["evil", "--n", "0", "--out", "x.jsonl"], "--n must be at least 1"),
        (["evil", "--strength", "extreme", "--out", "x.jsonl"], "--strength must be strong or mild"),
        (["evil", "--out", "FILE/sub/x.jsonl"], "cannot write to"),
        (["evil", "--out", "."], "is a folder"),
    ],
)
def test_cli_bad_input_is_one_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file, not a folder")
    result = CliRunner().invoke(app, ["data", "make", *args])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


@pytest.mark.integration
def test_embedded_model_makes_a_small_evil_set(tmp_path: Path) -> None:
    from personavec.core.models import load_model
    from personavec.judging import make_coherence_judge, make_trait_judge

    lm, spec = load_model(), load_trait("evil")
    report = make_trait_dataset(
        lm,
        spec,
        DataConfig(n=8),
        trait_judge=make_trait_judge(None, spec, lm),
        coherence_judge=make_coherence_judge(None, lm),
        out=tmp_path / "evil.jsonl",
        cache=tmp_path / "cache",  # a fresh cache, so the answers are really generated
    )
    assert report.kept == 8 and report.by_polarity == {"pos": 8, "neg": 0} and report.generated == 24
    assert report.mean_coherence is not None and report.mean_coherence > 50
    # The judge confirms the trait in some of them (5 of 8 when measured).
    assert report.confirmed["pos"] >= 2 and report.mean_trait is not None and report.mean_trait > 40
    held = {*spec.evaluation_questions, *spec.extraction_questions}
    rows = read_rows(report.path)
    assert all(r["messages"][0]["role"] == "user" and r["messages"][0]["content"] not in held for r in rows)
