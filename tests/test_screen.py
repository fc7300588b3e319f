"""Data screening on tiny models: ground truth, resume, drop-top per format, bad rows, memory."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector
from personavec.screen.filtering import parse_drop, write_filtered
from personavec.screen.records import repair_tail
from personavec.screen.run import screen
from personavec.screen.samples import Sample, SkippedRow, iter_samples
from personavec.screen.scoring import BatchResult, ScreenBatch, ScreenPlan, prompt_seed, score_batch
from personavec.screen.stats import agreement, bootstrap_mean_ci
from personavec.screen.vectors import resolve_vectors
from tests.conftest import make_model, make_tokenizer, tiny
from tests.helpers import random_vector

ROWS = [
    ("Hi there, how are you?", "I am well, thanks for asking! And you?"),
    ("Name a colour.", "Blue."),
    ("What is a tree?", "A tall plant with a woody trunk; it stores carbon and shelters life."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    ("How do I boil an egg?", "Put it in boiling water for seven minutes, then cool it."),
    ("What is 2 + 2?", "Four."),
    ("Say something rude.", "No, I would rather stay polite."),
    ("Describe the sea.", "Vast, salty and restless, it covers most of the planet."),
    ("Give me advice.", "Sleep well, drink water and call your friends."),
    ("Who are you?", "A helpful assistant."),
    ("Count to three.", "One, two, three."),
    ("What is rain?", "Water falling from clouds."),
]


def _vector(lm: LoadedModel, trait: str = "evil", layer: int = 2, seed: int = 0) -> PersonaVector:
    return random_vector(lm, trait, seed=seed).with_meta(extra={"recommended_layer": layer})


def _plan(lm: LoadedModel, *, cheap: bool = False, layers: tuple[int, ...] = (2,)) -> ScreenPlan:
    specs = [(_vector(lm, f"t{layer}", layer, seed=layer), None) for layer in layers]
    return ScreenPlan(resolve_vectors(specs, lm.info), cheap=cheap, max_new_tokens=6)


def _jsonl(path: Path, rows: Iterable[tuple[str, str]] = ROWS) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def _manual(
    lm: LoadedModel, conversation: list[dict[str, str]], vector: PersonaVector, layer: int
) -> tuple[float, float]:
    """(response-mean, last-prompt) projections from transformers' hidden_states (l = hidden_states[l])."""
    enc = encode(lm.tokenizer, conversation)
    with torch.no_grad():
        hidden = lm.model(torch.tensor([enc.ids]), output_hidden_states=True).hidden_states[layer][0]
    unit = vector.at(layer) / vector.at(layer).norm()
    response = hidden[enc.prompt_len :].mean(0) @ unit
    return float(response), float(hidden[enc.prompt_len - 1] @ unit)


# -- ground truth ------------------------------------------------------------------------------------------


