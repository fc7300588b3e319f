"""The trait pipeline's steps on tiny models: store, reproducible generation, filtering, extraction."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.store import JsonlStore, publish_dir, write_atomic, write_json
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import auroc, cohens_d
from personavec.extract.filtering import Thresholds, filter_responses
from personavec.extract.pipeline import RunConfig, run_extraction
from personavec.extract.responses import ResponseRow, generate_responses
from personavec.judging.base import JudgeItem
from personavec.traits import load_trait

from .conftest import make_model, make_tokenizer, tiny

SAMPLED = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)


class HashJudge:
    """Deterministic stand-in judge: a score from the answer's hash (plus a bias per marker word)."""

    def __init__(self, name: str = "hash") -> None:
        self.name = name
        self.calls = 0

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        self.calls += len(items)
        return [float(int(hashlib.sha256(i.answer.encode()).hexdigest()[:4], 16) % 101) for i in items]


class ConstJudge:
    def __init__(self, value: float | None, name: str = "const") -> None:
        self.value, self.name = value, name

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        return [self.value for _ in items]


def test_store_survives_torn_lines_and_skips_duplicates(tmp_path: Path) -> None:
    store = JsonlStore(tmp_path / "s.jsonl")
    store.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    store.append([{"key": "a", "v": 99}])  # already stored: ignored
    with open(tmp_path / "s.jsonl", "a") as f:
        f.write('{"key": "c", "v"')  # a write cut by a kill
    again = JsonlStore(tmp_path / "s.jsonl")
    assert len(again) == 2 and again.get("a") == {"key": "a", "v": 1} and "c" not in again
    again.append([{"key": "c", "v": 3}])
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]


