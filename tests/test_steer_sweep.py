"""Read-back, the steering sweep and its automatic choice, the steer CLI, and the HTML report."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.activations import capture_activations, response_mean
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel
from personavec.core.steering import project
from personavec.core.store import JsonlStore
from personavec.core.vectors import PersonaVector
from personavec.judging.base import JudgeItem
from personavec.judging.coherence import PerplexityCoherence
from personavec.reports import write_report
from personavec.steer.readback import perplexity_ratio, read_back
from personavec.steer.sweep import (
    DEFAULT_STEER_FRACTION,
    Cell,
    Guard,
    SweepResult,
    choose,
    default_layers,
    readback_layer,
    spearman,
    steering_defaults,
    sweep,
    with_choice,
)
from personavec.traits import load_trait
from tests.conftest import make_model, make_tokenizer, tiny
from tests.helpers import generate_threads, random_vector

ITEMS = [
    ("Hi there, how are you?", "I am well, thanks for asking! And you?"),
    ("Name a colour.", "Blue."),
    ("What is a tree?", "A tall plant with a woody trunk that stores carbon."),
]
TINY = SamplingParams(max_new_tokens=4)


def _vector(lm: LoadedModel, seed: int = 0) -> PersonaVector:
    v = random_vector(lm, trait="evil", seed=seed)
    return v.with_meta(extra={"recommended_layer": 2})


# -- read-back ---------------------------------------------------------------------------------------
def test_readback_equals_manual_projection_and_likelihood(tiny_lm: LoadedModel) -> None:
    lm = tiny_lm
    v = _vector(lm)
    rb = read_back(lm, v, [*ITEMS, ("Empty?", "  ")], 2, tokens=True, batch_size=2)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in ITEMS]
    acts = capture_activations(lm, convs, layers=[2], poolings=[response_mean])
    manual = project(acts.at("response_mean", 2), v, 2)
    assert torch.allclose(torch.tensor(rb.projection[:3]), manual, atol=1e-5)
    assert math.isnan(rb.projection[3]) and math.isnan(rb.log_likelihood[3])  # empty: unmeasured, not 0
    lls = PerplexityCoherence(lm).log_likelihood([JudgeItem(q, a) for q, a in ITEMS])
    assert rb.log_likelihood[:3] == pytest.approx(lls, abs=1e-4)
    # Per-token projections average to the pooled one.
    assert rb.token_projection is not None and rb.tokens is not None
    for i in range(3):
        toks = rb.token_projection[i]
        assert len(toks) == len(rb.tokens[i]) > 0
        assert sum(toks) / len(toks) == pytest.approx(rb.projection[i], abs=1e-5)
    assert perplexity_ratio(rb, rb) == pytest.approx(1.0)


# -- the chooser on made-up cells --------------------------------------------------------------------
def test_readback_ignores_passes_of_other_threads(tiny_lm: LoadedModel) -> None:
    lm = tiny_lm
    v = _vector(lm)
    alone = read_back(lm, v, ITEMS, 2)
    # After the blocks of each read-back pass (at its LM head), another thread runs a whole pass of its
    # own through the same blocks, as the sweep's second stream does; the read-back must keep its own
    # activations, not pick up the other pass's.
    me = threading.get_ident()
    other_ids = torch.randint(3, 60, (2, 9))

    def interleave(_m: torch.nn.Module, _args: object) -> None:
        if threading.get_ident() == me:
            worker = threading.Thread(target=lambda: lm.backbone(input_ids=other_ids))
            worker.start()
            worker.join()

    handle = lm.model.get_output_embeddings().register_forward_pre_hook(interleave)
    try:
        with torch.inference_mode():
            mixed = read_back(lm, v, ITEMS, 2)
    finally:
        handle.remove()
    assert mixed.projection == pytest.approx(alone.projection, abs=1e-5)
    assert mixed.log_likelihood == pytest.approx(alone.log_likelihood, abs=1e-5)


def _cell(cond: str, layer: int, coef: float, trait: float, ppl: float, coh: float | None = None) -> Cell:
    return Cell(cond, layer, coef, coef / 10, trait, ppl, 0.0, None, coh, 5)


BASE = {
    "amplify": _cell("amplify", 0, 0.0, 1.0, 1.0, 80.0),
    "suppress": _cell("suppress", 0, 0.0, 5.0, 1.0, 80.0),
}


def test_choose_respects_perplexity_guard() -> None:
    cells = [
        _cell("amplify", 4, 1.0, 2.0, 1.2),
        _cell("amplify", 4, 3.0, 9.0, 3.5),  # biggest rise, but perplexity 3.5x: not coherent
        _cell("amplify", 6, 2.0, 4.0, 1.9),  # the best coherent one
        Cell("amplify", 6, 50.0, 5.0, 100.0, 1.0, refused=True),  # would win, but refused
        _cell("suppress", 4, -1.0, 4.0, 1.1),
        _cell("suppress", 4, -3.0, 1.0, 2.5),  # biggest drop, incoherent
        _cell("suppress", 6, -2.0, 3.0, 1.5),
    ]
    choice = choose(cells, BASE, use_judge=False)
    assert (choice["amplify"]["layer"], choice["amplify"]["coef"]) == (6, 2.0)
    assert choice["amplify"]["trait_change"] == pytest.approx(3.0)
    assert (choice["suppress"]["layer"], choice["suppress"]["coef"]) == (6, -2.0)
    assert choice["chosen_by"]["signal"] == "perplexity"
    # A looping answer is likely text: the repetition check keeps it out.
    loop = Cell("amplify", 6, 2.5, 0.25, 8.0, 1.0, 0.9, None, None, 5)
    assert choose([*cells, loop], BASE, use_judge=False)["amplify"]["coef"] == 2.0
    # Stricter guard: nothing amplifying passes except the first cell.
    strict = choose(cells, BASE, use_judge=False, guard=Guard(ppl_ratio_max=1.5))
    assert strict["amplify"]["coef"] == 1.0


def test_choose_respects_judge_guard_and_needs_a_change() -> None:
    cells = [
        _cell("amplify", 4, 1.0, 2.0, 5.0, coh=70.0),  # perplexity bad, but the judge decides here
        _cell("amplify", 4, 2.0, 6.0, 1.0, coh=40.0),  # incoherent by the judge
        _cell("suppress", 4, -1.0, 6.0, 1.0, coh=90.0),  # raises the trait: not a suppression
    ]
    choice = choose(cells, BASE, use_judge=True, coherence_judge="perplexity:x")
    assert choice["amplify"]["coef"] == 1.0
    assert choice["suppress"] is None
    assert choice["chosen_by"]["signal"] == "judge" and "perplexity:x" in choice["chosen_by"]["guard"]
    # Nothing raises the trait: no amplifying choice.
    assert choose([_cell("amplify", 4, 1.0, 0.5, 1.0, 90.0)], BASE, use_judge=True)["amplify"] is None


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 2, 3, None], [1, 1, 1, 5]) is None  # no spread


# -- the sweep ---------------------------------------------------------------------------------------
def test_sweep_resumes_and_round_trips_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny("llama", n_layers=4)
    v = _vector(lm)
    spec = load_trait("evil")
    store_path = tmp_path / "sweep.jsonl"
    seen: list[int] = []
    first = sweep(
        lm,
        v,
        spec,
        store=JsonlStore(store_path),
        quick=True,
        n_questions=2,
        params=TINY,
        on_progress=seen.append,
    )
    assert default_layers(v, quick=True) == [1, 2]  # recommended + 1/3 depth (1/2 is taken)
    assert len(first.cells) == 2 * 2 * 3 and not any(c.refused for c in first.cells)
    assert sum(seen) == 2 * (1 + 2 * 3) * 2
    amp = [c for c in first.cells if c.condition == "amplify"]
    assert all(c.coef > 0 for c in amp) and sorted({c.fraction for c in amp}) == [0.0625, 0.125, 0.25]
    assert all(math.isfinite(c.trait) and math.isfinite(c.ppl_ratio) for c in first.cells)
    n_records = len(JsonlStore(store_path))

    # The second run must recompute nothing: generation and read-back would fail if called.
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("recomputed a cached answer")

    monkeypatch.setattr("personavec.steer.sweep.generate", boom)
    monkeypatch.setattr("personavec.steer.sweep.read_back", boom)
    monkeypatch.setattr("personavec.steer.sweep._examples", lambda *_a: [])
    second = sweep(lm, v, spec, store=JsonlStore(store_path), quick=True, n_questions=2, params=TINY)
    assert len(JsonlStore(store_path)) == n_records
    assert [c.to_dict() for c in second.cells] == [c.to_dict() for c in first.cells]

    # Metadata round trip: the choice lands in the file and drives the defaults.
    first.choice["amplify"] = first.choice["amplify"] or {
        "layer": 3,
        "coef": 0.5,
        "coef_fraction_of_residual_norm": 0.1,
    }
    path = with_choice(v, first).save(tmp_path / "v.safetensors")
    back = PersonaVector.load(path)
    steering = back.meta.extra["steering"]
    assert steering["amplify"]["layer"] == first.choice["amplify"]["layer"]
    assert steering["chosen_by"] == first.choice["chosen_by"]
    assert back.meta.extra["recommended_layer"] == 2  # other metadata kept
    d = steering_defaults(lm, back)
    assert (d["layer"], d["coef"]) == (first.choice["amplify"]["layer"], first.choice["amplify"]["coef"])
    # Without a stored choice: recommended layer, coefficient from the residual norm.
    fresh = steering_defaults(lm, v)
    assert fresh["layer"] == 2 and fresh["fraction"] == DEFAULT_STEER_FRACTION == 0.125 and fresh["coef"] > 0


def test_sweep_on_two_streams_matches_one(tmp_path: Path) -> None:
    lm = tiny("qwen2", n_layers=4)
    v = _vector(lm)
    spec = load_trait("evil")
    sampled = SamplingParams(max_new_tokens=5, temperature=1.0)
    kw: dict[str, Any] = {"quick": True, "n_questions": 2, "params": sampled, "batch_size": 5}
    one = sweep(lm, v, spec, store=JsonlStore(tmp_path / "one.jsonl"), workers=1, **kw)
    with generate_threads(lm) as threads:
        two = sweep(lm, v, spec, store=JsonlStore(tmp_path / "two.jsonl"), workers=2, **kw)
    # Baseline (4 rows) and two layers of 12 rows each, in batches of at most 5: 1 + 3 + 3 batches.
    assert len(threads) == 7 and threading.get_ident() not in threads and len(set(threads)) == 2
    records = [list(JsonlStore(tmp_path / f"{n}.jsonl").records()) for n in ("one", "two")]
    assert records[0] == records[1] and len(records[0]) == 4 + 2 * 12
    assert [c.to_dict() for c in two.cells] == [c.to_dict() for c in one.cells]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_sweep_refuses_huge_coefficients(tmp_path: Path) -> None:
    lm = tiny("llama")
    v = _vector(lm)
    result = sweep(
        lm, v, load_trait("evil"), layers=[2], coefs=[1e6], store=JsonlStore(tmp_path / "s.jsonl"),
        n_questions=2, params=TINY,
    )  # fmt: skip
    assert all(c.refused for c in result.cells) and len(result.warnings) == 2
    assert result.choice["amplify"] is None and result.choice["suppress"] is None


# -- CLI ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    lm = LoadedModel.from_hf(make_model("llama"), make_tokenizer(), model_id=str(folder))
    vec = _vector(lm).with_meta(model_id=str(folder)).save(tmp_path / "run" / "vector.safetensors")
    return folder, vec


def test_cli_steer_json(tiny_folder: tuple[Path, Path]) -> None:
    _folder, vec = tiny_folder
    args = ["steer", str(vec), "--prompt", "Hi there", "--max-new-tokens", "4", "--layer", "2"]
    result = CliRunner().invoke(app, [*args, "--coef", "0.5", "--coef", "-0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layer"] == 2 and doc["coef_source"] == "given"
    assert [a["coef"] for a in doc["answers"]] == [0.0, 0.5, -0.5]
    assert all(isinstance(a["answer"], str) and math.isfinite(a["readback"]) for a in doc["answers"])
    # No layer/coef: derived from the residual norm at the recommended layer.
    result = CliRunner().invoke(app, ["steer", str(vec), "--prompt", "Hi", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layer"] == 2 and "residual norm" in doc["coef_source"]
    assert doc["answers"][1]["fraction_of_residual_norm"] == pytest.approx(DEFAULT_STEER_FRACTION)


def test_cli_steer_bad_input(tiny_folder: tuple[Path, Path], tmp_path: Path) -> None:
    folder, vec = tiny_folder
    runner = CliRunner()
    cases = {
        "empty": (["--prompt", "  "], "prompt is empty"),
        "layer": (["--prompt", "Hi", "--layer", "9"], "layer 9 is out of range"),
        "positions": (["--prompt", "Hi", "--positions", "middle"], "positions must be"),
    }
    for extra, message in cases.values():
        result = runner.invoke(app, ["steer", str(vec), *extra])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # Coefficient too large: a warning, not a refusal.
    result = runner.invoke(
        app, ["steer", str(vec), "--prompt", "Hi", "--coef", "1e5", "--max-new-tokens", "2"]
    )
    assert result.exit_code == 0 and "warning: coef" in result.stderr
    # A vector made for another model shape.
    other = random_vector(tiny("llama", n_layers=5), trait="evil").with_meta(model_id=str(folder))
    path = other.save(tmp_path / "other.safetensors")
    result = runner.invoke(app, ["steer", str(path), "--prompt", "Hi"])
    assert result.exit_code == 2 and "was made for" in result.stderr and "5 blocks" in result.stderr


def test_cli_chat(tiny_folder: tuple[Path, Path]) -> None:
    _folder, vec = tiny_folder
    result = CliRunner().invoke(
        app, ["chat", str(vec), "--layer", "2", "--coef", "0.5", "--max-new-tokens", "3"], input="Hello\n\n"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("model>") == 1 and "read-back at layer 2" in result.stderr


# -- report ------------------------------------------------------------------------------------------
def _run_folder(tmp_path: Path) -> Path:
    lm = tiny("llama")
    v = _vector(lm)
    spec = load_trait("evil")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trait.yaml").write_text(spec.to_yaml(), encoding="utf-8")
    layers = list(range(1, lm.info.n_blocks + 1))
    ev = {"layers": layers, "auroc": [0.5, 0.8, 0.7], "effect_size": [0.1, 1.2, 0.9], "labels": "test"}
    summary = {
        "trait": "evil",
        "model": lm.info.to_dict(),
        "counts": {"total_pos": 4, "kept_pos": 3, "total_neg": 4, "kept_neg": 4},
        "recommended_layer": 2,
        "evaluation": {name: ev for name in ("response_mean", "prompt_mean", "last_prompt")},
        "trait_judge": "embedding",
        "coherence_judge": "perplexity",
    }
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    result: SweepResult = sweep(
        lm, v, spec, store=JsonlStore(run / "sweep.jsonl"), quick=True, n_questions=2, params=TINY
    )
    (run / "sweep.json").write_text(json.dumps(result.to_dict(), default=str), encoding="utf-8")
    return run


def test_report_is_self_contained(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    path = write_report(run)
    page = path.read_text(encoding="utf-8")
    for section in ("id='trait'", "id='filtering'", "id='separation'", "id='dose-response'", "id='examples'"):
        assert section in page
    assert "id='heatmap'" in page and "<span style='background:rgba(" in page
    assert not re.search(r"https?://", page), "the report must not reference the network"
    assert "<script" not in page.lower()
    assert page.count("data:image/png;base64,") == 2
    assert (run / "dose_response.png").stat().st_size > 1000 and (run / "separation.png").is_file()


def test_report_browser(tmp_path: Path) -> None:
    """Render in headless Chromium (``apt-get install -y chromium``); skipped when it is absent."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    path = write_report(_run_folder(tmp_path))
    script = Path(__file__).resolve().parent.parent / "bench" / "render_report.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(path), "--png", str(tmp_path / "shot.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["pixel_variance"] > 1e-4 and not doc["console_errors"]


