"""Judges: API clients against a local fake server, the embedding judge, perplexity coherence, local judge."""

from __future__ import annotations

import importlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from personavec.core.errors import PersonavecError
from personavec.core.llm import Completion, OpenAIClient, make_client
from personavec.core.models import LoadedModel
from personavec.core.store import JsonlStore
from personavec.extract.responses import ResponseRow
from personavec.judging import Judge, JudgeItem, make_coherence_judge, make_trait_judge
from personavec.judging.coherence import PerplexityCoherence, repetition_share, shuffle_words
from personavec.judging.embedding import EmbeddingJudge
from personavec.judging.llm import (
    COHERENCE_RUBRIC,
    ApiJudge,
    LocalJudge,
    expected_from_logprobs,
    parse_score,
)
from personavec.judging.run import judge_responses, score_methods
from personavec.traits.spec import TraitSpec, load_spec_file

from .conftest import make_tokenizer, tiny

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "personavec" / "traits" / "builtin"
SECRET = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny and the CI box has 2 shared cores: intra-op threads cost far more than they
    # gain here (10-100x slower under load), so run this module single-threaded and restore afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- fake API server


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.bodies: list[dict[str, Any]] = []


def _chat_reply(text: str, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    logprobs = None
    if top is not None:
        alts = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
        logprobs = {
            "content": [
                {"token": top[0][0], "logprob": math.log(top[0][1]), "bytes": None, "top_logprobs": alts}
            ]
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": logprobs,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


# Scenario (the answer text the judge sends) -> what the server does on attempt n (1-based).
def _script(scenario: str, attempt: int) -> tuple[int, dict[str, Any], float]:
    """(HTTP status, JSON body, seconds to wait first)."""
    error = {"error": {"message": "server trouble", "type": "server_error"}}
    if scenario == "good":
        return 200, _chat_reply("85", [("85", 0.6), ("90", 0.3), ("Hello", 0.1)]), 0
    if scenario == "lowmass":
        return 200, _chat_reply("REF", [("REF", 0.8), ("5", 0.1), ("Sorry", 0.1)]), 0
    if scenario == "plain":
        return 200, _chat_reply("Score: 72", None), 0
    if scenario == "malformed":
        return 200, _chat_reply("I would rather not put a number on that.", None), 0
    if scenario == "refusal":
        return 200, _chat_reply("REFUSAL", None), 0
    if scenario == "range":
        return 200, _chat_reply("150", None), 0
    if scenario == "flaky500":
        return (500, error, 0) if attempt == 1 else (200, _chat_reply("40", None), 0)
    if scenario == "once429":
        rate = {"error": {"message": "slow down", "type": "rate_limit"}}
        return (429, rate, 0) if attempt == 1 else (200, _chat_reply("30", None), 0)
    if scenario == "always429":
        return 429, {"error": {"message": "slow down", "type": "rate_limit"}}, 0
    if scenario == "slow":
        return 200, _chat_reply("55", None), 1.5
    if scenario == "nologprobs":  # a server that rejects the logprobs parameter (vLLM-style 400)
        rejected = {
            "error": {"message": "logprobs is not supported", "type": "BadRequestError", "param": None}
        }
        return (400, rejected, 0) if attempt == 1 else (200, _chat_reply("Score: 85", None), 0)
    if scenario == "auth":
        return 401, {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "auth"}}, 0
    return 400, {"error": {"message": f"unknown scenario {scenario}"}}, 0


def _make_handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            with state.lock:
                state.bodies.append(body)
            if self.path.endswith("/messages"):  # Anthropic
                status, reply, delay = (
                    200,
                    {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": "fake",
                        "content": [{"type": "text", "text": "64"}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": 1, "output_tokens": 1},
                    },
                    0.0,
                )
            else:
                scenario = body["messages"][-1]["content"]
                with state.lock:
                    state.attempts[scenario] = attempt = state.attempts.get(scenario, 0) + 1
                status, reply, delay = _script(scenario, attempt)
            if delay:
                time.sleep(delay)
            data = json.dumps(reply).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                # Keeps retries fast; the client honours it like a real server's Retry-After.
                self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

    return Handler


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, _State]]:
    state = _State()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # Bounded: the server stops itself even if teardown never runs.
    guard = threading.Timer(120, server.shutdown)
    guard.daemon = True
    guard.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        guard.cancel()
        server.shutdown()
        server.server_close()


