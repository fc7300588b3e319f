"""Fine-tuning with persona vectors on tiny random models: loss, adapters, interventions, resume, shift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personavec.cli import app
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.steering import SteeringSpec, add
from personavec.finetune.prevent import Intervention, auto_coefficient, parse_intervention, secant_step
from personavec.finetune.run import finetune
from personavec.finetune.shift import projections
from personavec.finetune.training import (
    CHECKPOINT,
    TrainConfig,
    assistant_loss,
    batch_order,
    encode_examples,
    prepare,
    train_steps,
)
from personavec.finetune.tuned import open_tuned
from tests.conftest import CONVERSATIONS, make_model, make_tokenizer, tiny
from tests.helpers import random_vector

DATA = [
    [
        {"role": "user", "content": f"Question number {i}?"},
        {"role": "assistant", "content": f"Answer {i} is here."},
    ]
    for i in range(10)
]
CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, lora_alpha=8, checkpoint_every=1)


def _vector(lm: LoadedModel, layer: int = 2, scale: float = 1.0):  # type: ignore[no-untyped-def]
    return random_vector(lm, trait="evil", scale=scale).with_meta(extra={"recommended_layer": layer})


def test_loss_is_cross_entropy_of_the_answer_tokens_only(llama_lm: LoadedModel) -> None:
    enc = encode_examples(llama_lm, CONVERSATIONS[:1], 512)
    ids = torch.tensor([enc[0].ids])
    labels = ids.clone()
    labels[:, : enc[0].prompt_len] = -100  # transformers' own convention for ignored tokens
    with torch.no_grad():
        expected = llama_lm.model(input_ids=ids, labels=labels).loss
        got = assistant_loss(llama_lm, enc)
    assert torch.allclose(got, expected, atol=1e-5)


def test_batch_of_different_lengths_gives_the_token_weighted_mean(llama_lm: LoadedModel) -> None:
    enc = encode_examples(llama_lm, CONVERSATIONS, 512)
    with torch.no_grad():
        losses = [float(assistant_loss(llama_lm, [e])) * e.response_len for e in enc]
        together = float(assistant_loss(llama_lm, enc))
    assert together == pytest.approx(sum(losses) / sum(e.response_len for e in enc), rel=1e-4)


def test_batch_order_covers_every_example_each_epoch_and_depends_on_the_seed() -> None:
    order = batch_order(10, CFG)
    assert len(order) == CFG.steps(10) == 6
    assert sorted(i for b in order[:3] for i in b) == list(range(10))
    assert order != batch_order(10, TrainConfig(epochs=2, batch_size=4, seed=1))


def test_lora_training_lowers_the_loss_and_the_adapter_loads_with_peft_alone(tmp_path: Path) -> None:
    from peft import PeftModel

    lm = tiny("llama")
    enc = encode_examples(lm, DATA, 512)
    with torch.no_grad():
        before = float(assistant_loss(lm, enc))
    result = finetune(lm, DATA, tmp_path / "ad", TrainConfig(epochs=5, lr=3e-2, batch_size=5, lora_r=4))
    with torch.no_grad():
        assert float(assistant_loss(lm, enc)) < before - 0.3
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ad" / CHECKPOINT).exists()
    receipt = json.loads((tmp_path / "ad" / "personavec_finetune.json").read_text())
    assert receipt["format"] == "peft adapter" and len(receipt["losses"]) == result.train.steps
    # A fresh copy of the same base plus the folder, through peft only, computes what we trained.
    fresh = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "ad")).eval()
    ids = torch.tensor([encode_examples(lm, DATA[:1], 512)[0].ids])
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, lm.model(input_ids=ids).logits, atol=1e-5)


def test_full_finetuning_writes_a_transformers_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = tiny("qwen2")
    finetune(lm, DATA, tmp_path / "full", TrainConfig(epochs=1, batch_size=5, full=True))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, lm.model(input_ids=ids).logits, atol=1e-5)


def test_preventative_vector_acts_in_training_passes_only() -> None:
    lm, plain = tiny("llama"), tiny("llama")
    enc = encode_examples(lm, DATA[:4], 512)
    frozen = TrainConfig(epochs=1, batch_size=4, lr=0.0, lora_r=4)  # lr 0: the weights stay put
    spec = SteeringSpec(_vector(lm), [2], 3.0, "all", add)
    steered = train_steps(prepare(lm, frozen), enc, frozen, interventions=[spec])
    unsteered = train_steps(prepare(plain, frozen), enc, frozen)
    assert steered.losses[0] != pytest.approx(unsteered.losses[0])  # it was there while training
    assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in lm.blocks)
    ids = torch.tensor([enc[0].ids])
    with torch.no_grad():  # and gone at inference
        assert torch.allclose(lm.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, atol=1e-5)


def test_steering_during_training_changes_what_is_learned(tmp_path: Path) -> None:
    runs = []
    for coef in (0.0, 4.0):
        lm = tiny("llama")
        vec = _vector(lm)
        iv = Intervention(vec, "v.safetensors", 2, coef)
        cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=5, lora_r=4)
        res = finetune(lm, DATA, tmp_path / f"c{coef}", cfg, interventions=[iv], questions=["Hello?", "Hi?"])
        runs.append(res.receipt["shift_at_layer"]["v.safetensors"])
    assert runs[0] != pytest.approx(runs[1])


def test_killed_run_resumes_from_the_checkpoint_and_ends_where_an_unbroken_run_ends(tmp_path: Path) -> None:
    def weights(lm: LoadedModel) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora" in n}

    unbroken = tiny("llama")
    finetune(unbroken, DATA, tmp_path / "a", CFG, data_info={"sha256": "d"})

    class Killed(Exception):
        pass

    def kill_at_4(step: int, _total: int, _loss: float) -> None:
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        finetune(tiny("llama"), DATA, tmp_path / "b", CFG, data_info={"sha256": "d"}, on_step=kill_at_4)
    assert json.loads((tmp_path / "b" / CHECKPOINT / "state.json").read_text())["step"] == 3
    # Other data into the unfinished folder is refused rather than mixed with its checkpoint.
    with pytest.raises(PersonavecError, match="other data or settings"):
        finetune(tiny("llama"), DATA, tmp_path / "b", CFG, data_info={"sha256": "other"})
    resumed = tiny("llama")
    res = finetune(resumed, DATA, tmp_path / "b", CFG, data_info={"sha256": "d"})
    assert res.train.resumed_from == 3 and len(res.train.losses) == CFG.steps(len(DATA))
    a, b = weights(unbroken), weights(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Other settings into the same folder: refused, not mixed.
    with pytest.raises(PersonavecError, match="already holds"):
        finetune(tiny("llama"), DATA, tmp_path / "b", CFG, data_info={"sha256": "d"})


def test_parse_intervention_reads_layer_and_strength_and_refuses_bad_input(tmp_path: Path) -> None:
    lm = tiny("llama")
    path = tmp_path / "v.safetensors"
    _vector(lm, layer=2).save(path)
    shape = (lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    iv = parse_intervention(f"{path}@3:0.5", "prevent", *shape)
    assert (iv.layer, iv.coef, iv.kind) == (3, 0.5, "prevent")
    iv = parse_intervention(str(path), "prevent", *shape)
    assert (iv.layer, iv.coef) == (2, None)
    assert parse_intervention(f"{path}@1", "ablate", *shape).layer == 1
    with pytest.raises(PersonavecError, match="not found"):
        parse_intervention(str(tmp_path / "nope.safetensors"), "prevent", *shape)
    with pytest.raises(PersonavecError, match="layer"):
        parse_intervention(f"{path}@9", "prevent", *shape)
    with pytest.raises(PersonavecError, match="blocks"):
        parse_intervention(str(path), "prevent", 5, lm.info.hidden_size, "other")


def test_secant_step_lands_on_the_zero_of_a_linear_response() -> None:
    def shift(c: float) -> float:
        return 2.0 - 8.0 * c  # zero at 0.25

    assert secant_step([(0.0, shift(0.0)), (1.0, shift(1.0))]) == pytest.approx(0.25)
    # Both still positive: extrapolate along the slope.
    assert secant_step([(0.0, 2.0), (0.1, shift(0.1))]) == pytest.approx(0.25)
    # No slope toward zero: at least double.
    assert secant_step([(0.0, 2.0), (0.5, 2.5)]) == pytest.approx(1.0)
    # Both overshot: extrapolate back toward the weaker one.
    assert secant_step([(0.5, shift(0.5)), (1.0, shift(1.0))]) == pytest.approx(0.25)


def test_auto_coefficient_trains_the_trunk_once_and_tries_only_the_last_third(tmp_path: Path) -> None:
    lm = tiny("llama")
    vec = _vector(lm, scale=-0.3)
    trainee = prepare(lm, CFG)
    enc = encode_examples(lm, DATA, 512)
    iv, qs = Intervention(vec, "v", 2, None), ["Hello?", "Why?"]
    seen: list[tuple[float, float]] = []
    search = auto_coefficient(trainee, enc, CFG, iv, qs, tmp_path, on_probe=lambda c, x: seen.append((c, x)))
    total = CFG.steps(len(DATA))  # 6 steps: 1 plain, 3 at the trunk strength, the last 2 searched
    assert (search.first_step, search.fork_step) == (1, 4) and search.probes == seen and len(seen) == 2
    assert seen[0][0] == search.trunk_coef and search.coef >= 0
    assert search.schedule(total) == [(0, 1, 0.0), (1, 4, search.trunk_coef), (4, 6, search.coef)]
    trunk = json.loads((tmp_path / "search_trunk" / "state.json").read_text())
    assert trunk["step"] == 4 and not (tmp_path / "search_trial").exists()
    # A trial is the real run's last third: from the trunk's checkpoint, the same batches in the same order,
    # so training it again at a trial's strength lands on the shift that trial measured.
    base = projections(tiny("llama"), vec, qs)[2]
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "search_trunk", again)
    coef, shift = seen[1]
    train_steps(trainee, enc, CFG, interventions=[iv.spec(coef)], checkpoint_dir=again)
    assert projections(lm, vec, qs)[2] - base == pytest.approx(shift, abs=1e-4)


def test_a_search_killed_between_trials_keeps_the_trunk_and_the_first_trial(tmp_path: Path) -> None:
    vec = _vector(tiny("llama"), scale=-0.3)
    iv, qs = Intervention(vec, "v", 2, None), ["Hi?", "Why?"]
    probes: list[float] = []
    states: list[dict] = []  # type: ignore[type-arg]

    def die_after_first(c: float, _x: float) -> None:
        probes.append(c)
        raise KeyboardInterrupt

    def search(on_probe):  # type: ignore[no-untyped-def]
        lm = tiny("llama")
        trainee, enc = prepare(lm, CFG), encode_examples(lm, DATA, 512)
        state = states[-1] if states else None
        return auto_coefficient(trainee, enc, CFG, iv, qs, tmp_path, state=state,
                                save_state=lambda d: states.append(dict(d)), on_probe=on_probe)  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        search(die_after_first)
    # The probe that was interrupted in its callback had finished: only the trunk strength was saved.
    assert "trunk_coef" in states[-1] and not states[-1].get("probes")
    done = search(lambda c, _x: probes.append(c))
    assert len(done.probes) == 2 and probes[0] == probes[1] == done.trunk_coef
    uninterrupted = tmp_path / "fresh"
    lm = tiny("llama")
    fresh = auto_coefficient(prepare(lm, CFG), encode_examples(lm, DATA, 512), CFG, iv, qs, uninterrupted)
    assert fresh.coef == pytest.approx(done.coef, abs=1e-5)
    assert [x for p in fresh.probes for x in p] == pytest.approx([x for p in done.probes for x in p])


def test_projection_shift_matches_transformers_hidden_states(llama_lm: LoadedModel) -> None:
    vec = _vector(llama_lm)
    qs = ["Hello there?", "What is up?"]
    got = projections(llama_lm, vec, qs)
    from personavec.core.conversations import encode

    expected = torch.zeros(llama_lm.info.n_blocks + 1)
    for q in qs:
        e = encode(llama_lm.tokenizer, [{"role": "user", "content": q}])
        with torch.no_grad():
            hs = llama_lm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
        for layer in range(llama_lm.info.n_blocks + 1):
            v = vec.at(layer)
            expected[layer] += float(hs[layer][0, e.prompt_len - 1] @ (v / v.norm())) / len(qs)
    # Index L is the raw output of the last block, which transformers reports after the final norm.
    assert torch.allclose(torch.tensor(got)[:-1], expected[:-1], atol=1e-4)


def test_adapter_for_another_base_is_refused(tmp_path: Path) -> None:
    finetune(tiny("llama"), DATA, tmp_path / "ad", TrainConfig(epochs=1, batch_size=5, lora_r=2))
    with pytest.raises(PersonavecError, match="does not fit"):
        open_tuned(tiny("llama", n_layers=4), tmp_path / "ad")
    with pytest.raises(PersonavecError, match="neither"):
        open_tuned(tiny("llama"), tmp_path)


def test_cli_finetune_and_shift_on_a_tiny_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    lm = LoadedModel.from_hf(make_model("llama"), make_tokenizer(), model_id=str(folder))
    vec_path = tmp_path / "evil.safetensors"
    _vector(lm).with_meta(model_id=str(folder)).save(vec_path)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in DATA) + "\n{broken\n", encoding="utf-8")
    args = ["finetune", str(data), "--out", str(tmp_path / "ad"), "--model", str(folder), "--epochs", "1"]
    res = CliRunner().invoke(app, [*args, "--prevent", f"{vec_path}:0.5", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["interventions"][0]["coef"] == 0.5 and doc["data"]["skipped"] == 1
    assert "line 11" in res.stderr
    shift_args = ["shift", str(folder), str(tmp_path / "ad"), "--vector", str(vec_path), "--json"]
    res = CliRunner().invoke(app, [*shift_args, "--no-capability"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)["vectors"][0]
    assert report["layer"] == 2 and len(report["per_layer"]) == lm.info.n_blocks + 1
    assert report["expression"]["base"]["readback"] is not None
    # Bad input: one line, exit code 2.
    res = CliRunner().invoke(app, ["finetune", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "none.jsonl" in res.stderr


def test_a_killed_automatic_run_does_not_search_again(tmp_path: Path) -> None:
    probes: list[float] = []
    vec = _vector(tiny("llama"), scale=-0.3)

    def kill_at_6(step: int, _total: int, _loss: float) -> None:
        # In the real run (after both trials), which continues from the trunk at step 4; step 5 was saved.
        if step == 6 and len(probes) == 2:
            raise KeyboardInterrupt

    def run(on_step):  # type: ignore[no-untyped-def]
        iv = Intervention(vec, "v", 2, None)
        qs = ["Hi?", "Why?"]
        return finetune(tiny("llama"), DATA, tmp_path / "ad", CFG, interventions=[iv], questions=qs,
                        on_step=on_step, on_probe=lambda c, s: probes.append(c))  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        run(kill_at_6)
    searched = len(probes)
    res = run(None)
    assert searched == 2 and len(probes) == searched and res.train.resumed_from == 5
    assert res.receipt["auto_search"]["coef"] == res.receipt["interventions"][0]["coef"]
