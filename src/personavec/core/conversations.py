"""Chat conversations and how they become token ids.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (roles ``system``, ``user``,
``assistant``). When it ends with an assistant message, that message is the *response* and everything
before it is the *prompt*; otherwise the whole conversation is the prompt.

The prompt is rendered with the model's chat template including the generation prompt (so its last
token is the one the model sees right before it answers), and the response text is tokenised on its own
and appended. That gives an exact prompt/response boundary in token space, the same one ``generate``
produces, instead of guessing it by re-tokenising the joined text.

Tokenizers without a chat template (base models such as Gemma 3 270M, tiny test models) get a plain-text
format instead, one paragraph per message with a capitalised role name, ending with the generation
prompt ``Assistant:``::

    <bos>System: Be kind.

    User: Hi there.

    Assistant: Hello!

``<bos>`` is the tokenizer's BOS token text, present only when the tokenizer itself adds one to plain
text (what the base model was trained with). The prompt ends at the colon, so its last token is the one
right before the answer; the single space after it belongs to the response, which is tokenised on its
own as ``" " + response`` (``Hello!`` becomes ``▁Hello!`` in a SentencePiece vocabulary, the token a base
model actually produces after ``Assistant:``). ``generate`` strips that space from the decoded answer, and
re-encoding the stripped answer adds it back, so the boundary stays exact at the token level. A base
model does not end its turn, so :func:`cut_plain_answer` cuts its text where the next turn begins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from personavec.core.errors import PersonavecError

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]
Conversation = Sequence[Message]

# The plain-text format for tokenizers without a chat template (see the module docstring).
PLAIN_SEPARATOR = "\n\n"
PLAIN_GENERATION_PROMPT = "Assistant:"
PLAIN_RESPONSE_PREFIX = " "
# A base model does not stop after its answer: it goes on writing the next turns of the transcript.
PLAIN_STOPS = tuple(PLAIN_SEPARATOR + f"{role.capitalize()}:" for role in ROLES)


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


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer ships a chat template (else the plain-text format is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer: Any) -> bool:
    # Ask the tokenizer rather than trusting flags: Gemma's reports add_bos_token=False yet adds one.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def render_plain(tokenizer: Any, messages: Sequence[Message]) -> str:
    """Render prompt messages in the plain-text format, ending with the ``Assistant:`` generation prompt."""
    turns = [f"{str(m['role']).capitalize()}: {m['content']}" for m in messages]
    text = PLAIN_SEPARATOR.join([*turns, PLAIN_GENERATION_PROMPT])
    return (str(tokenizer.bos_token) + text) if _adds_bos(tokenizer) else text


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """Render prompt messages with the chat template (or the plain format) and the generation prompt."""
    if not has_chat_template(tokenizer):
        return render_plain(tokenizer, messages)
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )
    return str(text)


def response_text(tokenizer: Any, response: str) -> str:
    """The text tokenised for a response: the answer itself, after one space in the plain format."""
    return response if has_chat_template(tokenizer) else PLAIN_RESPONSE_PREFIX + response


def cut_plain_answer(tokenizer: Any, answer: str) -> str:
    """Cut a generated answer where a base model starts the next turn (a blank line, then ``User:``).

    A no-op for tokenizers with a chat template (their models end the turn with a special token).

    Args:
        tokenizer: The model's tokenizer.
        answer: Decoded generated text.

    Returns:
        The answer up to the first plain-format turn header (see ``PLAIN_STOPS``), stripped.
    """
    if has_chat_template(tokenizer):
        return answer
    cut = min((i for i in (answer.find(s) for s in PLAIN_STOPS) if i >= 0), default=len(answer))
    return answer[:cut].strip()


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
    response_ids = (
        tokenizer(response_text(tokenizer, response), add_special_tokens=False)["input_ids"]
        if response
        else []
    )
    return Encoded(tuple(prompt_ids) + tuple(response_ids), len(prompt_ids))