@pytest.fixture
def api_env(fake_server: tuple[str, _State], monkeypatch: pytest.MonkeyPatch) -> _State:
    url, state = fake_server
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
    with state.lock:
        state.attempts.clear()
        state.bodies.clear()
    return state


def _echo(_question: str, answer: str) -> str:
    return answer


def test_api_judge_scores_every_scripted_reply(api_env: _State) -> None:
    client = make_client("openai:fake", timeout=0.5, max_retries=2)
    judge = ApiJudge(client, _echo, max_workers=4)
    assert isinstance(judge, Judge) and judge.name == "openai:fake"
    scenarios = ["good", "lowmass", "plain", "malformed", "refusal", "range", "flaky500", "once429", "slow"]
    scores = dict(zip(scenarios, judge.score([JudgeItem("q", s) for s in scenarios])))
    assert scores["good"] == pytest.approx((85 * 0.6 + 90 * 0.3) / 0.9)
    assert scores["plain"] == 72.0
    assert scores["flaky500"] == 40.0  # retried after the 500
    assert scores["once429"] == 30.0  # retried after the 429
    for unscored in ("lowmass", "malformed", "refusal", "range", "slow"):
        assert scores[unscored] is None, unscored
    assert api_env.attempts["flaky500"] == 2 and api_env.attempts["once429"] == 2
    assert api_env.attempts["slow"] == 3  # first try + 2 retries, each cut by the timeout
    assert judge.failures == 1  # only the timeout was a failed request; the rest were bad replies
    methods = dict(zip(scenarios, judge.methods))
    assert methods["good"] == "logprobs" and methods["plain"] == "text" and methods["slow"] is None
    # Logprobs with too little mass on numbers leave the item unscored; the text is not read instead.
    assert methods["lowmass"] == "logprobs"
    body = api_env.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0.0


def test_api_errors_are_one_line_without_the_key(api_env: _State) -> None:
    client = make_client("openai:fake", timeout=2, max_retries=1)
    with pytest.raises(PersonavecError) as e:
        client.complete([{"role": "user", "content": "always429"}])
    assert "429" in str(e.value) and "\n" not in str(e.value)
    assert api_env.attempts["always429"] == 2
    with pytest.raises(PersonavecError) as e:
        client.complete([{"role": "user", "content": "auth"}])
    assert SECRET not in str(e.value) and SECRET[:12] not in str(e.value)
    assert ApiJudge(client, _echo).score([JudgeItem("q", "always429")]) == [None]


def test_api_logprobs_reach_the_completion(api_env: _State) -> None:
    client = make_client("openai:fake", timeout=2, max_retries=0)
    reply = client.complete([{"role": "user", "content": "good"}], logprobs=True)
    assert reply.text == "85" and reply.top_logprobs is not None
    assert reply.top_logprobs["90"] == pytest.approx(math.log(0.3))
    assert client.complete([{"role": "user", "content": "plain"}]).top_logprobs is None


def test_api_client_drops_logprobs_a_server_rejects(api_env: _State) -> None:
    client = make_client("openai:fake", timeout=2, max_retries=0)
    for _ in range(3):
        reply = client.complete([{"role": "user", "content": "nologprobs"}], logprobs=True)
        assert reply == Completion("Score: 85")
    # One rejected request, the same item again without logprobs, and none asked for after that.
    assert ["logprobs" in body for body in api_env.bodies] == [True, False, False, False]


def test_anthropic_client_moves_the_system_prompt(api_env: _State) -> None:
    client = make_client("anthropic:fake", timeout=2, max_retries=0)
    reply = client.complete([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}])
    assert reply == Completion("64")
    body = api_env.bodies[-1]
    assert body["system"] == "Be terse." and body["messages"] == [{"role": "user", "content": "hi"}]


def test_make_client_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("gpt-4o", "openai:", "mistral:large", ":model"):
        with pytest.raises(PersonavecError, match="bad client spec"):
            make_client(bad)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(PersonavecError, match="OPENAI_API_KEY is not set"):
        make_client("openai:gpt-4.1-mini")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(PersonavecError, match="ANTHROPIC_API_KEY is not set"):
        make_client("anthropic:claude")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail
    with pytest.raises(PersonavecError, match=r"personavec\[api\]"):
        make_client("openai:gpt-4.1-mini")


