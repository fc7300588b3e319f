"""The generation engine: one worker thread owns the model and decodes every request in one batch.

Requests wait in a bounded queue. Between decoding steps the worker takes as many waiting requests as
the batch has room for, reads their prompts in one left-padded *prefill* pass, and merges their KV cache
into the running batch (continuous batching; see :mod:`personavec.serve.kvcache`). Each decoding step
then feeds every row's last token in one pass. Rows finish on their own (end of turn, a stop string,
``max_tokens``, a cancelled client) and leave the batch at once.

A row's numbers do not depend on its batch: its position ids count its own tokens only, padding is
masked, steering is per row (one :class:`~personavec.core.steering.SteeringSpec` per vector and layer,
with a coefficient per row, 0 for rows that do not use it), and sampling uses the row's own generator.
So a greedy answer in a batch equals the same request alone (up to float rounding of batched matmuls).

Monitoring reads every loaded vector at its read layer in the same passes, by hooks registered after
the steering hooks: readings are of the residual stream as the model computes it, steering included.
The prefill pass gives the last prompt token's reading; each decoding step gives the projection of the
token it feeds, which is the token generated before (as :func:`personavec.monitor.monitoring.monitor`
traces answers). A token is therefore streamed one step after it is sampled, together with its
projection, and a row that reaches ``max_tokens`` runs one more step for its last token's projection.

Positions: unconditional entries steer the prompt and the answer (``all``) unless they say otherwise.
Conditional entries (``when``) are decided on the prompt's reading after the prefill pass, before the
first generated token is fed back, so they steer ``response`` positions: every generated token from
the first on is fed through the steered stream (the first token itself is sampled from the unsteered
prompt, as with ``positions="response"`` in :func:`~personavec.core.steering.steer`). When they do not
fire, the row's numbers are exactly the unsteered ones.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personavec.core.activations import layer_hooks, pad_batch
from personavec.core.conversations import PLAIN_STOPS, Encoded
from personavec.core.errors import PersonavecError
from personavec.core.generation import PerRowSampler
from personavec.core.models import LoadedModel
from personavec.core.steering import SteeringSpec, steer
from personavec.serve import kvcache
from personavec.serve.events import (
    Event,
    Failed,
    Finished,
    FinishReason,
    Job,
    PersonaReport,
    Prefilled,
    Token,
    TokenLogprob,
    VectorReport,
)
from personavec.serve.registry import Reading, SteerPlan, VectorRegistry
from personavec.serve.text import TextStream

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
# Per row, (vector name, layer) -> summed coefficient for the pass at hand.
CoefMap = dict[tuple[str, int], float]


class EngineBusy(PersonavecError):
    """The queue is full (or the engine is shutting down): try again later."""


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits.

    Attributes:
        max_batch: Most rows decoded together.
        max_queue: Most requests waiting for a batch slot; more are refused with :class:`EngineBusy`.
        merge: Admit new requests into a running batch (else only when it is empty).
    """

    max_batch: int = 16
    max_queue: int = 64
    merge: bool = True


@dataclass
class EngineStats:
    """Counters since start (read by ``/health`` and the tests)."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    tokens: int = 0
    prefills: int = 0
    merges: int = 0
    steps: int = 0
    peak_batch: int = 0


class Ticket:
    """A submitted job's handle: cancel it to free its batch slot at the next step."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop the job (a no-op once it has finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()


def eos_ids(lm: LoadedModel) -> frozenset[int]:
    """The token ids that end a turn (generation config first, else the tokenizer's)."""
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))


