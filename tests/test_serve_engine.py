"""The serving engine on tiny random models: batching, steering, monitoring, stopping, cancelling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.steering import steer
from personavec.monitor.monitoring import monitor
from personavec.serve.engine import Engine, EngineBusy, EngineConfig
from personavec.serve.events import Event, Failed, Finished, Job, Prefilled, Token
from personavec.serve.registry import VectorRegistry, assign_names
from personavec.serve.schema import SteeringEntry
from personavec.serve.text import TextStream

from .conftest import make_tokenizer, tiny
from .helpers import random_vector

PROMPTS = [
    "Hi there, how are you?",
    "Name a colour.",
    "x",
    "A longer prompt that goes on for quite a while, so that the batch needs padding.",
    "What is a tree?",
]


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def prompt_ids(lm: LoadedModel, text: str) -> tuple[int, ...]:
    return encode(lm.tokenizer, conv(text)).ids


def finished(events: Sequence[Event]) -> Finished:
    done = [e for e in events if isinstance(e, Finished)]
    assert len(done) == 1, events[-1]
    return done[0]


def tokens(events: Sequence[Event]) -> list[Token]:
    return [e for e in events if isinstance(e, Token)]


def run_together(engine: Engine, jobs: Sequence[Job], gap_s: float = 0.0) -> list[list[Event]]:
    """Submit every job (``gap_s`` apart) and wait for all; events per job in submission order."""
    results: list[list[Event]] = [[] for _ in jobs]
    left = threading.Semaphore(0)
    for out, job in zip(results, jobs):

        def sink(event: Event, out: list[Event] = out) -> None:
            out.append(event)
            if isinstance(event, Finished | Failed):
                left.release()

        engine.submit(job, sink)
        time.sleep(gap_s)
    for _ in jobs:
        assert left.acquire(timeout=60)
    return results


@pytest.fixture
def served() -> Iterator[tuple[LoadedModel, VectorRegistry, Engine]]:
    lm = tiny("llama")
    registry = VectorRegistry(
        lm, [(random_vector(lm, "evil"), None), (random_vector(lm, "kind", seed=1), None)]
    )
    with Engine(lm, registry, EngineConfig(max_batch=4)) as engine:
        yield lm, registry, engine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize("gap_s", [0.0, 0.004])
def test_batched_answers_equal_answers_alone(arch: str, gap_s: float) -> None:
    # Mixed lengths, steering, sampling and max_tokens; gap_s > 0 makes requests join a running batch.
    lm = tiny(arch)
    registry = VectorRegistry(lm, [(random_vector(lm, "evil"), None)])
    steering = registry.resolve([SteeringEntry(vector="evil", strength=1.0, layer=2)])
    jobs = [
        Job(
            prompt_ids(lm, p),
            max_tokens=8 + 5 * i,
            temperature=0.9 if i % 3 == 1 else 0.0,
            seed=i,
            steering=steering if i % 2 else (),
        )
        for i, p in enumerate(PROMPTS * 2)
    ]
    with Engine(lm, registry, EngineConfig(max_batch=4)) as engine:
        alone = [engine.run(job) for job in jobs]
        together = run_together(engine, jobs, gap_s)
        if gap_s:
            assert engine.stats.merges > 0
        assert engine.stats.peak_batch == 4
    for a, b in zip(alone, together):
        assert [t.token_id for t in tokens(a)] == [t.token_id for t in tokens(b)]
        assert finished(a).text == finished(b).text
        pa = [t.projections["evil"] for t in tokens(a)]
        pb = [t.projections["evil"] for t in tokens(b)]
        torch.testing.assert_close(torch.tensor(pa), torch.tensor(pb), atol=1e-4, rtol=1e-4)


def test_answers_and_readings_match_the_library(served: tuple[LoadedModel, VectorRegistry, Engine]) -> None:
    lm, registry, engine = served
    vectors = [sv.vector for sv in registry.vectors.values()]
    layers = [sv.read_layer for sv in registry.vectors.values()]
    assert len(set(layers)) == 1  # both default to the middle block of the tiny model
    records = monitor(
        lm,
        vectors,
        [conv(p) for p in PROMPTS],
        layers=layers[0],
        generate=True,
        params=SamplingParams(max_new_tokens=12),
    )
    answers = generate(lm, [conv(p) for p in PROMPTS], SamplingParams(max_new_tokens=12))
    for i, p in enumerate(PROMPTS):
        events = engine.run(Job(prompt_ids(lm, p), max_tokens=12))
        done = finished(events)
        assert done.text.strip() == answers[i]
        for rec in records[2 * i : 2 * i + 2]:
            name = list(registry.vectors)[rec.vector]
            report = done.persona.vectors[name]
            assert report.prompt.raw == pytest.approx(rec.projection, abs=1e-4)
            assert rec.token_projections is not None
            got = [t.projections[name] for t in tokens(events)]
            assert got == pytest.approx(list(rec.token_projections), abs=1e-4)
            assert report.response_mean == pytest.approx(rec.response_mean, abs=1e-4)


@pytest.mark.parametrize("positions", ["all", "response"])
def test_steered_answer_matches_library_steering(
    served: tuple[LoadedModel, VectorRegistry, Engine], positions: str
) -> None:
    lm, registry, engine = served
    entry = SteeringEntry(vector="evil", coef=0.05, layer=2, positions=positions)  # type: ignore[arg-type]
    plan = registry.resolve([entry])
    with steer(lm, registry.vectors["evil"].vector, layers=2, coef=0.05, positions=positions):
        expected = generate(lm, [conv(p) for p in PROMPTS], SamplingParams(max_new_tokens=10))
    jobs = [Job(prompt_ids(lm, p), max_tokens=10, steering=plan) for p in PROMPTS]
    for want, events in zip(expected, run_together(engine, jobs)):
        assert finished(events).text.strip() == want
    unsteered = generate(lm, [conv(p) for p in PROMPTS], SamplingParams(max_new_tokens=10))
    assert unsteered != expected  # the strength is enough to change something


def test_conditional_steering_applies_only_when_the_prompt_crosses(
    served: tuple[LoadedModel, VectorRegistry, Engine],
) -> None:
    lm, registry, engine = served
    ids = prompt_ids(lm, PROMPTS[0])
    raw = finished(engine.run(Job(ids, max_tokens=10))).persona.vectors["evil"].prompt.raw
    plain = finished(engine.run(Job(ids, max_tokens=10)))

    def with_when(threshold: float) -> Finished:
        entry = SteeringEntry.model_validate(
            {"vector": "evil", "coef": 0.05, "layer": 2, "when": {"raw_above": threshold}}
        )
        return finished(engine.run(Job(ids, max_tokens=10, steering=registry.resolve([entry]))))

    quiet, fired = with_when(raw + 1.0), with_when(raw - 1.0)
    assert quiet.persona.steering[0][1] is False and fired.persona.steering[0][1] is True
    assert quiet.text == plain.text  # not triggered: exactly the unsteered answer
    with steer(lm, registry.vectors["evil"].vector, layers=2, coef=0.05, positions="response"):
        expected = generate(lm, [conv(PROMPTS[0])], SamplingParams(max_new_tokens=10))[0]
    assert fired.text.strip() == expected != plain.text.strip()


def test_stop_strings_max_tokens_and_end_of_turn(served: tuple[LoadedModel, VectorRegistry, Engine]) -> None:
    lm, _registry, engine = served
    ids = prompt_ids(lm, PROMPTS[1])
    full = finished(engine.run(Job(ids, max_tokens=30, ignore_eos=True)))
    assert full.reason == "length" and full.completion_tokens == 30
    stop = full.text[5:7]
    cut = finished(engine.run(Job(ids, max_tokens=30, ignore_eos=True, stop=(stop,))))
    assert cut.reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    streamed = engine.run(Job(ids, max_tokens=30, ignore_eos=True, stop=(stop,)))
    assert "".join(t.delta for t in tokens(streamed)) + finished(streamed).tail == cut.text
    # An end-of-turn token as the most likely first token ends the answer at once, with no tokens.
    eos = next(iter(engine.eos))
    lm.model.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(lm.model.config.vocab_size))
    with torch.no_grad():
        lm.model.get_output_embeddings().bias[eos] = 1e4
    done = finished(engine.run(Job(ids, max_tokens=30)))
    assert (done.reason, done.completion_tokens, done.text) == ("stop", 0, "")
    assert done.persona.vectors["evil"].response_mean is None


def test_cancel_frees_the_slot_and_a_full_queue_is_refused() -> None:
    lm = tiny("llama")
    registry = VectorRegistry(lm)
    engine = Engine(lm, registry, EngineConfig(max_batch=2, max_queue=2))
    sinks: list[list[Event]] = [[], [], []]
    tickets = [
        engine.submit(Job(prompt_ids(lm, "hi"), max_tokens=200, ignore_eos=True), s.append) for s in sinks[:2]
    ]
    with pytest.raises(EngineBusy, match="2 requests are already waiting"):
        engine.submit(Job(prompt_ids(lm, "hi")), sinks[2].append)
    with engine:
        while not tokens(sinks[0]):
            time.sleep(0.005)
        tickets[0].cancel()
        deadline = time.monotonic() + 10
        while engine.load()["active"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert finished(sinks[0]).reason == "cancelled"
        tickets[1].cancel()
        while engine.load()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert finished(sinks[1]).reason == "cancelled"


def test_closing_fails_waiting_and_running_jobs() -> None:
    lm = tiny("llama")
    engine = Engine(lm, VectorRegistry(lm), EngineConfig(max_batch=1))
    events: list[list[Event]] = [[], []]
    for out in events:
        engine.submit(Job(prompt_ids(lm, "hi"), max_tokens=10_000, ignore_eos=True), out.append)
    engine.start()
    while not tokens(events[0]):
        time.sleep(0.005)
    engine.close()
    assert all(isinstance(e[-1], Failed) and "shutting down" in e[-1].message for e in events)
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit(Job(prompt_ids(lm, "hi")), lambda _e: None)


def test_events_order_and_prefill_report(served: tuple[LoadedModel, VectorRegistry, Engine]) -> None:
    lm, registry, engine = served
    plan = registry.resolve([SteeringEntry(vector="kind")])
    events = engine.run(
        Job(prompt_ids(lm, "hello"), max_tokens=5, ignore_eos=True, logprobs=3, steering=plan)
    )
    assert isinstance(events[0], Prefilled) and isinstance(events[-1], Finished)
    assert [t.index for t in tokens(events)] == list(range(5))
    first = tokens(events)[0]
    assert first.logprob is not None and len(first.logprob.top) == 3
    assert first.logprob.top[0][1] >= first.logprob.logprob
    assert events[0].persona.flagged is None and events[-1].persona.flagged == ()
    ((entry, applied),) = events[-1].persona.steering
    assert applied and entry.vector == "kind" and entry.fraction == pytest.approx(0.125)


def test_text_stream_holds_back_stop_prefixes_and_partial_characters() -> None:
    tok = make_tokenizer()
    ids = tok("  Hello wor\u00e9ld END tail", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stops=(" END",))
    sent = "".join(stream.push(i) for i in ids)
    assert stream.stopped and stream.text == "Hello wor\u00e9ld" and sent + stream.flush() == stream.text
    # Until its last byte arrives, a two-byte character is never sent as a replacement character.
    partial = TextStream(tok)
    assert all("\ufffd" not in partial.push(i) for i in ids)


def test_registry_names_and_steering_errors() -> None:
    from pathlib import Path

    lm = tiny("llama")
    a, b, c = (random_vector(lm, "evil", seed=s) for s in range(3))
    paths = [Path("runs/evil-a/vector.safetensors"), Path("x/evil_v2.safetensors"), None]
    assert assign_names(list(zip([a, b, c], paths))) == ["evil-a", "evil_v2", "evil"]
    registry = VectorRegistry(lm, [(a, None)])
    bad = [
        ({"vector": "nope"}, "unknown vector 'nope'; loaded vectors: evil"),
        ({"vector": "evil", "layer": 4}, "layer 4 is out of range; steerable layers are 1..3"),
        ({"vector": "evil", "coef": 1e6}, "the residual norm at layer"),
        ({"vector": "evil", "when": {"z_above": 1}}, "z_above needs a calibration"),
    ]
    for entry, message in bad:
        with pytest.raises(PersonavecError, match=message.replace(".", r"\.").replace("(", r"\(")):
            registry.resolve([SteeringEntry.model_validate(entry)])
    (plan,) = registry.resolve([SteeringEntry(vector="evil", strength=0.25, layer=1)])
    assert plan.fraction == pytest.approx(0.25) and plan.positions == "all" and plan.when is None


def test_without_merging_new_requests_wait_for_the_batch_to_empty() -> None:
    # What the engine does with caches it cannot merge (sliding windows): the same answers, no joins.
    lm = tiny("llama")
    registry = VectorRegistry(lm)
    jobs = [Job(prompt_ids(lm, p), max_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    with Engine(lm, registry, EngineConfig(max_batch=4, merge=False)) as engine:
        alone = [engine.run(job) for job in jobs]
        together = run_together(engine, jobs, gap_s=0.004)
        assert engine.stats.merges == 0
    assert [finished(a).text for a in alone] == [finished(b).text for b in together]


def test_kv_cache_merge_select_and_trim() -> None:
    from transformers.cache_utils import DynamicCache

    from personavec.serve import kvcache

    def cache(keys: torch.Tensor) -> DynamicCache:
        c = DynamicCache()
        c.update(keys, -keys, 0)
        return c

    ka, kb = torch.randn(2, 1, 3, 4), torch.randn(1, 1, 5, 4)
    ma, mb = torch.tensor([[1, 1, 1], [0, 1, 1]]), torch.ones(1, 5, dtype=torch.long)
    merged, mask = kvcache.merge(cache(ka), ma, cache(kb), mb)
    assert kvcache.can_merge(merged) and mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1] * 5]
    assert torch.equal(merged.layers[0].keys[:2, :, 2:], ka) and torch.equal(merged.layers[0].keys[2], kb[0])
    assert not merged.layers[0].keys[:2, :, :2].any()
    kept, mask = kvcache.select(merged, mask, [1, 0])  # the padding both rows share is dropped
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]] and torch.equal(kept.layers[0].values, -ka[[1, 0]])

    class Opaque:  # a cache without per-layer tensors: rows are picked by its own method, no trimming
        def batch_select_indices(self, index: torch.Tensor) -> None:
            self.index = index.tolist()

    opaque = Opaque()
    _, mask = kvcache.select(opaque, torch.tensor([[0, 1], [0, 1]]), [1])
    assert not kvcache.can_merge(opaque) and opaque.index == [1] and mask.tolist() == [[0, 1]]
