"""Screen on a Ray cluster: actors each holding one model replica, batches streamed, results in order.

:func:`ray_scorer` is a :data:`~personavec.screen.scoring.Scorer` for :func:`personavec.screen.run.screen`.
Each actor loads the model itself from the same spec the driver used (the embedded model, a folder, a
``.gguf`` file or a Hugging Face id), so nothing big crosses the network, and checks that its replica has
the driver's fingerprint. The driver sends each actor at most ``in_flight`` batches at a time (one
running, one queued, so an actor never waits for the driver) and hands the results back strictly in
batch order: the driver writes the same records in the same order as a single-process run, and owns every
file, so resuming works as it does locally.

Ray is imported only here, and only when a Ray scorer is asked for: ``personavec`` runs without it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from personavec.core.errors import PersonavecError
from personavec.screen.scoring import BatchResult, Scorer, ScreenBatch, ScreenPlan

INSTALL_HINT = "pip install 'personavec[ray]' (install.sh installs it)"
IN_FLIGHT = 2  # batches per actor: one running and one queued behind it
READY_TIMEOUT_S = 900.0  # model loads on every node; a big model from a slow disk takes minutes
CONNECT_TIMEOUT_S = 5.0
RELEASE_TIMEOUT_S = 10.0  # waiting for a killed actor's CPUs to be free again
# A local cluster's object store only carries batches of text and their scores.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
# Ray runs workers at nice 15 by default. Ours do the work a single-process run does at the driver's
# priority; at 15 they would yield the cores to every busy neighbour on a shared machine.
LOCAL_SYSTEM_CONFIG: dict[str, Any] = {"worker_niceness": 0}
# Forwarded to the actors so that they reach the hub only when the driver does. Cache paths are not:
# they name folders on the driver's machine, and each node has its own.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    Attributes:
        address: A running cluster (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``); ``None`` starts a
            local cluster for this run (on this machine's cores) and stops it afterwards.
        workers: Actors, each holding one model replica (default: every CPU of the cluster, ``threads``
            each).
        threads: Torch threads per actor (default: the cluster's CPUs shared out among ``workers``, or 1
            when ``workers`` is not given either).
        in_flight: Batches sent to an actor ahead of its results.
    """

    address: str | None = None
    workers: int | None = None
    threads: int | None = None
    in_flight: int = IN_FLIGHT


@dataclass(frozen=True)
class Layout:
    """What a Ray run uses.

    Attributes:
        workers: Actors (model replicas).
        threads: Torch threads (and reserved Ray CPUs) per actor.
        cluster_cpus: CPUs of the whole cluster.
        nodes: Nodes alive in the cluster.
        local: Whether this run started the cluster itself.
    """

    workers: int
    threads: int
    cluster_cpus: int
    nodes: int
    local: bool

    def describe(self) -> str:
        """One line for the log: ``Ray: 2 workers x 1 thread on 1 node (2 CPUs, local cluster)``."""
        where = "local cluster" if self.local else "existing cluster"
        return (
            f"Ray: {self.workers} worker{'s' * (self.workers != 1)} x {self.threads} "
            f"thread{'s' * (self.threads != 1)} on {self.nodes} node{'s' * (self.nodes != 1)} "
            f"({self.cluster_cpus} CPUs, {where})"
        )


