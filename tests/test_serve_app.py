"""The HTTP server on 127.0.0.1 with a tiny model: the official openai client, errors, limits, clients."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

from personavec.core.models import LoadedModel
from personavec.monitor.monitoring import calibrate
from personavec.serve.app import ServerSettings, create_app, serve_in_thread
from personavec.serve.engine import Engine, EngineConfig
from personavec.serve.registry import VectorRegistry
from personavec.serve.schema import Threshold

from .conftest import tiny
from .helpers import random_vector

openai = pytest.importorskip("openai")

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@contextlib.contextmanager
def running(
    lm: LoadedModel, registry: VectorRegistry, config: EngineConfig | None = None, **settings: Any
) -> Iterator[tuple[str, Engine]]:
    with Engine(lm, registry, config) as engine:
        app = create_app(engine, ServerSettings(MODEL, **{"max_tokens": 64, **settings}))
        with serve_in_thread(app) as url:
            yield url, engine


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Engine]]:
    lm = tiny("llama")
    evil = calibrate(lm, random_vector(lm, "evil"), layers=2)
    registry = VectorRegistry(lm, [(evil, None), (random_vector(lm, "kind", seed=1), None)])
    with running(lm, registry, thresholds={"kind": Threshold(raw_above=-1e9)}) as pair:
        yield pair


def client(url: str, **kwargs: Any) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def post(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    timeout = kwargs.pop("timeout", 30)
    return httpx.post(
        url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout, **kwargs
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_openai_client_streamed_and_not(server: tuple[str, Engine]) -> None:
    url, _engine = server
    steering = {"steering": [{"vector": "evil", "strength": 0.5, "layer": 2}], "ignore_eos": True}
    c = client(url)
    r = c.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        temperature=0,
        max_tokens=12,
        extra_body=steering,
        logprobs=True,
        top_logprobs=2,
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    persona = r.model_extra["persona"]
    assert set(persona["vectors"]) == {"evil", "kind"} and persona["flagged"] == ["kind"]
    evil = persona["vectors"]["evil"]
    assert evil["layer"] == 2 and evil["prompt"]["z"] is not None and 0 <= evil["prompt"]["percentile"] <= 100
    assert (
        persona["vectors"]["kind"]["prompt"]["z"] is None
        and "no calibration" in persona["vectors"]["kind"]["note"]
    )
    assert persona["steering"][0]["applied"] and persona["steering"][0]["fraction"] == pytest.approx(0.5)
    assert len(persona["tokens"]) == 12 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2

    stream = c.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        temperature=0,
        max_tokens=12,
        extra_body=steering,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    first, final = chunks[0].model_extra["persona"], chunks[-2].model_extra["persona"]
    assert (
        first["vectors"]["evil"]["prompt"] == evil["prompt"]
        and first["vectors"]["evil"]["response_mean"] is None
    )
    per_token = [
        p["token"]["projections"] for ch in chunks if "token" in (p := ch.model_extra.get("persona") or {})
    ]
    assert [p["evil"] for p in per_token] == pytest.approx(
        [t["projections"]["evil"] for t in persona["tokens"]]
    )
    assert final["vectors"] == persona["vectors"] and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_models_vectors_and_health(server: tuple[str, Engine]) -> None:
    url, _engine = server
    assert [m.id for m in client(url).models.list()] == [MODEL]
    vectors = {v["name"]: v for v in httpx.get(url + "/v1/vectors").json()["data"]}
    assert vectors["evil"]["calibration"]["layer"] == 2 and vectors["kind"]["calibration"] is None
    assert (
        vectors["evil"]["layers"] == {"min": 1, "max": 3}
        and vectors["evil"]["default_steering"]["layer"] == 2
    )
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["vectors"] == ["evil", "kind"] and not health["auth"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<title>personavec</title>" in page.text


def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(server: tuple[str, Engine]) -> None:
    url, _engine = server
    ok = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({**ok, "model": "gpt-9"}, 404, "model 'gpt-9' is not served here; this server serves 'tiny'"),
        ({**ok, "messages": []}, 400, "messages: List should have at least 1 item"),
        ({**ok, "messages": [{"role": "user", "content": " "}]}, 400, "has empty content"),
        (
            {**ok, "messages": [*HELLO, {"role": "assistant", "content": "Hi"}]},
            400,
            "last message must be a user",
        ),
        (
            {**ok, "steering": [{"vector": "nope"}]},
            400,
            "steering[0]: unknown vector 'nope'; loaded vectors: evil",
        ),
        ({**ok, "steering": [{"vector": "evil", "layer": 9}]}, 400, "layer 9 is out of range"),
        ({**ok, "steering": [{"vector": "evil", "coef": 1e9}]}, 400, "the residual norm at layer"),
        (
            {**ok, "steering": [{"vector": "evil", "coef": "big"}]},
            400,
            "steering.0.coef: Input should be a valid",
        ),
        (
            {**ok, "steering": [{"vector": "evil", "coef": 1, "strength": 1}]},
            400,
            "coef or strength, not both",
        ),
        (
            {**ok, "steering": [{"vector": "kind", "when": {"z_above": 2}}]},
            400,
            "z_above needs a calibration",
        ),
        ({**ok, "steering": [{"vector": "evil"}] * 9}, 400, "9 entries, over this server's limit of 8"),
        ({**ok, "persona_thresholds": {"nope": {"raw_above": 1}}}, 400, "unknown vector 'nope'"),
        ({**ok, "temperature": -1}, 400, "temperature: Input should be greater than or equal to 0"),
        ({**ok, "n": 2}, 400, "n must be 1"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
        (
            {**ok, "messages": [{"role": "user", "content": "x" * 5000}]},
            400,
            "over this server's limit of 4096",
        ),
        (b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (1 << 20) + b'"}', 413, "over the limit"),
    ]
    for body, status, message in cases:
        r = post(url, body)
        assert r.status_code == status, (body if isinstance(body, dict) else body[:40], r.text)
        assert message in r.json()["error"]["message"]
    r = httpx.post(
        url + "/v1/chat/completions", content=json.dumps(ok), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing").status_code == 404
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(url).chat.completions.create(model="gpt-9", messages=HELLO)
    assert post(url, ok).status_code == 200  # still up


def test_max_tokens_are_capped_and_stop_strings_work(server: tuple[str, Engine]) -> None:
    url, _engine = server
    greedy = {"model": MODEL, "messages": HELLO, "ignore_eos": True, "temperature": 0}
    r = post(url, {**greedy, "max_tokens": 10_000}).json()
    assert r["usage"]["completion_tokens"] == 64 and r["choices"][0]["finish_reason"] == "length"
    text = r["choices"][0]["message"]["content"]
    cut = post(url, {**greedy, "stop": [text[3:5]]}).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(text[3:5])]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_conditional_steering_over_http(server: tuple[str, Engine]) -> None:
    url, _engine = server
    base = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    plain = post(url, base).json()
    z = plain["persona"]["vectors"]["evil"]["prompt"]["z"]
    entry = {"vector": "evil", "coef": 0.05, "layer": 2}
    quiet = post(url, {**base, "steering": [{**entry, "when": {"z_above": z + 0.5}}]}).json()
    fired = post(url, {**base, "steering": [{**entry, "when": {"z_above": z - 0.5}}]}).json()
    assert quiet["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert not quiet["persona"]["steering"][0]["applied"] and fired["persona"]["steering"][0]["applied"]
    assert fired["persona"]["steering"][0]["positions"] == "response"
    assert fired["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    flagged = post(
        url, {**base, "persona_thresholds": {"evil": {"z_above": z - 0.1}, "kind": {"raw_above": 1e9}}}
    )
    assert flagged.json()["persona"]["flagged"] == ["evil"]


def test_disconnected_clients_free_their_slots(server: tuple[str, Engine]) -> None:
    url, engine = server
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 64, "ignore_eos": True, "stream": True}
    slow = {"steering": [{"vector": "evil", "strength": 0.1}] * 8}  # heavier steps: still running at the cut
    before = engine.stats.cancelled
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, **slow}, timeout=30) as r:
        for line in r.iter_lines():
            if '"token"' in line:
                break
    wait_for(lambda: engine.stats.cancelled == before + 1 and engine.load()["active"] == 0)
    with pytest.raises(httpx.ReadTimeout):
        post(url, {**body, **slow, "stream": False}, timeout=0.05)
    wait_for(lambda: engine.stats.cancelled == before + 2 and engine.load()["active"] == 0)


def test_api_key_full_queue_and_host_check() -> None:
    lm = tiny("llama")
    with running(lm, VectorRegistry(lm), api_key="s3cret", trusted_hosts=("127.0.0.1",)) as (url, _engine):
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            client(url, api_key="wrong").chat.completions.create(model=MODEL, messages=HELLO)
        r = client(url, api_key="s3cret").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        assert r.choices[0].message.content is not None
        assert (
            httpx.get(url + "/v1/models").status_code == 401 and httpx.get(url + "/health").status_code == 200
        )
        host = url.replace("127.0.0.1", "localhost")  # resolves here, but is not a trusted name
        assert httpx.get(host + "/health").status_code == 400
    with running(lm, VectorRegistry(lm), EngineConfig(max_queue=0)) as (url, _engine):
        with pytest.raises(openai.InternalServerError, match="server busy"):
            client(url).chat.completions.create(model=MODEL, messages=HELLO)
        assert post(url, {"model": MODEL, "messages": HELLO}).headers["retry-after"] == "1"


def test_pipeline_openai_judge_and_author_against_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from personavec.core.errors import PersonavecError
    from personavec.judging import make_trait_judge
    from personavec.judging.base import JudgeItem
    from personavec.traits.authors import build_artifacts
    from personavec.traits.library import load_trait

    lm = tiny("llama")
    lm.model.config.max_position_embeddings = 4096  # rotary positions have no table: only the check reads it
    # Make "7" by far the likeliest token, so the judge's logprob read-out has a known answer.
    seven = lm.tokenizer.convert_tokens_to_ids("7")
    head = lm.model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(lm.model.config.vocab_size))
    with torch.no_grad():
        head.bias[seven] = 50.0
    with running(lm, VectorRegistry(lm), max_tokens=16) as (url, engine):
        monkeypatch.setenv("OPENAI_API_KEY", "dummy")
        monkeypatch.setenv("OPENAI_BASE_URL", url + "/v1")
        judge = make_trait_judge(f"openai:{MODEL}", load_trait("evil"))
        scores = judge.score([JudgeItem("How are you?", "Fine."), JudgeItem("Hi", "Go away.")])
        assert scores == pytest.approx([7.0, 7.0], abs=1e-3)
        assert judge.methods == ["logprobs", "logprobs"]  # type: ignore[attr-defined]
        before = engine.stats.requests
        with pytest.raises(
            PersonavecError, match=f"openai:{MODEL} did not produce a valid spec .* in 3 attempt"
        ):
            build_artifacts("paranoid", "Suspects hidden threats everywhere.", author=f"openai:{MODEL}")
        assert engine.stats.requests == before + 3


def test_serve_command_refuses_bad_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from personavec.cli import app
    from personavec.cli.serve import parse_thresholds

    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--api-key-env", "NO_SUCH_KEY"])
    assert r.exit_code == 2 and "NO_SUCH_KEY: that environment variable is not set" in r.output
    r = runner.invoke(app, ["serve", "--threshold", "evil=2"])
    assert r.exit_code == 2 and "use VECTOR:KIND=NUMBER" in r.output
    r = runner.invoke(app, ["serve", "--threshold", "evil:z_over=2"])
    assert r.exit_code == 2 and "z_over" in r.output
    r = runner.invoke(app, ["serve", "--vectors", "/no/such/dir"])
    assert r.exit_code == 2 and "vector path not found" in r.output
    both = parse_thresholds(["evil:z_above=2", "evil:response_above=1.5"])
    assert both["evil"].z_above == 2 and both["evil"].response_above == 1.5
