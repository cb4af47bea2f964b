"""One worker's loop: claim members, train them to their next ready points, commit; again.

`work` is the loop every executor that trains members in worker processes runs: each worker
process of the processes executor (`poptune.execution.processes`), ``poptune worker`` on any
machine that reaches the run's storage and checkpoints, and any other host of a worker (a Ray
actor, say). It is the member lifecycle of `poptune.execution.lifecycle`:

1. **Claim**, in an exclusive transaction: among the running members no live worker holds, the
   least advanced; among equals those this worker keeps live (no rebuild), then the
   best-scoring first (`claim_order`). A worker claims a batch of them (`batch_size`: by
   default half the claimable members, at most its cache of live trainables, or more when
   its commits take longer than training a member does). A member
   ``max_lag`` steps or more ahead of the slowest is not claimed. A member whose owner stopped
   sending heartbeats (judged on the storage's clock), or whose process is gone (only for
   owners of this host and PID namespace), is claimed again from its last checkpoint. Two
   workers never hold the same member.
2. **Restore** each (kept live in the worker's bounded cache when nobody else trained it since,
   else loaded from the checkpoint its row names), train it to its next ready point and
   **checkpoint** it; then the next member of the batch.
3. **Commit** the batch in one transaction: the results, the controller's decisions, the
   lineage events, the checkpoint references, the release of the claims and the claim of the
   next batch. The transaction (under the run's lock) is what limits a run of cheap steps, so
   a batch shares one; a worker keeps the member rows it read and reads only those changed
   since (`poptune.storage.base.Transaction.members_since`). A member the worker no longer
   owns (it was presumed dead) is left out: its work is dropped, never mixed with the new
   owner's. A member whose step raised takes the failure path at once, in a transaction of
   its own.

**Who ends the run.** The worker whose claim finds no member left to train (every member
finished or failed) marks the run completed, inside its exclusive transaction: exactly one
worker does, whichever machine it runs on, and whether or not the process that started the run
is still there. A worker stops when the run is completed, failed or interrupted (by its
starter, `poptune resume`, Ctrl-C on the driver), when its ``stop`` event is set (between
steps: the stretch since the member's last ready point is dropped, never committed), or when
its parent process is gone (``parent_pid``; noticed within a second, also during a long step:
`ParentWatch`); whatever it holds is then released at once. The worker that marks the run
completed removes the checkpoint files nobody committed (`poptune.execution.tidy`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from poptune.execution.lifecycle import (
    Heartbeat,
    InfrastructureError,
    Lifecycle,
    TrainableCache,
    Trained,
    claim_order,
    committing,
    limit_threads,
    next_ready,
)
from poptune.execution.session import (
    RunIdentity,
    RunReplaced,
    check_identity,
    controller_from,
    new_worker_id,
    owner_alive,
    release_held,
    run_identity,
)
from poptune.storage.base import (
    MemberRow,
    Storage,
    StorageError,
    StorageUnavailable,
    Transaction,
    TransactionLost,
)
from poptune.storage.checkpoints import DamagedCheckpoint
from poptune.trainable import set_worker_device

if TYPE_CHECKING:
    from poptune.execution.session import RunOptions
    from poptune.experiment import Experiment
    from poptune.trainable import Trainable

__all__ = [
    "ParentWatch",
    "Stretch",
    "WorkReport",
    "Worker",
    "batch_size",
    "join_run",
    "settle_run",
    "work",
]

#: Run statuses in which no worker trains.
FINAL = ("completed", "failed", "interrupted")


@dataclass(frozen=True)
class Stretch:
    """A stretch of training a worker committed.

    Attributes:
        member: The member's id.
        start: Its step when the worker claimed it.
        step: The step it reached (its ready point, or the last step).
        score: Its score at ``step``.
        commit_seconds: How long the commit took, waiting for the run's lock included.
        committed_at: When the commit ended (``time.time()`` of this machine).
    """

    member: int
    start: int
    step: int
    score: float
    commit_seconds: float
    committed_at: float


@dataclass
class WorkReport:
    """What one call of `work` did.

    Attributes:
        worker: The worker's id.
        stretches: Every stretch it committed, in order.
        dropped: Stretches it trained but could not commit: it had been presumed dead and
            its member was claimed by another worker.
        failures: Exceptions from user code it recorded (retried or not).
        status: The run's status when the worker stopped.
        stopped: Whether it stopped because it was told to (``stop``) or its parent was gone.
    """

    worker: str
    stretches: list[Stretch] = field(default_factory=list)
    dropped: int = 0
    failures: int = 0
    status: str = "running"
    stopped: bool = False

    @property
    def steps(self) -> int:
        """Member-steps committed."""
        return sum(s.step - s.start for s in self.stretches)

    @property
    def members(self) -> list[int]:
        """The members it trained, ascending."""
        return sorted({s.member for s in self.stretches})


def work(
    storage_url: str,
    run: str,
    checkpoint_root: str,
    options: RunOptions,
    *,
    experiment: Experiment | None = None,
    source: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    worker_id: str | None = None,
    stop: threading.Event | None = None,
    failed_before: int | None = None,
    parent_pid: int | None = None,
    handle_signals: bool = False,
    on_start: Callable[[Worker], None] | None = None,
    on_commit: Callable[[Stretch], None] | None = None,
    identity: RunIdentity | None = None,
) -> WorkReport:
    """Claims and trains members of a stored run until it is over or this worker must stop.

    The run must exist in the storage (``poptune run``, ``Experiment.run`` or `join_run` set
    it up); this only trains it. Safe to call from several processes and machines at once.

    Args:
        storage_url: The run's storage; the worker opens (and closes) its own connection.
        run: The run's name.
        checkpoint_root: The run's checkpoint root (`poptune.storage.base.RunInfo`'s).
        options: Heartbeats, retries, failure budget, cache size, lag.
        experiment: The run's experiment; else ``source`` (``FILE.py[:NAME]``) is imported.
        source: Where the experiment is defined, when ``experiment`` is not given.
        device: The device members train on (`poptune.Trainable.device`), if any.
        threads: Math-library threads for this process (None: left as they are).
        worker_id: This worker's id (default: a new one, `poptune.storage.leases`).
        stop: Set it to make the worker stop after the current step (its stretch is
            dropped and its member released).
        failed_before: Members failed for good before this worker started, not counted
            against ``options.max_failures`` (default: those failed now).
        parent_pid: Stop when this process is no longer this process's parent (looked at
            from a thread, also during a step; a worker that has not stopped a few seconds
            later releases its members and ends its process: `ParentWatch`). For worker
            processes only.
        handle_signals: Make SIGINT and SIGTERM set ``stop`` while the worker runs (main
            thread only; the previous handlers come back afterwards).
        on_start: Called with the worker once it is built, before it claims anything.
        on_commit: Called after each committed stretch.
        identity: The run this worker is for (`poptune.execution.session.run_identity`; by
            default the one stored under ``run`` when the worker starts). Every transaction
            checks it: once the run is deleted or replaced by another of the same name, the
            worker stops without writing to it.

    Returns:
        What the worker did, and the run's status when it stopped.

    Raises:
        poptune.RunFailed: The failure policy stopped the run (it is marked failed).
        poptune.execution.source.SourceError: ``source`` cannot be imported.
        poptune.storage.StorageError: The storage cannot be opened, or the run is not there.
    """
    set_worker_device(device)
    if threads is not None:
        limit_threads(threads)
    if experiment is None:
        if source is None:
            raise ValueError("work() needs the run's `experiment` or its `source` file.")
        from poptune.execution.source import load_experiment

        experiment = load_experiment(source)[0]
    if threads is not None:
        limit_threads(threads)  # again: the experiment's module may have imported torch
    worker = Worker(
        experiment,
        storage_url,
        run,
        checkpoint_root,
        options,
        worker_id or new_worker_id(),
        stop=stop,
        failed_before=failed_before,
        parent_pid=parent_pid,
        on_commit=on_commit,
        identity=identity,
    )
    previous: dict[signal.Signals, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():

        def _stop(signum: int, frame: Any) -> None:
            worker.stopping.set()

        _stop.poptune_graceful = True  # type: ignore[attr-defined]
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
    try:
        if on_start is not None:
            on_start(worker)
        return worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def join_run(
    storage: Storage, run: str, heartbeat_timeout: float | None = None
) -> tuple[str, float]:
    """Prepares a stored run for a worker that joins it, atomically: a run nobody is training
    (``created``, or ``interrupted``) is marked running, and a run that records no heartbeat
    timeout gets ``heartbeat_timeout`` (default 30 s), so that every worker judges the others
    by the same one.

    Returns:
        The run's status before, and its heartbeat timeout (the recorded one, if any: the
        caller checks it against what it was asked for).
    """
    with committing(storage, run) as tx:
        info = tx.run()
        stored = info.execution.get("heartbeat_timeout")
        if stored is None:
            stored = 30.0 if heartbeat_timeout is None else heartbeat_timeout
            tx.set_execution({**info.execution, "heartbeat_timeout": float(stored)})
        if info.status in ("created", "interrupted"):
            tx.set_status("running")
    return info.status, float(stored)


def settle_run(
    storage: Storage, run: str, stopped: str, identity: RunIdentity | None = None
) -> None:
    """The driver's last word on a run whose workers (processes or Ray actors) are all gone.

    A run its workers left ``running`` with every member finished or failed is marked
    completed; one with members left to train is marked interrupted.

    Raises:
        poptune.execution.session.RunReplaced: The run is no longer the one ``identity``
            names; nothing is written.
        poptune.RunFailed: The failure policy stopped the run.
        poptune.RunInterrupted: Members were left to train; ``stopped`` says why the workers
            stopped and what to do.
    """
    from poptune.execution.session import RunFailed, RunInterrupted

    info = storage.get_run(run)
    check_identity(info, run, identity)
    if info is not None and info.status == "failed":
        raise RunFailed(info.error or f"Run {run!r} failed.")
    if info is not None and info.status == "running":
        rows = storage.members(run)
        if all(r.state["status"] in ("finished", "failed") for r in rows):
            storage.update_run(run, status="completed")
        else:
            storage.update_run(run, status="interrupted")
            raise RunInterrupted(stopped)


class Worker:
    """One worker: claim, restore, train, checkpoint, commit, in a loop (see the module doc).

    Build it with `work`, which also sets up the device, threads and signals.
    """

    def __init__(
        self,
        experiment: Experiment,
        storage_url: str,
        run: str,
        checkpoint_root: str,
        options: RunOptions,
        worker_id: str,
        *,
        stop: threading.Event | None = None,
        failed_before: int | None = None,
        parent_pid: int | None = None,
        on_commit: Callable[[Stretch], None] | None = None,
        identity: RunIdentity | None = None,
    ) -> None:
        from poptune.storage import open_storage
        from poptune.storage.base import StorageError
        from poptune.storage.checkpoints import CheckpointStore

        self.id, self.name, self.exp, self.options = worker_id, run, experiment, options
        self.identity: RunIdentity | None = identity
        self.storage: Storage = open_storage(storage_url)
        try:
            if identity is None:
                info = self.storage.get_run(run)
                if info is None:
                    raise StorageError(f"No run named {run!r} in {self.storage.display_url}.")
                identity = run_identity(info)
            if failed_before is None:
                rows = self.storage.members(run)  # also: the run must exist
                failed_before = sum(1 for r in rows if r.state["status"] == "failed")
            self.ckpts = CheckpointStore(checkpoint_root, allow_pickle=experiment.allow_pickle)
        except BaseException:
            self.storage.close()
            raise
        self.life = Lifecycle(
            experiment,
            self.storage,
            run,
            self.ckpts,
            options,
            worker_id,
            failed_before=failed_before,
        )
        self.cache = TrainableCache(options.cache_size)
        self.stopping = stop if stop is not None else threading.Event()
        self.parent_pid = parent_pid
        self.on_commit = on_commit
        self._completed = False  # whether this worker marked the run completed
        self.report = WorkReport(worker_id)
        # The population as last read, and its version (`Transaction.members_since`).
        self._rows: dict[int, MemberRow] = {}
        self._seen: int | None = None
        # Running means of the seconds one member's stretch and one commit take (`batch_size`).
        self._stretch_s: float | None = None
        self._commit_s: float | None = None

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> WorkReport:
        """Trains until the run is over or the worker must stop; releases what it holds."""
        watch = ParentWatch(self, self.parent_pid) if self.parent_pid is not None else None
        try:
            with Heartbeat(self.storage, self.name, self.id, self.options.heartbeat_timeout):
                claimed: list[MemberRow] | int | None = -1
                while not self.stopping.is_set():
                    if self.parent_pid is not None and os.getppid() != self.parent_pid:
                        self.report.stopped = True
                        break  # the coordinator is gone: stop; `poptune resume` continues
                    try:
                        if claimed == -1:
                            claimed = self._claim()
                        if claimed is None:
                            break
                        if isinstance(claimed, int):
                            time.sleep(self.options.poll_interval)
                            continue
                        # Committing members claims the next ones in the same transaction.
                        claimed = self._work(claimed)
                    except (TransactionLost, StorageUnavailable) as e:
                        claimed = self._recover(e)
                if self.stopping.is_set():
                    self.report.stopped = True
        except InfrastructureError as e:
            self._interrupt(str(e))
        except RunReplaced:
            self.report.status, self.report.stopped = "replaced", True
        finally:
            self._release_all()
            if watch is not None:
                watch.done.set()
        return self.report

    def _claim(self) -> list[MemberRow] | int | None:
        """The claimed members' rows; -1 when none is free yet; None when the run is over."""
        with self._transaction() as tx:
            return self._pick(tx, tx.run().status, list(self._population(tx).values()))

    def _transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        return committing(self.storage, self.name, self.identity)

    def _population(self, tx: Transaction) -> dict[int, MemberRow]:
        """Every member's row as of ``tx``, by id: the rows kept from the last transaction,
        with those changed since read again. Only committed rows are ever kept (they are read
        before ``tx`` writes), so a transaction that rolls back leaves nothing wrong here."""
        version, changed = tx.members_since(self._seen)
        if self._seen is None or version < self._seen:  # first look, or a new run
            self._rows = {}
        self._rows.update((r.id, r) for r in changed)
        self._seen = version
        return dict(self._rows)

    def _pick(
        self, tx: Transaction, status: str, rows: list[MemberRow]
    ) -> list[MemberRow] | int | None:
        """Claims, in ``tx``, the members to train next (`claim_order`; `batch_size` of them),
        if any is free; marks the run completed when no member is left to train."""
        if status in FINAL or self.stopping.is_set():
            self.report.status = status
            return None
        alive = [r for r in rows if r.state["status"] in ("running", "waiting")]
        if not alive:
            tx.set_status("completed")
            self.report.status = "completed"
            self._completed = True
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
        picks = sorted(free, key=lambda r: claim_order(r, self.exp.mode, self.cache))
        known = {r.id: r for r in rows}
        timeout = self.options.heartbeat_timeout
        size = batch_size(self.options, len(free), self._stretch_s, self._commit_s)
        return [tx.claim(r.id, self.id, timeout, known=known) for r in picks[:size]]

    def _work(self, rows: list[MemberRow]) -> list[MemberRow] | int | None:
        """Trains claimed members to their next ready points, one after the other, and commits
        them together; returns what `_claim` would (the next members, already claimed)."""
        start = {row.id: int(row.state["step"]) for row in rows}
        trained: list[Trained] = []
        training = time.perf_counter()
        for row in rows:
            try:
                done = self._train(row)
            except _Stopping:
                self._drop(trained)  # written, never committed
                return None
            if done is not None:
                trained.append(done)
        if not trained:
            return -1
        began = time.perf_counter()
        self._stretch_s = _mean(self._stretch_s, (began - training) / len(rows))
        claimed: list[MemberRow] | int | None = -1
        committed = None
        try:
            with self._transaction() as tx:
                stored = self._population(tx)
                # A member whose worker was presumed dead meanwhile: its work is dropped.
                owned = [t for t in trained if stored[t.member].owner == self.id]
                if owned:
                    info = tx.run()
                    pbt = controller_from(self.exp, info, stored.values())
                    committed = self.life.commit(tx, pbt, owned, stored, keep_owner=False)
                    claimed = self._pick(tx, info.status, committed.rows)
        except TransactionLost:
            self.report.dropped += len(trained)  # its files are kept: see `_start_afresh`
            raise
        seconds = time.perf_counter() - began
        self._commit_s = _mean(self._commit_s, seconds)
        kept = {t.member for t in owned}
        lost = [t for t in trained if t.member not in kept]
        self.report.dropped += len(lost)
        self._drop(lost)
        if committed is None:
            return -1
        for doomed in committed.doomed:
            self.ckpts.delete(doomed)
        now = time.time()
        for t in owned:
            score = t.results[-1].score if t.results else float("nan")
            stretch = Stretch(t.member, start[t.member], t.step, score, seconds, now)
            self.report.stretches.append(stretch)
            if self.on_commit is not None:
                self.on_commit(stretch)
        return claimed

    def _drop(self, trained: list[Trained]) -> None:
        """Forgets stretches that will never be committed: their trainables and the checkpoint
        files no row refers to."""
        for t in trained:
            self.cache.drop(t.member)
            with contextlib.suppress(Exception):
                self.ckpts.delete(t.location)

    def _train(self, row: MemberRow) -> Trained | None:
        """Trains a claimed member to its next ready point and checkpoints it; keeps its
        trainable live (at that checkpoint: a decision that names another takes effect at the
        next restore). None when it failed (recorded in a transaction of its own).

        Raises:
            _Stopping: The worker was told to stop; the stretch is dropped.
        """
        mid = row.id
        held = self.cache.take(mid)
        if held is None:
            self.cache.make_room()
        trainable: Trainable | None = None
        step = int(row.state["step"])
        try:
            trainable = self.life.restore(row, held)
            self.life.reseed_retry(trainable, row)
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
            raise
        except InfrastructureError:
            raise
        except Exception as exc:
            if trainable is not None and trainable is not (held[1] if held else None):
                with contextlib.suppress(Exception):
                    trainable.close()
            elif held is not None:
                with contextlib.suppress(Exception):
                    held[1].close()
            self._failed(mid, exc, step)
            return None
        self.cache.put(mid, location, trainable)
        return Trained(mid, step, results, location, size)

    def _failed(self, mid: int, exc: BaseException, step: int) -> None:
        """Records what the member's stretch raised, in a transaction of its own: a damaged
        checkpoint (`Lifecycle.record_damaged`: no failure of the member's), else the one
        failure policy (`Lifecycle.record_failure`). Nothing if the member is no longer ours."""
        with self._transaction() as tx:
            stored = self._population(tx)
            if stored[mid].owner != self.id:
                return
            pbt = controller_from(self.exp, tx.run(), stored.values())
            self.report.failures += 1
            if isinstance(exc, DamagedCheckpoint):
                self.life.record_damaged(tx, pbt, mid, exc, stored, keep_owner=False)
            else:
                self.life.record_failure(tx, pbt, mid, exc, stored, keep_owner=False, step=step)

    def _interrupt(self, message: str) -> None:
        """Ends the run as interrupted (an `InfrastructureError`): every worker stops at its
        next claim, and the message says what failed and how to resume."""
        self.report.status = "interrupted"
        with contextlib.suppress(Exception), self._transaction() as tx:  # storage may be down
            if tx.run().status not in FINAL:
                tx.set_status("interrupted", message)

    def _recover(self, error: StorageError) -> int | None:
        """After a transaction was lost, or the storage could not be used even after the
        waits of `poptune.execution.lifecycle.committing`: carries on as a fresh worker
        (`_start_afresh`, which waits for the storage again); -1 once the storage answers.
        If it still does not, the run is marked interrupted where that can be written, with
        what failed, and None (the worker stops): nothing committed is lost, and `poptune
        resume` continues."""
        try:
            return self._start_afresh()
        except (TransactionLost, StorageUnavailable) as e:
            error = e
        self._interrupt(
            f"Run {self.name!r} stopped: its storage could not be used ({error}). Everything "
            "committed is kept; resume it once the storage is back."
        )
        return None

    def _start_afresh(self) -> int:
        """Carries on after the storage ended a transaction of this worker from outside (it
        sat in it, frozen, past the run's heartbeat timeout: `TransactionLost`), as a fresh
        worker: whatever it was committing is dropped, its live trainables and kept rows are
        forgotten and every member it still holds is released. The checkpoint files of the
        dropped work are left alone: had the connection broken during the commit itself, the
        commit may have happened and rows may name them."""
        self.cache.clear()
        self._rows, self._seen = {}, None
        with self._transaction() as tx:
            release_held(tx, self.id.__eq__)
        return -1

    def _release_all(self) -> None:
        self.cache.clear()
        try:
            with self._transaction() as tx:
                release_held(tx, self.id.__eq__)
        except Exception:
            pass
        if self._completed:
            from poptune.execution.tidy import tidy_checkpoints

            # Nobody can commit into a completed run: files of uncommitted stretches go.
            with contextlib.suppress(Exception):
                tidy_checkpoints(self.storage, self.name, self.ckpts)
        self.storage.close()


