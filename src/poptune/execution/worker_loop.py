"""The per-worker loop every multi-worker executor runs: claim, restore, train, checkpoint,
commit, in a loop, until the run is over (the member lifecycle of
`poptune.execution.lifecycle`, one member at a time).

A worker is anything that can open the run's storage and checkpoint root: a process started by
the processes executor (`poptune.execution.processes.worker_main`), or a Ray actor
(`poptune.execution.ray`). `WorkerSpec` is everything it needs, picklable; `WorkerLoop` is
the loop. See `poptune.execution.processes` for the claim rules.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from poptune.execution.lifecycle import (
    Heartbeat,
    Lifecycle,
    TrainableCache,
    Trained,
    claim_order,
    committing,
    next_ready,
)
from poptune.execution.session import (
    RunOptions,
    controller_from,
    owner_alive,
    release_held,
)
from poptune.storage.base import MemberRow, Storage, Transaction

if TYPE_CHECKING:
    from poptune.experiment import Experiment
    from poptune.trainable import Trainable

__all__ = ["Stopping", "WorkerLoop", "WorkerSpec", "load_experiment_of"]


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


def load_experiment_of(spec: WorkerSpec) -> Experiment:
    if spec.source is not None:
        from poptune.execution.source import load_experiment

        return load_experiment(spec.source)[0]
    assert spec.experiment is not None
    exp: Experiment = pickle.loads(spec.experiment)
    return exp


class WorkerLoop:
    """One worker: claim, restore, train, checkpoint, commit, in a loop (the member
    lifecycle of `poptune.execution.lifecycle`, one member at a time)."""

    def __init__(self, spec: WorkerSpec, worker_id: str) -> None:
        from poptune.storage import open_storage
        from poptune.storage.checkpoints import CheckpointStore

        self.spec, self.id = spec, worker_id
        self.exp = load_experiment_of(spec)
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
                    raise Stopping
                step += 1
                results.append(self.life.step(trainable, mid, step, segment))
            location, size = self.life.save(trainable, mid, step)
        except Stopping:
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


class Stopping(Exception):
    """The coordinator asked this worker to stop (SIGTERM): the stretch is dropped."""
