"""Captured activations equal transformers' own hidden states (the independent ground truth)."""

from __future__ import annotations

import threading

import pytest
import torch

from personavec.core.activations import (
    BatchLayout,
    capture_activations,
    default_max_padding,
    iter_activations,
    length_batches,
    pad_batch,
    response_mean,
)
from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel

from .conftest import CONVERSATIONS, tiny
from .helpers import random_vector, reference_hidden_states


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_capture_matches_hidden_states(tiny_lm: LoadedModel, padding_side: str) -> None:
    # max_padding=1: all three in one padded batch, so the padding path is what gets checked.
    acts = capture_activations(
        tiny_lm, CONVERSATIONS, tokens=True, padding_side=padding_side, max_padding=1.0
    )
    n_blocks = tiny_lm.info.n_blocks
    assert acts["response_mean"].shape == (3, n_blocks + 1, tiny_lm.info.hidden_size)
    assert acts.tokens is not None
    for i, conv in enumerate(CONVERSATIONS):
        hs, p = reference_hidden_states(tiny_lm, conv)
        assert len(hs) == n_blocks + 1
        for layer in range(n_blocks + 1):
            ref = hs[layer]
            ours = acts.tokens[i][:, layer]
            if layer == n_blocks:
                # Convention: our index L is the raw block output; transformers applies the final norm.
                assert tiny_lm.final_norm is not None
                assert not torch.allclose(ours, ref, atol=1e-3)
                with torch.no_grad():
                    ours = tiny_lm.final_norm(ours)
                ref_pooled = None
            else:
                ref_pooled = ref
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            if ref_pooled is not None:
                torch.testing.assert_close(
                    acts["response_mean"][i, layer], ref[p:].mean(0), atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(
                    acts["prompt_mean"][i, layer], ref[:p].mean(0), atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(acts["last_prompt"][i, layer], ref[p - 1], atol=1e-5, rtol=1e-5)


def test_subset_of_layers_and_batching_do_not_change_results() -> None:
    lm = tiny("qwen2", n_layers=4)
    full = capture_activations(lm, CONVERSATIONS)
    part = capture_activations(lm, CONVERSATIONS, layers=[2, 0], batch_size=1)
    assert part.layers == (0, 2)
    torch.testing.assert_close(part.at("last_prompt", 2), full.at("last_prompt", 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.at("response_mean", 0), full.at("response_mean", 0), atol=1e-5, rtol=1e-5)


def test_capture_stops_after_deepest_layer() -> None:
    lm = tiny("llama", n_layers=4)
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(lm.blocks)]
    head_calls: list[int] = []
    handles.append(lm.model.lm_head.register_forward_hook(lambda *_a: head_calls.append(1)))
    try:
        capture_activations(lm, CONVERSATIONS[:1], layers=[2])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]
    assert head_calls == []


def test_stream_yields_every_example_once() -> None:
    lm = tiny("gpt2")
    convs = CONVERSATIONS * 5
    seen = [ex.index for ex in iter_activations(lm, convs, layers=[1], batch_size=4, token_budget=300)]
    assert sorted(seen) == list(range(len(convs)))


@pytest.mark.parametrize("max_padding", [0.0, 0.05, 0.2, 1.0])
def test_length_batches_respect_every_bound(max_padding: float) -> None:
    lengths = [57, 300, 120, 118, 64, 250, 249, 90, 91, 92, 180, 10, 300, 301]
    batches = length_batches(lengths, batch_size=4, token_budget=900, max_padding=max_padding)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * width <= 900
        assert len(b) == 1 or sum(lengths[i] for i in b) >= (1 - max_padding) * len(b) * width
    if max_padding == 0.0:
        # Only equal lengths may share a batch.
        assert all(len({lengths[i] for i in b}) == 1 for b in batches)
    if max_padding == 1.0:
        assert len(batches) < len(lengths)


def test_default_padding_is_tight_on_cpu() -> None:
    assert default_max_padding(torch.device("cpu")) < default_max_padding(torch.device("cuda"))


def test_left_padding_positions_count_real_tokens() -> None:
    lm = tiny("llama")
    enc = [encode(lm.tokenizer, c) for c in CONVERSATIONS[:2]]
    _ids, layout, pos = pad_batch(enc, 0, "left", torch.device("cpu"))
    short = 1 if len(enc[1].ids) < len(enc[0].ids) else 0
    first_real = int(layout.attention_mask[short].argmax())
    assert first_real > 0 and int(pos[short, first_real]) == 0
    assert bool(layout.response_mask[short, -1]) and not bool(layout.prompt_mask[short, -1])


def test_bad_input_errors() -> None:
    lm = tiny("llama")
    with pytest.raises(PersonavecError, match="empty"):
        capture_activations(lm, [])
    with pytest.raises(PersonavecError, match=r"valid layers for this model are 0\.\.3"):
        capture_activations(lm, CONVERSATIONS, layers=[4])
    with pytest.raises(PersonavecError, match="no assistant turn"):
        capture_activations(lm, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(PersonavecError, match="unknown role"):
        capture_activations(lm, [[{"role": "robot", "content": "hi"}]])
    # Without response pooling a prompt-only conversation is fine.
    from personavec.core.activations import last_prompt

    acts = capture_activations(lm, [[{"role": "user", "content": "hi"}]], poolings=[last_prompt])
    assert acts["last_prompt"].shape == (1, 4, 32)


def _varied_conversations(n: int) -> list[list[dict[str, str]]]:
    # Different lengths, so length bucketing makes many batches of different widths.
    return [
        [
            {"role": "user", "content": "question " * (1 + i % 7)},
            {"role": "assistant", "content": "answer " * (1 + (3 * i) % 11)},
        ]
        for i in range(n)
    ]


def _threads_seen() -> tuple[list[int], object]:
    """A pooling that notes which thread ran it (poolings run inside the forward pass's thread)."""
    seen: list[int] = []

    def response_mean_noting_thread(hidden: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        seen.append(threading.get_ident())
        return response_mean(hidden, layout)

    return seen, response_mean_noting_thread


def test_parallel_workers_give_the_same_results_as_one() -> None:
    lm = tiny("llama", n_layers=3)
    convs = _varied_conversations(24)
    kwargs = dict(tokens=True, batch_size=3, token_budget=400)
    one = capture_activations(lm, convs, workers=1, **kwargs)  # type: ignore[arg-type]
    seen, noting = _threads_seen()
    threads_before = torch.get_num_threads()
    two = capture_activations(lm, convs, workers=2, poolings=[noting], **kwargs)  # type: ignore[arg-type]
    # The work really ran on two threads other than this one, and this thread's setting is intact.
    assert threading.get_ident() not in seen and len(set(seen)) == 2
    assert torch.get_num_threads() == threads_before
    torch.testing.assert_close(two["response_mean_noting_thread"], one["response_mean"], atol=1e-6, rtol=1e-6)
    assert one.tokens is not None and two.tokens is not None
    for a, b in zip(one.tokens, two.tokens):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert two.prompt_lens == one.prompt_lens


def test_other_hooks_on_the_model_keep_capture_on_one_thread() -> None:
    # Steering keeps per-pass state (which positions are prompt), so two passes at once must not share
    # it: under steering capture runs in the calling thread, with the same numbers as one at a time.
    from personavec.core.steering import steer

    lm = tiny("qwen2", n_layers=3)
    convs = _varied_conversations(12)
    vec = random_vector(lm)
    seen, noting = _threads_seen()
    with steer(lm, vec, layers=[1, 2], coef=2.0, positions="response"):
        together = capture_activations(lm, convs, workers=2, poolings=[noting], batch_size=2)
        alone = [capture_activations(lm, [c], poolings=[response_mean], workers=1) for c in convs]
    assert set(seen) == {threading.get_ident()}
    for i, single in enumerate(alone):
        torch.testing.assert_close(
            together["response_mean_noting_thread"][i], single["response_mean"][0], atol=1e-5, rtol=1e-5
        )


def test_leaving_a_stream_early_or_failing_leaves_no_hooks_or_threads() -> None:
    lm = tiny("llama", n_layers=3)
    convs = _varied_conversations(20)
    threads_before = threading.active_count()
    stream = iter_activations(lm, convs, batch_size=2, workers=2)
    next(stream)
    stream.close()
    assert threading.active_count() == threads_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())

    def broken(hidden: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        raise PersonavecError("pooling failed")

    with pytest.raises(PersonavecError, match="pooling failed"):
        capture_activations(lm, convs, poolings=[broken], batch_size=2, workers=2)
    assert threading.active_count() == threads_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    with pytest.raises(PersonavecError, match="at least 1"):
        capture_activations(lm, convs, workers=0)
