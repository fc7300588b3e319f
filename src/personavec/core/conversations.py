"""Chat conversations and how they become token ids.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (roles ``system``, ``user``,
``assistant``). When it ends with an assistant message, that message is the *response* and everything
before it is the *prompt*; otherwise the whole conversation is the prompt.

The prompt is rendered with the model's chat template including the generation prompt (so its last
token is the one the model sees right before it answers), and the response text is tokenised on its own
and appended. That gives an exact prompt/response boundary in token space, the same one ``generate``
produces, instead of guessing it by re-tokenising the joined text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from personavec.core.errors import PersonavecError

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]
Conversation = Sequence[Message]

# Used only for tokenizers without a chat template (tiny test models, some base models).
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    """One conversation as token ids.

    Attributes:
        ids: Prompt ids followed by response ids.
        prompt_len: Number of prompt tokens; ``ids[prompt_len:]`` is the response (may be empty).
    """

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def response_len(self) -> int:
        """Number of response tokens."""
        return len(self.ids) - self.prompt_len


def validate(conversation: Any, where: str = "conversation") -> list[dict[str, str]]:
    """Check a conversation's shape and return it as a list of plain dicts.

    Args:
        conversation: The object to check.
        where: Prefix for the error message (e.g. ``file.jsonl:3``).

    Returns:
        The messages as ``{"role", "content"}`` dicts.

    Raises:
        PersonavecError: On a wrong shape, unknown role or empty content.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
        raise PersonavecError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PersonavecError(f"{where}: message {i} is not a {{role, content}} object")
        if m["role"] not in ROLES:
            raise PersonavecError(
                f"{where}: message {i} has unknown role '{m['role']}' (use {', '.join(ROLES)})"
            )
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise PersonavecError(f"{where}: message {i} ({m['role']}) has empty content")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """Render prompt messages with the chat template and the generation prompt appended."""
    template = None if getattr(tokenizer, "chat_template", None) else _FALLBACK_TEMPLATE
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, chat_template=template
    )
    return str(text)


def encode(tokenizer: Any, conversation: Conversation, *, require_response: bool = False) -> Encoded:
    """Tokenise one conversation with an exact prompt/response boundary.

    Args:
        tokenizer: A transformers tokenizer.
        conversation: Messages; a final assistant message is the response.
        require_response: Raise if the conversation has no assistant turn at the end.

    Returns:
        The token ids and the prompt length.

    Raises:
        PersonavecError: On a malformed conversation or a missing response when one is required.
    """
    messages = validate(conversation)
    if messages[-1]["role"] == "assistant":
        prompt_msgs, response = messages[:-1], messages[-1]["content"]
        if not prompt_msgs:
            raise PersonavecError("conversation has only an assistant message: add the user turn before it")
    else:
        if require_response:
            raise PersonavecError(
                "conversation has no assistant turn at the end, but response pooling needs one"
            )
        prompt_msgs, response = messages, ""
    # The rendered template already holds any BOS token, so do not let the tokenizer add another.
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt_msgs), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    return Encoded(tuple(prompt_ids) + tuple(response_ids), len(prompt_ids))
