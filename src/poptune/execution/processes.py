"""The processes executor: N worker processes share one run through its storage.

Each worker process runs `poptune.execution.worker.work`, the one worker loop (claim, restore,
train to the next ready point, checkpoint, commit, a small batch of members at a time; its
module docstring says how members are claimed and who ends the run). ``poptune worker`` runs
the same loop on other machines, and they may join a run this executor trains.

A member judged at step ``s`` ranks against each peer's score at ``s`` where the peer has one,
and never copies a donor behind it (see `poptune.PBT`); a member that copies a donor refers to
the donor's checkpoint file, which retention therefore keeps.

The parent process only starts the workers, watches them, and restarts one that dies (its
claims are released at once, without waiting for the heartbeat timeout). Each worker's math
libraries use its share of the cores (`poptune.RunOptions.threads`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from poptune.execution.devices import assign_devices
from poptune.execution.lifecycle import deferred_interrupts, limit_threads
from poptune.execution.session import (
    RunFailed,
    RunIdentity,
    RunInterrupted,
    RunOptions,
    RunReplaced,
    check_identity,
    new_worker_id,
    run_identity,
)
from poptune.execution.worker import Worker, settle_run, work
from poptune.storage import leases
from poptune.storage.base import Storage
from poptune.trainable import set_worker_device

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from poptune.experiment import Experiment

__all__ = ["WorkerSpec", "run_processes", "worker_main"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, picklable.

    ``source`` (``FILE.py:NAME``) is re-imported in the worker; otherwise ``experiment`` holds
    the pickled experiment.
    """

    storage_url: str
    name: str
    checkpoint_root: str
    options: RunOptions
    source: str | None = None
    experiment: bytes | None = None
    failed_before: int = 0
    identity: RunIdentity | None = None


def experiment_of(spec: WorkerSpec) -> Experiment:
    """The experiment ``spec`` carries: imported from its source file, or unpickled."""
    if spec.source is not None:
        from poptune.execution.source import load_experiment

        return load_experiment(spec.source)[0]
    assert spec.experiment is not None
    exp: Experiment = pickle.loads(spec.experiment)
    return exp


