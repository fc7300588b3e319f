"""Steering hooks: exact arithmetic, positions, cleanup, generation and autograd."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.steering import SteeringSpec, ablate, project, steer

from .conftest import CONVERSATIONS, tiny
from .helpers import block_outputs, random_vector

PROMPTS = [
    [{"role": "user", "content": "Tell me a story."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue, in detail?"},
    ],
    [{"role": "user", "content": "Hi"}],
]


def _ids(lm: LoadedModel, i: int = 0) -> torch.Tensor:
    return torch.tensor([encode(lm.tokenizer, CONVERSATIONS[i]).ids])


def _logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_coef_zero_gives_identical_logits(tiny_lm: LoadedModel) -> None:
    v = random_vector(tiny_lm)
    ids = _ids(tiny_lm)
    base = _logits(tiny_lm, ids)
    with steer(tiny_lm, v, layers=[1, 2], coef=0.0):
        same = _logits(tiny_lm, ids)
    assert torch.equal(base, same)
    with steer(tiny_lm, v, layers=2, coef=4.0):
        moved = _logits(tiny_lm, ids)
    assert not torch.allclose(base, moved, atol=1e-3)


def _downstream_inputs(
    lm: LoadedModel, ids: torch.Tensor, layer: int, **steering: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """What block ``layer + 1`` reads (everything downstream of block ``layer``): unsteered, steered."""
    seen: list[torch.Tensor] = []
    h = lm.blocks[layer].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            lm.backbone(input_ids=ids)
            with steer(lm, layers=layer, **steering):  # type: ignore[arg-type]
                lm.backbone(input_ids=ids)
    finally:
        h.remove()
    return seen[0], seen[1]


def test_downstream_sees_exactly_added_vector(tiny_lm: LoadedModel) -> None:
    v = random_vector(tiny_lm, seed=1)
    layer, coef = 2, 3.5
    plain, steered = _downstream_inputs(tiny_lm, _ids(tiny_lm), layer, vector=v, coef=coef)
    torch.testing.assert_close(steered, plain + coef * v.at(layer), atol=1e-6, rtol=1e-6)


def test_per_row_coefficients_steer_each_row_by_its_own_strength(tiny_lm: LoadedModel) -> None:
    v = random_vector(tiny_lm, seed=3)
    layer, coefs = 2, [0.0, 3.5, -1.25]
    ids = _ids(tiny_lm).expand(3, -1)
    plain, steered = _downstream_inputs(tiny_lm, ids, layer, vector=v, coef=coefs)
    for row, c in enumerate(coefs):
        torch.testing.assert_close(steered[row], plain[row] + c * v.at(layer), atol=1e-6, rtol=1e-6)
    two = steer(tiny_lm, v, layers=layer, coef=[1.0, 2.0])
    with (
        pytest.raises(PersonavecError, match="2 per-row coefficients for a batch of 3"),
        torch.no_grad(),
        two,
    ):
        tiny_lm.backbone(input_ids=ids)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(PersonavecError, match="coef"), steer(tiny_lm, v, layers=layer, coef=bad):
            pass


def test_per_row_coefficients_in_batched_generate() -> None:
    lm = tiny("llama")
    v = random_vector(lm, seed=4, scale=3.0)
    params = SamplingParams(max_new_tokens=6)
    with steer(lm, v, layers=1, coef=[0.0, 2.0, -2.0]):
        batched = generate(lm, PROMPTS, params, batch_size=3)
    alone = []
    for prompt, c in zip(PROMPTS, [0.0, 2.0, -2.0]):
        with steer(lm, v, layers=1, coef=c):
            alone.append(generate(lm, [prompt], params)[0])
    assert batched == alone


def test_defaults_come_from_the_stored_sweep_choice(tiny_lm: LoadedModel) -> None:
    v = random_vector(tiny_lm, seed=2)
    ids = _ids(tiny_lm)

    def steered_logits(vec: object, **kw: object) -> torch.Tensor:
        with steer(tiny_lm, vec, **kw):  # type: ignore[arg-type]
            return _logits(tiny_lm, ids)

    chosen = v.with_meta(extra={**v.meta.extra, "steering": {"amplify": {"layer": 1, "coef": 2.5}}})
    assert torch.equal(steered_logits(chosen), steered_logits(v, layers=1, coef=2.5))
    # An explicit coefficient overrides the stored one; an explicit layer drops the stored coefficient.
    assert torch.equal(steered_logits(chosen, coef=-1.0), steered_logits(v, layers=1, coef=-1.0))
    assert torch.equal(steered_logits(chosen, layers=2), steered_logits(v, layers=2, coef=1.0))
    assert not torch.equal(steered_logits(chosen), steered_logits(v, layers=1, coef=1.0))
    bare = v.with_meta(extra={})
    with pytest.raises(PersonavecError, match="no recommended layer"):
        steered_logits(bare)


@pytest.mark.parametrize("use_cache", [True, False])
def test_response_positions_leave_prompt_untouched(use_cache: bool) -> None:
    lm = tiny("llama")
    v = random_vector(lm, scale=5.0)
    ids = torch.tensor([encode(lm.tokenizer, PROMPTS[0]).ids])
    p, n = ids.shape[1], lm.info.n_blocks

    def run(steered: bool) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
        with torch.no_grad(), steer(lm, v, layers=1, coef=2.0 if steered else 0.0, positions="response"):
            # Recorders registered after the steering hooks see the steered block outputs.
            seen, handles = block_outputs(lm)
            try:
                out = lm.model.generate(
                    input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=256
                )
            finally:
                for h in handles:
                    h.remove()
        return seen, out

    base, _ = run(False)
    seen, out = run(True)
    for (_, ours), (_, ref) in zip(seen[:n], base[:n]):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)  # the prompt pass is untouched
    # The first generated token was steered: its block-1 output is the unsteered one plus 2v.
    with steer(lm, v, layers=1, coef=0.0):
        ref_seen, handles = block_outputs(lm)
        with torch.no_grad():
            lm.model(input_ids=out[:, : p + 1])
        for h in handles:
            h.remove()
    steered_step = seen[n][1][:, -1]
    torch.testing.assert_close(steered_step, ref_seen[0][1][:, p] + 2.0 * v.at(1), atol=1e-5, rtol=1e-5)
    if not use_cache:
        # Without a cache every pass re-reads the prompt, which must still be left alone.
        torch.testing.assert_close(seen[n][1][:, :p], base[0][1], atol=1e-5, rtol=1e-5)


def test_prompt_positions_only_touch_the_prompt() -> None:
    lm = tiny("qwen2")
    v = random_vector(lm)
    ids = torch.tensor([encode(lm.tokenizer, PROMPTS[1]).ids])
    p = ids.shape[1]
    with torch.no_grad(), steer(lm, v, layers=1, coef=1.0, positions="prompt"):
        seen, handles = block_outputs(lm)
        out = lm.model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=256)
        for h in handles:
            h.remove()
    # Same thing in one teacher-forced pass with an explicit mask over the prompt positions.
    mask = torch.zeros(out[:, : p + 1].shape, dtype=torch.bool)
    mask[:, :p] = True
    with torch.no_grad(), steer(lm, v, layers=1, coef=1.0, positions=mask):
        ref, handles = block_outputs(lm)
        lm.model(input_ids=out[:, : p + 1])
        for h in handles:
            h.remove()
    with torch.no_grad():
        plain, handles = block_outputs(lm)
        lm.model(input_ids=ids)
        for h in handles:
            h.remove()
    n = lm.info.n_blocks
    torch.testing.assert_close(seen[0][1], plain[0][1] + v.at(1), atol=1e-5, rtol=1e-5)  # prompt steered
    torch.testing.assert_close(seen[n][1][:, -1], ref[0][1][:, p], atol=1e-5, rtol=1e-5)  # answer not


def test_hooks_removed_after_exception() -> None:
    lm = tiny("gpt2")
    v = random_vector(lm)
    ids = _ids(lm)
    base = _logits(lm, ids)
    with pytest.raises(RuntimeError, match="boom"), steer(lm, v, layers=[1, 2, 3], coef=3.0):
        raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in lm.blocks)
    assert torch.equal(_logits(lm, ids), base)


def test_steering_inside_batched_generate_with_left_padding() -> None:
    lm = tiny("llama")
    v = random_vector(lm, scale=3.0)
    params = SamplingParams(max_new_tokens=6)
    plain = generate(lm, PROMPTS, params)
    with steer(lm, v, layers=2, coef=2.0):
        batched = generate(lm, PROMPTS, params, batch_size=3)
    with steer(lm, v, layers=2, coef=2.0):
        alone = [generate(lm, [p], params)[0] for p in PROMPTS]
    assert batched == alone
    assert batched != plain


def test_several_vectors_compose_additively() -> None:
    lm = tiny("gemma")
    a, b = random_vector(lm, seed=1), random_vector(lm, seed=2)
    ids = _ids(lm)
    with steer(lm, [SteeringSpec(a, [2], 1.5), SteeringSpec(b, [2], -0.5)]):
        both = _logits(lm, ids)
    with steer(lm, a * 1.5 - b * 0.5, layers=2, coef=1.0):
        combined = _logits(lm, ids)
    with steer(lm, a, layers=2, coef=1.5), steer(lm, b, layers=2, coef=-0.5):
        nested = _logits(lm, ids)
    torch.testing.assert_close(both, combined, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, nested, atol=1e-5, rtol=1e-5)


def test_ablate_removes_the_direction() -> None:
    lm = tiny("llama")
    v = random_vector(lm)
    ids = _ids(lm)
    with torch.no_grad(), steer(lm, v, layers=2, mode=ablate):
        seen, handles = block_outputs(lm)
        lm.backbone(input_ids=ids)
        for h in handles:
            h.remove()
    out2 = seen[1][1]
    assert project(out2, v, 2).abs().max() < 1e-4
    assert project(seen[0][1], v, 1).abs().max() > 1e-2


def test_hooks_work_with_autograd_and_masks() -> None:
    lm = tiny("qwen2")
    v = random_vector(lm)
    ids = _ids(lm)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, 5:] = True
    lm.model.train()
    try:
        with steer(lm, v, layers=2, coef=2.0, positions=mask):
            loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        lm.model.eval()
    grads = [p.grad for p in lm.blocks[0].parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads if g is not None)
    lm.model.zero_grad()
    with torch.no_grad(), steer(lm, v, layers=2, coef=2.0, positions=mask):
        steered = lm.model(input_ids=ids).logits
    base = _logits(lm, ids)
    torch.testing.assert_close(steered[:, :5], base[:, :5])  # masked-out prefix untouched (causal model)
    assert not torch.allclose(steered[:, 5:], base[:, 5:], atol=1e-3)


def test_bad_steering_input() -> None:
    lm = tiny("llama")
    v = random_vector(lm)
    with (
        pytest.raises(PersonavecError, match=r"valid layers for this model are 1\.\.3"),
        steer(lm, v, layers=0),
    ):
        pass
    with (
        pytest.raises(PersonavecError, match="positions must be"),
        steer(lm, v, layers=1, positions="middle"),
    ):
        pass
    other = random_vector(tiny("llama", n_layers=5))
    with pytest.raises(PersonavecError, match="was made for"), steer(lm, other, layers=1):
        pass
    with pytest.raises(PersonavecError, match="no recommended layer"), steer(lm, v):
        pass


def test_project_uses_unit_direction() -> None:
    lm = tiny("llama")
    v = random_vector(lm) * 7.0
    acts = v.at(2).unsqueeze(0) * 2.0
    torch.testing.assert_close(project(acts, v, 2), v.at(2).norm().unsqueeze(0) * 2.0)


def _in_thread(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` run to completion in a new thread."""
    out: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def test_this_thread_only_leaves_other_threads_passes_alone(tiny_lm: LoadedModel) -> None:
    v = random_vector(tiny_lm, seed=5)
    ids = _ids(tiny_lm)
    base = _logits(tiny_lm, ids)
    with steer(tiny_lm, v, layers=2, coef=4.0):
        steered = _logits(tiny_lm, ids)
        # By default every thread's pass is steered: a generation run in a streamer's thread must be.
        torch.testing.assert_close(_in_thread(lambda: _logits(tiny_lm, ids)), steered)
    assert not torch.allclose(base, steered, atol=1e-3)
    with steer(tiny_lm, v, layers=2, coef=4.0, this_thread_only=True):
        other = _in_thread(lambda: _logits(tiny_lm, ids))
        mine = _logits(tiny_lm, ids)
    assert torch.equal(other, base)
    torch.testing.assert_close(mine, steered)


def test_two_threads_steer_their_own_generations_at_once() -> None:
    lm = tiny("llama", n_layers=2)
    v = random_vector(lm, scale=4.0)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0)
    expected = {}
    for coef in (-3.0, 3.0):
        with steer(lm, v, layers=1, coef=coef, positions="response"):
            expected[coef] = generate(lm, PROMPTS, params, seeds=[1, 2, 3], workers=1)
    # Both threads wait for each other before generating, so their passes interleave.
    barrier = threading.Barrier(2)
    got: dict[float, list[str]] = {}

    def run(coef: float) -> None:
        with steer(lm, v, layers=1, coef=coef, positions="response", this_thread_only=True):
            barrier.wait()
            got[coef] = generate(lm, PROMPTS, params, seeds=[1, 2, 3], workers=1)

    threads = [threading.Thread(target=run, args=(c,)) for c in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected and expected[-3.0] != expected[3.0]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