class _Row:
    """One request inside the batch: its sampling state, steering, readings and answer so far."""

    def __init__(self, engine: Engine, job: Job, sink: Sink, ticket: Ticket) -> None:
        self.engine, self.job, self.sink, self.ticket = engine, job, sink, ticket
        self.next_pos = len(job.prompt_ids)  # position id of the next token fed
        self.pending: int | None = None  # sampled, waiting to be fed (and streamed with its projection)
        self.pending_logprob: TokenLogprob | None = None
        self.done = False
        self.text = TextStream(engine.lm.tokenizer, (*job.stop, *engine.plain_stops))
        self.token_ids: list[int] = []
        self.projections: dict[str, list[float]] = {name: [] for name in engine.registry.vectors}
        self.readings: dict[str, Reading] = {}
        self.applied: tuple[bool, ...] = ()
        self.response_coefs: CoefMap = {}
        self.sampler: PerRowSampler | None = None
        if job.temperature > 0:
            seed = secrets.randbits(63) if job.seed is None else job.seed
            self.sampler = PerRowSampler([seed], job.temperature, job.top_p)

    # -- steering -------------------------------------------------------------------------------
    def prompt_coefs(self) -> CoefMap:
        """Coefficients for the prompt pass: unconditional entries on ``all`` or ``prompt``."""
        return _sum_coefs(p for p in self.job.steering if p.when is None and p.positions != "response")

    def decide(self, readings: Mapping[str, Reading]) -> None:
        """Read the prompt and decide which conditional entries fire."""
        self.readings = dict(readings)
        self.applied = tuple(
            p.when is None or p.when.fires(readings[p.when.vector]) for p in self.job.steering
        )
        # The coefficients of every later pass are fixed from here on.
        self.response_coefs = _sum_coefs(
            p for p, on in zip(self.job.steering, self.applied) if on and p.positions != "prompt"
        )

    # -- tokens ---------------------------------------------------------------------------------
    def choose(self, logits: Tensor) -> None:
        """Sample the next token from this row's ``[V]`` logits, or finish on end of turn."""
        if self.sampler is not None:
            # The sampler leaves only the drawn token finite; it ignores its input_ids argument.
            scores = self.sampler(torch.empty(0, dtype=torch.long), logits[None])  # type: ignore[arg-type]
            token = int(scores[0].argmax())
        else:
            token = int(logits.argmax())
        if self.job.logprobs is not None:
            self.pending_logprob = self.engine.logprob(logits, token, self.job.logprobs)
        if token in self.engine.eos and not self.job.ignore_eos:
            self.finish("stop")
            return
        self.pending = token

    def emit(self, projections: Mapping[str, float]) -> None:
        """Stream the token just fed with its projections; finish on a stop string or ``max_tokens``."""
        assert self.pending is not None
        token, self.pending = self.pending, None
        for name, value in projections.items():
            self.projections[name].append(value)
        self.token_ids.append(token)
        delta = self.text.push(token)
        piece = self.engine.lm.tokenizer.decode([token], skip_special_tokens=False)
        index = len(self.token_ids) - 1
        self.send(Token(index, token, piece, delta, dict(projections), self.pending_logprob))
        if self.text.stopped:
            self.finish("stop")
        elif len(self.token_ids) >= self.job.max_tokens:
            self.finish("length")

    # -- events ---------------------------------------------------------------------------------
    def report(self, final: bool) -> PersonaReport:
        """The ``persona`` object: prompt readings, and at the end response means and flags."""
        vectors = {}
        for name, sv in self.engine.registry.vectors.items():
            values = self.projections[name]
            mean = sum(values) / len(values) if final and values else None
            vectors[name] = VectorReport(sv.read_layer, self.readings[name], mean, sv.note)
        flagged = None
        if final:
            flagged = tuple(
                n for n, f in self.job.flags.items() if f.crosses(vectors[n].prompt, vectors[n].response_mean)
            )
        return PersonaReport(vectors, tuple(zip(self.job.steering, self.applied)), flagged)

    def finish(self, reason: FinishReason) -> None:
        """Send the final event (once)."""
        if self.done:
            return
        self.done = True
        n_prompt, n_tokens = len(self.job.prompt_ids), len(self.token_ids)
        # The tail is text held back for a stop string that never came.
        tail = self.text.flush()
        self.send(Finished(reason, self.text.text, n_prompt, n_tokens, self.report(final=True), tail))
        self.engine.stats.finished += 1
        self.engine.stats.cancelled += reason == "cancelled"
        self.engine.stats.tokens += len(self.token_ids)

    def fail(self, message: str) -> None:
        """Send a failure (once)."""
        if not self.done:
            self.done = True
            self.send(Failed(message))

    def send(self, event: Event) -> None:
        """Hand an event to the client's sink; a sink that fails means the client is gone."""
        try:
            self.sink(event)
        except Exception:  # a closed event loop, a dropped connection: nobody is listening any more
            self.ticket.cancel()


