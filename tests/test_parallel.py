"""Parallel CPU streams: ordering, clean-up, when they are used, and that they change no result."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.parallel import choose_workers, default_workers, ordered_map, raise_if_stopping, stopping
from personavec.core.steering import steer

from .conftest import tiny
from .helpers import generate_threads, random_vector

SAMPLED = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7)
PROMPTS = [[{"role": "user", "content": f"Question {i}" + "?" * (i % 4)}] for i in range(10)]


def test_ordered_map_keeps_input_order_and_uses_worker_threads() -> None:
    seen: list[int] = []

    def slow_first(x: int) -> int:
        seen.append(threading.get_ident())
        time.sleep(0.05 if x == 0 else 0.0)  # item 0 finishes last
        return x * x

    assert list(ordered_map(slow_first, range(12), workers=3)) == [x * x for x in range(12)]
    assert threading.get_ident() not in seen and len(set(seen)) >= 2
    assert list(ordered_map(slow_first, [], workers=2)) == []


def test_ordered_map_gives_each_worker_its_share_of_threads_and_restores_ours() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        shares = list(ordered_map(lambda _x: torch.get_num_threads(), range(4), workers=2))
        assert shares == [2, 2, 2, 2]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_ordered_map_errors_and_early_exit_leave_no_threads() -> None:
    threads = threading.active_count()
    started: list[int] = []

    def fail_at_3(x: int) -> int:
        started.append(x)
        if x == 3:
            raise ValueError("item 3 failed")
        return x

    with pytest.raises(ValueError, match="item 3"):
        list(ordered_map(fail_at_3, range(100), workers=2))
    assert threading.active_count() == threads
    assert len(started) < 100  # at most a window ahead of the failure, not the whole input

    stream = ordered_map(lambda x: x, range(100), workers=2)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == threads


def test_closing_early_tells_running_items_to_stop() -> None:
    running = threading.Event()
    outcome: list[str] = []

    def item(x: int) -> int:
        if x == 1:
            running.set()
            deadline = time.monotonic() + 30
            while not stopping():
                if time.monotonic() > deadline:
                    outcome.append("ran on")
                    return x
                time.sleep(0.01)
            outcome.append("stopped")
            raise_if_stopping()  # gives the item up; the map drops it without raising in the caller
            outcome.append("went on")
        return x

    assert not stopping()  # outside any stream
    raise_if_stopping()  # and this does nothing there
    stream = ordered_map(item, range(2), workers=2)
    assert next(stream) == 0
    assert running.wait(10)
    stream.close()
    assert outcome == ["stopped"]


def test_generation_ends_at_its_next_step_when_its_stream_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny("llama", n_layers=2)
    params = SamplingParams(max_new_tokens=12)
    new_tokens: list[int] = []
    original: Callable[..., Any] = lm.model.generate  # type: ignore[assignment]

    def counting(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(lm.model, "generate", counting)
    generate(lm, PROMPTS[:2], params, workers=1)
    # As if this thread were a stream whose map is being closed: one decoding step, then stop.
    monkeypatch.setattr("personavec.core.generation.stopping", lambda: True)
    generate(lm, PROMPTS[:2], params, workers=1)
    assert new_tokens[0] > 1 and new_tokens[1] == 1


def test_default_and_chosen_workers() -> None:
    lm = tiny("gpt2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert default_workers(torch.device("cpu")) == 2
        assert default_workers(torch.device("cuda")) == 1
        assert choose_workers(lm, None, n_batches=5) == 2
        assert choose_workers(lm, 4, n_batches=3) == 3  # never more streams than batches
        assert choose_workers(lm, 4, n_batches=0) == 1
        with steer(lm, random_vector(lm), layers=[1]):
            assert choose_workers(lm, 2, n_batches=5) == 1  # hooks keep per-pass state
        assert choose_workers(lm, 2, n_batches=5) == 2
        torch.set_num_threads(1)
        assert default_workers(torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(PersonavecError, match="at least 1"):
        choose_workers(lm, 0, n_batches=5)


def test_parallel_generation_gives_the_same_answers() -> None:
    lm = tiny("llama", n_layers=2)
    seeds = [3 * i + 1 for i in range(len(PROMPTS))]
    one = generate(lm, PROMPTS, SAMPLED, seeds=seeds, batch_size=3, workers=1)
    with generate_threads(lm) as seen:
        two = generate(lm, PROMPTS, SAMPLED, seeds=seeds, batch_size=3, workers=2)
    assert two == one
    assert len(seen) == 4 and threading.get_ident() not in seen and len(set(seen)) == 2


def test_steered_generation_stays_on_the_calling_thread() -> None:
    lm = tiny("qwen2", n_layers=2)
    vec = random_vector(lm, scale=4.0)
    with steer(lm, vec, layers=[1], coef=3.0, positions="response"), generate_threads(lm) as seen:
        together = generate(lm, PROMPTS, SAMPLED, batch_size=3, workers=2)
    assert set(seen) == {threading.get_ident()}
    with steer(lm, vec, layers=[1], coef=3.0, positions="response"):
        one = generate(lm, PROMPTS, SAMPLED, batch_size=3, workers=1)
    assert together == one


def test_parallel_judges_give_the_same_scores() -> None:
    from personavec.judging.base import JudgeItem
    from personavec.judging.coherence import PerplexityCoherence
    from personavec.judging.llm import LocalJudge

    lm = tiny("llama", n_layers=2)
    items = [JudgeItem(f"Question {i}?", "An answer " * (1 + i % 5)) for i in range(9)]
    one = PerplexityCoherence(lm, batch_size=2, workers=1).log_likelihood(items)
    two = PerplexityCoherence(lm, batch_size=2, workers=2).log_likelihood(items)
    assert two == pytest.approx(one, abs=1e-6)

    def rubric(question: str, answer: str) -> str:
        return f"Q: {question}\nA: {answer}\nScore 0-100:"

    judged_one = LocalJudge(lm, rubric, workers=1).score(items[:4])
    judged_two = LocalJudge(lm, rubric, workers=2).score(items[:4])
    assert judged_two == pytest.approx(judged_one, abs=1e-6)


def test_hooks_added_inside_a_loop_over_a_parallel_stream_fail_loudly() -> None:
    # Streams run a few batches ahead: steering entered in the loop body would reach batches already
    # under way, so workers refuse to go on rather than mix steered and unsteered results.
    from personavec.core.activations import iter_activations
    from personavec.core.generation import iter_generate

    lm = tiny("llama", n_layers=3)
    vec = random_vector(lm)
    convs = [
        [{"role": "user", "content": "q " * (1 + i % 5)}, {"role": "assistant", "content": "a"}]
        for i in range(30)
    ]
    stream = iter_activations(lm, convs, batch_size=1, workers=2)
    next(stream)
    with pytest.raises(PersonavecError, match="workers=1"), steer(lm, vec, layers=[1]):
        for _ in stream:
            pass
    answers = iter_generate(lm, PROMPTS, SAMPLED, batch_size=1, workers=2)
    next(answers)
    with pytest.raises(PersonavecError, match="workers=1"), steer(lm, vec, layers=[1]):
        for _ in answers:
            pass
    # One stream runs nothing ahead, so the same loop is fine there.
    stream = iter_activations(lm, convs, batch_size=1, workers=1)
    next(stream)
    with steer(lm, vec, layers=[1]):
        assert len(list(stream)) == len(convs) - 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
