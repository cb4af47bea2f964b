"""The Ray executor: N Ray actors share one run through its storage (extra ``[ray]``).

Each actor runs the very loop a worker process of the processes executor and ``poptune worker``
run (`poptune.execution.worker.work`): claim the least advanced free member, restore it
(kept live in the actor's bounded cache of trainables when nobody else trained it since),
train it to its next ready point, checkpoint it, commit. Actors live for the whole run, so a
member claimed again by the same actor continues in memory: no model is rebuilt every
interval. The driver (this process) only starts the actors, watches them, and replaces one that
dies; it trains nothing.

* **Placement.** Each actor asks Ray for ``resources`` (default ``{"cpu": 1}``; ``"gpu"`` may
  be a fraction, so that several members share a GPU; other keys are Ray custom resources). A
  member built in an actor with a GPU reads its device as ``"cuda:0"`` (Ray makes the GPU it
  assigned the only visible one) through `poptune.trainable.worker_device`.
* **Where things are.** Actors open the run's storage URL and its checkpoint root themselves,
  so every node that runs one must reach both: with PostgreSQL any node may commit, and the
  checkpoint root must then be a shared folder or an fsspec URL. A SQLite file lives on one
  machine: with SQLite every actor is pinned to the driver's node (a hard node-affinity
  constraint), and a Ray Client address (``ray://``, where this process is not a cluster node)
  is refused with a message saying to use PostgreSQL.
* **Faults.** An actor whose process dies (killed, out of memory, its node lost) has its
  members released at once (by the tag in its worker id) and is replaced, up to
  ``max(4, 2 * workers)`` times; the work it had not committed is lost, nothing else (commits
  are refused to a worker that no longer owns the member, see `poptune.storage.leases`).
  Actors wait as long as Ray takes to place them, except that while none of the run's actors
  has started and no live node could host one (its node was lost and not replaced, or it asks
  for resources no node has), the driver waits at most `PLACEMENT_TIMEOUT` for such a node (an
  autoscaler adding one, say); it then stops, marks the run interrupted and raises
  `RunInterrupted` saying what the actors ask for. Actors still waiting for a place when the
  run ended elsewhere (``poptune worker`` processes completed it) are ended.
  Should the driver die, Ray ends its actors with it; `poptune resume` (or running the
  experiment again) continues from the last commits. The driver never returns an unfinished
  run: it raises `RunFailed` when the failure policy stopped the run and `RunInterrupted` when
  the actors stopped before it completed.
* **The Ray instance.** A Ray connection this process already holds (``ray.init`` called by
  the user) is used as it is. Otherwise ``address`` is connected to, else ``RAY_ADDRESS``
  when the environment sets it, else a new local instance is started (no dashboard, usage
  statistics off) and kept for later runs in this process. Never a cluster Ray merely finds
  on this machine (``ray.init()``'s own default joins the last one ``ray start`` or another
  program left running, whoever's it is).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
import secrets
import signal
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from poptune.execution.lifecycle import deferred_interrupts, limit_threads
from poptune.execution.processes import WorkerSpec, _identity, experiment_of
from poptune.execution.session import (
    RunFailed,
    RunInterrupted,
    RunOptions,
    check_identity,
    new_worker_id,
)
from poptune.execution.worker import settle_run, work
from poptune.trainable import set_worker_device

if TYPE_CHECKING:
    from poptune.experiment import Experiment
    from poptune.storage.base import Storage

__all__ = ["PLACEMENT_TIMEOUT", "RayWorker", "check_resources", "import_ray", "run_ray"]

DEFAULT_RESOURCES: dict[str, float] = {"cpu": 1.0}

#: Seconds the driver waits, while none of its actors has started, for a live Ray node that
#: could host one (see Faults above) before it gives up on the run: RunInterrupted.
PLACEMENT_TIMEOUT = 600.0


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says what to install."""
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise ImportError(
            f"executor='ray' needs Ray ({e}). Install it with: pip install 'poptune[ray]'"
        ) from None