def _sum_coefs(plans: Iterable[SteerPlan]) -> CoefMap:
    out: CoefMap = {}
    for p in plans:
        key = (p.vector, p.layer)
        out[key] = out.get(key, 0.0) + p.coef
    return out


class Engine:
    """Batched, steered, monitored generation on one model, in one worker thread.

    Attributes:
        lm: The model.
        registry: The loaded vectors.
        config: Limits.
        stats: Counters.
    """

    def __init__(self, lm: LoadedModel, registry: VectorRegistry, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.registry = registry
        self.config = config or EngineConfig()
        if self.config.max_batch < 1 or self.config.max_queue < 0:
            raise PersonavecError("max_batch must be at least 1 and max_queue at least 0")
        self.stats = EngineStats()
        self.eos = eos_ids(lm)
        # A base model (no chat template) does not end its turn: cut where it starts the next one.
        self.plain_stops = () if lm.info.has_chat_template else PLAIN_STOPS
        self._plan = {
            layer: (units.to(lm.device), names) for layer, (units, names) in registry.read_plan().items()
        }
        params = inspect.signature(lm.model.forward).parameters
        self._cache_arg = kvcache.cache_kwarg(lm.model)
        self._keep_logits = "logits_to_keep" in params
        self._cv = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Tensor | None = None
        self._mergeable: bool | None = None  # known after the first prefill
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="personavec-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; waiting and running requests fail with a message saying so."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------
    def submit(self, job: Job, sink: Sink) -> Ticket:
        """Queue a job; its events go to ``sink`` (called from the worker thread).

        Raises:
            EngineBusy: When the queue is full or the engine is closing.
        """
        if not job.prompt_ids:
            raise PersonavecError("the prompt is empty")
        ticket = Ticket()
        with self._cv:
            if self._closing:
                raise EngineBusy("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise EngineBusy(
                    f"server busy: {len(self._waiting)} requests are already waiting; retry shortly"
                )
            self._waiting.append(_Row(self, job, sink, ticket))
            self.stats.requests += 1
            self._cv.notify()
        return ticket

    def run(self, job: Job) -> list[Event]:
        """Submit a job and wait for all its events (a blocking convenience for scripts and tests)."""
        events: list[Event] = []
        done = threading.Event()

        def sink(event: Event) -> None:
            events.append(event)
            if isinstance(event, Finished | Failed):
                done.set()

        self.submit(job, sink)
        done.wait()
        return events

    def load(self) -> dict[str, int]:
        """Rows decoding and requests waiting right now."""
        with self._cv:
            return {"active": len(self._rows), "waiting": len(self._waiting)}

    def logprob(self, logits: Tensor, token: int, top: int) -> TokenLogprob:
        """The chosen token's log-probability and the ``top`` likeliest alternatives."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        decode = self.lm.tokenizer.decode
        alts: tuple[tuple[str, float], ...] = ()
        if top > 0:
            values, ids = logp.topk(top)
            alts = tuple((decode([int(i)]), float(v)) for v, i in zip(values, ids))
        return TokenLogprob(decode([token]), float(logp[token]), alts)

    # -- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            admitted = self._admit()
            if admitted is None:
                break
            if admitted:
                try:
                    self._prefill(admitted)
                except Exception as e:  # one bad batch must not take the server down
                    log.exception("prefill failed")
                    for row in admitted:
                        row.fail(f"generation failed: {type(e).__name__}: {e}")
            if self._rows:
                try:
                    self._step()
                except Exception as e:
                    log.exception("decoding step failed")
                    self._reset(f"generation failed: {type(e).__name__}: {e}")
        self._reset("the server is shutting down")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for row in waiting:
            row.fail("the server is shutting down")

    def _admit(self) -> list[_Row] | None:
        """Wait for work; return the requests to prefill now ([] to just step), or None to stop."""
        with self._cv:
            while not self._closing and not self._waiting and not self._rows:
                self._cv.wait()
            if self._closing:
                return None
            room = self.config.max_batch - len(self._rows)
            if self._rows and not (self.config.merge and self._mergeable):
                room = 0
            taken: list[_Row] = []
            while self._waiting and len(taken) < room:
                row = self._waiting.popleft()
                if not row.ticket.cancelled:
                    taken.append(row)
            return taken

    def _prefill(self, rows: list[_Row]) -> None:
        """Read the new prompts in one pass, decide conditional steering, merge them into the batch."""
        encoded = [Encoded(r.job.prompt_ids, len(r.job.prompt_ids)) for r in rows]
        pad_id = int(self.lm.tokenizer.pad_token_id)
        ids, layout, positions = pad_batch(encoded, pad_id, "left", self.lm.device)
        logits, projections, cache = self._forward(
            ids, layout.attention_mask, positions, None, [r.prompt_coefs() for r in rows]
        )
        self.stats.prefills += 1
        for i, row in enumerate(rows):
            row.decide({n: self.registry.vectors[n].reading(float(p[i])) for n, p in projections.items()})
            row.send(Prefilled(len(row.job.prompt_ids), row.report(final=False)))
            row.choose(logits[i])
        if self._mergeable is None:
            self._mergeable = kvcache.can_merge(cache)
        with self._cv:
            if self._rows:
                assert self._mask is not None
                self._cache, self._mask = kvcache.merge(self._cache, self._mask, cache, layout.attention_mask)
                self.stats.merges += 1
            else:
                self._cache, self._mask = cache, layout.attention_mask
            self._rows.extend(rows)
            self.stats.peak_batch = max(self.stats.peak_batch, len(self._rows))
        self._drop_done()

    def _step(self) -> None:
        """Feed every row's pending token; stream it with its projections; sample the next."""
        for row in self._rows:
            if row.ticket.cancelled:
                row.finish("cancelled")
        self._drop_done()
        if not self._rows:
            return
        rows = self._rows
        assert self._mask is not None
        ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.lm.device)
        positions = torch.tensor([[r.next_pos] for r in rows], dtype=torch.long, device=self.lm.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits, projections, self._cache = self._forward(
            ids, mask, positions, self._cache, [r.response_coefs for r in rows]
        )
        self._mask = mask
        self.stats.steps += 1
        for i, row in enumerate(rows):
            row.next_pos += 1
            row.emit({name: float(p[i]) for name, p in projections.items()})
            if not row.done:
                row.choose(logits[i])
        self._drop_done()

    def _drop_done(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        with self._cv:
            if keep:
                assert self._mask is not None
                self._cache, self._mask = kvcache.select(self._cache, self._mask, keep)
                self._rows = [self._rows[i] for i in keep]
            else:
                self._rows, self._cache, self._mask = [], None, None

    def _reset(self, message: str) -> None:
        for row in self._rows:
            row.fail(message)
        with self._cv:
            self._rows, self._cache, self._mask = [], None, None

    def _forward(
        self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, coefs: Sequence[CoefMap]
    ) -> tuple[Tensor, dict[str, Tensor], Any]:
        """One steered, monitored pass: last-position logits, projections per vector name, the cache."""
        read: dict[int, Tensor] = {}

        def record(layer: int, hidden: Tensor) -> None:
            # Only the newest position of each row is read: the last prompt token, or the token fed.
            read[layer] = hidden[:, -1].float() @ self._plan[layer][0]

        kwargs: dict[str, Any] = {} if cache is None else {self._cache_arg: cache}
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions need no logits
        with contextlib.ExitStack() as stack, torch.inference_mode():
            specs = self._specs(coefs)
            if specs:
                stack.enter_context(steer(self.lm, specs, this_thread_only=True))
            if self._plan:
                # Registered after the steering hooks, so readings see the steered stream.
                slot, _ = stack.enter_context(layer_hooks(self.lm, sorted(self._plan)))
                slot.record = record
            out = self.lm.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            )
        projections = {
            name: read[layer][:, j].cpu()
            for layer, (_units, names) in self._plan.items()
            for j, name in enumerate(names)
        }
        return out.logits[:, -1].float(), projections, kvcache.output_cache(out)

    def _specs(self, coefs: Sequence[CoefMap]) -> list[SteeringSpec]:
        """One spec per (vector, layer) any row steers with, each row with its own coefficient."""
        keys = sorted({key for row in coefs for key, c in row.items() if c != 0.0})
        specs = []
        for name, layer in keys:
            per_row = [row.get((name, layer), 0.0) for row in coefs]
            specs.append(SteeringSpec(self.registry.vectors[name].vector, [layer], per_row, "all"))
        return specs
