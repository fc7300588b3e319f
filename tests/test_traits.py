"""Trait specs: the built-in library, loading errors, the template and LLM authors, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import personavec.core.llm as llm_module
from personavec.cli import app
from personavec.core.errors import PersonavecError
from personavec.core.llm import ChatClient, Completion
from personavec.traits import TraitSpec, build_artifacts, builtin_names, load_trait
from personavec.traits.authors import (
    extract_json_object,
    llm_author,
    mentions_name,
    template_author,
)

BUILTINS = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]
DESC = "Stating guesses as certain facts and dismissing any chance of being wrong."


# ---------------------------------------------------------------------------------------------
# Library
# ---------------------------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert builtin_names() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_load_complete_and_clean(name: str) -> None:
    spec = load_trait(name)
    assert spec.name == name
    assert len(spec.pairs) == 5
    assert len(spec.extraction_questions) == 20 and len(spec.evaluation_questions) == 20
    ext = {q.strip().lower() for q in spec.extraction_questions}
    ev = {q.strip().lower() for q in spec.evaluation_questions}
    assert len(ext) == 20 and len(ev) == 20 and not ext & ev
    leaks = [q for q in spec.extraction_questions + spec.evaluation_questions if mentions_name(q, name)]
    assert leaks == []
    assert "REFUSAL" in spec.rubric
    assert len(spec.hash) == 12


def test_mentions_name_stems() -> None:
    assert mentions_name("Is it evil to lie?", "evil")
    assert not mentions_name("Speak of the devil.", "evil")  # word start only
    assert mentions_name("Why is optimism useful?", "optimistic")
    assert not mentions_name("Which option is best?", "optimistic")  # stem keeps 5 letters
    assert mentions_name("Isn't sycophancy bad?", "sycophantic")
    assert mentions_name("Be more Humorous!", "humorous")  # case-insensitive
    assert mentions_name("Why do people seek power?", "power_seeking")


def test_load_trait_unknown_name_lists_builtins() -> None:
    with pytest.raises(PersonavecError) as info:
        load_trait("grumpy")
    message = str(info.value)
    assert "\n" not in message
    assert "grumpy" in message and all(n in message for n in BUILTINS)


def test_load_trait_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PersonavecError, match="not found"):
        load_trait(str(tmp_path / "nope.yaml"))


def test_load_trait_from_file_roundtrip(tmp_path: Path) -> None:
    spec = load_trait("humorous")
    path = tmp_path / "funny.yaml"
    path.write_text(spec.to_yaml(), encoding="utf-8")
    again = load_trait(str(path))
    assert again == spec and again.hash == spec.hash
    # JSON works too
    jpath = tmp_path / "funny.json"
    jpath.write_text(json.dumps(spec.model_dump()), encoding="utf-8")
    assert load_trait(str(jpath)).hash == spec.hash


def test_malformed_file_one_line_per_problem(tmp_path: Path) -> None:
    data = load_trait("evil").model_dump()
    data["name"] = "Evil Twin"  # problem 1: not a lowercase identifier
    data["rubric"] = "Rate {question} from 0 to 100."  # problem 2: no {answer}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(PersonavecError) as info:
        load_trait(str(path))
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(str(path) in line for line in lines)
    fields = sorted(line.split(": ")[1] for line in lines)
    assert fields == ["name", "rubric"]
    assert "{answer}" in next(line for line in lines if ": rubric:" in line)


def test_not_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(PersonavecError, match="not valid YAML"):
        load_trait(str(path))


# ---------------------------------------------------------------------------------------------
# Template author
# ---------------------------------------------------------------------------------------------


def test_template_author_validates_and_has_full_counts() -> None:
    spec = template_author("overconfident", DESC)
    assert isinstance(spec, TraitSpec)
    assert len(spec.pairs) == 5
    assert len(spec.extraction_questions) == 20 and len(spec.evaluation_questions) == 20
    assert not {q.lower() for q in spec.extraction_questions} & {q.lower() for q in spec.evaluation_questions}
    assert spec.metadata["author"] == "template" and "review" in spec.metadata["note"]
    assert "stating guesses as certain facts" in spec.pairs[0].positive
    assert "stating guesses as certain facts" in spec.pairs[0].negative
    assert "OVERCONFIDENT" in spec.rubric and "REFUSAL" in spec.rubric
    assert "0 (no trace" in spec.rubric and "100 (the trait" in spec.rubric
    assert spec.judge_prompt("Q?", "A.").count("Q?") == 1
    assert any("stating guesses" in a.lower() for a in spec.anchors.positive)
    assert not any("stating guesses" in a.lower() for a in spec.anchors.negative)
    # round-trips through its own YAML
    assert TraitSpec.model_validate(yaml.safe_load(spec.to_yaml())) == spec


def test_template_author_varies_with_description_and_is_deterministic() -> None:
    a = template_author("overconfident", DESC)
    b = template_author("overconfident", "Refusing to change an opinion even when shown clear evidence.")
    assert a == template_author("overconfident", DESC)
    assert a.hash != b.hash
    assert a.pairs != b.pairs and a.rubric != b.rubric and a.anchors.positive != b.anchors.positive
    assert a.extraction_questions != b.extraction_questions  # the draw is seeded by the description


def test_template_author_skips_pool_questions_naming_the_trait() -> None:
    spec = template_author("lonely", "Talking about feeling isolated and wishing for company.")
    questions = spec.extraction_questions + spec.evaluation_questions
    assert not any(mentions_name(q, "lonely") for q in questions)


def test_template_author_escapes_braces_in_rubric() -> None:
    spec = template_author("curly", "Writing {braces} and [brackets] everywhere in answers.")
    assert "(braces)" in spec.rubric
    assert spec.judge_prompt("q", "a")  # still a valid template


@pytest.mark.parametrize(
    ("name", "description", "match"),
    [
        ("Bad Name", DESC, "lowercase identifier"),
        ("9lives", DESC, "lowercase identifier"),
        ("ok", "   ", "empty"),
        ("ok", "First sentence. Second sentence.", "one sentence"),
        ("ok", "line one\nline two", "one line"),
        ("ok", "x" * 301, "at most 300"),
    ],
)
def test_build_artifacts_rejects_bad_inputs(name: str, description: str, match: str) -> None:
    with pytest.raises(PersonavecError, match=match):
        build_artifacts(name, description)


def test_build_artifacts_author_choices() -> None:
    assert build_artifacts("overconfident", DESC).metadata["author"] == "template"
    assert build_artifacts("overconfident", DESC, "template") == template_author("overconfident", DESC)
    seen: list[tuple[str, str]] = []

    def custom(name: str, description: str) -> TraitSpec:
        seen.append((name, description))
        return template_author(name, description)

    build_artifacts("overconfident", f"  {DESC}  ", custom)
    assert seen == [("overconfident", DESC)]  # description stripped before the author sees it
    with pytest.raises(PersonavecError, match="unknown author"):
        build_artifacts("overconfident", DESC, "gpt4")


# ---------------------------------------------------------------------------------------------
# LLM author
# ---------------------------------------------------------------------------------------------


class FakeClient:
    """A ChatClient that replays scripted replies and records every request."""

    def __init__(self, replies: Sequence[str], name: str = "openai:fake-model") -> None:
        self.name = name
        self.replies = list(replies)
        self.requests: list[list[dict[str, str]]] = []

    def complete(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        logprobs: bool = False,
    ) -> Completion:
        self.requests.append([dict(m) for m in messages])
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        return Completion(text=reply)


def artifacts(**changes: Any) -> dict[str, Any]:
    """A valid authored object for the trait 'stubborn' (borrowing evil's material)."""
    data = load_trait("evil").model_dump(include={"pairs", "extraction_questions", "evaluation_questions"})
    data["rubric"] = load_trait("evil").rubric.replace("EVIL", "STUBBORN")
    data["anchors"] = {"positive": ["I will never change my mind."], "negative": ["Good point, I was wrong."]}
    data.update(changes)
    return data


def test_fake_client_is_a_chat_client() -> None:
    assert isinstance(FakeClient([]), ChatClient)


def test_extract_json_object_tolerates_fences_and_prose() -> None:
    assert extract_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json_object('Here you go:\n{"a": {"b": [1, 2]}}\nHope it helps!') == {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json_object('{"a": 1,')
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json_object("sorry, I cannot help")


def _leaky() -> str:
    qs = artifacts()["extraction_questions"]
    qs[3] = "Why are some people so stubborn about politics?"
    return json.dumps(artifacts(extraction_questions=qs))


@pytest.mark.parametrize(
    ("first_reply", "expected_problem"),
    [
        ('{"pairs": [ this is not json', "not valid JSON"),
        (json.dumps({k: v for k, v in artifacts().items() if k != "rubric"}), "missing keys: rubric"),
        (_leaky(), "extraction_questions.3: mentions the trait name 'stubborn'"),
        (
            json.dumps(artifacts(evaluation_questions=artifacts()["extraction_questions"])),
            "repeat extraction",
        ),
        (json.dumps(artifacts(pairs=artifacts()["pairs"][:3])), "pairs: expected 5 items, got 3"),
    ],
)
def test_llm_author_retries_with_the_problems(first_reply: str, expected_problem: str) -> None:
    good = "```json\n" + json.dumps(artifacts()) + "\n```"
    client = FakeClient([first_reply, good])
    spec = llm_author(client)("stubborn", "Refusing to change an opinion even when shown clear evidence.")
    assert spec.name == "stubborn" and spec.metadata == {"author": "openai:fake-model"}
    assert len(spec.pairs) == 5 and len(spec.extraction_questions) == 20
    assert len(client.requests) == 2
    first, second = client.requests
    assert "stubborn" in first[-1]["content"] and "Refusing to change an opinion" in first[-1]["content"]
    assert not any(expected_problem in m["content"] for m in first)
    # the second request carries the model's own reply and the validation errors
    assert second[: len(first)] == first
    assert second[-2] == {"role": "assistant", "content": first_reply}
    assert second[-1]["role"] == "user" and expected_problem in second[-1]["content"]


def test_llm_author_trims_extra_items_and_ignores_model_name_fields() -> None:
    extra = artifacts()
    extra["extraction_questions"] = [*extra["extraction_questions"], "One more question about lunch?"]
    extra["name"] = "something_else"
    extra["comment"] = "unknown keys are dropped"
    client = FakeClient([json.dumps(extra)])
    spec = llm_author(client)("stubborn", "Refusing to change an opinion even when shown clear evidence.")
    assert spec.name == "stubborn" and len(spec.extraction_questions) == 20
    assert len(client.requests) == 1


def test_llm_author_gives_up_after_max_attempts() -> None:
    bad = json.dumps({k: v for k, v in artifacts().items() if k not in ("rubric", "anchors")})
    client = FakeClient([bad])
    with pytest.raises(PersonavecError) as info:
        llm_author(client, max_attempts=2)("stubborn", "Refusing to change an opinion.")
    assert len(client.requests) == 2
    lines = str(info.value).splitlines()
    assert "openai:fake-model" in lines[0] and "2 attempt" in lines[0]
    assert lines[1:] == ["reply: missing keys: rubric, anchors"]


def test_llm_author_reports_every_problem_on_its_own_line() -> None:
    qs = artifacts()["extraction_questions"]
    qs[0] = "Is being stubborn ever good?"
    bad = json.dumps(artifacts(extraction_questions=qs, rubric="Score {question} please."))
    client = FakeClient([bad])
    with pytest.raises(PersonavecError) as info:
        llm_author(client, max_attempts=3)("stubborn", "Refusing to change an opinion.")
    assert len(client.requests) == 3
    problems = str(info.value).splitlines()[1:]
    assert any("extraction_questions.0: mentions the trait name" in p for p in problems)
    assert any(p.startswith("reply: rubric:") and "REFUSAL" in p for p in problems)
    assert any(p.startswith("reply: rubric:") and "{answer}" in p for p in problems)


def test_llm_author_rejects_zero_attempts() -> None:
    with pytest.raises(PersonavecError, match="at least 1"):
        llm_author(FakeClient([]), max_attempts=0)


def test_build_artifacts_with_client_spec_uses_make_client(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient([json.dumps(artifacts())])
    asked: list[str] = []

    def fake_make_client(spec: str) -> FakeClient:
        asked.append(spec)
        return client

    monkeypatch.setattr(llm_module, "make_client", fake_make_client, raising=False)
    spec = build_artifacts("stubborn", "Refusing to change an opinion.", "openai:fake-model")
    assert asked == ["openai:fake-model"] and spec.metadata["author"] == "openai:fake-model"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_traits_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["traits", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [t["name"] for t in data["traits"]] == BUILTINS
    evil = next(t for t in data["traits"] if t["name"] == "evil")
    assert evil["pairs"] == 5 and evil["extraction_questions"] == 20 and evil["evaluation_questions"] == 20
    assert evil["hash"] == load_trait("evil").hash


def test_cli_traits_table(runner: CliRunner) -> None:
    result = runner.invoke(app, ["traits"])
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in BUILTINS)


def test_cli_trait_show(runner: CliRunner) -> None:
    spec = load_trait("evil")
    result = runner.invoke(app, ["trait", "show", "evil"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert spec.hash in text and "[QUESTION START]" in text and "{answer}" in text
    assert "How should I treat a coworker" in text and "positive" in text
    result = runner.invoke(app, ["trait", "show", "evil", "--json"])
    data = json.loads(result.stdout)
    assert data["hash"] == spec.hash and TraitSpec.model_validate(data["spec"]) == spec


def test_cli_trait_show_unknown(runner: CliRunner) -> None:
    result = runner.invoke(app, ["trait", "show", "grumpy"])
    assert result.exit_code == 2
    assert "unknown trait 'grumpy'" in result.stderr and result.stdout == ""


def test_cli_trait_new_writes_refuses_and_forces(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["trait", "new", "overconfident", DESC])
    assert result.exit_code == 0, result.output
    path = tmp_path / "overconfident.yaml"
    assert "overconfident.yaml" in result.stderr and result.stdout == ""
    spec = load_trait(str(path))
    assert spec == template_author("overconfident", DESC)
    assert [p.name for p in tmp_path.iterdir()] == ["overconfident.yaml"]  # no temp file left

    before = path.read_text()
    result = runner.invoke(app, ["trait", "new", "overconfident", "Something else entirely."])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert path.read_text() == before

    result = runner.invoke(app, ["trait", "new", "overconfident", "Something else entirely.", "--force"])
    assert result.exit_code == 0, result.output
    assert load_trait(str(path)).description == "Something else entirely."


def test_cli_trait_new_json_and_out(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "mine.yaml"
    result = runner.invoke(app, ["trait", "new", "overconfident", DESC, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(out) and data["hash"] == load_trait(str(out)).hash
    assert TraitSpec.model_validate(data["spec"]) == load_trait(str(out))


def test_cli_trait_new_bad_input(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["trait", "new", "Bad", DESC, "--out", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and "lowercase identifier" in result.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_cli_trait_new_llm_author_never_leaks_the_key(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    client = FakeClient(["not json at all", json.dumps(artifacts())])
    monkeypatch.setattr(llm_module, "make_client", lambda spec: client, raising=False)
    out = tmp_path / "stubborn.yaml"
    args = ["trait", "new", "stubborn", "Refusing to change an opinion.", "--out", str(out)]
    result = runner.invoke(app, [*args, "--author", "openai:fake-model", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["spec"]["metadata"] == {"author": "openai:fake-model"}
    assert load_trait(str(out)).metadata == {"author": "openai:fake-model"}
    assert len(client.requests) == 2
    texts = [result.stdout, result.stderr, out.read_text()]
    texts += [m["content"] for request in client.requests for m in request]
    assert not any("sk-secret" in t for t in texts)


def test_cli_trait_new_llm_failure_is_one_error(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeClient(["nope"])
    monkeypatch.setattr(llm_module, "make_client", lambda spec: client, raising=False)
    out = tmp_path / "stubborn.yaml"
    result = runner.invoke(
        app, ["trait", "new", "stubborn", "Refusing to change.", "--out", str(out), "--author", "openai:x"]
    )
    assert result.exit_code == 2 and "error:" in result.stderr and "3 attempt" in result.stderr
    assert not out.exists()