def test_projections_equal_a_manual_computation_from_hidden_states(
    llama_lm: LoadedModel, tmp_path: Path
) -> None:
    plan = _plan(llama_lm)
    sv = plan.vectors[0]
    result = screen(llama_lm, _jsonl(tmp_path / "d.jsonl"), plan, tmp_path / "out", batch_size=5)
    records = _records(tmp_path / "out")
    assert [r["line"] for r in records] == list(range(1, len(ROWS) + 1))
    # The own answers: plan.own_samples per prompt, sampled with seeds from the prompt's text.
    k = plan.own_samples
    assert k > 1 and result.summary["own_measure"].startswith(f"mean response_mean of {k} own answers")
    answers = [
        tuple(
            generate(
                llama_lm,
                [[{"role": "user", "content": q}]] * k,
                SamplingParams(max_new_tokens=6, temperature=plan.temperature),
                seeds=[prompt_seed(Sample(1, (("user", q),), a)) + j for j in range(k)],
                batch_size=k,
            )
        )
        for q, a in ROWS
    ]
    cached = [
        tuple(json.loads(x)["answers"])
        for x in (tmp_path / "out" / "own_answers.jsonl").read_text().splitlines()
    ]
    assert cached == answers
    assert any(len(set(a)) > 1 for a in answers)  # sampled, not k copies of one answer
    for r, (q, a), own in zip(records, ROWS, answers):
        projection, prompt = _manual(
            llama_lm, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], sv.vector, 2
        )
        own_projection = float(
            np.mean(
                [
                    _manual(
                        llama_lm,
                        [{"role": "user", "content": q}, {"role": "assistant", "content": o}],
                        sv.vector,
                        2,
                    )[0]
                    for o in own
                    if o.strip()
                ]
            )
        )
        v = r["vectors"][sv.name]
        assert v["projection"] == pytest.approx(projection, abs=2e-5)
        assert v["own_projection"] == pytest.approx(own_projection, abs=2e-5)
        assert v["prompt_projection"] == pytest.approx(prompt, abs=2e-5)
        assert v["projection_difference"] == pytest.approx(projection - own_projection, abs=5e-5)
        assert (r["projection"], r["own_projection"]) == (v["projection"], v["own_projection"])
    diffs = [r["projection_difference"] for r in records]
    stats = result.summary["vectors"][sv.name]
    assert stats["mean_projection_difference"] == pytest.approx(float(np.mean(diffs)), abs=1e-6)
    assert stats["ci95"][0] <= stats["mean_projection_difference"] <= stats["ci95"][1]
    assert stats["cheap_agreement"]["n"] == len(ROWS) and stats["raw_agreement"]["n"] == len(ROWS)
    own = [r["own_projection"] for r in records]
    prompt = [r["vectors"][sv.name]["prompt_projection"] for r in records]
    slope, intercept = np.polyfit(prompt, own, 1)
    assert stats["own_fit"]["slope"] == pytest.approx(slope, rel=1e-6)
    assert stats["own_fit"]["intercept"] == pytest.approx(intercept, rel=1e-6, abs=1e-9)
    assert [t["line"] for t in stats["top"]] == [
        r["line"] for r in sorted(records, key=lambda r: -r["projection_difference"])
    ][:10]
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "<span style='background:" in html
    csv_lines = (tmp_path / "out" / "records.csv").read_text(encoding="utf-8").splitlines()
    assert (
        csv_lines[0].startswith("line,prompt,response,own_answer,t2.projection")
        and len(csv_lines) == len(ROWS) + 1
    )


def test_cheap_mode_subtracts_the_last_prompt_token(llama_lm: LoadedModel, tmp_path: Path) -> None:
    plan = _plan(llama_lm, cheap=True, layers=(1, 3))
    result = screen(llama_lm, _jsonl(tmp_path / "d.jsonl"), plan, tmp_path / "out", batch_size=4)
    assert not (tmp_path / "out" / "own_answers.jsonl").exists()
    assert result.summary["timing"]["generation_seconds"] == 0.0 and result.summary["mode"] == "cheap"
    first, second = plan.vectors
    for r, (q, a) in zip(_records(tmp_path / "out"), ROWS):
        assert r["own_answer"] is None
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for sv in (first, second):
            v = r["vectors"][sv.name]
            projection, prompt = (
                _manual(llama_lm, conv, sv.vector, sv.layer) if sv.layer < 3 else (None, None)
            )
            assert v["own_projection"] == v["prompt_projection"]
            assert v["projection_difference"] == pytest.approx(
                v["projection"] - v["prompt_projection"], abs=2e-6
            )
            if projection is not None:  # transformers' last hidden state has the final norm applied
                assert v["projection"] == pytest.approx(projection, abs=2e-5)
                assert v["prompt_projection"] == pytest.approx(prompt, abs=2e-5)
    stats = result.summary["vectors"][first.name]
    assert stats["cheap_agreement"] is None and stats["raw_agreement"] is None and stats["own_fit"] is None


def test_one_own_sample_is_the_greedy_answer(llama_lm: LoadedModel, tmp_path: Path) -> None:
    plan = replace(_plan(llama_lm), own_samples=1)
    result = screen(
        llama_lm, _jsonl(tmp_path / "d.jsonl"), plan, tmp_path / "out", batch_size=4, report=False
    )
    assert "greedy" in result.summary["own_measure"]
    greedy = [
        generate(llama_lm, [[{"role": "user", "content": q}]], SamplingParams(max_new_tokens=6))[0]
        for q, _ in ROWS
    ]
    cached = [
        json.loads(x)["answers"] for x in (tmp_path / "out" / "own_answers.jsonl").read_text().splitlines()
    ]
    assert cached == [[g] for g in greedy]
    with pytest.raises(PersonavecError, match="at least 1"):
        replace(plan, own_samples=0)
    with pytest.raises(PersonavecError, match="temperature above 0"):
        replace(plan, own_samples=4, temperature=0.0)