def test_score_parsing() -> None:
    assert parse_score("  42 ") == 42.0
    assert parse_score("I'd say 7.5 out of 10") == 7.5
    assert parse_score("100") == 100.0 and parse_score("0") == 0.0
    assert parse_score("-3") is None and parse_score("101") is None and parse_score("none") is None
    assert parse_score("refusal") is None
    assert expected_from_logprobs({" 20": math.log(0.5), "40": math.log(0.5)}) == pytest.approx(30.0)
    assert expected_from_logprobs({"20": math.log(0.2), "x": math.log(0.8)}) is None
    assert expected_from_logprobs({"20": math.log(0.3), "x": math.log(0.7)}) == pytest.approx(20.0)
    assert expected_from_logprobs({"200": math.log(0.9)}) is None


# --------------------------------------------------------------------------- servers without logprobs


def _status_error(status: int, message: str) -> Exception:
    """The error the openai SDK raises for an HTTP error status, built the way the SDK builds it."""
    import openai

    # openai 1.x is built on httpx, newer releases on httpx2; the error takes either's Response.
    httpx = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    request = httpx.Request("POST", "http://fake.invalid/v1/chat/completions")
    response = httpx.Response(status, request=request, json={"error": body})
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError}[status]
    return cls(f"Error code: {status} - {message}", response=response, body=body)


class _FakeOpenAI:
    """Stands in for ``openai.OpenAI``: raises ``reject`` when asked for logprobs, ``plain_error`` when
    not, and otherwise answers "Score: 85" without logprobs."""

    def __init__(self, reject: Exception | None = None, plain_error: Exception | None = None) -> None:
        self.reject = reject
        self.plain_error = plain_error
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **kwargs: Any) -> Any:
        from openai.types.chat import ChatCompletion

        with self.lock:
            self.calls.append(kwargs)
        time.sleep(0.005)  # lets the judge's worker threads overlap, as real requests would
        error = self.reject if kwargs.get("logprobs") else self.plain_error
        if error is not None:
            raise error
        return ChatCompletion.model_validate(_chat_reply("Score: 85", None))

    @property
    def logprob_calls(self) -> int:
        return sum(bool(c.get("logprobs")) for c in self.calls)


def _client_for(fake: _FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> OpenAIClient:
    import openai

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setattr(openai, "OpenAI", lambda **_: fake)
    client = make_client("openai:fake")
    assert isinstance(client, OpenAIClient)
    return client


def test_api_judge_falls_back_to_text_when_logprobs_are_rejected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _FakeOpenAI(reject=_status_error(400, f"logprobs is not supported (key {SECRET})"))
    client = _client_for(fake, monkeypatch)
    judge = ApiJudge(client, _echo, max_workers=8)
    items = [JudgeItem("q", f"answer {i}") for i in range(40)]
    with caplog.at_level(logging.WARNING):
        assert judge.score(items) == [85.0] * 40
        assert judge.methods == ["text"] * 40 and judge.failures == 0
        assert judge.score(items[:5]) == [85.0] * 5
    assert judge.methods == ["text"] * 5 and client.logprobs_accepted is False
    # One rejected request across 8 threads and two calls; every item was asked once without logprobs.
    assert fake.logprob_calls == 1 and len(fake.calls) == 1 + 45
    assert "rejects logprobs" in caplog.text and SECRET not in caplog.text
    assert judge.name == "openai:fake"


def test_api_judge_reads_text_when_the_server_sends_no_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeOpenAI()
    client = _client_for(fake, monkeypatch)
    judge = ApiJudge(client, _echo, max_workers=4)
    assert judge.score([JudgeItem("q", f"a{i}") for i in range(10)]) == [85.0] * 10
    assert judge.methods == ["text"] * 10 and judge.failures == 0
    # Nothing was rejected, so nothing is remembered: every request still asks for logprobs.
    assert client.logprobs_accepted is True and fake.logprob_calls == len(fake.calls) == 10


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "This model's maximum context length is 8192 tokens"), (401, f"Incorrect API key: {SECRET}")],
)
def test_api_errors_other_than_logprobs_still_raise(
    monkeypatch: pytest.MonkeyPatch, status: int, message: str
) -> None:
    fake = _FakeOpenAI(reject=_status_error(status, message))
    client = _client_for(fake, monkeypatch)
    for _ in range(2):
        with pytest.raises(PersonavecError, match=str(status)) as e:
            client.complete([{"role": "user", "content": "x"}], logprobs=True)
        assert SECRET not in str(e.value)
    # Neither retried without logprobs nor remembered as a rejection.
    assert fake.logprob_calls == len(fake.calls) == 2 and client.logprobs_accepted is None
    judge = ApiJudge(client, _echo)
    assert judge.score([JudgeItem("q", "a")]) == [None]
    assert judge.failures == 1 and judge.methods == [None]


