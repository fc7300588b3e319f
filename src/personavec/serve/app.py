"""The HTTP face of the server: an OpenAI-compatible API over an :class:`~personavec.serve.engine.Engine`.

Routes: ``GET /`` (the web page), ``GET /health``, ``GET /v1/models``, ``GET /v1/vectors`` and
``POST /v1/chat/completions`` (streamed as server-sent events ending with ``data: [DONE]``, or not).
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official clients
raise them with their message; a bad request never takes the server down.

Hardening for a local server: the ``/v1`` routes take an optional bearer token; requests must be
``application/json`` (a web page on another origin cannot send that without a CORS preflight, which
this server never grants); with ``trusted_hosts`` set (the CLI does for loopback binds) requests naming
another ``Host`` are refused, which defeats DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from personavec.core.conversations import encode, validate
from personavec.core.errors import PersonavecError
from personavec.serve.engine import Engine, EngineBusy, Ticket
from personavec.serve.events import Event, Failed, Finished, Job, Prefilled, Token
from personavec.serve.schema import ChatRequest, Threshold, describe


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer enforces.

    Attributes:
        served_name: The model name clients send (and ``/v1/models`` lists).
        aliases: Other accepted model names (e.g. the spec the model was loaded from).
        api_key: Bearer token required on ``/v1`` routes (``None``: no token).
        max_body_bytes: Largest request body.
        max_tokens: Most tokens per answer (larger requests are capped to it; also the default).
        max_prompt_tokens: Longest prompt, in tokens.
        max_steering: Most steering entries per request.
        thresholds: Per-vector thresholds that flag responses (a request can override them).
        trusted_hosts: Accepted ``Host`` header names (``None``: any).
    """

    served_name: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 1 << 20
    max_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_steering: int = 8
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    trusted_hosts: tuple[str, ...] | None = None


