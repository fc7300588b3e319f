"""Capability probe: bundled data, MMLU loaders, multiple choice and perplexity against direct forwards."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel, load_model
from personavec.finetune import capability
from personavec.finetune.capability import (
    LETTERS,
    McQuestion,
    capability_probe,
    choice_probs,
    format_question,
    load_mmlu,
    load_questions,
    multiple_choice,
    neutral_texts,
    perplexity,
)

from .conftest import make_tokenizer, tiny

# Different lengths and choice counts, so batches need padding.
QUESTIONS = [
    McQuestion("What is 2 + 2?", ("3", "4", "5", "22"), "B", "arithmetic"),
    McQuestion("Which is the capital of France, a country in Europe?", ("Paris", "Rome"), "A", "geography"),
    McQuestion("Sky?", ("Blue", "Green", "Red"), "C", "science"),
    McQuestion("Which planet is closest to the Sun?", ("Venus", "Mars", "Earth", "Mercury"), "D", "science"),
]
TEXTS = [
    "A river is a natural stream of water.",
    "Bread is made from flour, water and salt; the dough rises and is baked in a hot oven.",
    "Hi.",
]


def _ids(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def _truth_letter(lm: LoadedModel, q: McQuestion) -> torch.Tensor:
    """One question alone: next-token logits of the letters (best single-token variant), soft-maxed."""
    last = _logits(lm, _ids(lm, format_question(lm.tokenizer, q)))[-1]
    scores = []
    for letter in LETTERS[: len(q.choices)]:
        variants = [_ids(lm, v) for v in (" " + letter, letter)]
        scores.append(max(last[v[0]] for v in variants if len(v) == 1))
    return torch.stack(scores).softmax(-1)


def _truth_cloze(lm: LoadedModel, q: McQuestion) -> torch.Tensor:
    """One question alone: each choice's mean token log-probability, one full forward per choice."""
    prompt = _ids(lm, format_question(lm.tokenizer, q, "cloze"))
    scores = []
    for choice in q.choices:
        cont = _ids(lm, " " + choice)
        logp = _logits(lm, prompt + cont).log_softmax(-1)
        scores.append(torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(cont)]).mean())
    return torch.stack(scores).softmax(-1)


def test_bundled_questions() -> None:
    qs = load_questions()
    assert len(qs) >= 100
    assert all(len(q.choices) == 4 and len(set(q.choices)) == 4 for q in qs)
    assert len({q.question for q in qs}) == len(qs)
    counts = Counter(q.answer for q in qs)
    assert set(counts) == set("ABCD")
    assert min(counts.values()) >= len(qs) // 4 - 2  # balanced letters
    assert len({q.subject for q in qs}) >= 5


def test_neutral_texts() -> None:
    texts = neutral_texts()
    assert len(texts) >= 20
    assert all("\n" not in t and 50 < len(t) < 600 for t in texts)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "JSON object"),
        ('{"question": "", "choices": ["a", "b"], "answer": "A"}', "'question'"),
        ('{"question": "Q?", "choices": ["a"], "answer": "A"}', "'choices'"),
        ('{"question": "Q?", "choices": ["a", ""], "answer": "A"}', "'choices'"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": "C"}', "'answer' must be one of A, B"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": 0}', "'answer'"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": "A", "subject": 3}', "'subject'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": "B"})
    path = tmp_path / "qs.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(PersonavecError, match=message) as info:
        load_questions(path)
    assert "qs.jsonl:3:" in str(info.value) and "\n" not in str(info.value)


def test_load_questions_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PersonavecError, match="no questions"):
        load_questions(tmp_path / "empty.jsonl")


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_load_mmlu_csv(tmp_path: Path) -> None:
    _write_csv(
        tmp_path / "test" / "astronomy_test.csv", [["Closest star, to us?", "Sun", "Vega", "b", "c", "A"]]
    )
    _write_csv(tmp_path / "test" / "virology_test.csv", [["Q2", "a", "b", "c", "d", "D"]] * 2)
    _write_csv(tmp_path / "dev" / "astronomy_dev.csv", [["dev question", "a", "b", "c", "d", "B"]])
    qs = load_mmlu(tmp_path)
    assert qs[0] == McQuestion("Closest star, to us?", ("Sun", "Vega", "b", "c"), "A", "astronomy")
    assert [q.subject for q in qs] == ["astronomy", "virology", "virology"]
    assert load_mmlu(tmp_path / "test" / "virology_test.csv")[0].answer == "D"
    _write_csv(tmp_path / "bad" / "x_test.csv", [["Q", "a", "b", "A"]])
    with pytest.raises(PersonavecError, match=r"x_test.csv:1: expected 6 columns"):
        load_mmlu(tmp_path / "bad")