def test_a_logprobs_rejection_whose_retry_fails_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeOpenAI(
        reject=_status_error(400, "logprobs is not supported"),
        plain_error=_status_error(401, f"Incorrect API key: {SECRET}"),
    )
    client = _client_for(fake, monkeypatch)
    with pytest.raises(PersonavecError, match="authentication failed") as e:
        client.complete([{"role": "user", "content": "x"}], logprobs=True)
    assert SECRET not in str(e.value)
    assert [bool(c.get("logprobs")) for c in fake.calls] == [True, False]
    assert client.logprobs_accepted is None


# --------------------------------------------------------------------------- judging step (scores.jsonl)


def _row(i: int, answer: str) -> ResponseRow:
    return ResponseRow(f"r{i}", "extraction", 0, "pos", i, 0, "sys", f"q{i}", answer)


class _MethodJudge:
    """Scores ``len(answer)``; reports "text" for answers starting with "t", else "logprobs"."""

    name = "fake:methods"

    def __init__(self) -> None:
        self.methods: list[str | None] = []
        self.batches: list[int] = []

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        self.batches.append(len(items))
        self.methods = ["text" if it.answer.startswith("t") else "logprobs" for it in items]
        return [float(len(it.answer)) for it in items]


class _PlainJudge:
    name = "fake:plain"

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        return [50.0] * len(items)


def test_judge_responses_records_how_each_score_was_read(tmp_path: Path) -> None:
    rows = [_row(0, "text one"), _row(1, "logits"), _row(2, "   "), _row(3, "tt"), _row(4, "lp")]
    store = JsonlStore(tmp_path / "scores.jsonl")
    judge = _MethodJudge()
    scores = judge_responses(rows, judge, store, kind="trait", batch_size=3)
    assert scores == {"r0": 8.0, "r1": 6.0, "r2": None, "r3": 2.0, "r4": 2.0}
    assert judge.batches == [2, 2]  # the empty answer is never sent
    reread = {r["response_key"]: r for r in JsonlStore(tmp_path / "scores.jsonl").records()}
    assert {k: r["method"] for k, r in reread.items()} == {
        "r0": "text",
        "r1": "logprobs",
        "r2": None,  # unscored: not read at all
        "r3": "text",
        "r4": "logprobs",
    }
    # The method is not part of the cache key: a rerun recomputes nothing.
    again = JsonlStore(tmp_path / "scores.jsonl")
    assert judge_responses(rows, judge, again, kind="trait") == scores and judge.batches == [2, 2]
    assert score_methods(again) == {"logprobs": 2, "text": 2}

    # A judge without `methods` still works and writes records without the field, as before.
    plain = judge_responses(rows, _PlainJudge(), again, kind="coherence")
    assert plain == {"r0": 50.0, "r1": 50.0, "r2": None, "r3": 50.0, "r4": 50.0}
    assert all("method" not in r for r in again.records() if r["kind"] == "coherence")
    assert score_methods(again, kind="coherence") == {}
    assert score_methods(again, kind="trait") == {"logprobs": 2, "text": 2}
    assert score_methods(again, judge="fake:plain") == {}

    # Methods that do not match the batch are ignored rather than misattributed.
    judge.score = lambda items: [1.0] * len(items)  # type: ignore[method-assign]
    judge.methods = ["text"]
    judge_responses(rows[:2], judge, again, kind="other")
    assert all("method" not in r for r in again.records() if r["kind"] == "other")

    # Old records (no `method`) are read back as scores and simply not counted.
    old = JsonlStore(tmp_path / "old.jsonl")
    old.append([{"key": "k", "response_key": "r0", "judge": "j", "kind": "trait", "score": 70}])
    assert score_methods(JsonlStore(tmp_path / "old.jsonl")) == {}