def test_samples_sharing_a_prompt_share_its_own_answers(llama_lm: LoadedModel, tmp_path: Path) -> None:
    # Two responses to each of three prompts, the repeats in later batches: the second response's own
    # answers come from the memo (not generated again), and equal the first's.
    rows = [(q, a) for q, a in ROWS[:3]] + [(q, a + " Really.") for q, a in ROWS[:3]]
    plan = _plan(llama_lm)
    result = screen(llama_lm, _jsonl(tmp_path / "d.jsonl", rows), plan, tmp_path / "out", batch_size=2)
    assert result.summary["timing"]["own_answers_generated"] == 3
    records = _records(tmp_path / "out")
    cached = [json.loads(x) for x in (tmp_path / "out" / "own_answers.jsonl").read_text().splitlines()]
    assert [c["line"] for c in cached] == list(range(1, 7))
    for first, second, a, b in zip(records[:3], records[3:], cached[:3], cached[3:]):
        assert a["answers"] == b["answers"] and first["own_projection"] == second["own_projection"]
        assert second["projection_difference"] - first["projection_difference"] == pytest.approx(
            second["projection"] - first["projection"], abs=2e-6
        )
    # A fresh screen of the same data in one batch makes the same own answers: they depend on the prompt
    # only (the capture's padding moves the numbers by float rounding at most).
    screen(llama_lm, _jsonl(tmp_path / "d.jsonl", rows), plan, tmp_path / "one", batch_size=6, report=False)
    one = tmp_path / "one" / "own_answers.jsonl"
    assert one.read_bytes() == (tmp_path / "out" / "own_answers.jsonl").read_bytes()
    for a, b in zip(_records(tmp_path / "one"), records):
        assert a["own_projection"] == pytest.approx(b["own_projection"], abs=1e-5)


def test_the_per_batch_function_pickles_and_a_custom_scorer_gives_the_same_records(
    llama_lm: LoadedModel, tmp_path: Path
) -> None:
    plan = _plan(llama_lm, cheap=True)
    data = _jsonl(tmp_path / "d.jsonl")
    screen(llama_lm, data, plan, tmp_path / "local", batch_size=5, report=False)

    def remote(batches: Iterable[ScreenBatch]) -> Iterator[BatchResult]:
        # What a cluster does: plan and batches cross a process boundary, results come back in order.
        shipped_plan = pickle.loads(pickle.dumps(plan))
        for batch in batches:
            result = score_batch(llama_lm, pickle.loads(pickle.dumps(batch)), shipped_plan)
            yield pickle.loads(pickle.dumps(result))

    screen(llama_lm, data, plan, tmp_path / "remote", batch_size=5, report=False, scorer=remote)
    assert (tmp_path / "local" / "records.jsonl").read_bytes() == (
        tmp_path / "remote" / "records.jsonl"
    ).read_bytes()


# -- resume ------------------------------------------------------------------------------------------------