class ApiError(Exception):
    """An error reply in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        """The JSON reply."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The FastAPI application serving ``engine`` (which the caller starts and closes).

    Args:
        engine: A started engine (its model and vectors are what the API serves).
        settings: Limits, names and the optional token.

    Returns:
        The application, for ``uvicorn.run`` or :func:`serve_in_thread`.
    """
    app = FastAPI(title="personavec", docs_url=None, redoc_url=None, openapi_url=None)
    if settings.trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.trusted_hosts))
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), settings.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "auth_error")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.served_name,
            "vectors": list(engine.registry.vectors),
            "auth": settings.api_key is not None,
            "max_tokens": settings.max_tokens,
            **engine.load(),
            "stats": asdict(engine.stats),
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        card = {"id": settings.served_name, "object": "model", "created": 0, "owned_by": "personavec"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/vectors")
    async def vectors(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [sv.info() for sv in engine.registry.vectors.values()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        check_key(request)
        req = _parse(await _read_body(request, settings.max_body_bytes))
        if req.model not in (settings.served_name, *settings.aliases):
            raise ApiError(
                404,
                f"model '{req.model}' is not served here; this server serves '{settings.served_name}'",
                "model_not_found",
                "model",
            )
        try:
            job = build_job(engine, settings, req)
        except PersonavecError as e:
            raise ApiError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            ticket = engine.submit(job, sink)
        except EngineBusy as e:
            raise ApiError(503, str(e), "server_busy", headers={"Retry-After": "1"}) from None
        reply = _Reply(settings.served_name, req)
        if req.stream:
            return StreamingResponse(
                _stream(reply, events, ticket),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(reply, events, ticket, request)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def page_html() -> str:
    """The web page (plain HTML and JavaScript, nothing fetched from elsewhere)."""
    return resources.files("personavec.serve").joinpath("page.html").read_text(encoding="utf-8")


async def _read_body(request: Request, limit: int) -> bytes:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"send the request body as application/json, not '{kind or 'nothing'}'")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


def _parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, describe(e)) from None


def build_job(engine: Engine, settings: ServerSettings, req: ChatRequest) -> Job:
    """A request's :class:`Job`: the encoded prompt, capped limits and resolved steering.

    Raises:
        PersonavecError: On a bad conversation, a prompt too long, or bad steering or thresholds.
    """
    messages = validate([m.as_dict() for m in req.messages], "messages")
    if messages[-1]["role"] != "user":
        raise PersonavecError("messages: the last message must be a user turn (the server answers it)")
    ids = encode(engine.lm.tokenizer, messages).ids
    if len(ids) > settings.max_prompt_tokens:
        raise PersonavecError(
            f"messages: the prompt has {len(ids)} tokens, over this server's limit of "
            f"{settings.max_prompt_tokens}"
        )
    if len(req.steering) > settings.max_steering:
        raise PersonavecError(
            f"steering: {len(req.steering)} entries, over this server's limit of {settings.max_steering}"
        )
    steering = engine.registry.resolve(req.steering)
    flags = engine.registry.flags({**settings.thresholds, **(req.persona_thresholds or {})})
    max_tokens = min(req.requested_tokens() or settings.max_tokens, settings.max_tokens)
    context = getattr(engine.lm.model.config, "max_position_embeddings", None)
    if isinstance(context, int):
        if len(ids) >= context:
            raise PersonavecError(f"messages: the prompt fills the model's context of {context} tokens")
        max_tokens = min(max_tokens, context - len(ids))
    return Job(
        prompt_ids=tuple(ids),
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=tuple(req.stops()),
        ignore_eos=req.ignore_eos,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        steering=steering,
        flags=flags,
    )


class _Reply:
    """Builds the response objects of one request."""

    def __init__(self, model: str, req: ChatRequest) -> None:
        self.model, self.req = model, req
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any], persona: dict[str, Any], **choice: Any) -> str:
        """One server-sent event with a ``chat.completion.chunk``."""
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **choice}],
            "persona": persona,
        }
        return _sse(body)

    def usage_chunk(self, done: Finished) -> str:
        """The last chunk when ``stream_options.include_usage`` asks for it (no choices)."""
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(done),
        }
        return _sse(body)

    def completion(self, done: Finished, tokens: list[Token]) -> dict[str, Any]:
        """The non-streamed ``chat.completion``."""
        logprobs = {"content": [_logprob(t) for t in tokens]} if self.req.logprobs else None
        persona = done.persona.to_dict()
        persona["tokens"] = [{"text": t.token, "projections": t.projections} for t in tokens]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "logprobs": logprobs,
                    "finish_reason": done.reason,
                }
            ],
            "usage": _usage(done),
            "persona": persona,
        }


def _sse(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _usage(done: Finished) -> dict[str, int]:
    prompt, completion = done.prompt_tokens, done.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprob(token: Token) -> dict[str, Any] | None:
    lp = token.logprob
    if lp is None:
        return None

    def entry(text: str, value: float) -> dict[str, Any]:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


async def _stream(reply: _Reply, events: asyncio.Queue[Event], ticket: Ticket) -> AsyncIterator[str]:
    """Server-sent events for one request; leaving early (a client gone) cancels the job."""
    try:
        while True:
            event = await events.get()
            if isinstance(event, Prefilled):
                persona = {**event.persona.to_dict(), "prompt_tokens": event.prompt_tokens}
                yield reply.chunk({"role": "assistant", "content": ""}, persona)
            elif isinstance(event, Token):
                token = {"index": event.index, "id": event.token_id, "text": event.token}
                logprobs = None if event.logprob is None else {"content": [_logprob(event)]}
                persona = {"token": {**token, "projections": event.projections}}
                yield reply.chunk({"content": event.delta}, persona, logprobs=logprobs)
            elif isinstance(event, Finished):
                if event.tail:
                    yield reply.chunk({"content": event.tail}, {})
                yield reply.chunk({}, event.persona.to_dict(), finish_reason=event.reason)
                if reply.req.stream_options is not None and reply.req.stream_options.include_usage:
                    yield reply.usage_chunk(event)
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse({"error": {"message": event.message, "type": "server_error"}})
                yield "data: [DONE]\n\n"
                return
    finally:
        ticket.cancel()  # a no-op once the job has finished


async def _collect(reply: _Reply, events: asyncio.Queue[Event], ticket: Ticket, request: Request) -> Response:
    """Wait for the whole answer, cancelling the job as soon as the client goes away."""
    gone = asyncio.ensure_future(_disconnected(request))
    tokens: list[Token] = []
    try:
        while True:
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({next_event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                return Response(status_code=499)  # nobody reads it; the job is cancelled below
            event = next_event.result()
            if isinstance(event, Token):
                tokens.append(event)
            elif isinstance(event, Finished):
                return JSONResponse(reply.completion(event, tokens))
            elif isinstance(event, Failed):
                raise ApiError(500, event.message, "server_error")
    finally:
        gone.cancel()
        ticket.cancel()  # a no-op once the job has finished


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so nothing else is received)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (for tests and benchmarks).

    Args:
        app: The application.
        host: Interface to bind.
        port: Port (0: a free one).

    Yields:
        The base URL, e.g. ``http://127.0.0.1:54321``.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="personavec-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise PersonavecError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)