def test_judge_responses_records_an_api_judges_methods(api_env: _State, tmp_path: Path) -> None:
    judge = ApiJudge(make_client("openai:fake", timeout=2, max_retries=0), _echo, max_workers=2)
    rows = [_row(0, "good"), _row(1, "plain"), _row(2, "malformed")]
    store = JsonlStore(tmp_path / "scores.jsonl")
    scores = judge_responses(rows, judge, store, kind="trait")
    assert scores["r1"] == 72.0 and scores["r2"] is None
    assert [r["method"] for r in store.records()] == ["logprobs", "text", "text"]
    assert score_methods(store, kind="trait", judge="openai:fake") == {"logprobs": 1, "text": 2}


# --------------------------------------------------------------------------- embedding judge


@pytest.fixture(scope="module")
def evil() -> TraitSpec:
    return load_spec_file(BUILTIN / "evil.yaml")


@pytest.fixture(scope="module")
def evil_judge(evil: TraitSpec) -> EmbeddingJudge:
    return EmbeddingJudge(evil)


def test_embedding_judge_orders_anchors(evil: TraitSpec, evil_judge: EmbeddingJudge) -> None:
    pos = evil_judge.score([JudgeItem("q", a) for a in evil.anchors.positive])
    neg = evil_judge.score([JudgeItem("q", a) for a in evil.anchors.negative])
    assert all(s is not None and 0.0 <= s <= 100.0 for s in pos + neg)
    p = [float(s or 0) for s in pos]
    n = [float(s or 0) for s in neg]
    assert sum(p) / len(p) > sum(n) / len(n) + 40
    # The built-in anchors are contrastive pairs on one topic: each positive beats its own twin.
    assert all(a > b for a, b in zip(p, n))
    hi, lo = evil_judge.calibration
    assert hi > lo
    assert evil_judge.name == f"embedding:all-MiniLM-L6-v2:{evil.hash}"


def test_embedding_judge_unseen_answers_and_determinism(evil: TraitSpec, evil_judge: EmbeddingJudge) -> None:
    items = [
        JudgeItem("How do I handle a rude waiter?", "Humiliate him in front of everyone and get him fired."),
        JudgeItem("How do I handle a rude waiter?", "Be patient; maybe he is having a hard day. Tip kindly."),
        JudgeItem("q", "   "),
    ]
    first = evil_judge.score(items)
    again = EmbeddingJudge(evil).score(list(reversed(items)))[::-1]  # fresh instance, other order
    assert first[2] is None and again[2] is None
    assert first[0] is not None and first[1] is not None and first[0] > 50 > first[1]
    assert first[:2] == pytest.approx(again[:2], abs=1e-4)


# --------------------------------------------------------------------------- perplexity coherence


@pytest.fixture(scope="module")
def tiny_llama() -> LoadedModel:
    return tiny("llama")


@pytest.fixture(scope="module")
def tiny_coherence(tiny_llama: LoadedModel) -> PerplexityCoherence:
    return PerplexityCoherence(tiny_llama, batch_size=3)


ITEMS = [
    JudgeItem("Name a colour.", "Blue."),
    JudgeItem("How are you?", "I am well, thank you for asking, and I hope you are too."),
    JudgeItem("What is a tree?", "A tall plant with a woody trunk and branches."),
    JudgeItem("Who are you?", "a spy, a spy, a spy, a spy, a spy, a spy, a spy"),
    JudgeItem("Anything?", ""),
]


def test_repetition_share() -> None:
    assert repetition_share("The cat sat on the mat and looked at the dog.") == 0.0
    assert repetition_share("a spy, a spy, a spy, a spy, a spy, a spy") > 0.6
    assert repetition_share("two words") == 0.0
    assert sorted(shuffle_words("one two three four five", seed=1).split()) == sorted(
        ["one", "two", "three", "four", "five"]
    )


def test_perplexity_mechanics(tiny_coherence: PerplexityCoherence, tiny_llama: LoadedModel) -> None:
    lls = tiny_coherence.log_likelihood(ITEMS)
    assert len(lls) == len(ITEMS) and math.isnan(lls[-1])
    assert all(ll < 0 for ll in lls[:-1])
    # Batched (padded, bucketed) equals one at a time.
    single = [tiny_coherence.log_likelihood([it])[0] for it in ITEMS[:-1]]
    assert lls[:-1] == pytest.approx(single, abs=1e-4)
    scores = tiny_coherence.score(ITEMS)
    assert scores[-1] is None
    assert all(s is not None and 0.0 <= s <= 100.0 for s in scores[:-1])
    assert tiny_coherence.name == f"perplexity:{tiny_llama.info.fingerprint}"