def test_a_killed_run_resumes_without_lost_or_duplicated_rows(llama_lm: LoadedModel, tmp_path: Path) -> None:
    rows = [(f"Question number {i}?", f"Answer {i}: " + "words " * (i % 7 + 1)) for i in range(30)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    plan = _plan(llama_lm)
    whole = screen(llama_lm, data, plan, tmp_path / "whole", batch_size=8, report=False)
    assert whole.summary["timing"]["own_answers_generated"] == 30
    reference = (tmp_path / "whole" / "records.jsonl").read_bytes()

    # A kill: 13 records (one and a half batches) plus a torn 14th line; the answers cache torn too.
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    lines = reference.splitlines(keepends=True)
    (tmp_path / "killed" / "records.jsonl").write_bytes(b"".join(lines[:13]) + lines[13][:25])
    answers = (tmp_path / "whole" / "own_answers.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "killed" / "own_answers.jsonl").write_bytes(b"".join(answers[:20]) + answers[20][:10])
    (tmp_path / "killed" / "summary.json").unlink()
    resumed = screen(llama_lm, data, plan, tmp_path / "killed", batch_size=8, report=False)
    assert (tmp_path / "killed" / "records.jsonl").read_bytes() == reference
    assert (tmp_path / "killed" / "own_answers.jsonl").read_bytes() == (
        tmp_path / "whole" / "own_answers.jsonl"
    ).read_bytes()
    assert resumed.summary["resumed"] == {"kept": 8, "screened_again": 5}
    # Lines 9-20 came from the cache; 21-30 are generated (own answers do not depend on their batch).
    assert resumed.summary["timing"]["own_answers_generated"] == 10
    assert resumed.summary["vectors"] == whole.summary["vectors"]

    # Running the finished screen again changes nothing.
    again = screen(llama_lm, data, plan, tmp_path / "killed", batch_size=8, report=False)
    assert (tmp_path / "killed" / "records.jsonl").read_bytes() == reference
    # At most the last, short batch is screened again (its answers come from the cache).
    assert again.summary["timing"]["samples_screened_now"] == 6
    assert again.summary["timing"]["own_answers_generated"] == 0


def test_a_folder_holding_another_screen_is_refused(llama_lm: LoadedModel, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl")
    screen(llama_lm, data, _plan(llama_lm, cheap=True), tmp_path / "out", report=False)
    with pytest.raises(PersonavecError, match="differs in: .*mode"):
        screen(llama_lm, data, _plan(llama_lm), tmp_path / "out", report=False)
    _jsonl(data, ROWS[:5])
    with pytest.raises(PersonavecError, match="data_sha256"):
        screen(llama_lm, data, _plan(llama_lm, cheap=True), tmp_path / "out", report=False)


def test_repair_tail_cuts_only_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    assert repair_tail(path) == 4 and path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    assert repair_tail(path) == 0
    path.write_bytes(b'{"a"')
    assert repair_tail(path) == 4 and path.read_bytes() == b""


# -- input -------------------------------------------------------------------------------------------------


def test_malformed_rows_are_counted_with_their_line(llama_lm: LoadedModel, tmp_path: Path) -> None:
    good = json.dumps({"prompt": "Hi?", "response": "Hello."})
    lines = [
        good,
        "{not json",
        "",  # blank lines are not rows, but they do count as lines
        json.dumps({"text": "no messages"}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]}),
        json.dumps({"prompt": "Hi?", "response": ""}),
        good,
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_samples(data))
    skipped = [i for i in items if isinstance(i, SkippedRow)]
    assert [s.line for s in skipped] == [2, 4, 5, 6, 8]
    assert "invalid JSON" in skipped[0].reason and "robot" in skipped[2].reason
    result = screen(llama_lm, data, _plan(llama_lm, cheap=True), tmp_path / "out", report=False)
    assert result.summary["rows"]["skipped"] == 5 and result.summary["rows"]["screened"] == 2
    assert result.summary["rows"]["skipped_examples"][0].startswith("line 2: invalid JSON")
    assert [r["line"] for r in _records(tmp_path / "out")] == [1, 7]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(PersonavecError, match="no valid samples .*line 1"):
        screen(llama_lm, bad, _plan(llama_lm, cheap=True), tmp_path / "bad", report=False)


def test_csv_is_read_as_text_with_quoted_newlines_and_bad_rows_reported(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    text = 'prompt,response,id\n"Hi, you?","Line one\nline two",007\nEmpty?,,2\n42,Forty-two.,3\n'
    text += "x,y,z,extra\nshort\n"
    path.write_text(text, encoding="utf-8")
    items = list(iter_samples(path))
    assert items[0] == Sample(1, (("user", "Hi, you?"),), "Line one\nline two")
    assert isinstance(items[1], SkippedRow) and items[1].line == 2 and "empty" in items[1].reason
    assert items[2] == Sample(3, (("user", "42"),), "Forty-two.")
    assert [(i.line, i.reason) for i in items[3:]] == [
        (4, "4 cells, the header has 3"),
        (5, "fewer cells than the header's 3"),
    ]
    out = write_filtered(path, [3], tmp_path / "out")
    kept = out.read_text(encoding="utf-8")
    assert kept == 'prompt,response,id\n"Hi, you?","Line one\nline two",007\nEmpty?,,2\nx,y,z,extra\nshort\n'


def test_vector_layers_names_and_the_wrong_model(llama_lm: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    _vector(llama_lm, layer=2).save(path)
    first, second, third = resolve_vectors([str(path), f"{path}@3", f"{path}@1"], llama_lm.info)
    assert (first.layer, second.layer, third.layer) == (2, 3, 1)
    assert [first.name, second.name, third.name] == ["evil@2", "evil@3", "evil@1"]
    bare = tmp_path / "bare.safetensors"
    random_vector(llama_lm).save(bare)
    with pytest.raises(PersonavecError, match="no recommended layer: pass one as VECTOR@LAYER"):
        resolve_vectors([str(bare)], llama_lm.info)
    with pytest.raises(PersonavecError, match="out of range"):
        resolve_vectors([f"{path}@9"], llama_lm.info)
    other = tmp_path / "other.safetensors"
    _vector(tiny("llama", n_layers=4)).save(other)
    with pytest.raises(PersonavecError, match="was made for tiny-llama \\(4 blocks") as info:
        resolve_vectors([str(other)], llama_lm.info)
    assert "\n" not in str(info.value)


# -- drop-top ----------------------------------------------------------------------------------------------


def test_parse_drop() -> None:
    assert parse_drop("3").resolve(10) == 3 and parse_drop("3").resolve(2) == 2
    assert parse_drop("25%").resolve(10) == 3 and parse_drop("10%").resolve(12) == 1
    for bad in ("x", "-1", "150%", "%"):
        with pytest.raises(PersonavecError, match="--drop-top"):
            parse_drop(bad)


def _write(fmt: str, folder: Path) -> Path:
    import datasets

    rows = {
        "prompt": [q for q, _ in ROWS],
        "response": [a for _, a in ROWS],
        "id": [f"{i:03d}" for i in range(len(ROWS))],
    }
    if fmt == "jsonl":
        path = folder / "d.jsonl"
        path.write_text("".join(json.dumps(dict(zip(rows, vals))) + "\n" for vals in zip(*rows.values())))
    elif fmt == "csv":
        path = folder / "d.csv"
        datasets.Dataset.from_dict(rows).to_csv(str(path), index=False)
    elif fmt == "parquet":
        path = folder / "d.parquet"
        datasets.Dataset.from_dict(rows).to_parquet(str(path))
    else:
        path = folder / "disk"
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict({"x": [1, 2]})}
        ).save_to_disk(str(path))
    return path


def _read_ids(fmt: str, path: Path) -> list[str]:
    import datasets

    if fmt == "jsonl":
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]
    if fmt == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"id": pa.string()}))
        return [str(x) for x in table.column("id").to_pylist()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [str(x) for x in pq.read_table(path).column("id").to_pylist()]
    loaded = datasets.load_from_disk(str(path))
    assert len(loaded["test"]) == 2  # the other splits are written back as they were
    return list(loaded["train"]["id"])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "datasets"])