def import_ray() -> ModuleType:
    """Import Ray, or fail with one line that says how to install it.

    Raises:
        PersonavecError: If Ray is not installed.
    """
    try:
        import ray
    except ImportError as e:
        raise PersonavecError(f"screening on Ray needs the ray package: {INSTALL_HINT} ({e})") from None
    return ray


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_layout(cpus: int, node_cpus: int, workers: int | None, threads: int | None) -> tuple[int, int]:
    """Actors and threads per actor so that together they fill the cluster's free CPUs and no more.

    Small models' matrices split badly over many intra-op threads (``personavec.core.parallel``), so
    the default is one single-threaded replica per CPU; with ``workers`` given, the CPUs are shared out
    among them, with no actor wider than the largest node.

    Args:
        cpus: Free CPUs in the whole cluster.
        node_cpus: CPUs of its largest node.
        workers: Requested actors, or ``None``.
        threads: Requested threads per actor, or ``None``.

    Returns:
        ``(workers, threads)``.

    Raises:
        PersonavecError: If an actor would need more CPUs than any node has.
    """
    if threads is None:
        threads = 1 if workers is None else max(1, min(node_cpus, cpus // workers))
    if threads > node_cpus:
        raise PersonavecError(
            f"--ray-threads {threads} is more than the largest node's {node_cpus} CPUs: "
            "an actor would never start"
        )
    if workers is None:
        workers = max(1, cpus // threads)
    return workers, threads


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with one line, when nothing listens at ``HOST:PORT`` (``ray.init`` would wait long).

    ``auto`` and other forms without a port are left to Ray.

    Raises:
        PersonavecError: If the host does not resolve or the port does not answer within ``timeout``.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise PersonavecError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e} (is 'ray start --head' running "
            "there, and is the port open?)"
        ) from None


def model_spec_for_workers(model: str | None) -> str | None:
    """The spec actors load: a local file or folder becomes absolute (actors run in other folders)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


class ScreenWorker:
    """An actor's body: one model replica that scores the batches sent to it.

    A replica that cannot load the model does not raise from ``__init__`` (Ray would bury the message in
    a traceback of its own): :meth:`ready` reports it, and the driver turns it into one line.

    Args:
        model: The model spec (as ``load_model`` takes it).
        plan: The vectors and the mode.
        threads: Torch intra-op threads for this replica.
        fingerprint: The driver's model fingerprint, which this replica must match (``None``: no check).
    """

    def __init__(self, model: str | None, plan: ScreenPlan, threads: int, fingerprint: str | None) -> None:
        import torch

        from personavec.core.models import LoadedModel, load_model

        # Ray reserves `threads` CPUs for this actor; more torch threads would contend with its neighbours.
        torch.set_num_threads(threads)
        self.plan = plan
        self.lm: LoadedModel | None = None
        self.error: str | None = None
        host = socket.gethostname()
        try:
            self.lm = load_model(model)
        except Exception as e:  # reported by ready(): the driver stops the run with this line
            self.error = f"on Ray node {host}: {e}" if isinstance(e, PersonavecError) else _describe(e)
            return
        if fingerprint is not None and self.lm.info.fingerprint != fingerprint:
            self.error = (
                f"model {self.lm.info.id!r} on Ray node {host} is not the driver's (fingerprint "
                f"{self.lm.info.fingerprint}, driver {fingerprint}): give every node the same model files"
            )

    def ready(self) -> dict[str, Any]:
        """Where this replica runs, or why it cannot (answered once the model is loaded)."""
        import torch

        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "nice": os.nice(0),
            "error": self.error,
        }

    def score(self, batch: ScreenBatch) -> BatchResult:
        """:func:`~personavec.screen.scoring.score_batch` on this replica."""
        from personavec.screen.scoring import score_batch

        if self.lm is None:
            raise PersonavecError(self.error or "this Ray worker has no model")
        return score_batch(self.lm, batch, self.plan)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _one_line(error: BaseException) -> str:
    """A Ray error as one line: the cause's own message where there is one, not Ray's traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, PersonavecError):
        return str(cause)
    if isinstance(cause, BaseException):
        return _describe(cause)
    text = [line for line in str(error).strip().splitlines() if line.strip()]
    return text[-1].strip() if text else type(error).__name__


def _connect(ray: ModuleType, options: RayOptions, log: Callable[[str], None]) -> bool:
    """Join a cluster (an already initialised one, ``options.address``, or a new local one).

    Returns:
        Whether this call started (and so must stop) a local cluster.
    """
    if ray.is_initialized():
        # The caller's own session (a notebook, a test, a benchmark): used as it is, and left running.
        log("using the Ray session already started in this process")
        return False
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if options.address is not None:
        check_reachable(options.address)
        log(f"connecting to the Ray cluster at {options.address} ...")
        try:
            ray.init(address=options.address, runtime_env={"env_vars": env} if env else None, **common)
        except Exception as e:  # ConnectionError, or Ray's own for a wrong version or a dead head
            raise PersonavecError(
                f"cannot join the Ray cluster at {options.address}: {_one_line(e)}"
            ) from None
        return False
    cpus = local_cpus()
    if options.workers is not None:
        # Asked for more replicas than cores: honour it (the user chose to oversubscribe).
        cpus = max(cpus, options.workers * (options.threads or 1))
    log(f"starting a local Ray cluster ({cpus} CPUs) ...")
    # address="local": a new cluster even where RAY_ADDRESS points at another one.
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        _system_config=LOCAL_SYSTEM_CONFIG,
        **common,
    )
    return True


