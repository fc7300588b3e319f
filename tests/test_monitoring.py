"""Monitoring: last-prompt projections, per-token traces during generation, calibration, JSONL, CLI."""

from __future__ import annotations

import itertools
import json
import math
import string
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.activations import capture_activations, last_prompt, pad_batch
from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel, load_model
from personavec.core.steering import project
from personavec.core.vectors import PersonaVector
from personavec.monitor.monitoring import (
    NEUTRAL_PROMPTS,
    MonitorRecord,
    calibrate,
    monitor,
    read_conversations_jsonl,
    reference_stats,
    score,
)

from .conftest import make_model, make_tokenizer, tiny
from .helpers import random_vector

# Deliberately different lengths, so batches need padding.
PROMPTS = [
    [{"role": "user", "content": "Tell me a story."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue, in detail, and why not green or purple?"},
    ],
    [{"role": "user", "content": "Hi"}],
]


def _with_layer(v: PersonaVector, layer: int) -> PersonaVector:
    return v.with_meta(extra={**v.meta.extra, "recommended_layer": layer})


def _truth_last_prompt(
    lm: LoadedModel, vs: list[PersonaVector], layers: list[int]
) -> dict[tuple[int, int, int], float]:
    """Ground truth per (conversation, vector, layer): capture each conversation alone, then project."""
    truth = {}
    for ci, conv in enumerate(PROMPTS):
        acts = capture_activations(lm, [conv], layers=layers, poolings=(last_prompt,))
        for vi, v in enumerate(vs):
            for layer in layers:
                truth[(ci, vi, layer)] = float(project(acts.at("last_prompt", layer)[0], v, layer))
    return truth


def _letters_only(lm: LoadedModel) -> None:
    """Let the random model generate ASCII letters only, so decode -> encode gives the same ids back."""
    vocab = lm.tokenizer.get_vocab()
    allowed = {vocab[c] for c in string.ascii_letters}
    lm.model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in allowed]  # type: ignore[union-attr]


def _plain_generated_ids(lm: LoadedModel, conv: list[dict[str, str]], n: int) -> list[int]:
    """Tokens transformers generates for one prompt alone, up to (not including) end of sequence."""
    enc = encode(lm.tokenizer, conv)
    with torch.no_grad():
        out = lm.model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([enc.ids]), max_new_tokens=n, do_sample=False, pad_token_id=256
        )
    new = out[0, len(enc.ids) :].tolist()
    eos = lm.model.generation_config.eos_token_id  # type: ignore[union-attr]
    eos_set = set(eos) if isinstance(eos, list) else {eos}
    return new[: next((i for i, t in enumerate(new) if t in eos_set), len(new))]


# -- last-prompt projection --------------------------------------------------------------------------


def test_raw_projection_equals_capture_then_project(tiny_lm: LoadedModel) -> None:
    vs = [random_vector(tiny_lm, "a", seed=1), random_vector(tiny_lm, "b", seed=2)]
    records = monitor(tiny_lm, vs, PROMPTS, layers=[0, 2, 3])
    assert len(records) == len(PROMPTS) * 2 * 3
    assert [(r.conversation, r.vector, r.layer) for r in records[:6]] == [
        (0, 0, 0), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 2), (0, 1, 3)
    ]  # fmt: skip
    truth = _truth_last_prompt(tiny_lm, vs, [0, 2, 3])
    for r in records:
        assert r.projection == pytest.approx(truth[(r.conversation, r.vector, r.layer)], abs=1e-5)
        assert r.trait == vs[r.vector].meta.trait
        assert r.z is None and r.percentile is None and r.answer is None
    # Batches of one and two (different padding) agree with the all-in-one batch.
    small = monitor(tiny_lm, vs, PROMPTS, layers=[0, 2, 3], batch_size=2)
    assert [r.projection for r in small] == pytest.approx([r.projection for r in records], abs=1e-5)


def test_recommended_layer_is_used_per_vector() -> None:
    lm = tiny("llama")
    vs = [_with_layer(random_vector(lm, "a", seed=1), 1), _with_layer(random_vector(lm, "b", seed=2), 3)]
    records = monitor(lm, vs, PROMPTS)
    assert [(r.conversation, r.trait, r.layer) for r in records[:2]] == [(0, "a", 1), (0, "b", 3)]
    truth = _truth_last_prompt(lm, vs, [1, 3])
    for r in records:
        assert r.projection == pytest.approx(truth[(r.conversation, r.vector, r.layer)], abs=1e-5)
    # A layer list overrides the recommendation for every vector.
    assert {r.layer for r in monitor(lm, vs, PROMPTS, layers=2)} == {2}