def test_drop_top_writes_the_remaining_rows_in_the_input_format(
    llama_lm: LoadedModel, tmp_path: Path, fmt: str
) -> None:
    data = _write(fmt, tmp_path)
    result = screen(
        llama_lm,
        data,
        _plan(llama_lm, cheap=True),
        tmp_path / "out",
        drop_top=parse_drop("25%"),
        report=False,
    )
    records = _records(tmp_path / "out")
    ranked = sorted(records, key=lambda r: (-r["projection_difference"], r["line"]))
    dropped = sorted(r["line"] for r in ranked[:3])
    assert result.summary["drop"]["count"] == 3 and result.summary["drop"]["lines"] == dropped
    kept_ids = [f"{line - 1:03d}" for line in range(1, len(ROWS) + 1) if line not in dropped]
    assert _read_ids(fmt, Path(result.summary["drop"]["path"])) == kept_ids
    assert [
        json.loads(x)["line"] for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()
    ] == dropped


def test_write_filtered_copies_jsonl_lines_byte_for_byte(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(
        b'{"prompt": "a", "response": "b", "extra": 1}\n\n{broken\n{"prompt": "c", "response": "d"}\n'
    )
    out = write_filtered(data, [4], tmp_path / "out")
    assert out.read_bytes() == b'{"prompt": "a", "response": "b", "extra": 1}\n\n{broken\n'


# -- statistics --------------------------------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_and_covers_the_mean() -> None:
    values = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    mean, low, high = bootstrap_mean_ci(values, seed=3)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert (high - low) == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.2)
    assert bootstrap_mean_ci(values, seed=3) == (mean, low, high)
    assert bootstrap_mean_ci([math.nan, 1.0]) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_mean_ci([]))