def _layout(ray: ModuleType, options: RayOptions, local: bool) -> Layout:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=0)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    # Sized on the CPUs free now: those other jobs hold would leave our actors waiting to be placed.
    free = int(ray.available_resources().get("CPU", 0))
    if free < 1:
        raise PersonavecError(
            f"the Ray cluster has no free CPU to run workers on ({cluster_cpus} in all; see 'ray status')"
        )
    workers, threads = choose_layout(free, node_cpus, options.workers, options.threads)
    if workers * threads > free:
        raise PersonavecError(
            f"{workers} Ray workers x {threads} threads need {workers * threads} CPUs, the cluster has "
            f"{free} free ({cluster_cpus} in all): pass fewer --ray-workers or --ray-threads"
        )
    return Layout(workers, threads, cluster_cpus, len(nodes), local)


def _start_actors(
    ray: ModuleType,
    layout: Layout,
    model: str | None,
    plan: ScreenPlan,
    fingerprint: str | None,
    actors: list[Any],
    log: Callable[[str], None],
) -> None:
    """Start the actors (into ``actors``, so the caller can stop them on any error) and wait until each
    has loaded its replica."""
    # No restarts: a lost worker ends the run with one line, and the same command resumes from the files.
    actor_class = ray.remote(ScreenWorker).options(num_cpus=layout.threads)
    actors.extend(actor_class.remote(model, plan, layout.threads, fingerprint) for _ in range(layout.workers))
    pending = {a.ready.remote(): a for a in actors}
    ready, waiting = ray.wait(list(pending), num_returns=len(pending), timeout=READY_TIMEOUT_S)
    if waiting:
        raise PersonavecError(
            f"{len(waiting)} of {len(actors)} Ray workers did not load the model within "
            f"{READY_TIMEOUT_S:.0f} s (see 'ray status': are the cluster's CPUs taken by other jobs?)"
        )
    infos: list[dict[str, Any]] = []
    for ref in ready:
        try:
            info = ray.get(ref)
        except Exception as e:  # the actor process itself died (out of memory, a lost node)
            raise PersonavecError(f"a Ray worker could not start: {_one_line(e)}") from None
        if info["error"]:
            raise PersonavecError(f"a Ray worker could not load the model: {info['error']}")
        infos.append(info)
    nice = max(i["nice"] for i in infos)
    if nice > os.nice(0):
        log(
            f"note: the Ray workers run at nice {nice}, below this process: on busy nodes they get less CPU "
            "(start the cluster with RAY_worker_niceness=0 to run them at normal priority)"
        )