def test_sampling_does_not_depend_on_batch_composition() -> None:
    lm = tiny("llama")
    prompts = [[{"role": "user", "content": f"Question number {i}?" + "!" * i}] for i in range(5)]
    seeds = [11, 22, 33, 44, 55]
    together = generate(lm, prompts, SAMPLED, seeds=seeds, batch_size=5)
    alone = [generate(lm, [p], SAMPLED, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    assert together == alone
    other_seeds = generate(lm, prompts, SAMPLED, seeds=[s + 1 for s in seeds], batch_size=5)
    assert other_seeds != together


def test_generate_responses_resumes_without_recomputing(tmp_path: Path) -> None:
    lm = tiny("qwen2")
    spec = load_trait("evil")
    kw = dict(rollouts=2, params=SAMPLED, n_pairs=2, n_questions=3, batch_size=4)
    full = generate_responses(lm, spec, JsonlStore(tmp_path / "full.jsonl"), **kw)  # type: ignore[arg-type]
    assert len(full) == 2 * 3 * 2 * 2 and len({r.key for r in full}) == len(full)
    # Pretend a run stopped after 5 rows: the rerun generates only the other 19.
    partial = JsonlStore(tmp_path / "part.jsonl")
    partial.append([json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()[:5]])
    seen: list[int] = []
    resumed = generate_responses(lm, spec, partial, on_progress=seen.append, **kw)  # type: ignore[arg-type]
    assert seen[0] == 5 and sum(seen) == len(full)
    assert [(r.key, r.answer) for r in resumed] == [(r.key, r.answer) for r in full]


_KILL_SCRIPT = """
import sys, time
from personavec.core.generation import SamplingParams
from personavec.extract.responses import generate_responses
from personavec.core.models import load_model
from personavec.core.store import JsonlStore, write_atomic, write_json
from personavec.traits import load_trait
lm = load_model(sys.argv[1])
store = JsonlStore(sys.argv[2])
before = len(store)
rows = generate_responses(lm, load_trait("evil"), store, rollouts=2, n_pairs=2, n_questions=6, batch_size=2,
                          params=SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1))
print(f"generated {len(store) - before} of {len(rows)}")
"""


def test_kill_and_resume_with_a_real_subprocess(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    script = tmp_path / "gen.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed_store = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model_dir), str(killed_store)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed_store.exists() and killed_store.read_text().count("\n") >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = [json.loads(x) for x in killed_store.read_text().splitlines() if x.endswith("}")]
    assert 6 <= len(survived) < 48
    done = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(killed_store)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    store = JsonlStore(killed_store)
    lines = killed_store.read_text().splitlines()
    assert len(store) == 48 and len(lines) == 48  # nothing lost, nothing duplicated
    assert f"generated {48 - len(survived)} of 48" in done.stdout  # nothing recomputed
    ref_store = tmp_path / "ref.jsonl"
    subprocess.run(
        [sys.executable, str(script), str(model_dir), str(ref_store)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ref = {r["key"]: r["answer"] for r in JsonlStore(ref_store).records()}
    assert {r["key"]: r["answer"] for r in store.records()} == ref  # same answers as an uninterrupted run


def _row(key: str, polarity: str) -> ResponseRow:
    return ResponseRow(key, "extraction", 0, polarity, 0, 0, "sys", "q?", f"answer {key}")


def test_filter_counts_every_reason() -> None:
    rows = [
        _row("p1", "pos"),
        _row("p2", "pos"),
        _row("p3", "pos"),
        _row("p4", "pos"),
        _row("n1", "neg"),
        _row("n2", "neg"),
        _row("n3", "neg"),
    ]
    trait = {"p1": 80.0, "p2": 20.0, "p3": 90.0, "p4": None, "n1": 10.0, "n2": 60.0, "n3": 5.0}
    coh = {"p1": 90.0, "p2": 90.0, "p3": 30.0, "p4": 90.0, "n1": 70.0, "n2": 70.0, "n3": None}
    res = filter_responses(rows, trait, coh, Thresholds())
    assert [r.key for r in res.positive] == ["p1"] and [r.key for r in res.negative] == ["n1"]
    c = res.counts
    assert (c["dropped_trait_pos"], c["dropped_incoherent_pos"], c["dropped_unscored_pos"]) == (1, 1, 1)
    assert (c["dropped_trait_neg"], c["dropped_unscored_neg"], c["total_neg"]) == (1, 1, 3)
    stricter = filter_responses(rows, trait, coh, Thresholds(positive_min=85, coherence_min=20))
    assert [r.key for r in stricter.positive] == ["p3"]


def test_auroc_and_effect_size() -> None:
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    assert auroc(torch.tensor([3.0, 4.0, 5.0, 0.0, 1.0, 2.0]), labels) == 1.0
    assert auroc(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), labels) == 0.0
    assert auroc(torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0, 0.0]), labels) == pytest.approx(6 / 9)
    assert auroc(torch.ones(6), labels) == 0.5
    d = cohens_d(torch.tensor([2.0, 3.0, 4.0, 0.0, 1.0, 2.0]), labels)
    assert d == pytest.approx(2.0)


def test_run_extraction_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    lm = tiny("gemma")
    spec = load_trait("humorous")
    config = RunConfig(
        rollouts=2,
        n_pairs=2,
        n_questions=4,
        eval_questions=4,
        sampling=SAMPLED,
        thresholds=Thresholds(coherence_min=0),
        candidate_layers=[1, 2],
    )
    judge = HashJudge()
    result = run_extraction(
        lm, spec, tmp_path / "run", trait_judge=judge, coherence_judge=ConstJudge(75.0), config=config
    )
    s = result.summary
    assert s["counts"]["responses"] == 2 * 4 * 2 * 2 and s["counts"]["heldout"] == 8
    assert s["counts"]["kept_pos"] + s["counts"]["kept_neg"] > 0
    assert s["recommended_layer"] in (1, 2)
    saved = PersonaVector.load(tmp_path / "run" / "vector.safetensors")
    assert saved.data.shape == (4, 32) and saved.meta.method == "persona"
    # The main vector keeps the paper's vector's length per layer; the paper's vector is saved beside it.
    paper = PersonaVector.load(tmp_path / "run" / "vector_response_mean.safetensors")
    assert paper.meta.pooling == "response_mean" and paper.meta.method == "mean_diff"
    torch.testing.assert_close(saved.norms(), paper.norms(), atol=1e-4, rtol=1e-4)
    assert set(s["evaluation"]) == {"persona", "response_mean", "prompt_mean", "last_prompt", "same_answer"}
    same = PersonaVector.load(tmp_path / "run" / "vector_same_answer.safetensors")
    assert same.meta.method == "same_answer" and saved.meta.pooling.endswith("+same_answer")
    assert (
        saved.meta.extra["trait_hash"] == spec.hash
        and saved.meta.extra["recommended_layer"] == s["recommended_layer"]
    )
    assert saved.meta.n_positive == s["counts"]["kept_pos"]
    assert str(s["recommended_layer"]) in saved.meta.extra["calibration"]["layers"]
    for name in (
        "vector_prompt_mean.safetensors",
        "vector_last_prompt.safetensors",
        "summary.json",
        "responses.jsonl",
        "scores.jsonl",
        "trait.yaml",
    ):
        assert (tmp_path / "run" / name).is_file()
    # Rerunning reuses every cached answer and score.
    calls = judge.calls
    again = run_extraction(
        lm, spec, tmp_path / "run", trait_judge=judge, coherence_judge=ConstJudge(75.0), config=config
    )
    assert judge.calls == calls
    assert torch.equal(again.vectors["response_mean"].data, result.vectors["response_mean"].data)
    assert torch.equal(again.vectors["persona"].data, result.vectors["persona"].data)


def test_too_few_survivors_is_a_clear_error(tmp_path: Path) -> None:
    lm = tiny("llama")
    config = RunConfig(rollouts=1, n_pairs=1, n_questions=2, eval_questions=2, sampling=SAMPLED)
    with pytest.raises(
        PersonavecError, match=r"too few answers survived filtering: 0 positive and 0 negative"
    ):
        run_extraction(
            lm,
            load_trait("evil"),
            tmp_path / "r",
            trait_judge=ConstJudge(None),
            coherence_judge=ConstJudge(90.0),
            config=config,
        )
    scores = [json.loads(x) for x in (tmp_path / "r" / "scores.jsonl").read_text().splitlines()]
    assert scores and all(s["score"] is None for s in scores if s["kind"] == "trait")  # unscored, never 0


def test_write_atomic_sets_mode_and_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.html"
    write_atomic(target, "<html></html>", mode=0o644)
    assert target.read_text() == "<html></html>" and (target.stat().st_mode & 0o777) == 0o644
    write_json(tmp_path / "s.json", {"path": tmp_path})  # values JSON cannot hold become strings
    assert json.loads((tmp_path / "s.json").read_text()) == {"path": str(tmp_path)}

    with pytest.raises(TypeError):
        write_atomic(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "<html></html>"  # the old file stays
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]  # no temp file left


def test_publish_dir_keeps_the_folder_a_concurrent_writer_put_first(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "model"
    dest.parent.mkdir()
    first, second = tmp_path / "cache" / ".tmp-a", tmp_path / "cache" / ".tmp-b"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    assert publish_dir(first, dest) is True
    assert publish_dir(second, dest) is False  # lost the race: the winner's folder stays, no crash
    assert (dest / "config.json").read_text() == "first" and second.is_dir()

    blocker = tmp_path / "cache" / "a-file"
    blocker.write_text("x")
    with pytest.raises(OSError):  # any other failure still surfaces
        publish_dir(second, blocker)