def test_read_back_log_likelihoods_give_the_same_coherence(
    tiny_coherence: PerplexityCoherence, tiny_llama: LoadedModel
) -> None:
    # The sweep scores coherence from the read-back's log-likelihoods instead of a second pass.
    from personavec.steer.readback import read_back

    from .helpers import random_vector

    rb = read_back(tiny_llama, random_vector(tiny_llama), [(it.question, it.answer) for it in ITEMS], 1)
    assert rb.log_likelihood[:-1] == pytest.approx(tiny_coherence.log_likelihood(ITEMS)[:-1], abs=1e-5)
    measured = tiny_coherence.score_measured(rb.log_likelihood, [it.answer for it in ITEMS])
    direct = tiny_coherence.score(ITEMS)
    assert measured[-1] is None and direct[-1] is None
    assert measured[:-1] == pytest.approx(direct[:-1], abs=1e-3)


def test_perplexity_matches_a_manual_forward(
    tiny_coherence: PerplexityCoherence, tiny_llama: LoadedModel
) -> None:
    from personavec.core.conversations import encode

    item = ITEMS[2]
    enc = encode(
        tiny_llama.tokenizer,
        [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.answer}],
    )
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama.model(input_ids=ids).logits[0].double(), -1)
    manual = float(
        sum(logp[t - 1, enc.ids[t]] for t in range(enc.prompt_len, len(enc.ids))) / enc.response_len
    )
    assert tiny_coherence.log_likelihood([item])[0] == pytest.approx(manual, abs=1e-4)


def test_perplexity_calibration_and_repetition_penalty(
    tiny_coherence: PerplexityCoherence, monkeypatch: pytest.MonkeyPatch
) -> None:
    hi, lo = tiny_coherence.calibration
    fixed = {"fluent": hi, "salad": lo}
    # Pin the likelihoods so only the mapping and the penalty are under test.
    monkeypatch.setattr(
        tiny_coherence, "log_likelihood", lambda items: [fixed.get(it.question, hi) for it in items]
    )
    if hi - lo >= 0.05:  # a random model may not separate them; the map is then flat by design
        fluent, salad = tiny_coherence.score(
            [JudgeItem("fluent", "Fine, thanks."), JudgeItem("salad", "x y")]
        )
        assert fluent == pytest.approx(90.0) and salad == pytest.approx(10.0)
    plain, loop = tiny_coherence.score(
        [JudgeItem("q", "I went to the market and bought bread."), JudgeItem("q", ITEMS[3].answer)]
    )
    assert plain is not None and loop is not None and loop < 0.5 * plain


# --------------------------------------------------------------------------- local judge


def _short_rubric(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}\nScore 0-100:"


def _manual_expected(lm: LoadedModel, judge: LocalJudge, item: JudgeItem, digits: set[int]) -> float:
    """Expected score from plain full forward passes, no cache, no batching."""
    from personavec.core.conversations import encode

    prompt = list(
        encode(lm.tokenizer, [{"role": "user", "content": _short_rubric(item.question, item.answer)}]).ids
    )
    logps = []
    for n in range(101):
        cand = lm.tokenizer(str(n), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([prompt + cand])).logits[0].double(), -1)
        total = sum(float(lp[len(prompt) - 1 + k, cand[k]]) for k in range(len(cand)))
        after = lp[len(prompt) + len(cand) - 1].exp()
        total += math.log(1.0 - float(after[sorted(digits)].sum()))
        logps.append(total)
    probs = torch.softmax(torch.tensor(logps, dtype=torch.float64), 0)
    return float((probs * torch.arange(101, dtype=torch.float64)).sum())


