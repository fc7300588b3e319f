"""Run independent batches as parallel streams on a CPU's cores.

A small model's matrices are too small to split well across a CPU's intra-op threads: the threads
meet at every op, and one that is slow (a busy or descheduled core) holds up the other. Two streams,
each with half of the threads and its own batches, keep the cores busy. Measured on 2 cores with
SmolLM2-135M (``bench/bench_streams.py``, paired rounds): generation 1.44x, capture 1.10x, the
perplexity and local judges 1.06-1.07x. An accelerator keeps one stream: there larger batches, not
threads, are what fill the device.

Used by :func:`personavec.core.activations.iter_activations`,
:func:`personavec.core.generation.iter_generate`, the perplexity coherence judge, the local LLM judge
and :func:`personavec.steer.sweep.sweep` (whose streams each steer their own batches, see
``steer(this_thread_only=True)``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel

T = TypeVar("T")
R = TypeVar("R")

# Batches queued per stream beyond the one it runs, so a stream that finishes early finds work while
# results are still handed out in order.
_AHEAD = 2
# In a worker thread: the Event its ordered_map sets when the caller stops reading (error, break, Ctrl-C).
_worker = threading.local()


def stopping() -> bool:
    """Whether the current thread runs an item of an :func:`ordered_map` that is being closed.

    Long items (a generation batch) check it to stop at their next step: nobody will read their result,
    and the caller is waiting for them to finish before it can raise or return.
    """
    event = getattr(_worker, "stop", None)
    return event is not None and event.is_set()


class _Stopped(Exception):
    """Raised by an item whose map is being closed; its result is never read, so this never surfaces."""


def raise_if_stopping() -> None:
    """Give up the current :func:`ordered_map` item if the map is being closed (see :func:`stopping`).

    Raises:
        _Stopped: Inside an item of a map that is being closed; the map drops it unread.
    """
    if stopping():
        raise _Stopped


def _start_worker(threads: int, stop: threading.Event) -> None:
    torch.set_num_threads(threads)
    _worker.stop = stop


def default_workers(device: torch.device) -> int:
    """Parallel streams to use on ``device`` when not told: 2 on a CPU with >= 2 threads, else 1."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def has_foreign_hooks(model: torch.nn.Module, ours: Collection[int] = ()) -> bool:
    """Whether any module of ``model`` (or the process) carries forward hooks other than ``ours``.

    Args:
        model: The model.
        ours: Ids of hooks to ignore (``RemovableHandle.id`` of the caller's own hooks).
    """
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(
        any(h not in ours for h in m._forward_hooks) or any(h not in ours for h in m._forward_pre_hooks)
        for m in model.modules()
    )


def _refusing_new_hooks(
    fn: Callable[[T], R], model: torch.nn.Module, ours: Collection[int]
) -> Callable[[T], R]:
    """``fn``, checking before and after each call that ``model`` carries no hooks but ``ours``."""

    def check() -> None:
        if has_foreign_hooks(model, ours):
            raise PersonavecError(
                "hooks were added to the model while it ran batches on parallel streams (steer() or "
                "monitoring inside a loop over a stream?): pass workers=1, or finish the stream first"
            )

    def checked(item: T) -> R:
        check()
        result = fn(item)
        check()
        return result

    return checked


def choose_workers(lm: LoadedModel, requested: int | None, n_batches: int) -> int:
    """The number of streams for ``n_batches`` batches on ``lm``.

    ``requested`` (default :func:`default_workers`) is capped by the number of batches, and is 1
    whenever the model carries hooks: steering and monitoring hooks keep per-pass state (which
    positions are prompt, which step this is) that two concurrent passes would corrupt.

    Raises:
        PersonavecError: If ``requested`` is below 1.
    """
    workers = default_workers(lm.device) if requested is None else requested
    if workers < 1:
        raise PersonavecError(f"workers must be at least 1, not {workers}")
    if workers > 1 and has_foreign_hooks(lm.model):
        return 1
    return max(1, min(workers, n_batches))


def ordered_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    *,
    model: torch.nn.Module | None = None,
    ours: Collection[int] = (),
) -> Generator[R, None, None]:
    """``map(fn, items)``, with ``workers > 1`` on that many threads, results in input order.

    Each thread gets an equal share of the caller's intra-op threads. At most ``_AHEAD * workers``
    items are started ahead of the one being handed out, so memory stays bounded whatever the data
    size. Closing the generator early cancels what has not started and waits for what has (items that
    check :func:`stopping` end sooner); an exception in ``fn`` reaches the caller when its item's turn
    comes.

    Because items run ahead of the caller, hooks added to ``model`` in the body of a loop over the
    result (say ``steer()`` inside ``for ex in iter_activations(...)``) would reach items already under
    way. With ``model`` given and ``workers > 1``, each item checks before and after ``fn`` that
    ``model`` carries no hooks but ``ours``, so that mistake fails loudly instead of mixing steered and
    unsteered results.

    Raises:
        PersonavecError: From an item, if hooks other than ``ours`` appeared on ``model``.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    if model is not None:
        fn = _refusing_new_hooks(fn, model, ours)
    threads = torch.get_num_threads()
    stop = threading.Event()
    pool = ThreadPoolExecutor(workers, initializer=_start_worker, initargs=(max(1, threads // workers), stop))
    pending: deque[Future[R]] = deque()
    todo = iter(items)
    try:
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) == _AHEAD * workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in todo:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        stop.set()
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        # A worker's set_num_threads also resizes torch's process-wide pthreadpool; give it back.
        torch.set_num_threads(threads)