def test_report_needs_a_run_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--no-model"])
    assert result.exit_code == 2 and "not a run folder" in result.stderr


class _LengthJudge:
    """A fake judge: longer answers score higher (deterministic, varied across cells)."""

    def __init__(self, name: str, offset: float = 0.0) -> None:
        self.name = name
        self.offset = offset
        self.calls = 0

    def score(self, items: list[JudgeItem]) -> list[float | None]:
        self.calls += 1
        return [min(100.0, self.offset + 10.0 * len(it.answer)) for it in items]


def test_sweep_with_judges(tmp_path: Path) -> None:
    lm = tiny("llama")
    v = _vector(lm)
    tj, cj = _LengthJudge("fake-trait"), _LengthJudge("fake-coherence", offset=20.0)
    kwargs = {"store": JsonlStore(tmp_path / "s.jsonl"), "quick": True, "n_questions": 2, "params": TINY}
    result = sweep(lm, v, load_trait("evil"), trait_judge=tj, coherence_judge=cj, **kwargs)  # type: ignore[arg-type]
    assert all(c.judge_trait is not None and c.judge_coherence is not None for c in result.cells)
    assert result.choice["chosen_by"]["signal"] == "judge"
    assert set(result.agreement) == {"readback_vs_judge_trait", "ppl_ratio_vs_judge_coherence"}
    # Cached scores are reused: a second sweep does not call the judges.
    tj2, cj2 = _LengthJudge("fake-trait"), _LengthJudge("fake-coherence", offset=20.0)
    kwargs["store"] = JsonlStore(tmp_path / "s.jsonl")
    again = sweep(lm, v, load_trait("evil"), trait_judge=tj2, coherence_judge=cj2, **kwargs)  # type: ignore[arg-type]
    assert tj2.calls == cj2.calls == 0
    assert [c.judge_coherence for c in again.cells] == [c.judge_coherence for c in result.cells]