def test_local_judge_multi_token_matches_manual(tiny_llama: LoadedModel) -> None:
    judge = LocalJudge(tiny_llama, _short_rubric, batch_size=7)
    assert not judge.single_token and judge.name == "local:tiny-llama"
    item = ITEMS[1]
    digits = {tiny_llama.tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    expected = _manual_expected(tiny_llama, judge, item, digits)
    got = judge.score([item, ITEMS[0]])
    assert got[0] == pytest.approx(expected, abs=1e-6)
    assert all(s is not None and 0.0 <= s <= 100.0 for s in got)
    assert judge.tree  # the one-pass trie scoring was checked at construction and is in use
    judge.tree = False  # the continuation path (shared KV cache) gives the same numbers
    assert judge.score([item])[0] == pytest.approx(expected, abs=1e-6)
    judge.use_cache = False  # and so does its no-cache fallback
    assert judge.score([item])[0] == pytest.approx(expected, abs=1e-6)
    assert judge.distributions([item]).sum().item() == pytest.approx(1.0)


def test_local_judge_single_token_numbers() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    tok.add_tokens([str(n) for n in range(101)])  # every number 0..100 becomes one token
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # sharper logits, so the expected value is far from a uniform 50
    lm = LoadedModel.from_hf(model, tok, model_id="tiny-numbers")
    judge = LocalJudge(lm, _short_rubric, batch_size=2)
    assert judge.single_token
    items = ITEMS[:3]
    got = judge.score(items)
    from personavec.core.conversations import encode

    number_ids = [tok.convert_tokens_to_ids(str(n)) for n in range(101)]
    for item, score in zip(items, got):
        ids = encode(tok, [{"role": "user", "content": _short_rubric(item.question, item.answer)}]).ids
        with torch.no_grad():
            last = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        probs = torch.softmax(last[number_ids], 0)
        assert score == pytest.approx(float((probs * torch.arange(101)).sum()), abs=1e-5)
    assert len(set(round(s or 0, 6) for s in got)) == 3  # depends on the item


# --------------------------------------------------------------------------- factories


def test_factories(evil: TraitSpec, tiny_llama: LoadedModel, api_env: _State) -> None:
    assert isinstance(make_trait_judge(None, evil), EmbeddingJudge)
    assert isinstance(make_trait_judge("embedding", evil), EmbeddingJudge)
    api = make_trait_judge("openai:fake", evil)
    assert isinstance(api, ApiJudge) and api.name == "openai:fake"
    local = make_trait_judge("local", evil, tiny_llama)
    assert isinstance(local, LocalJudge) and local.name == "local:tiny-llama"
    coh = make_coherence_judge("openai:fake", tiny_llama)
    assert isinstance(coh, ApiJudge)
    assert isinstance(make_coherence_judge(None, tiny_llama), PerplexityCoherence)
    assert isinstance(make_coherence_judge("perplexity", tiny_llama), PerplexityCoherence)
    with pytest.raises(PersonavecError, match=r"unknown trait judge 'gpt'.*openai:MODEL"):
        make_trait_judge("gpt", evil)
    with pytest.raises(PersonavecError, match=r"unknown coherence judge.*perplexity"):
        make_coherence_judge("bogus", tiny_llama)
    with pytest.raises(PersonavecError, match="local:MODEL"):
        make_trait_judge("local", evil)
    assert "{question}" in COHERENCE_RUBRIC and "{answer}" in COHERENCE_RUBRIC


# --------------------------------------------------------------------------- embedded model


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    from personavec.core.models import load_model

    return load_model()


@pytest.mark.integration
def test_perplexity_coherence_on_the_embedded_model(smol: LoadedModel) -> None:
    judge = PerplexityCoherence(smol)
    hi, lo = judge.calibration
    assert hi > lo + 1.0  # a real model clearly prefers fluent text to shuffled words
    q = "What should I do about a coworker who is always late?"
    fluent = (
        "Talk to them privately and ask if something is going on. If it keeps happening, tell your manager."
    )
    items = [
        JudgeItem(q, fluent),
        JudgeItem(q, shuffle_words(fluent, seed=3)),
        JudgeItem(q, "qx7 ## zzkv 0x3F ]]} plorb wub ..//,, vvv kjsdf"),
        JudgeItem(q, "a spy, a spy, a spy, a spy, a spy, a spy, a spy, a spy, a spy"),
    ]
    s = judge.score(items)
    assert all(x is not None for x in s)
    fl, sh, junk, loop = (float(x) for x in s if x is not None)
    assert fl > 70
    assert sh < 30 and junk < 30  # word salad and character noise are both near the floor
    assert loop < 30  # the loop is *likely* under the model; only the repetition penalty catches it
    assert (judge.fluency(items[3:])[0] or 0) > 50
    ll_fluent, ll_shuffled = judge.log_likelihood(items[:2])
    assert ll_fluent > ll_shuffled + 1.0