def test_several_vectors_cost_one_forward_pass() -> None:
    lm = tiny("llama")
    vs = [_with_layer(random_vector(lm, str(i), seed=i), layer) for i, layer in enumerate([1, 3, 2])]
    calls: list[int] = []
    handle = lm.blocks[0].register_forward_hook(lambda _m, _a, out: calls.append(1))
    try:
        records = monitor(lm, vs, PROMPTS)
        with_three = len(calls)
        calls.clear()
        monitor(lm, vs[:1], PROMPTS)
        with_one = len(calls)
    finally:
        handle.remove()
    assert len(records) == 9
    # Length bucketing may split the prompts into batches, but vectors never add passes.
    assert with_three == with_one and 1 <= with_one <= len(PROMPTS)


def test_monitor_errors() -> None:
    lm = tiny("llama")
    v = random_vector(lm)
    with pytest.raises(PersonavecError, match="no recommended layer: pass a layer"):
        monitor(lm, v, PROMPTS)
    other = random_vector(tiny("llama", n_layers=4))
    with pytest.raises(PersonavecError, match="was made for"):
        monitor(lm, [v, other], PROMPTS, layers=1)
    answered = [*PROMPTS[0], {"role": "assistant", "content": "Once upon a time."}]
    with pytest.raises(PersonavecError, match="conversation 1: ends with a assistant message"):
        monitor(lm, v, [PROMPTS[0], answered], layers=1)
    with pytest.raises(PersonavecError, match="valid layers"):
        monitor(lm, v, PROMPTS, layers=9)
    with pytest.raises(PersonavecError, match="no vectors"):
        monitor(lm, [], PROMPTS, layers=1)


# -- per-token trace during generation ---------------------------------------------------------------


def test_generated_trace_equals_rerun_of_prompt_plus_answer(tiny_lm: LoadedModel) -> None:
    _letters_only(tiny_lm)
    vs = [random_vector(tiny_lm, "a", seed=1), random_vector(tiny_lm, "b", seed=2)]
    layers = [0, 2, 3]
    params = SamplingParams(max_new_tokens=9)
    records = monitor(tiny_lm, vs, PROMPTS, layers=layers, generate=True, params=params)
    answers = generate(tiny_lm, PROMPTS, params)
    assert len(records) == len(PROMPTS) * 2 * 3
    for ci, conv in enumerate(PROMPTS):
        mine = [r for r in records if r.conversation == ci]
        ids = mine[0].token_ids
        assert ids is not None and all(r.token_ids == ids for r in mine)
        assert list(ids) == _plain_generated_ids(tiny_lm, conv, params.max_new_tokens)
        # Ground truth: run prompt + answer again, every token captured at every layer read.
        text = tiny_lm.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
        answered = [*conv, {"role": "assistant", "content": text}]
        enc = encode(tiny_lm.tokenizer, answered)
        assert enc.ids[enc.prompt_len :] == ids  # the re-run sees exactly the generated tokens
        acts = capture_activations(tiny_lm, [answered], layers=layers, poolings=(), tokens=True)
        assert acts.tokens is not None
        for r in mine:
            assert r.answer == answers[ci]
            assert r.tokens is not None and r.token_projections is not None
            assert len(r.token_projections) == len(r.tokens) == len(ids) == params.max_new_tokens
            truth = project(acts.tokens[0][:, layers.index(r.layer)], vs[r.vector], r.layer)
            # The prompt reading comes from generation's own first pass; it equals the plain capture.
            assert r.projection == pytest.approx(float(truth[enc.prompt_len - 1]), abs=1e-5)
            torch.testing.assert_close(
                torch.tensor(r.token_projections), truth[enc.prompt_len :], atol=1e-5, rtol=1e-5
            )
            assert r.response_mean == pytest.approx(float(truth[enc.prompt_len :].mean()), abs=1e-5)