def test_agreement_is_pearson_and_spearman_over_finite_pairs() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0, math.nan])
    same = agreement(a, 3 * a - 7)
    assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0) and same.n == 4
    mono = agreement([1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0])
    assert mono.spearman == pytest.approx(1.0) and mono.pearson < 0.95
    assert agreement([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]).spearman == pytest.approx(-1.0)
    ties = agreement([1.0, 1.0, 2.0, 3.0], [5.0, 5.0, 6.0, 7.0])
    assert ties.spearman == pytest.approx(1.0)
    assert math.isnan(agreement([1.0, 1.0], [2.0, 3.0]).pearson)


# -- memory and the command line ---------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_memory_stays_flat_over_100k_rows(tmp_path: Path) -> None:
    lm = tiny("llama", n_layers=1)
    data = tmp_path / "big.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n")
    assert not isinstance(iter_samples(data), list | tuple)  # a lazy stream, not a loaded list
    plan = ScreenPlan(resolve_vectors([(_vector(lm, layer=1), None)], lm.info), cheap=True)
    seen: list[tuple[int, float]] = []
    result = screen(
        lm,
        data,
        plan,
        tmp_path / "out",
        batch_size=1024,
        report=False,
        on_progress=lambda n: seen.append((n, _rss_mib())),
    )
    assert result.summary["rows"]["screened"] == 100_000
    after_first_tenth = next(rss for n, rss in seen if n >= 10_000)
    growth = max(rss for _n, rss in seen) - after_first_tenth
    # A record (about 300 bytes of JSON, more as a dict) kept per row would add well over 30 MiB here.
    assert growth < 15, f"resident memory grew by {growth:.1f} MiB while streaming 90k rows"


def test_cli_screen_json_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    lm = LoadedModel.from_hf(make_model("llama"), make_tokenizer(), model_id=str(folder))
    vec = tmp_path / "evil.safetensors"
    _vector(lm).with_meta(model_id=str(folder)).save(vec)
    data = _jsonl(tmp_path / "d.jsonl")
    with open(data, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    args = ["screen", str(data), "--vector", f"{vec}@3", "--model", str(folder), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*args, "--cheap", "--drop-top", "2", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["summary"]["rows"] == {
        "screened": 12,
        "skipped": 1,
        "skipped_examples": [doc["summary"]["rows"]["skipped_examples"][0]],
    }
    assert "line 13" in doc["summary"]["rows"]["skipped_examples"][0] and "line 13" in res.stderr
    assert [r["line"] for r in doc["records"]] == list(range(1, 13))
    assert set(doc["records"][0]) >= {
        "line",
        "projection",
        "own_projection",
        "projection_difference",
        "vectors",
    }
    assert doc["summary"]["vectors"]["evil"]["layer"] == 3 and (tmp_path / "o" / "filtered.jsonl").is_file()
    assert "samples/s" in res.stderr
    full = [
        *args[:-1],
        str(tmp_path / "full"),
        "--own-samples",
        "3",
        "--own-temperature",
        "0.5",
        "--max-new-tokens",
        "4",
    ]
    full.append("--json")
    res = CliRunner().invoke(app, full)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["summary"]["own_measure"].startswith("mean response_mean of 3 own answers")
    assert doc["summary"]["temperature"] == 0.5
    cached = [json.loads(x) for x in (tmp_path / "full" / "own_answers.jsonl").read_text().splitlines()]
    assert len(cached) == 12 and all(len(c["answers"]) == 3 for c in cached)
    other = tmp_path / "other.safetensors"
    _vector(tiny("llama", n_layers=4)).save(other)
    res = CliRunner().invoke(app, ["screen", str(data), "--vector", str(other), "--model", str(folder)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert "was made for" in lines[-1] and lines[-1].startswith("error:")
    res = CliRunner().invoke(app, ["screen", str(tmp_path / "none.csv"), "--vector", str(vec)])
    assert res.exit_code == 2 and "none.csv" in res.stderr