#: How often a worker process looks whether its parent is still there (`ParentWatch`).
PARENT_POLL_SECONDS = 0.5

#: How long a worker process whose parent is gone may take to stop between steps before it
#: ends itself in the middle of one (`ParentWatch`).
PARENT_GRACE_SECONDS = 5.0

#: The exit status of a worker process that ended itself in the middle of a step.
PARENT_GONE_EXIT = 3


class ParentWatch:
    """Stops a worker process whose parent (the driver) is gone, even during a long step.

    A daemon thread looks every `PARENT_POLL_SECONDS`; once the parent is gone it sets the
    worker's ``stop`` event (the worker stops after its current step, dropping the stretch).
    A step can take minutes, and a resumed driver waits for the members this worker holds:
    if the worker has not stopped `PARENT_GRACE_SECONDS` later, the thread releases what the
    worker holds and ends the process (``os._exit``). What it had not committed is lost,
    never half-committed: a commit is one transaction. Set ``done`` once the worker stopped.
    """

    def __init__(self, worker: Worker, parent_pid: int) -> None:
        self.worker, self.parent = worker, parent_pid
        self.done = threading.Event()
        thread = threading.Thread(target=self._run, name="poptune-parent-watch", daemon=True)
        thread.start()

    def _run(self) -> None:
        while os.getppid() == self.parent:
            if self.done.wait(PARENT_POLL_SECONDS):
                return
        worker = self.worker
        worker.report.stopped = True
        worker.stopping.set()
        if self.done.wait(PARENT_GRACE_SECONDS):
            return
        with (
            contextlib.suppress(Exception),
            committing(worker.storage, worker.name, worker.identity) as tx,
        ):
            release_held(tx, worker.id.__eq__)
        os._exit(PARENT_GONE_EXIT)


