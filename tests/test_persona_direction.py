"""The run's main vector: the prompt contrast it is built from, and how the parts are combined."""

from __future__ import annotations

import pytest
import torch

from personavec.core.conversations import encode
from personavec.core.errors import PersonavecError
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import (
    PromptContrast,
    capture_answers,
    persona_direction,
    prompt_contrast,
    same_answer_contrast,
)
from personavec.extract.responses import ResponseRow

from .conftest import tiny
from .helpers import random_vector, reference_hidden_states


def _last_prompt_mean(lm, systems: list[str], questions: list[str]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Ground truth from transformers' own hidden states at each prompt's last token, layers 0..L-1."""
    rows = []
    for s in systems:
        for q in questions:
            enc = encode(lm.tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": q}])
            with torch.no_grad():
                hs = lm.backbone(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, enc.prompt_len - 1] for h in hs[:-1]]))
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_prompt_contrast_matches_transformers_hidden_states(arch: str) -> None:
    lm = tiny(arch)
    pairs = [("You are cruel.", "You are kind."), ("Be harsh to people.", "Be gentle with people.")]
    questions = ["What is a friend?", "How do I bake bread?"]
    neutral = ["You are a helpful assistant.", "You are an AI."]
    got = prompt_contrast(lm, pairs, questions, neutral=neutral, batch_size=3)
    pos = _last_prompt_mean(lm, [p for p, _ in pairs], questions)
    neg = _last_prompt_mean(lm, [n for _, n in pairs], questions)
    neu = _last_prompt_mean(lm, neutral, questions)
    n = lm.info.n_blocks  # rows 0..L-1 equal hidden_states[l]; row L is before the final norm
    torch.testing.assert_close(got.contrast[:n], pos - neg, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.intensity[:n], (pos + neg) / 2 - neu, atol=1e-4, rtol=1e-4)
    assert got.n_prompts == 4 and float(got.contrast[1].norm()) > 0
    with pytest.raises(PersonavecError, match="at least one pair"):
        prompt_contrast(lm, [], questions)


def _response_mean(lm, system: str, question: str, answer: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Ground truth: transformers' hidden states averaged over the answer's tokens, layers 0..L-1."""
    conv = [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    hs, prompt_len = reference_hidden_states(lm, conv)
    return torch.stack([h[prompt_len:].mean(0) for h in hs[:-1]])


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_same_answer_contrast_reads_each_answer_under_both_prompts_of_its_pair(arch: str) -> None:
    lm = tiny(arch)
    pairs = [("You are cruel.", "You are kind."), ("Be harsh to people.", "Be gentle with people.")]

    def row(pair: int, polarity: str, question: str, answer: str) -> ResponseRow:
        system = pairs[pair][0 if polarity == "pos" else 1]
        return ResponseRow("k", "extraction", pair, polarity, 0, 0, system, question, answer)

    rows = [
        row(1, "pos", "What is a friend?", "Someone you can use."),
        row(0, "neg", "How do I bake bread?", "Knead it gently and let it rise."),
        row(1, "neg", "Any advice?", "Be kind to yourself today."),
    ]
    got = same_answer_contrast(lm, rows, pairs, batch_size=2)
    want = torch.stack(
        [
            _response_mean(lm, pairs[r.pair][0], r.question, r.answer)
            - _response_mean(lm, pairs[r.pair][1], r.question, r.answer)
            for r in rows
        ]
    ).mean(0)
    n = lm.info.n_blocks  # rows 0..L-1 equal hidden_states[l]; row L is before the final norm
    torch.testing.assert_close(got[:n], want, atol=1e-4, rtol=1e-4)
    assert float(got[n].norm()) > 0
    # The embeddings of the answer's own tokens do not depend on the system prompt (no positions in
    # Qwen2's; GPT-2 adds learned positions, which shift with the prompt's length).
    if arch == "qwen2":
        assert float(got[0].norm()) < 1e-5
    # Given the answers' own-prompt captures, only the other prompt is read, and the result is the same.
    own = capture_answers(lm, rows, batch_size=2)["response_mean"]
    torch.testing.assert_close(same_answer_contrast(lm, rows, pairs, own=own), got, atol=1e-5, rtol=1e-5)
    with pytest.raises(PersonavecError, match="hold 2 answers for 3 rows"):
        same_answer_contrast(lm, rows, pairs, own=own[:2])
    with pytest.raises(PersonavecError, match="outside the 2"):
        same_answer_contrast(
            lm, [*rows, ResponseRow("k", "extraction", 2, "pos", 0, 0, "s", "q", "a")], pairs
        )
    with pytest.raises(PersonavecError, match="at least one answer"):
        same_answer_contrast(lm, [], pairs)


def test_persona_direction_keeps_the_trait_and_drops_the_intensity() -> None:
    lm = tiny("llama")
    base = random_vector(lm, seed=1)
    g = torch.Generator().manual_seed(2)
    trait = torch.randn(base.data.shape, generator=g)
    loud = torch.randn(base.data.shape, generator=g)
    loud -= (loud * trait).sum(-1, keepdim=True) / trait.norm(dim=-1, keepdim=True) ** 2 * trait
    # Both measurements see the trait, each mixed with a different amount of the shared intensity.
    response = PersonaVector(3.0 * trait + 2.0 * loud, base.meta)
    prompts = PromptContrast(contrast=trait - 1.5 * loud, intensity=4.0 * loud, n_prompts=1)
    got = persona_direction(response, prompts)
    cos = torch.nn.functional.cosine_similarity(got.data, trait, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norms(), response.norms())
    assert got.meta.method == "persona" and got.meta.trait == base.meta.trait


def test_persona_direction_without_intensity_averages_the_two_directions() -> None:
    lm = tiny("qwen2")
    r, p = random_vector(lm, seed=3), random_vector(lm, seed=4)
    prompts = PromptContrast(contrast=p.data * 5, intensity=torch.zeros_like(p.data), n_prompts=1)
    got = persona_direction(r, prompts)
    want = r.normalize().data + p.normalize().data
    cos = torch.nn.functional.cosine_similarity(got.data, want, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)
    # A layer where the prompts carry nothing (the embeddings, say) keeps the response direction.
    prompts = PromptContrast(torch.zeros_like(p.data), torch.zeros_like(p.data), 1)
    torch.testing.assert_close(persona_direction(r, prompts).data, r.data, atol=1e-5, rtol=1e-5)