def worker_main(
    spec: WorkerSpec,
    tag: str,
    threads: int = 1,
    started: Any = None,
    errors: Any = None,
    device: str | None = None,
) -> None:
    """Entry point of a worker process: `poptune.execution.worker.work` with its own id,
    ``host:pid:...-tag``, stopping when its parent (the coordinator) is gone.

    SIGINT is ignored (Ctrl-C in a terminal reaches every process of the group; the
    coordinator alone handles it); SIGTERM asks the worker to stop between steps, so no
    exception ever lands inside a storage call.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()

    def _terminate(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _terminate)

    def _started(worker: Worker) -> None:
        if started is not None:
            started.set()

    set_worker_device(device)
    limit_threads(threads)  # before the experiment's module imports torch or numpy's BLAS
    with contextlib.suppress(RunFailed):  # recorded in the storage; the coordinator reports it
        try:
            experiment = experiment_of(spec)
            work(
                spec.storage_url,
                spec.name,
                spec.checkpoint_root,
                spec.options,
                experiment=experiment,
                device=device,
                threads=threads,
                worker_id=f"{new_worker_id()}-{tag}",
                stop=stop,
                failed_before=spec.failed_before,
                parent_pid=os.getppid(),
                on_start=_started,
                identity=spec.identity,
            )
        except BaseException as exc:
            if errors is not None and not (started is not None and started.is_set()):
                errors.put(f"{type(exc).__name__}: {exc}")
            raise
    _exit_now()


def _exit_now() -> None:
    """Ends a worker process that finished cleanly without the interpreter's teardown.

    Everything is committed, released and closed by now; tearing down torch's and
    scikit-learn's modules would take about a second per process (measured on 2 cores), which
    the coordinator spends waiting: on a short run that alone costs a tenth of the speed-up of
    a second worker. Only in a child process: called in the main process it would end it.
    """
    if mp.parent_process() is None:
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _release_worker(storage: Storage, name: str, pid: int) -> None:
    """Frees every member held by the worker process ``pid`` of this machine (and namespace)."""
    with deferred_interrupts(), storage.transaction(name) as tx:
        tx.release_all(lambda owner: leases.from_local_process(owner, pid))


def run_processes(
    experiment: Experiment,
    storage: Storage,
    storage_url: str,
    name: str,
    checkpoint_root: str,
    workers: int,
    options: RunOptions,
    source: str | None = None,
    devices: Sequence[str] | None = None,
) -> None:
    """Trains a prepared run with ``workers`` processes until it completes or fails; worker
    ``i`` trains on ``devices[i % len(devices)]`` (a restarted worker takes the device of the
    one it replaces).

    Raises:
        RunFailed: The failure policy stopped the run.
        RunInterrupted: The workers stopped before the run completed (they kept dying, or
            could not start at all: a script that calls ``run()`` at its top level without an
            ``if __name__ == "__main__":`` guard is run again by every worker it spawns).
        KeyboardInterrupt: Ctrl-C, after the workers stopped and the run was marked
            interrupted (so is it when this process fails otherwise, its storage down, say,
            as far as the storage lets it).
    """
    payload = None
    if source is None:
        try:
            payload = pickle.dumps(experiment)
        except Exception as e:
            raise ValueError(
                "executor='processes' sends the experiment to worker processes, but it cannot "
                f"be pickled ({e}). Define the trainable (and any explore function) at module "
                "level, or start the run with `poptune run FILE.py`."
            ) from None
    failed = sum(1 for r in storage.members(name) if r.state["status"] == "failed")
    identity = _identity(storage, name)
    spec = WorkerSpec(
        storage_url, name, checkpoint_root, options, source, payload, failed, identity
    )
    threads = options.threads_per_worker(workers)
    storage.update_run(name, status="running")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()  # why a worker could not start, when it can say
    procs: dict[int, tuple[Any, Any]] = {}
    slots: dict[int, str | None] = {}  # worker pid -> its device
    restarts, max_restarts = 0, max(4, 2 * workers)
    count, never_started = 0, 0

    def start(device: str | None) -> None:
        nonlocal count
        count += 1
        tag = f"w{count}"
        started = ctx.Event()
        p = ctx.Process(
            target=worker_main,
            args=(spec, tag, threads, started, errors, device),
            name=f"poptune-{tag}",
            daemon=False,
        )
        p.start()
        assert p.pid is not None
        procs[p.pid] = (p, started)
        slots[p.pid] = device

    try:
        for device in assign_devices(workers, devices):
            start(device)
        while procs:
            for pid, (p, started) in list(procs.items()):
                p.join(timeout=0.1)
                if p.exitcode is None:
                    continue
                del procs[pid]
                if p.exitcode == 0:
                    continue
                # A worker died (killed, out of memory...): free its member at once, if the
                # run is still the one it trained.
                check_identity(storage.get_run(name), name, identity)
                _release_worker(storage, name, pid)
                if not started.is_set():
                    never_started += 1
                    if never_started >= workers:
                        _stop_workers(procs)
                        storage.update_run(name, status="interrupted")
                        why = errors.get() if not errors.empty() else None
                        raise RunInterrupted(
                            _NO_START.format(name=name)
                            if why is None
                            else f"Run {name!r}: worker processes could not start: {why}. "
                            "The run is kept; resume it once that is fixed."
                        )
                info = storage.get_run(name)
                check_identity(info, name, identity)  # never restart into another run
                if info is not None and info.status == "running" and restarts < max_restarts:
                    restarts += 1
                    start(slots[pid])
    except RunReplaced:
        _stop_workers(procs)  # they stop by themselves too; nothing is written
        raise
    except BaseException:
        # Ctrl-C, or this process failing (its storage down, read-only or full): the workers
        # stop, and the run is marked interrupted as far as the storage still lets it (else
        # it would stay "running" with nobody training it). A second Ctrl-C must not cut the
        # clean-up short.
        with _ctrl_c_held():
            _stop_workers(procs)
            with contextlib.suppress(Exception):
                for pid in procs:
                    _release_worker(storage, name, pid)
            with contextlib.suppress(Exception):
                info = storage.get_run(name)
                if info is not None and info.status == "running":
                    storage.update_run(name, status="interrupted")
        raise
    settle_run(
        storage,
        name,
        f"Run {name!r}: every worker stopped before the run completed (more than "
        f"{max_restarts} died). Resume it with `poptune resume {name}`.",
        identity,
    )


def _identity(storage: Storage, name: str) -> RunIdentity:
    """The identity of the prepared run ``name`` (`run_identity`), which workers keep to."""
    info = storage.get_run(name)
    if info is None:
        raise RunReplaced(f"Run {name!r} was deleted before its workers started.")
    return run_identity(info)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ignores Ctrl-C in the block (main thread only: elsewhere there is none to ignore)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_NO_START = (
    "Run {name!r}: worker processes could not start (each exited before it began). The usual "
    "cause: a script that calls run() at its top level is imported again by every worker "
    'process it starts. Put the call under `if __name__ == "__main__":`, or start the run '
    "with `poptune run FILE.py`. The run is kept; resume it afterwards."
)


def _stop_workers(procs: dict[int, tuple[Any, Any]]) -> None:
    """Asks every worker to stop between steps (SIGTERM), then kills those that do not."""
    for p, _ in procs.values():
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p, _ in procs.values():
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