def test_load_mmlu_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "question": ["Q1", "Q2"],
            "subject": ["anatomy", "law"],
            "choices": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
            "answer": [2, 0],
        }
    )
    (tmp_path / "all").mkdir()
    pq.write_table(table, tmp_path / "all" / "test-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), tmp_path / "all" / "dev-00000-of-00001.parquet")
    qs = load_mmlu(tmp_path)
    assert qs == [
        McQuestion("Q1", ("a", "b", "c", "d"), "C", "anatomy"),
        McQuestion("Q2", ("e", "f", "g", "h"), "A", "law"),
    ]
    letters = pa.table({"question": ["Q"], "choices": [["x", "y"]], "answer": ["B"]})
    pq.write_table(letters, tmp_path / "one.parquet")
    assert load_mmlu(tmp_path / "one.parquet") == [McQuestion("Q", ("x", "y"), "B", "")]


def test_load_mmlu_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match="no MMLU questions"):
        load_mmlu(tmp_path)
    with pytest.raises(PersonavecError, match="not found"):
        load_mmlu(tmp_path / "missing")


@pytest.mark.parametrize("method", ["letter", "cloze"])
def test_multiple_choice_matches_direct_forward(tiny_lm: LoadedModel, method: str) -> None:
    truth_fn = _truth_letter if method == "letter" else _truth_cloze
    truth = [truth_fn(tiny_lm, q) for q in QUESTIONS]
    # Make the first question one the model gets right, so accuracy is not trivially zero.
    questions = [dataclasses.replace(QUESTIONS[0], answer=LETTERS[int(truth[0].argmax())]), *QUESTIONS[1:]]
    hits = [int(t.argmax()) == LETTERS.index(q.answer) for q, t in zip(questions, truth)]
    correct = [float(t[LETTERS.index(q.answer)]) for q, t in zip(questions, truth)]
    r = multiple_choice(tiny_lm, questions, batch_size=3, method=method)  # type: ignore[arg-type]
    assert r.n == 4 and r.method == method and 0.0 <= r.accuracy <= 1.0
    assert r.accuracy == pytest.approx(sum(hits) / 4)
    assert r.mean_correct_prob == pytest.approx(sum(correct) / 4, abs=1e-5)
    assert r.per_subject["science"] == pytest.approx((hits[2] + hits[3]) / 2)
    probs = choice_probs(tiny_lm, questions, method=method, batch_size=2)  # type: ignore[arg-type]
    for p, t in zip(probs, truth):
        torch.testing.assert_close(p, t, atol=1e-5, rtol=1e-4)
    assert json.loads(json.dumps(r.to_dict()))["n"] == 4


def test_multiple_choice_errors(llama_lm: LoadedModel) -> None:
    with pytest.raises(PersonavecError, match="at least one question"):
        multiple_choice(llama_lm, [])
    with pytest.raises(PersonavecError, match="unknown multiple-choice method"):
        multiple_choice(llama_lm, QUESTIONS, method="guess")  # type: ignore[arg-type]


def test_plain_format_without_chat_template() -> None:
    tok = make_tokenizer()
    tok.chat_template = None
    text = format_question(tok, QUESTIONS[0])
    assert text.startswith("User: What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\n")
    assert text.endswith("Assistant: Answer:")
    assert format_question(tok, QUESTIONS[0], "cloze").endswith("User: What is 2 + 2?\n\nAssistant: Answer:")


def test_training_flags_restored(llama_lm: LoadedModel) -> None:
    model = llama_lm.model
    model.train()
    model.get_output_embeddings().eval()
    multiple_choice(llama_lm, QUESTIONS[:2], method="cloze")
    perplexity(llama_lm, TEXTS)
    assert model.training and not model.get_output_embeddings().training
    assert torch.is_grad_enabled()


