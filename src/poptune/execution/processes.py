"""The processes executor: N worker processes share one run through its storage.

Each worker runs the shared member lifecycle (`poptune.execution.lifecycle`) one member at a
time: *claim, restore, train to the next ready point, checkpoint, commit*.

1. **Claim**, in an exclusive transaction: among the running members no live worker holds, the
   least advanced; among equals those this worker keeps live (no rebuild), then the
   best-scoring first (`claim_order`), so that the members likely to copy another are judged
   when most peers have reached their step. A member more
   than ``max_lag`` steps ahead of the slowest is not claimed. A member whose owner stopped
   sending heartbeats (or whose process is gone, on this machine) is claimed again from its
   last checkpoint. Two workers never hold the same member.
2. **Restore** it (kept live in the worker's bounded cache when nobody else trained it since,
   else loaded from the checkpoint its row names), then train it to its next ready point.
3. **Checkpoint** it (written atomically to a unique file), then **commit**, in one
   transaction: its results, the controller's decisions, the lineage events, the checkpoint
   references, the release of the claim and the claim of the next member. The commit is
   refused if the worker no longer owns the member (it was presumed dead): its work is then
   dropped, never mixed with the new owner's.

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
from poptune.execution.lifecycle import (
    Heartbeat,
    Lifecycle,
    TrainableCache,
    Trained,
    claim_order,
    committing,
    deferred_interrupts,
    limit_threads,
    next_ready,
)
from poptune.execution.session import (
    RunFailed,
    RunInterrupted,
    RunOptions,
    controller_from,
    new_worker_id,
    owner_alive,
    release_held,
)
from poptune.storage import leases
from poptune.storage.base import MemberRow, Storage, Transaction
from poptune.trainable import set_worker_device

if TYPE_CHECKING:
    from collections.abc import Sequence

    from poptune.experiment import Experiment
    from poptune.trainable import Trainable

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


def _load(spec: WorkerSpec) -> Experiment:
    if spec.source is not None:
        from poptune.execution.source import load_experiment

        return load_experiment(spec.source)[0]
    assert spec.experiment is not None
    exp: Experiment = pickle.loads(spec.experiment)
    return exp


class _Worker:
    """One worker process: claim, restore, train, checkpoint, commit, in a loop (the member
    lifecycle of `poptune.execution.lifecycle`, one member at a time)."""

    def __init__(self, spec: WorkerSpec, worker_id: str) -> None:
        from poptune.storage import open_storage
        from poptune.storage.checkpoints import CheckpointStore

        self.spec, self.id = spec, worker_id
        self.exp = _load(spec)
        self.storage: Storage = open_storage(spec.storage_url)
        self.ckpts = CheckpointStore(spec.checkpoint_root)
        self.options = spec.options
        self.life = Lifecycle(
            self.exp,
            self.storage,
            spec.name,
            self.ckpts,
            self.options,
            worker_id,
            failed_before=spec.failed_before,
        )
        self.cache = TrainableCache(self.options.cache_size)
        self.stopping = threading.Event()
        self._parent = os.getppid()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            with Heartbeat(self.storage, self.spec.name, self.id, self.options.heartbeat_timeout):
                claimed: MemberRow | int | None = -1
                while not self.stopping.is_set():
                    if os.getppid() != self._parent:
                        break  # the coordinator is gone: stop; `poptune resume` continues
                    if claimed == -1:
                        claimed = self._claim()
                    if claimed is None:
                        break
                    if isinstance(claimed, int):
                        time.sleep(self.options.poll_interval)
                        continue
                    # Committing a member claims the next one in the same transaction.
                    claimed = self._work(claimed)
        finally:
            self._release_all()

    def _claim(self) -> MemberRow | int | None:
        """A claimed member's row; -1 when none is free yet; None when the run is over."""
        with self._transaction() as tx:
            return self._pick(tx, tx.run().status, tx.members())

    def _transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        return committing(self.storage, self.spec.name)

    def _pick(self, tx: Transaction, status: str, rows: list[MemberRow]) -> MemberRow | int | None:
        """Claims, in ``tx``, the member to train next (`claim_order`), if any is free."""
        if status in ("completed", "failed", "interrupted") or self.stopping.is_set():
            return None
        alive = [r for r in rows if r.state["status"] in ("running", "waiting")]
        if not alive:
            tx.set_status("completed")
            return None
        t = tx.now()
        running = [int(r.state["step"]) for r in alive if r.state["status"] == "running"]
        lag = self.options.max_lag or 2 * self.exp.interval
        limit = (min(running) + lag) if running else 0
        free = [
            r
            for r in alive
            if r.state["status"] == "running"
            and int(r.state["step"]) < limit
            and (
                r.owner is None
                or not owner_alive(r.owner, r.heartbeat, self.options.heartbeat_timeout, t)
            )
        ]
        if not free:
            return -1
        pick = min(free, key=lambda r: claim_order(r, self.exp.mode, self.cache))
        known = {r.id: r for r in rows}
        return tx.claim(pick.id, self.id, self.options.heartbeat_timeout, known=known)

    def _work(self, row: MemberRow) -> MemberRow | int | None:
        """Trains a claimed member to its next ready point and commits; returns what `_claim`
        would (the next member, already claimed)."""
        mid = row.id
        held = self.cache.take(mid)
        if held is None:
            self.cache.make_room()
        trainable: Trainable | None = None
        step = int(row.state["step"])
        try:
            trainable = self.life.restore(row, held)
            self.life.context(trainable, mid, step)
            target = next_ready(row.state, self.exp.interval, self.exp.burn_in, self.exp.steps)
            segment = row.state.get("segment")
            results = []
            while step < target:
                if self.stopping.is_set():
                    raise _Stopping
                step += 1
                results.append(self.life.step(trainable, mid, step, segment))
            location, size = self.life.save(trainable, mid, step)
        except _Stopping:
            if trainable is not None:
                self.cache.put(mid, None, trainable)  # its state is not at any checkpoint
                self.cache.drop(mid)
            return None
        except Exception as exc:
            if trainable is not None and trainable is not (held[1] if held else None):
                with contextlib.suppress(Exception):
                    trainable.close()
            elif held is not None:
                with contextlib.suppress(Exception):
                    held[1].close()
            return self._failed(mid, exc, step)
        with self._transaction() as tx:
            stored = {r.id: r for r in tx.members()}
            if stored[mid].owner != self.id:  # presumed dead meanwhile: the work is dropped
                committed = None
            else:
                info = tx.run()
                pbt = controller_from(self.exp, info, stored.values())
                committed = self.life.commit(
                    tx, pbt, [Trained(mid, step, results, location, size)], stored, keep_owner=False
                )
                claimed = self._pick(tx, info.status, committed.rows)
        if committed is None:
            with contextlib.suppress(Exception):
                trainable.close()
            return -1
        for doomed in committed.doomed:
            self.ckpts.delete(doomed)
        # Kept at the checkpoint just written: the decision (an exploit names another) takes
        # effect at the next restore, inside the failure path.
        self.cache.put(mid, location, trainable)
        return claimed

    def _failed(self, mid: int, exc: BaseException, step: int) -> int:
        with self._transaction() as tx:
            stored = {r.id: r for r in tx.members()}
            if stored[mid].owner != self.id:
                return -1
            pbt = controller_from(self.exp, tx.run(), stored.values())
            self.life.record_failure(tx, pbt, mid, exc, stored, keep_owner=False, step=step)
        return -1

    def _release_all(self) -> None:
        self.cache.clear()
        try:
            with self._transaction() as tx:
                release_held(tx, self.id.__eq__)
        except Exception:
            pass
        self.storage.close()


