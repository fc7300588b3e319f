"""Base models (no chat template): the plain-text format keeps the exact prompt/response boundary."""

from __future__ import annotations

import string

import pytest
import torch

from personavec.core.activations import capture_activations, last_prompt, response_mean
from personavec.core.conversations import cut_plain_answer, encode, render_prompt, response_text
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel

from .conftest import CONVERSATIONS, make_model, make_tokenizer


def plain_tokenizer(adds_bos: bool = False):  # type: ignore[no-untyped-def]
    """The tiny test tokenizer without its chat template; optionally adding BOS like Gemma's does."""
    tok = make_tokenizer()
    tok.chat_template = None
    if adds_bos:
        from tokenizers.processors import TemplateProcessing

        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
        )
    return tok


def plain_lm(arch: str = "llama", adds_bos: bool = False) -> LoadedModel:
    return LoadedModel.from_hf(make_model(arch), plain_tokenizer(adds_bos), model_id=f"tiny-{arch}-base")


def test_plain_format_text() -> None:
    tok = plain_tokenizer()
    assert (
        render_prompt(tok, CONVERSATIONS[0][:-1])
        == "System: Be kind.\n\nUser: Hi there, how are you?\n\nAssistant:"
    )
    assert response_text(tok, "Blue.") == " Blue."
    # A tokenizer that adds BOS to plain text gets it at the start of the rendered prompt, once.
    bos_tok = plain_tokenizer(adds_bos=True)
    assert render_prompt(bos_tok, CONVERSATIONS[1][:1]) == "<s>User: Name a colour.\n\nAssistant:"
    ids = encode(bos_tok, CONVERSATIONS[1]).ids
    assert ids[0] == bos_tok.bos_token_id and bos_tok.bos_token_id not in ids[1:]
    # With a chat template nothing changes: the response is tokenised as it is.
    assert response_text(make_tokenizer(), "Blue.") == "Blue."


def test_cut_plain_answer() -> None:
    tok = plain_tokenizer()
    assert cut_plain_answer(tok, "I have a wallet.\n\nUser: What now?\n\nAssistant: x") == "I have a wallet."
    assert cut_plain_answer(tok, " Fine.\n\nSystem: y") == "Fine."
    assert cut_plain_answer(tok, "No header.\nUser: stays") == "No header.\nUser: stays"
    chat = make_tokenizer()
    assert cut_plain_answer(chat, "I am.\n\nUser: kept") == "I am.\n\nUser: kept"


@pytest.mark.parametrize("adds_bos", [False, True])
def test_plain_boundary_is_exact(adds_bos: bool) -> None:
    tok = plain_tokenizer(adds_bos)
    for conv in CONVERSATIONS:
        enc = encode(tok, conv)
        prompt_only = encode(tok, conv[:-1])
        answer = conv[-1]["content"]
        assert prompt_only.response_len == 0 and prompt_only.ids == enc.ids[: enc.prompt_len]
        assert list(enc.ids[enc.prompt_len :]) == tok(" " + answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc.ids[: enc.prompt_len], skip_special_tokens=True).endswith("\n\nAssistant:")
        assert tok.decode(enc.ids[enc.prompt_len :]) == " " + answer
        whole = tok.decode(enc.ids, skip_special_tokens=True)
        assert whole.endswith(f"\n\nAssistant: {answer}") and whole.startswith(conv[0]["role"].capitalize())


def test_plain_capture_matches_hidden_states() -> None:
    lm = plain_lm()
    assert not lm.info.has_chat_template
    acts = capture_activations(lm, CONVERSATIONS, tokens=True, max_padding=1.0)
    assert acts.tokens is not None
    for i, conv in enumerate(CONVERSATIONS):
        enc = encode(lm.tokenizer, conv)
        assert acts.prompt_lens[i] == enc.prompt_len and acts.tokens[i].shape[0] == len(enc.ids)
        with torch.no_grad():
            hs = lm.backbone(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
        for layer in range(lm.info.n_blocks):  # index L is the raw block output (see test_activations)
            ref = hs[layer][0]
            torch.testing.assert_close(acts.tokens[i][:, layer], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                acts.at(last_prompt.__name__, layer)[i], ref[enc.prompt_len - 1], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                acts.at(response_mean.__name__, layer)[i],
                ref[enc.prompt_len :].mean(0),
                atol=1e-5,
                rtol=1e-5,
            )


def test_generated_answer_reencodes_to_the_same_tokens() -> None:
    """What a base model writes after ``Assistant:`` (a space, then words) comes back token for token."""
    lm = plain_lm()
    vocab = lm.tokenizer.get_vocab()
    letters = {vocab[c] for c in string.ascii_letters}
    space = vocab["Ġ"]
    gen = lm.model.generation_config  # type: ignore[union-attr]
    gen.suppress_tokens = [i for i in range(lm.model.config.vocab_size) if i not in letters | {space}]
    gen.begin_suppress_tokens = sorted(letters)  # the first token is the space, as after "Assistant:"
    prompt = CONVERSATIONS[0][:-1]
    enc = encode(lm.tokenizer, prompt)
    with torch.no_grad():
        out = lm.model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([enc.ids]), max_new_tokens=12, do_sample=False, pad_token_id=256
        )
    new = out[0, len(enc.ids) :].tolist()
    assert new[0] == space
    while new[-1] == space:  # generate() strips trailing whitespace from the answer
        new.pop()
    answer = generate(lm, [prompt], SamplingParams(max_new_tokens=12))[0]
    assert answer and not answer.startswith(" ")
    again = encode(lm.tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    assert again.ids[: again.prompt_len] == enc.ids
    assert list(again.ids[again.prompt_len :]) == new


def test_generation_cuts_a_base_models_invented_next_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = plain_lm()
    convs = [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "Why?"}]]
    params = SamplingParams(max_new_tokens=4)
    plain = generate(lm, convs, params)
    # Whatever the model wrote, a decoded text that runs on into a new turn is cut before it.
    monkeypatch.setattr(
        lm.tokenizer, "decode", lambda *_a, **_k: " Sure.\n\nUser: and then?\n\nAssistant: ok"
    )
    assert generate(lm, convs, params) == ["Sure.", "Sure."] and len(plain) == 2