def _stream(
    ray: ModuleType, actors: list[Any], batches: Iterable[ScreenBatch], in_flight: int
) -> Iterator[BatchResult]:
    """Score ``batches`` on ``actors`` and yield the results in the batches' order.

    Each actor has at most ``in_flight`` batches sent and not yet finished; finished results wait for
    their turn, at most ``2 * in_flight`` per actor in all, so memory stays bounded when one actor lags.
    """
    todo = iter(batches)
    exhausted = False
    order: deque[Any] = deque()  # refs of sent batches, in batch order, until yielded
    running: dict[Any, int] = {}  # ref -> actor slot, until the actor finishes it
    load = [0] * len(actors)
    window = 2 * in_flight * len(actors)
    while True:
        while not exhausted and len(order) < window:
            slot = min(range(len(actors)), key=load.__getitem__)
            if load[slot] >= in_flight:
                break
            batch = next(todo, None)
            if batch is None:
                exhausted = True
                break
            ref = actors[slot].score.remote(batch)
            order.append(ref)
            running[ref] = slot
            load[slot] += 1
        if not order:
            return
        head = order[0]
        if head in running:
            finished, _ = ray.wait(list(running), num_returns=1)
            for ref in finished:
                load[running.pop(ref)] -= 1
            continue
        order.popleft()
        try:
            result: BatchResult = ray.get(head)
        except ray.exceptions.RayActorError as e:
            raise PersonavecError(
                f"a Ray worker died ({_one_line(e)}); finished batches are saved, the same command resumes"
            ) from None
        except ray.exceptions.RayTaskError as e:
            raise PersonavecError(f"a Ray worker failed: {_one_line(e)}") from None
        yield result


@contextlib.contextmanager
def ray_scorer(
    model: str | None,
    plan: ScreenPlan,
    *,
    fingerprint: str | None = None,
    options: RayOptions | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> Iterator[Scorer]:
    """A :data:`~personavec.screen.scoring.Scorer` on Ray actors, for the duration of a ``with`` block.

    On entry: joins the cluster (an already initialised Ray session is used as it is; ``options.address``
    joins a running cluster; otherwise a local cluster is started), starts the actors and waits until each
    has loaded the model. On exit, also on an error or Ctrl-C: kills the actors and stops a local cluster
    this call started, so no process outlives the run.

    Args:
        model: The model spec the driver loaded (``None``: the embedded model); each actor loads it on its
            own node, so a folder or ``.gguf`` path must exist there too.
        plan: The vectors and the mode (sent to each actor once).
        fingerprint: The driver's ``lm.info.fingerprint``; every replica must match it.
        options: Cluster address, workers, threads (default :class:`RayOptions`).
        log: Progress messages.

    Yields:
        The scorer: results in the order of the batches it is given.

    Raises:
        PersonavecError: If Ray is missing, the cluster cannot be reached or lacks the CPUs, or an actor
            cannot load the model.
    """
    options = options or RayOptions()
    if options.in_flight < 1:
        raise PersonavecError(f"in_flight must be at least 1, got {options.in_flight}")
    ray = import_ray()
    started = _connect(ray, options, log)
    actors: list[Any] = []
    threads = 0
    try:
        layout = _layout(ray, options, started)
        threads = layout.threads
        log(layout.describe() + "; loading the model on each worker ...")
        _start_actors(ray, layout, model_spec_for_workers(model), plan, fingerprint, actors, log)

        def score(batches: Iterable[ScreenBatch]) -> Iterator[BatchResult]:
            return _stream(ray, actors, batches, options.in_flight)

        yield score
    finally:
        _stop_actors(ray, actors, 0 if started else len(actors) * threads)
        if started:
            ray.shutdown()


def _stop_actors(ray: ModuleType, actors: list[Any], cpus: int) -> None:
    """Kill the actors; then wait (briefly) until the cluster has their ``cpus`` back.

    Ray frees a killed actor's CPUs a moment later. A session that goes on (a notebook, the next screen in
    the same process) would otherwise see them taken and size its next run on fewer.
    """
    if not actors:
        return
    free_before = ray.available_resources().get("CPU", 0)
    for actor in actors:
        with contextlib.suppress(Exception):  # already dead: nothing left to stop
            ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while cpus and time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= free_before + cpus:
            return
        time.sleep(0.05)