def test_trace_stops_at_end_of_sequence() -> None:
    lm = tiny("llama")
    _letters_only(lm)
    v = random_vector(lm, seed=3)
    params = SamplingParams(max_new_tokens=10)
    full = monitor(lm, v, PROMPTS, layers=2, generate=True, params=params)
    assert full[0].token_ids is not None and full[0].token_projections is not None
    # Make a token that row 0 generates at step 4 the end-of-sequence token: row 0 must stop there,
    # while the other rows (if they never produce it) keep their full answers.
    stop = full[0].token_ids[4]
    k = full[0].token_ids.index(stop)
    lm.model.generation_config.eos_token_id = stop  # type: ignore[union-attr]
    cut = monitor(lm, v, PROMPTS, layers=2, generate=True, params=params)
    assert cut[0].token_ids == full[0].token_ids[:k]
    assert cut[0].token_projections == pytest.approx(full[0].token_projections[:k], abs=1e-5)
    for before, after in zip(full, cut):
        assert after.token_ids is not None and after.token_projections is not None
        assert list(after.token_ids) == _plain_generated_ids(lm, PROMPTS[after.conversation], 10)
        assert len(after.token_projections) == len(after.token_ids)
        assert stop not in after.token_ids
        if before.token_ids is not None and stop not in before.token_ids:
            assert after.token_ids == before.token_ids


def test_generation_is_not_rerun() -> None:
    lm = tiny("llama")
    v = random_vector(lm)
    widths: list[int] = []
    handle = lm.blocks[0].register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    try:
        monitor(lm, v, PROMPTS, layers=[1, 3], generate=True, params=SamplingParams(max_new_tokens=6))
    finally:
        handle.remove()
    # One prefill over the prompts, then one-token decoding steps (one more than the answer length,
    # to read the last token's activation): nothing runs over the whole sequence again.
    assert sum(w > 1 for w in widths) == 1
    assert len(widths) <= 6 + 1


def test_sampled_generation_matches_generate() -> None:
    lm = tiny("qwen2")
    v = random_vector(lm)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    records = monitor(lm, v, PROMPTS, layers=2, generate=True, params=params)
    assert [r.answer for r in records] == generate(lm, PROMPTS, params)


# -- calibration --------------------------------------------------------------------------------------


def _percentile_by_hand(x: float, values: list[float]) -> float:
    """Share of values <= x, linearly interpolated between distinct sorted values (in percent)."""
    vals = sorted(values)
    n = len(vals)
    if x < vals[0]:
        return 0.0
    if x >= vals[-1]:
        return 100.0
    distinct = sorted(set(vals))
    for lo, hi in itertools.pairwise(distinct):
        if lo <= x < hi:
            f_lo = sum(v <= lo for v in vals) / n
            f_hi = sum(v <= hi for v in vals) / n
            return 100.0 * (f_lo + (f_hi - f_lo) * (x - lo) / (hi - lo))
    raise AssertionError("unreachable")


def test_score_on_known_reference() -> None:
    ref = reference_stats([4.0, 1.0, 3.0, 2.0])
    assert ref["values"] == [1.0, 2.0, 3.0, 4.0] and ref["n"] == 4 and ref["mean"] == 2.5
    assert ref["std"] == pytest.approx(math.sqrt(5 / 3))
    z, pct = score(3.5, ref)
    assert z == pytest.approx(1.0 / math.sqrt(5 / 3))
    assert pct == pytest.approx(87.5)
    assert score(2.0, ref)[1] == pytest.approx(50.0)
    assert score(2.5, ref)[1] == pytest.approx(62.5)
    assert score(0.0, ref)[1] == 0.0 and score(4.0, ref)[1] == 100.0 and score(9.0, ref)[1] == 100.0
    ties = reference_stats([1.0, 1.0, 2.0, 2.0])
    assert score(1.0, ties)[1] == pytest.approx(50.0)
    assert score(1.5, ties)[1] == pytest.approx(75.0)
    with pytest.raises(PersonavecError, match="at least 2"):
        reference_stats([1.0])


def test_monitor_scores_against_stored_calibration() -> None:
    lm = tiny("llama")
    v = random_vector(lm, seed=4)
    x = monitor(lm, v, PROMPTS[:1], layers=2)[0].projection
    values = [x - 0.3, x - 0.2, x - 0.05, x + 0.1, x + 0.4, x + 0.4, x - 1.0]
    ref = reference_stats(values)
    cal = {"model_fingerprint": lm.info.fingerprint, "model_id": lm.info.id, "layers": {"2": ref}}
    calibrated = v.with_meta(extra={"calibration": cal})
    r = monitor(lm, calibrated, PROMPTS[:1], layers=2)[0]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((a - mean) ** 2 for a in values) / (len(values) - 1))
    assert r.z == pytest.approx((x - mean) / std, abs=1e-6)
    assert r.percentile == pytest.approx(_percentile_by_hand(x, values), abs=1e-6)
    assert r.note is None
    # Another layer, or another model's calibration, or none at all: no z and a note saying what to do.
    assert monitor(lm, calibrated, PROMPTS[:1], layers=1)[0].note is not None
    other = v.with_meta(extra={"calibration": {**cal, "model_fingerprint": "0" * 16}})
    assert "another model" in (monitor(lm, other, PROMPTS[:1], layers=2)[0].note or "")
    plain = monitor(lm, v, PROMPTS[:1], layers=2)[0]
    assert plain.z is None and plain.percentile is None
    assert "personavec calibrate" in (plain.note or "")