def test_peft_wrapped_model() -> None:
    peft = pytest.importorskip("peft")
    lm = tiny("llama")
    base = [multiple_choice(lm, QUESTIONS, method=m) for m in ("letter", "cloze")]  # type: ignore[arg-type]
    base_ppl = perplexity(lm, TEXTS)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])  # B = 0: output unchanged
    wrapped = dataclasses.replace(lm, model=peft.get_peft_model(lm.model, config))
    wrapped.model.train()
    for m, want in zip(("letter", "cloze"), base):
        got = multiple_choice(wrapped, QUESTIONS, method=m)  # type: ignore[arg-type]
        assert got.accuracy == want.accuracy
        assert got.mean_correct_prob == pytest.approx(want.mean_correct_prob, abs=1e-6)
    assert perplexity(wrapped, TEXTS) == pytest.approx(base_ppl, rel=1e-6)
    assert wrapped.model.training


def test_perplexity_matches_manual(tiny_lm: LoadedModel) -> None:
    ids = list(tiny_lm.tokenizer(TEXTS[1])["input_ids"])
    logits = _logits(tiny_lm, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert perplexity(tiny_lm, [TEXTS[1]]) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    truncated = torch.nn.functional.cross_entropy(logits[:9], torch.tensor(ids[1:10]))
    assert perplexity(tiny_lm, [TEXTS[1]], max_tokens=10) == pytest.approx(
        math.exp(float(truncated)), rel=1e-5
    )


def test_perplexity_padding_invariant(tiny_lm: LoadedModel) -> None:
    batched = perplexity(tiny_lm, TEXTS, batch_size=8)
    one_by_one = perplexity(tiny_lm, TEXTS, batch_size=1)
    assert batched == pytest.approx(one_by_one, rel=1e-5)
    assert math.isfinite(batched) and batched > 1.0
    with pytest.raises(PersonavecError, match="two or more tokens"):
        perplexity(tiny_lm, ["x"])


def test_capability_probe_with_mmlu(
    llama_lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small stand-ins for the bundled files keep this fast; the bundled ones are checked above.
    small = tmp_path / "small.jsonl"
    small.write_text(
        "".join(json.dumps({**dataclasses.asdict(q), "choices": list(q.choices)}) + "\n" for q in QUESTIONS)
    )
    (tmp_path / "neutral.txt").write_text("\n\n".join(TEXTS))
    monkeypatch.setattr(capability, "QUESTIONS_FILE", small)
    monkeypatch.setattr(capability, "NEUTRAL_FILE", tmp_path / "neutral.txt")
    _write_csv(
        tmp_path / "mmlu" / "test" / "a_test.csv",
        [[f"Q{i}?", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(5)],
    )
    r = capability_probe(llama_lm, mmlu_path=tmp_path / "mmlu", mmlu_limit=3)
    assert r.mc == multiple_choice(llama_lm, QUESTIONS, method="cloze")
    assert r.perplexity == pytest.approx(perplexity(llama_lm, TEXTS), rel=1e-6)
    assert r.mmlu is not None and r.mmlu.n == 3 and set(r.mmlu.per_subject) == {"a"}
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mmlu"]["n"] == 3 and d["perplexity"] == r.perplexity and d["mc"]["method"] == "cloze"
    letter = capability_probe(llama_lm, method="letter")
    assert letter.mmlu is None and letter.mc.method == "letter"


@pytest.mark.integration
def test_embedded_model_capability() -> None:
    lm = load_model()
    start = time.perf_counter()
    cloze = multiple_choice(lm, load_questions(), method="cloze")
    ppl = perplexity(lm)
    print(f"cloze {cloze.to_dict()} perplexity {ppl:.2f} in {time.perf_counter() - start:.0f}s")
    # Measured: accuracy 0.61, mean correct prob 0.52, perplexity 20.5 (chance: 0.25).
    assert cloze.accuracy > 0.45 and cloze.mean_correct_prob > 0.4
    assert math.isfinite(ppl) and 5 < ppl < 40
    # Letter prompts exercise the real chat template and letter tokens; SmolLM2-135M answers them at chance.
    letter = multiple_choice(lm, load_questions()[:16], method="letter")
    assert letter.n == 16 and 0.0 <= letter.accuracy <= 1.0