class _Stopping(Exception):
    """The coordinator asked this worker to stop (SIGTERM): the stretch is dropped."""


def worker_main(
    spec: WorkerSpec,
    tag: str,
    threads: int = 1,
    started: Any = None,
    errors: Any = None,
    device: str | None = None,
) -> None:
    """Entry point of a worker process. Its id is ``host:pid:...-tag``, with its own pid.

    SIGINT is ignored (Ctrl-C in a terminal reaches every process of the group; the
    coordinator alone handles it); SIGTERM asks the worker to stop between steps, so no
    exception ever lands inside a storage call.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_worker_device(device)
    limit_threads(threads)
    worker_id = f"{new_worker_id()}-{tag}"
    try:
        worker = _Worker(spec, worker_id)
    except BaseException as exc:
        if errors is not None:
            errors.put(f"{type(exc).__name__}: {exc}")
        raise
    if started is not None:
        started.set()
    limit_threads(threads)  # again: the experiment's module may have imported torch

    def _terminate(signum: int, frame: Any) -> None:
        worker.stopping.set()

    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.suppress(RunFailed):  # recorded in the storage; the coordinator reports it
        worker.run()
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
            interrupted.
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
    spec = WorkerSpec(storage_url, name, checkpoint_root, options, source, payload, failed)
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
                # A worker died (killed, out of memory...): free its member at once.
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
                if info is not None and info.status == "running" and restarts < max_restarts:
                    restarts += 1
                    start(slots[pid])
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut the clean-up short: the run would stay "running".
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _stop_workers(procs)
            for pid in procs:
                _release_worker(storage, name, pid)
            storage.update_run(name, status="interrupted")
        finally:
            signal.signal(signal.SIGINT, previous)
        raise
    info = storage.get_run(name)
    if info is not None and info.status == "failed":
        raise RunFailed(info.error or f"Run {name!r} failed.")
    if info is not None and info.status == "running":
        rows = storage.members(name)
        if all(r.state["status"] in ("finished", "failed") for r in rows):
            storage.update_run(name, status="completed")
        else:
            storage.update_run(name, status="interrupted")
            raise RunInterrupted(
                f"Run {name!r}: every worker stopped before the run completed (more than "
                f"{max_restarts} died). Resume it with `poptune resume {name}`."
            )


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