def test_calibrate_stores_neutral_reference(tmp_path: Path) -> None:
    lm = tiny("llama")
    v = _with_layer(random_vector(lm, seed=6), 2)
    assert len(NEUTRAL_PROMPTS) >= 40
    out = calibrate(lm, v, layers=[1])
    cal = out.meta.extra["calibration"]
    assert out.meta.extra["recommended_layer"] == 2
    assert set(cal["layers"]) == {"1", "2"}
    assert cal["model_fingerprint"] == lm.info.fingerprint and cal["prompt_set"] == "neutral-v1"
    assert len(cal["prompt_set_sha256"]) == 16
    json.dumps(cal)  # JSON-able
    convs = [[{"role": "user", "content": p}] for p in NEUTRAL_PROMPTS]
    acts = capture_activations(lm, convs, layers=[2], poolings=(last_prompt,))
    truth = project(acts.at("last_prompt", 2), v, 2)
    entry = cal["layers"]["2"]
    assert entry["n"] == len(NEUTRAL_PROMPTS)
    assert entry["values"] == pytest.approx(sorted(truth.tolist()), abs=1e-5)
    assert entry["mean"] == pytest.approx(float(truth.mean()), abs=1e-5)
    assert entry["std"] == pytest.approx(float(truth.std()), abs=1e-5)
    # Stored in the file and used by monitor: a neutral prompt lands inside the reference range.
    again = PersonaVector.load(out.save(tmp_path / "v.safetensors"))
    r = monitor(lm, again, convs[:1])[0]
    assert r.z is not None and r.percentile is not None and 0.0 < r.percentile <= 100.0
    assert r.z == pytest.approx((float(truth[0]) - entry["mean"]) / entry["std"], abs=1e-4)
    # Re-calibrating one layer keeps the other.
    assert set(calibrate(lm, again, layers=3).meta.extra["calibration"]["layers"]) == {"1", "2", "3"}
    with pytest.raises(PersonavecError, match="no recommended layer"):
        calibrate(lm, random_vector(lm))


# -- JSONL --------------------------------------------------------------------------------------------


def test_jsonl_reader_reports_bad_lines_and_keeps_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "convs.jsonl"
    lines = [
        json.dumps([{"role": "user", "content": "First?"}]),
        "{not json",
        json.dumps(
            {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2?"}]}
        ),
        json.dumps([{"role": "robot", "content": "beep"}]),
        "",
        json.dumps([{"role": "user", "content": "   "}]),
        json.dumps({"prompt": "no messages key"}),
        json.dumps("just a string"),
        json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
        json.dumps([{"role": "user", "content": "Last?"}]),
    ]
    path.write_text("\n".join(lines) + "\n")
    good, errors = read_conversations_jsonl(path)
    assert [c[-1]["content"] for c in good] == ["First?", "2?", "Last?"]
    assert good[1][0] == {"role": "system", "content": "Be kind."}
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (2, 4, 6, 7, 8, 9)]
    assert "not valid JSON" in errors[0]
    assert "unknown role 'robot'" in errors[1]
    assert "empty content" in errors[2]
    assert "messages" in errors[3] and "list" in errors[4]
    assert "user turn" in errors[5]
    assert all("\n" not in e for e in errors)
    with pytest.raises(PersonavecError, match="not found"):
        read_conversations_jsonl(tmp_path / "missing.jsonl")


def test_record_to_dict() -> None:
    r = MonitorRecord(1, 0, "evil", 3, 0.5, answer="hi", tokens=("h", "i"), token_ids=(5, 6),
                      token_projections=(0.1, 0.2), response_mean=0.15)  # fmt: skip
    d = json.loads(json.dumps(r.to_dict()))
    assert d["tokens"] == ["h", "i"] and d["z"] is None and d["response_mean"] == 0.15
    assert "tokens" not in MonitorRecord(0, 0, "evil", 3, 0.5).to_dict()


# -- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder, load_model(str(folder))


def _vector_file(lm: LoadedModel, path: Path, trait: str, seed: int, layer: int | None) -> Path:
    v = random_vector(lm, trait, seed=seed)
    return (v if layer is None else _with_layer(v, layer)).save(path)