def check_resources(resources: object) -> dict[str, float] | None:
    """The resources each Ray actor asks for, as ``{name: amount}`` (None stays None).

    ``"cpu"`` and ``"gpu"`` (case-insensitive) are Ray's CPUs and GPUs; other names are Ray
    custom resources. Amounts are finite numbers >= 0, as Ray accepts them: none between 0
    and 0.0001 (Ray's unit), and more than one GPU only as a whole number; a fraction of a
    GPU lets several actors share it.

    Raises:
        ValueError: Not a mapping of names to such amounts.
    """
    if resources is None:
        return None
    if not isinstance(resources, Mapping):
        raise ValueError(
            "`resources` must map resource names to amounts, such as {'cpu': 1, 'gpu': 0.5}, "
            f"but got {resources!r}."
        )
    out: dict[str, float] = {}
    for key, value in resources.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                "`resources` must map names to finite amounts >= 0, such as "
                f"{{'cpu': 1, 'gpu': 0.5}}, but got {key!r}: {value!r}."
            )
        name = key.lower() if key.lower() in ("cpu", "gpu") else key
        amount = float(value)
        if 0 < amount < 0.0001:
            raise ValueError(
                f"`resources`: Ray counts amounts in units of 0.0001, but got {key!r}: {value!r}."
            )
        if name == "gpu" and amount > 1 and not amount.is_integer():
            raise ValueError(
                "`resources`: actors share a GPU in fractions of one, so more than one GPU "
                f"must be a whole number, but got {key!r}: {value!r}."
            )
        out[name] = amount
    return out


def _actor_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """Ray actor options for ``resources``; two threads of calls: ``run`` and ``stop``."""
    custom = {k: v for k, v in resources.items() if k not in ("cpu", "gpu")}
    options: dict[str, Any] = {
        "num_cpus": resources.get("cpu", DEFAULT_RESOURCES["cpu"]),
        "num_gpus": resources.get("gpu", 0.0),
        "max_concurrency": 2,
        "max_restarts": 0,  # a dead actor's members are released and a new actor started
    }
    if custom:
        options["resources"] = custom
    return options


class RayWorker:
    """A Ray actor running `poptune.execution.worker.work` (wrapped by ``ray.remote`` when the
    run starts).

    Its worker id is minted in its own process (``HOST:PID:NAMESPACE:TOKEN-TAG``), so that the
    liveness rule of `poptune.storage.leases` can check its PID on its own machine.
    """

    def __init__(self, spec: WorkerSpec, tag: str, threads: int) -> None:
        self.spec, self.threads = spec, threads
        self.device = _assigned_gpu()
        set_worker_device(self.device)
        limit_threads(threads)
        self.experiment = experiment_of(spec)
        self.id = f"{new_worker_id()}-{tag}"
        self.stopping = threading.Event()

    def pid(self) -> int:
        """This actor's process id (known once its constructor has run)."""
        return os.getpid()

    def run(self) -> None:
        """Claims and trains members until the run is over (or `stop` is called)."""
        spec = self.spec
        with contextlib.suppress(RunFailed):  # recorded in the storage; the driver reports it
            work(
                spec.storage_url,
                spec.name,
                spec.checkpoint_root,
                spec.options,
                experiment=self.experiment,
                device=self.device,
                threads=self.threads,
                worker_id=self.id,
                stop=self.stopping,
                failed_before=spec.failed_before,
                identity=spec.identity,
            )

    def stop(self) -> None:
        """Asks `run` to stop between steps; its stretch in progress is dropped."""
        self.stopping.set()


def _assigned_gpu() -> str | None:
    """``"cuda:N"`` for the GPU Ray assigned to this actor, None without one."""
    ray = import_ray()
    try:
        ids = ray.get_gpu_ids()
    except Exception:
        return None
    if not ids:
        return None
    # Ray normally makes the assigned GPU the only visible one (cuda:0).
    return "cuda:0" if os.environ.get("CUDA_VISIBLE_DEVICES") else f"cuda:{int(ids[0])}"


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected: as the user connected it, else to ``address``, else to
    ``RAY_ADDRESS``, else to a new local instance (no dashboard, usage statistics off)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    else:
        ray.init(address=address, logging_level="WARNING")
    return ray


def _absolute_sqlite(url: str) -> str:
    """A SQLite URL with an absolute path: actors do not share the driver's working folder."""
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    if parsed.database and parsed.database != ":memory:" and not os.path.isabs(parsed.database):
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    return parsed.render_as_string(hide_password=False)