def test_cli_sweep_writes_choice_and_report(tiny_folder: tuple[Path, Path]) -> None:
    _folder, vec = tiny_folder
    args = ["sweep", str(vec), "--trait", "evil", "--quick", "--n-questions", "2", "--max-new-tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # strict JSON: no NaN tokens
    assert "NaN" not in result.stdout
    assert len(doc["cells"]) == 12 and doc["choice"]["chosen_by"]["signal"] == "perplexity"
    assert Path(doc["report"]).is_file() and (vec.parent / "sweep.json").is_file()
    steering = PersonaVector.load(vec).meta.extra["steering"]
    assert steering["chosen_by"] == doc["choice"]["chosen_by"]
    # The table form lists every cell and says which signal chose.
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "chosen by" in table.stdout and "% resid." in table.stdout
    bad = CliRunner().invoke(app, [*args, "--coefs", "a,b"])
    assert bad.exit_code == 2 and "cannot parse coefficients" in bad.stderr


def test_cli_ctrl_c_is_one_line(tiny_folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _folder, vec = tiny_folder

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("personavec.steer.sweep.sweep", interrupted)
    result = CliRunner().invoke(app, ["sweep", str(vec), "--trait", "evil", "--quick"])
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 130
    assert last == "interrupted: finished batches are saved, the same command resumes"
    monkeypatch.setattr("personavec.core.generation.generate", interrupted)
    result = CliRunner().invoke(app, ["steer", str(vec), "--prompt", "Hi", "--layer", "2", "--coef", "1"])
    assert result.exit_code == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "interrupted"  # steer has nothing to resume


@pytest.mark.parametrize(
    ("recommended", "expected"),
    [(10, [10, 12, 15, 20]), (4, [4, 10, 15, 20]), (15, [10, 15, 17, 20]), (None, [10, 15, 17, 20])],
)
def test_default_grid_layers(recommended: int | None, expected: list[int]) -> None:
    from personavec.core.vectors import VectorMeta

    meta = VectorMeta(trait="t", model_id="m", model_fingerprint="f", n_blocks=30, hidden_size=4)
    extra = {} if recommended is None else {"recommended_layer": recommended}
    v = PersonaVector(torch.ones(31, 4), meta).with_meta(extra=extra)
    assert default_layers(v) == expected
    assert default_layers(v, quick=True) == sorted({readback_layer(v), 15 if readback_layer(v) != 15 else 10})