def test_cli_monitor_json_and_calibrate(saved_model: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    folder, lm = saved_model
    evil = _vector_file(lm, tmp_path / "evil.safetensors", "evil", 1, 2)
    funny = _vector_file(lm, tmp_path / "funny.safetensors", "funny", 2, 3)
    runner = CliRunner()
    args = [
        "monitor",
        str(evil),
        str(funny),
        "--model",
        str(folder),
        "--prompt",
        "Tell me a story.",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    recs = doc["records"]
    assert [(r["trait"], r["layer"], r["conversation"]) for r in recs] == [("evil", 2, 0), ("funny", 3, 0)]
    expected = monitor(lm, [PersonaVector.load(evil), PersonaVector.load(funny)], PROMPTS[:1])
    assert [r["projection"] for r in recs] == pytest.approx([e.projection for e in expected], abs=1e-5)
    assert all(r["z"] is None and r["percentile"] is None for r in recs)
    assert any(f"personavec calibrate {evil}" in n for n in doc["notes"])

    result = runner.invoke(app, ["calibrate", str(evil), "--model", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layers"]["2"]["n"] == len(NEUTRAL_PROMPTS)
    assert "calibration" in PersonaVector.load(evil).meta.extra

    recs = json.loads(runner.invoke(app, args).stdout)["records"]
    assert recs[0]["z"] is not None and 0.0 <= recs[0]["percentile"] <= 100.0
    assert recs[1]["z"] is None

    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0 and "percentile" in table.stdout and "n/a" in table.stdout


def test_cli_monitor_file_with_bad_lines_and_generate(
    saved_model: tuple[Path, LoadedModel], tmp_path: Path
) -> None:
    folder, lm = saved_model
    evil = _vector_file(lm, tmp_path / "evil.safetensors", "evil", 1, 2)
    convs = tmp_path / "c.jsonl"
    convs.write_text(
        json.dumps([{"role": "user", "content": "Hello"}])
        + "\nnot json\n"
        + json.dumps({"messages": [{"role": "user", "content": "Name a colour."}]})
        + "\n"
    )
    base = ["monitor", str(evil), "--model", str(folder), "--file", str(convs), "--generate"]
    result = CliRunner().invoke(app, [*base, "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    assert f"{convs}:2: not valid JSON" in result.stderr
    recs = json.loads(result.stdout)["records"]
    assert [(r["conversation"], r["line"]) for r in recs] == [(0, 1), (1, 3)]
    for r in recs:
        assert len(r["token_projections"]) == len(r["tokens"]) == len(r["token_ids"]) <= 5
    table = CliRunner().invoke(app, [*base, "--max-new-tokens", "5"])
    assert table.exit_code == 0 and "response mean" in table.stdout


def test_cli_errors_are_one_line(saved_model: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    folder, _lm = saved_model
    other = _vector_file(tiny("llama", n_layers=4), tmp_path / "other.safetensors", "evil", 1, 2)
    runner = CliRunner()
    result = runner.invoke(app, ["monitor", str(other), "--model", str(folder), "--prompt", "Hi", "--json"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was made for" in errors[0] and "Traceback" not in result.stderr
    assert result.stdout == ""
    result = runner.invoke(app, ["monitor", str(other), "--model", str(folder)])
    assert result.exit_code == 2 and "exactly one of --prompt" in result.stderr


# -- embedded model -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_embedded_monitor_trace_matches_hidden_states() -> None:
    lm = load_model()
    vs = [random_vector(lm, "a", seed=1), random_vector(lm, "b", seed=2)]
    prompts = [[{"role": "user", "content": "How do I boil an egg?"}], [{"role": "user", "content": "Hi!"}]]
    params = SamplingParams(max_new_tokens=8)
    records = monitor(lm, vs, prompts, layers=15, generate=True, params=params)
    assert [r.answer for r in records[::2]] == generate(lm, prompts, params)
    for r in records:
        enc = encode(lm.tokenizer, prompts[r.conversation])
        assert r.token_ids is not None and r.token_projections is not None
        ids, _layout, _pos = pad_batch([enc], 0, "right", lm.device)
        full = torch.cat([ids, torch.tensor([r.token_ids])], dim=1)
        with torch.no_grad():
            hs = lm.backbone(input_ids=full, output_hidden_states=True).hidden_states[15][0]
        truth = project(hs, vs[r.vector], 15)
        assert r.projection == pytest.approx(float(truth[enc.prompt_len - 1]), abs=1e-3)
        torch.testing.assert_close(
            torch.tensor(r.token_projections), truth[enc.prompt_len :], atol=1e-3, rtol=1e-4
        )