def _placement(ray: Any, url: str, address: str | None) -> dict[str, Any]:
    """Actor options that keep a SQLite run on the driver's node; none for PostgreSQL."""
    if not url.startswith("sqlite"):
        return {}
    if address is not None and address.startswith("ray://"):
        raise ValueError(
            "executor='ray' with a SQLite storage keeps the run on this machine, but a Ray "
            f"Client address ({address}) runs the actors on a cluster this machine is not part "
            "of. Use a PostgreSQL storage (any node may commit to it) with a shared checkpoint "
            "folder or fsspec URL, or run on a node of the cluster."
        )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def _need(resources: Mapping[str, float]) -> dict[str, float]:
    """What one actor asks Ray for, by Ray's resource names (amounts > 0 only)."""
    need = {
        "CPU": resources.get("cpu", DEFAULT_RESOURCES["cpu"]),
        "GPU": resources.get("gpu", 0.0),
        **{k: v for k, v in resources.items() if k not in ("cpu", "gpu")},
    }
    return {k: v for k, v in need.items() if v > 0}


def _live_nodes(ray: Any) -> list[dict[str, float]]:
    """The resources of each live node of the Ray instance (all of them, used or not)."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _hostable(ray: Any, need: Mapping[str, float]) -> bool:
    """Whether a live node has ``need`` in all (an actor runs on one node)."""
    return any(
        all(float(have.get(k, 0.0)) >= v for k, v in need.items()) for have in _live_nodes(ray)
    )


def _check_feasible(ray: Any, need: Mapping[str, float], address: str | None) -> None:
    """Refuses resources no node of a local Ray instance has (an actor asking for them would
    wait forever); a cluster given by address may be autoscaled: `PLACEMENT_TIMEOUT` there."""
    if address is None and not _hostable(ray, need):
        have = [{k: float(n.get(k, 0.0)) for k in need} for n in _live_nodes(ray)]
        raise ValueError(
            f"executor='ray': each actor asks for {dict(need)}, but no node of this Ray "
            f"instance has that much (its nodes have {have}), so no actor could ever start. "
            "Ask for less with resources=... (--resources)."
        )


def _release(storage: Storage, name: str, tag: str) -> None:
    """Frees every member held by the actor whose worker id ends with ``-tag``."""
    suffix = f"-{tag}"
    with deferred_interrupts(), storage.transaction(name) as tx:
        tx.release_all(lambda owner: owner.endswith(suffix))


class _Actor:
    """The driver's record of one actor: its handle, tag, and the calls it watches."""

    def __init__(self, handle: Any, tag: str) -> None:
        self.handle, self.tag = handle, tag
        self.started = handle.pid.remote()  # resolves once the constructor has run
        self.done = handle.run.remote()


