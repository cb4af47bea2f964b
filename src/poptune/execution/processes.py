"""The processes executor: N worker processes share one run through its storage.

There is no coordinator in the algorithm: each worker loops on *claim, train, commit*:

1. **Claim**, in an exclusive transaction: the running member with the fewest steps that no
   live worker holds (ties: lowest id). Its row then names the worker as ``owner``; a member
   whose owner stopped sending heartbeats (or whose process is gone, on this machine) is
   claimed again from its last checkpoint. Two workers never hold the same member.
2. **Train** it, in memory, up to its next ready point (or its last step).
3. **Checkpoint** it (written atomically to a unique file), then **commit**, in one
   transaction: its results, the decision the controller makes at its ready point, the
   lineage event, the checkpoint reference, and the release of the claim. The commit is
   refused if the worker no longer owns the member (it was presumed dead): its work is then
   dropped, never mixed with the new owner's.

The donor's state a member copies is the donor's checkpoint at its last ready point, the one
that produced the score it was judged on. A member that copied a donor refers to the donor's
checkpoint file, which retention therefore keeps.

The parent process only starts the workers, watches them, and restarts one that dies (its
claims are released at once, without waiting for the heartbeat timeout).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from poptune.controller import Decision
from poptune.execution.common import (
    apply_decision,
    build_member,
    event_from_decision,
    read_metrics,
)
from poptune.execution.session import (
    RunFailed,
    RunOptions,
    controller_from,
    member_rows,
    new_worker_id,
    now,
    owner_alive,
    release_held,
    released,
    retention,
    write_population,
)
from poptune.storage.base import (
    FailureRow,
    MemberRow,
    ResultRow,
    RunInfo,
    Storage,
    StorageError,
    Transaction,
)

if TYPE_CHECKING:
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
    failures_before: int = 0


def _load(spec: WorkerSpec) -> Experiment:
    if spec.source is not None:
        from poptune.execution.source import load_experiment

        return load_experiment(spec.source)[0]
    assert spec.experiment is not None
    exp: Experiment = pickle.loads(spec.experiment)
    return exp


class _Worker:
    def __init__(self, spec: WorkerSpec, worker_id: str) -> None:
        from poptune.storage import open_storage
        from poptune.storage.checkpoints import CheckpointStore

        self.spec, self.id = spec, worker_id
        self.exp = _load(spec)
        self.storage: Storage = open_storage(spec.storage_url)
        self.ckpts = CheckpointStore(spec.checkpoint_root)
        self.options = spec.options
        self.max_failures = self.options.max_failures or 2 * self.exp.population_size
        # member -> (checkpoint location it was loaded from / last saved, trainable)
        self.cache: dict[int, tuple[str | None, Trainable]] = {}
        self.held: int | None = None
        self._stop = threading.Event()
        self._parent = os.getppid()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        beat = threading.Thread(target=self._heartbeat, daemon=True, name="poptune-heartbeat")
        beat.start()
        try:
            claimed: int | None = -1
            while True:
                if os.getppid() != self._parent:
                    break  # the coordinator is gone: stop; `poptune resume` continues the run
                if claimed is not None and claimed < 0:
                    claimed = self._claim()
                if claimed is None:
                    break
                if claimed < 0:
                    time.sleep(self.options.poll_interval)
                    continue
                # Committing a member claims the next one in the same transaction.
                claimed = self._work(claimed)
        finally:
            self._stop.set()
            self._release_all()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.options.heartbeat_timeout / 4):
            with contextlib.suppress(Exception):  # a missed beat is retried
                self.storage.heartbeat(self.spec.name, self.id, now())

    def _claim(self) -> int | None:
        """A claimed member id; -1 when none is free yet; None when the run is over."""
        with self.storage.transaction(self.spec.name) as tx:
            return self._pick(tx, tx.run().status, tx.members())

    def _pick(self, tx: Transaction, status: str, rows: list[MemberRow]) -> int | None:
        """Claims, in ``tx``, the free running member with the fewest steps (see `_claim`)."""
        self.held = None
        if status in ("completed", "failed", "interrupted"):
            return None
        alive = [r for r in rows if r.state["status"] in ("running", "waiting")]
        if not alive:
            tx.set_status("completed")
            return None
        t = now()
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
        pick = min(free, key=lambda r: (int(r.state["step"]), r.id))
        tx.put_members(
            [
                MemberRow(
                    pick.state, self.id, t, pick.checkpoint, pick.checkpoint_step, pick.attempts
                )
            ]
        )
        self.held = pick.id
        self._row = pick
        return pick.id

    def _trainable(self, row: MemberRow, cached: tuple[str | None, Trainable] | None) -> Trainable:
        """The member's trainable: the one in memory if it is at the stored checkpoint (no other
        worker trained it since), else rebuilt from that checkpoint."""
        hparams = row.state["hparams"]
        if cached is not None and cached[0] == row.checkpoint:
            trainable = cached[1]
            if trainable.hparams != hparams:
                trainable.set_hparams(hparams)
            return trainable
        trainable = build_member(self.exp, row.id, hparams)
        if row.checkpoint is not None:
            trainable.load_state_dict(self.ckpts.load(row.checkpoint))
            trainable.set_hparams(hparams)
        return trainable

    def _target(self, state: Mapping[str, Any]) -> int:
        """The step at which the member is next judged: its next ready point, or the end."""
        exp, step = self.exp, int(state["step"])
        ready = max(int(state["last_ready"]) + exp.interval, exp.burn_in)
        while ready <= step:
            ready += exp.interval
        return min(ready, exp.steps)

    def _work(self, mid: int) -> int | None:
        """Trains a claimed member to its next ready point and commits; returns what
        `_claim` would (the next member, already claimed)."""
        row = self._row
        cached = self.cache.pop(mid, None)  # dropped for good if anything below fails
        try:
            trainable = self._trainable(row, cached)
            step, target = int(row.state["step"]), self._target(row.state)
            results: list[ResultRow] = []
            while step < target:
                metrics, score = read_metrics(trainable.step(), self.exp.metric)
                step += 1
                results.append(ResultRow(mid, step, score, metrics))
        except Exception as exc:
            self._failed(mid, exc)
            return -1
        saved = self.ckpts.save(self.spec.name, mid, step, trainable.state_dict())
        outcome = self._commit(mid, step, results, saved)
        if outcome is None:
            return -1  # lost the claim: the work is dropped
        decision, location, claimed = outcome
        if decision.action in ("exploit", "explore"):
            # After an exploit `location` is the donor's checkpoint: load it, then the hparams.
            state = self.ckpts.load(location) if decision.copies_state else None
            trainable = apply_decision(self.exp, trainable, decision, state)
        self.cache[mid] = (location, trainable)
        return claimed

    def _owned(self, tx: Transaction, mid: int) -> tuple[RunInfo, dict[int, MemberRow]] | None:
        """The run and its members, if this worker still holds ``mid``; else None (it was
        presumed dead and the member reclaimed: whatever it did since must be dropped)."""
        stored = {r.id: r for r in tx.members()}
        if stored[mid].owner != self.id:
            self.held = None
            return None
        return tx.run(), stored

    def _commit(
        self, mid: int, step: int, results: list[ResultRow], saved: Any
    ) -> tuple[Decision, str, int | None] | None:
        """Records a member's interval and its ready point's decision; returns the decision,
        the checkpoint its state is in now (the donor's, after an exploit) and the next
        member claimed (see `_claim`); None if this worker no longer holds the member."""
        with self.storage.transaction(self.spec.name) as tx:
            owned = self._owned(tx, mid)
            if owned is None:
                return None
            info, stored = owned
            pbt = controller_from(self.exp, info, stored.values())
            for r in results:
                pbt.report(mid, r.step, r.score)
            decision = pbt.decide(mid)
            tx.add_checkpoint(mid, step, saved.location, saved.size)
            changes: dict[int, dict[str, Any]] = {
                mid: {
                    "owner": None,
                    "heartbeat": None,
                    "checkpoint": saved.location,
                    "checkpoint_step": step,
                    "attempts": 0,
                }
            }
            decisions = [decision]
            if pbt.synchronous:  # a completed generation decides every member at once
                # (this member's own decision was already handed over by `decide`)
                decisions = [decision if k == mid else pbt.poll(k) for k in sorted(pbt.members)]
            before = {k: (r.checkpoint, r.checkpoint_step) for k, r in stored.items()}
            before[mid] = (saved.location, step)  # the state this member was judged on
            events = self._lineage(decisions, before, changes, tx.event_count())
            final = changes[mid]["checkpoint"]
            rows = member_rows(pbt, stored, changes)
            write_population(tx, pbt, rows)
            tx.add_results(results)
            tx.add_events(events)
            doomed = retention(tx, self.options.keep_checkpoints, rows)
            claimed = self._pick(tx, info.status, rows)
        for location in doomed:
            self.ckpts.delete(location)
        return decision, final, claimed

    @staticmethod
    def _lineage(
        decisions: list[Decision],
        checkpoints: dict[int, tuple[str | None, int | None]],
        changes: dict[int, dict[str, Any]],
        first_index: int,
        kinds: dict[int, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Events for the decisions that changed members. A member that copies a donor's state
        now refers to the donor's checkpoint as it was *before* any of these decisions
        (``checkpoints``: member -> location, step), whatever else they change; that is
        recorded in ``changes``."""
        events: list[dict[str, Any]] = []
        for d in decisions:
            if d.action not in ("exploit", "explore"):
                continue
            if d.copies_state:
                assert d.donor is not None
                location, step = checkpoints[d.donor]
                changes.setdefault(d.member, {}).update(
                    {"checkpoint": location, "checkpoint_step": step}
                )
            kind = (kinds or {}).get(d.member)
            events.append(event_from_decision(first_index + len(events), d, kind).to_dict())
        return events

    def _failed(self, mid: int, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        count = len(self.storage.failures(self.spec.name)) - self.spec.failures_before + 1
        with self.storage.transaction(self.spec.name) as tx:
            owned = self._owned(tx, mid)
            if owned is None:
                return
            info, stored = owned
            mine = stored[mid]
            attempt = mine.attempts + 1
            step = int(mine.state["step"])
            tx.add_failure(FailureRow(mid, step, attempt, text, now()))
            if count > self.max_failures:
                tx.put_members([released(mine, attempt)])
                tx.set_status(
                    "failed",
                    f"{count} failures in user code (more than max_failures="
                    f"{self.max_failures}). Last one, member {mid} at step {step}:\n{text}",
                )
                self.held = None
                return
            if attempt <= self.options.max_retries:
                tx.put_members([released(mine, attempt)])
                self.held = None
                return
            pbt = controller_from(self.exp, info, stored.values())
            d = pbt.replace(mid)
            changes: dict[int, dict[str, Any]] = {
                mid: {"owner": None, "heartbeat": None, "attempts": attempt}
            }
            decisions = [d]
            if pbt.synchronous:  # the failure may have completed a generation
                decisions += [pbt.poll(k) for k in sorted(pbt.members) if k != d.member]
            before = {k: (r.checkpoint, r.checkpoint_step) for k, r in stored.items()}
            events = self._lineage(
                decisions, before, changes, tx.event_count(), {d.member: "replace"}
            )
            write_population(tx, pbt, member_rows(pbt, stored, changes))
            tx.add_events(events)
        self.held = None

    def _release_all(self) -> None:
        try:
            with self.storage.transaction(self.spec.name) as tx:
                release_held(tx, self.id.__eq__)
        except Exception:
            pass
        self.storage.close()


def worker_main(spec: WorkerSpec, tag: str) -> None:
    """Entry point of a worker process. Its id is ``host:pid:random-tag``, with its own pid."""
    worker_id = f"{new_worker_id()}-{tag}"

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.suppress(KeyboardInterrupt):
        _Worker(spec, worker_id).run()


def _release_worker(storage: Storage, name: str, pid: int) -> None:
    """Frees every member held by the worker process ``pid`` of this machine."""
    prefix = f"{socket.gethostname()}:{pid}:"
    with storage.transaction(name) as tx:
        release_held(tx, lambda owner: owner.startswith(prefix))


def run_processes(
    experiment: Experiment,
    storage: Storage,
    storage_url: str,
    name: str,
    checkpoint_root: str,
    workers: int,
    options: RunOptions,
    source: str | None = None,
) -> None:
    """Trains a prepared run with ``workers`` processes until it completes or fails."""
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
    before = len(storage.failures(name))
    spec = WorkerSpec(storage_url, name, checkpoint_root, options, source, payload, before)
    storage.update_run(name, status="running")
    ctx = mp.get_context("spawn")
    procs: dict[int, Any] = {}
    restarts, max_restarts = 0, max(4, 2 * workers)
    started = 0

    def start() -> None:
        nonlocal started
        started += 1
        tag = f"w{started}"
        p = ctx.Process(target=worker_main, args=(spec, tag), name=f"poptune-{tag}", daemon=False)
        p.start()
        assert p.pid is not None
        procs[p.pid] = p

    try:
        for _ in range(workers):
            start()
        while procs:
            for pid, p in list(procs.items()):
                p.join(timeout=0.1)
                if p.exitcode is None:
                    continue
                del procs[pid]
                if p.exitcode != 0:
                    # A worker died (killed, out of memory...): free its member at once.
                    _release_worker(storage, name, pid)
                    info = storage.get_run(name)
                    if info is not None and info.status == "running" and restarts < max_restarts:
                        restarts += 1
                        start()
    except BaseException:
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for pid in procs:
            _release_worker(storage, name, pid)
        storage.update_run(name, status="interrupted")
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
            raise StorageError(
                f"Run {name!r}: every worker stopped before the run completed (more than "
                f"{max_restarts} died). Resume it with `poptune resume {name}`."
            )
