"""Chat clients for LLM authors and judges: OpenAI-compatible endpoints and Anthropic.

Keys come only from the environment (``OPENAI_API_KEY`` with optional ``OPENAI_BASE_URL`` for vLLM,
llama.cpp's server, Ollama ...; ``ANTHROPIC_API_KEY``) and are never logged or written anywhere.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from personavec.core.errors import PersonavecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A chat reply.

    Attributes:
        text: The reply text.
        top_logprobs: For the first generated token, candidate token -> log-probability, when the
            backend returns them (OpenAI-compatible ``logprobs``); else ``None``.
    """

    text: str
    top_logprobs: dict[str, float] | None = None


@runtime_checkable
class ChatClient(Protocol):
    """Anything that answers chat messages.

    Attributes:
        name: ``provider:model``, recorded in outputs (never the key).
    """

    name: str

    def complete(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        logprobs: bool = False,
    ) -> Completion:
        """Reply to ``messages``; raises :class:`~personavec.core.errors.PersonavecError` if retries fail."""
        ...


DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 5
# OpenAI's API returns at most 20 alternatives per position; the judge needs as many as it can get.
TOP_LOGPROBS = 20
_PROVIDERS = ("openai", "anthropic")
# Anything that looks like a secret key, so a server's error text never carries one into our message.
_KEY_LIKE = re.compile(r"\b(?:sk|key|pk)-[A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)


def _one_line(text: str, secret: str | None, limit: int = 200) -> str:
    """A server's error text made safe to show: one line, short, with the key and key-like strings removed."""
    if secret:
        text = text.replace(secret, "***")
    text = _KEY_LIKE.sub("***", " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(package: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise PersonavecError(
            f"the '{package}' package is not installed: run 'pip install \"personavec[api]\"'"
        ) from None


def _key(variable: str, provider: str) -> str:
    key = os.environ.get(variable, "").strip()
    if not key:
        hint = (
            " (servers that need no key, such as a local vLLM or Ollama, accept any value)"
            if (provider == "openai")
            else ""
        )
        raise PersonavecError(f"{variable} is not set: export it to use '{provider}:' clients{hint}")
    return key


class OpenAIClient:
    """An OpenAI-compatible chat endpoint (OpenAI, or vLLM / llama.cpp / Ollama via ``OPENAI_BASE_URL``).

    Some compatible servers reject the ``logprobs`` parameter (HTTP 400/422 naming it). The first such
    rejection is remembered: that request is sent again without it, and so is every later one, so a
    judge falls back to reading the reply text at the cost of one failed request in all.

    Attributes:
        name: ``openai:<model>``.
        model: The model name sent with each request.
        logprobs_accepted: Whether the server takes ``logprobs`` requests: ``None`` until one was
            answered, then ``True``, or ``False`` once the server rejected one.
    """

    def __init__(
        self, model: str, *, timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES
    ) -> None:
        openai = _require("openai")
        self._openai = openai
        self._key = _key("OPENAI_API_KEY", "openai")
        base_url = os.environ.get("OPENAI_BASE_URL", "").strip() or None
        # The client retries 408/409/429/5xx, connection errors and timeouts itself, with exponential
        # backoff and honouring Retry-After; we only translate what is left after that.
        self._client = openai.OpenAI(
            api_key=self._key, base_url=base_url, timeout=timeout, max_retries=max_retries
        )
        self.model = model
        self.name = f"openai:{model}"
        self._retries = max_retries
        self.logprobs_accepted: bool | None = None
        self._probe_lock = threading.Lock()

    def complete(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        logprobs: bool = False,
    ) -> Completion:
        """Reply to ``messages``; with ``logprobs`` also the first token's top-20 alternatives.

        If the server rejects ``logprobs``, the reply comes without them (``top_logprobs`` is ``None``).

        Raises:
            PersonavecError: One line, once the client's retries are exhausted or on a non-retryable error.
        """
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if logprobs and self.logprobs_accepted is None:
            # Until a server has answered one logprobs request, send them one at a time: one that
            # rejects them then costs a single failed request, not one per worker thread.
            with self._probe_lock:
                if self.logprobs_accepted is None:
                    return self._reply(self._create(kwargs, logprobs=True))
        ask = logprobs and self.logprobs_accepted is not False
        return self._reply(self._create(kwargs, logprobs=ask))

    def _create(self, kwargs: dict[str, Any], *, logprobs: bool) -> Any:
        """The SDK's reply, with logprobs if asked and the server does not reject them."""
        create = self._client.chat.completions.create
        try:
            if not logprobs:
                return create(**kwargs)
            try:
                resp = create(**kwargs, logprobs=True, top_logprobs=TOP_LOGPROBS)
            except self._openai.OpenAIError as e:
                if not _rejects_logprobs(e):
                    raise
                resp = create(**kwargs)
                # Remembered only once the retry worked: had it failed too, the 400 was not (only)
                # about logprobs, and that error is the one to report.
                self._note_rejection(e)
                return resp
            self.logprobs_accepted = True
            return resp
        except self._openai.OpenAIError as e:
            raise PersonavecError(_describe(self.name, e, self._key, self._retries)) from None

    def _note_rejection(self, error: Exception) -> None:
        if self.logprobs_accepted is not False:
            log.warning(
                "%s: the server rejects logprobs (%s); reading scores from the reply text instead",
                self.name,
                _one_line(str(getattr(error, "message", "") or error), self._key),
            )
        self.logprobs_accepted = False

    def _reply(self, resp: Any) -> Completion:
        if not resp.choices:
            raise PersonavecError(f"{self.name}: the reply had no choices")
        choice = resp.choices[0]
        text = choice.message.content or ""
        top: dict[str, float] | None = None
        content = getattr(choice.logprobs, "content", None)
        if content:
            top = {}
            for alt in content[0].top_logprobs or []:
                # Keep the likelier entry if a server lists one token string twice.
                top[alt.token] = max(alt.logprob, top.get(alt.token, -math.inf))
        return Completion(text, top)


def _rejects_logprobs(error: Exception) -> bool:
    """Whether an SDK error is a server refusing the ``logprobs`` parameters (400/422 naming them)."""
    if getattr(error, "status_code", None) not in (400, 422):
        return False
    # Servers put the reason in different places: the message, ``param``, or a bare/odd body.
    said = " ".join(str(getattr(error, a, "") or "") for a in ("message", "param", "body"))
    return "logprob" in said.lower()


class AnthropicClient:
    """Anthropic's Messages API (no log-probabilities: judges parse the reply text).

    Attributes:
        name: ``anthropic:<model>``.
        model: The model name sent with each request.
    """

    def __init__(
        self, model: str, *, timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES
    ) -> None:
        anthropic = _require("anthropic")
        self._anthropic = anthropic
        self._key = _key("ANTHROPIC_API_KEY", "anthropic")
        self._client = anthropic.Anthropic(api_key=self._key, timeout=timeout, max_retries=max_retries)
        # Recent SDKs dropped `temperature` from messages.create; older ones accept it.
        try:
            params = inspect.signature(self._client.messages.create).parameters
            self._takes_temperature = "temperature" in params
        except (TypeError, ValueError):
            self._takes_temperature = False
        self.model = model
        self.name = f"anthropic:{model}"
        self._retries = max_retries

    def complete(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        logprobs: bool = False,
    ) -> Completion:
        """Reply to ``messages`` (``logprobs`` is ignored: the API has none).

        Raises:
            PersonavecError: One line, once the client's retries are exhausted or on a non-retryable error.
        """
        # The Messages API takes system prompts as a separate argument, not as a message.
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        kwargs: dict[str, Any] = {"model": self.model, "messages": chat, "max_tokens": max_tokens}
        if self._takes_temperature:
            kwargs["temperature"] = temperature
        if system:
            kwargs["system"] = system
        try:
            resp = self._client.messages.create(**kwargs)
        except self._anthropic.AnthropicError as e:
            raise PersonavecError(_describe(self.name, e, self._key, self._retries)) from None
        text = "".join(getattr(b, "text", "") for b in resp.content if getattr(b, "type", "") == "text")
        return Completion(text)


def _describe(name: str, error: Exception, key: str, retries: int) -> str:
    """One safe line for an SDK error (both SDKs share the class names used here)."""
    kind = type(error).__name__
    status = getattr(error, "status_code", None)
    if kind == "AuthenticationError":
        return f"{name}: authentication failed (HTTP {status}): check the API key"
    if kind == "APITimeoutError":
        return f"{name}: request timed out (gave up after {retries} retries)"
    if kind == "APIConnectionError":
        return f"{name}: cannot connect to the server (gave up after {retries} retries)"
    detail = _one_line(str(getattr(error, "message", "") or error), key)
    if status is not None:
        return f"{name}: HTTP {status} (after up to {retries} retries): {detail}"
    return f"{name}: {kind}: {detail}"


def make_client(
    spec: str, *, timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES
) -> ChatClient:
    """Build a chat client from ``openai:MODEL`` or ``anthropic:MODEL``.

    Keys come from ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``; ``OPENAI_BASE_URL`` points the OpenAI client
    at any compatible server. Failed requests (429, 5xx, timeouts, dropped connections) are retried by
    the official client with exponential backoff before an error is raised.

    Args:
        spec: ``provider:model``.
        timeout: Seconds allowed for one request.
        max_retries: Retries after the first attempt.

    Returns:
        The client.

    Raises:
        PersonavecError: On a malformed spec, an unknown provider, a missing key or a missing package.
    """
    provider, sep, model = spec.partition(":")
    provider, model = provider.strip().lower(), model.strip()
    if not sep or not model or provider not in _PROVIDERS:
        raise PersonavecError(
            f"bad client spec '{_one_line(spec, None, 60)}': use 'openai:MODEL' (any OpenAI-compatible "
            f"server, with OPENAI_BASE_URL) or 'anthropic:MODEL'"
        )
    if provider == "openai":
        return OpenAIClient(model, timeout=timeout, max_retries=max_retries)
    return AnthropicClient(model, timeout=timeout, max_retries=max_retries)