def run_ray(
    experiment: Experiment,
    storage: Storage,
    storage_url: str,
    name: str,
    checkpoint_root: str,
    workers: int,
    options: RunOptions,
    source: str | None = None,
    resources: Mapping[str, float] | None = None,
    address: str | None = None,
) -> None:
    """Trains a prepared run with ``workers`` Ray actors until it completes or fails.

    Raises:
        RunFailed: The failure policy stopped the run.
        RunInterrupted: The actors stopped before the run completed (they kept dying, none
            could start, or no node could host one for `PLACEMENT_TIMEOUT`; the message says
            why).
        KeyboardInterrupt: Ctrl-C, after the actors stopped and the run was marked
            interrupted.
        ImportError: Ray is not installed.
        ValueError: A SQLite storage with a Ray Client address.
    """
    ray = connect(address)
    url = _absolute_sqlite(storage_url) if storage_url.startswith("sqlite") else storage_url
    placement = _placement(ray, url, address)
    res = dict(resources or DEFAULT_RESOURCES)
    need = _need(res)
    _check_feasible(ray, need, address)
    payload = None
    if source is None:
        try:  # Ray's cloudpickle: classes defined in a script or notebook go by value
            payload = ray.cloudpickle.dumps(experiment)
        except Exception as e:
            raise ValueError(
                f"executor='ray' sends the experiment to Ray actors, but it cannot be pickled "
                f"({e}). Define the trainable at module level, or start the run with "
                "`poptune run FILE.py`."
            ) from None
    failed = sum(1 for r in storage.members(name) if r.state["status"] == "failed")
    identity = _identity(storage, name)
    spec = WorkerSpec(url, name, checkpoint_root, options, source, payload, failed, identity)
    threads = options.threads or max(1, int(res.get("cpu", 1.0)))
    actor_cls = ray.remote(RayWorker)
    actor_options = {**_actor_options(res), **placement}
    storage.update_run(name, status="running")
    prefix = f"ray{secrets.token_hex(4)}"
    actors: dict[Any, _Actor] = {}  # by the reference of its run() call
    restarts, max_restarts = 0, max(4, 2 * workers)
    count, never_started = 0, 0
    last_error: str | None = None
    stranded: float | None = None  # since when no actor started and no node could host one

    def start() -> None:
        nonlocal count
        count += 1
        tag = f"{prefix}x{count}"
        actor = _Actor(
            actor_cls.options(name=f"poptune:{name}:{tag}", **actor_options).remote(
                spec, tag, threads
            ),
            tag,
        )
        actors[actor.done] = actor

    try:
        for _ in range(workers):
            start()
        while actors:
            ready, _ = ray.wait(list(actors), num_returns=1, timeout=1.0)
            for ref in ready:
                actor = actors.pop(ref)
                try:
                    ray.get(ref)
                    ended = True
                except Exception as e:  # the actor died, or run() raised
                    ended, last_error = False, _reason(e)
                with contextlib.suppress(Exception):
                    ray.kill(actor.handle, no_restart=True)
                if ended:
                    continue
                _release(storage, name, actor.tag)
                if not _started(ray, actor):
                    never_started += 1
                    if never_started >= workers and not any(
                        _started(ray, a) for a in actors.values()
                    ):
                        _stop_actors(ray, actors, storage, name)
                        storage.update_run(name, status="interrupted")
                        raise RunInterrupted(
                            f"Run {name!r}: no Ray actor could start: {last_error}. The run is "
                            "kept; resume it once that is fixed."
                        )
                info = storage.get_run(name)
                check_identity(info, name, identity)  # never restart into another run
                if info is not None and info.status == "running" and restarts < max_restarts:
                    restarts += 1
                    start()
            if not actors or any(_started(ray, a) for a in actors.values()):
                stranded = None
                continue
            info = storage.get_run(name)
            if info is None or info.status != "running":  # ended by workers elsewhere
                _stop_actors(ray, actors, storage, name, grace=0)
                actors.clear()
            elif _hostable(ray, need):
                stranded = None
            elif stranded is None:
                stranded = time.monotonic()
            elif time.monotonic() - stranded > PLACEMENT_TIMEOUT:
                _stop_actors(ray, actors, storage, name, grace=0)
                actors.clear()
                storage.update_run(name, status="interrupted")
                raise RunInterrupted(
                    f"Run {name!r}: no Ray actor is running and no live node has what one asks "
                    f"for ({need}); none came within {PLACEMENT_TIMEOUT:g} s. The run is kept; "
                    "resume it once the cluster has such a node, or ask for less with "
                    "resources=... (--resources)."
                )
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _stop_actors(ray, actors, storage, name)
            storage.update_run(name, status="interrupted")
        finally:
            signal.signal(signal.SIGINT, previous)
        raise
    except BaseException:
        _stop_actors(ray, actors, storage, name)
        raise
    why = f" Last error: {last_error}" if last_error else ""
    settle_run(
        storage,
        name,
        f"Run {name!r}: every Ray actor stopped before the run completed (more than "
        f"{max_restarts} died).{why} Resume it with `poptune resume {name}`.",
        identity,
    )


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _reason(exc: BaseException) -> str:
    """Why an actor ended, in one line: the exception its code raised, else Ray's first line.

    Ray wraps an exception raised in an actor, its constructor's included, in one whose first
    line only names the actor; the exception itself is its ``cause`` or, for a constructor
    (`RayWorker` importing the experiment, say), the last line of the traceback in its text.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return _first_line(cause)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if frames:
        for line in lines[frames[-1] + 1 :]:
            if not line[:1].isspace():
                return line.strip()
    return _first_line(exc)


def _started(ray: Any, actor: _Actor) -> bool:
    """Whether the actor's constructor ran (it answered `RayWorker.pid`)."""
    try:
        ray.get(actor.started, timeout=0)
    except Exception:
        return False
    return True


def _stop_actors(
    ray: Any, actors: Mapping[Any, _Actor], storage: Storage, name: str, grace: float = 30.0
) -> None:
    """Asks every actor to stop between steps, kills those that do not within ``grace``
    seconds, and releases their members."""
    for actor in actors.values():
        with contextlib.suppress(Exception):
            actor.handle.stop.remote()
    deadline = time.monotonic() + grace
    pending = list(actors)
    while pending and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
    for actor in actors.values():
        with contextlib.suppress(Exception):
            ray.kill(actor.handle, no_restart=True)
        with contextlib.suppress(Exception):
            _release(storage, name, actor.tag)