#: The share of a worker's time its commits may take before it claims larger batches than its
#: cache of live trainables holds (`batch_size`).
COMMIT_SHARE = 0.25

#: Seconds of training a batch grown beyond the cache holds at most (`batch_size`): what a
#: worker that stops or dies loses, uncommitted, and how stale its members' rows get.
BATCH_SECONDS = 1.0


def batch_size(
    options: RunOptions,
    free: int,
    stretch_s: float | None = None,
    commit_s: float | None = None,
) -> int:
    """How many of ``free`` claimable members a worker claims at once (`RunOptions.claim_batch`).

    By default half of them (so that other workers find members too), at least 1, and at most
    ``cache_size``, unless the worker's commits, ``commit_s`` seconds each, would then take
    more than `COMMIT_SHARE` of its time, training a member taking ``stretch_s`` (running
    means; None before the first commit): then enough members that a batch's commit takes
    that share, as long as the batch trains for at most `BATCH_SECONDS`. Cheap steps (a
    commit, durable on disk, costs more than training a member to its next ready point) so
    share their commits among more members; members beyond the cache are restored from their
    checkpoints, which adds to ``stretch_s``.
    """
    if options.claim_batch is not None:
        return options.claim_batch
    limit = options.cache_size
    if stretch_s and commit_s and stretch_s > 0:
        enough = math.ceil(commit_s * (1 - COMMIT_SHARE) / (COMMIT_SHARE * stretch_s))
        limit = max(limit, min(enough, math.floor(BATCH_SECONDS / stretch_s)))
    return max(1, min(limit, (free + 1) // 2))


def _mean(old: float | None, new: float) -> float:
    """A running mean that follows changes within a few commits."""
    return new if old is None else 0.7 * old + 0.3 * new


class _Stopping(Exception):
    """The worker was told to stop (SIGTERM, Ctrl-C, its stop event): the stretch is dropped."""
