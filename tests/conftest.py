"""Shared fixtures: tiny randomly initialised models of several architectures, built in the test.

Nothing here touches a hub: the tokenizer is a byte-level one built in memory, the models come from
configs. The embedded SmolLM2 model is used only by tests marked ``integration``.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personavec.core.models import LoadedModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


VOCAB = 260
ARCHS = ("llama", "qwen2", "gemma", "gpt2")


def make_model(arch: str, n_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    from transformers import (
        AutoModelForCausalLM,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "gemma":
        config = GemmaConfig(**common, head_dim=8)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=n_layers,
            n_head=4,
            n_positions=256,
            pad_token_id=256,
            bos_token_id=257,
            eos_token_id=258,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives tiny residual updates; scale weights up so blocks visibly change the stream.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
    return model.eval()


def tiny(arch: str, n_layers: int = 3) -> LoadedModel:
    return LoadedModel.from_hf(make_model(arch, n_layers), make_tokenizer(), model_id=f"tiny-{arch}")


@pytest.fixture(params=ARCHS)
def tiny_lm(request: pytest.FixtureRequest) -> LoadedModel:
    return tiny(request.param)


@pytest.fixture
def llama_lm() -> LoadedModel:
    return tiny("llama")


CONVERSATIONS = [
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi there, how are you?"},
        {"role": "assistant", "content": "I am well, thanks for asking! And you?"},
    ],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [
        {"role": "system", "content": "You answer in long sentences."},
        {"role": "user", "content": "What is a tree and why does it matter to the planet we live on?"},
        {
            "role": "assistant",
            "content": "A tree is a tall plant with a woody trunk; it stores carbon and shelters life.",
        },
    ],
]
