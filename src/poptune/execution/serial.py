"""The serial executor: the whole population in this process, stepped in lockstep.

It runs the shared member lifecycle (`poptune.execution.lifecycle`) for every member at once:
each tick, every running member trains one step; when members reach their ready point (all
together, since ready clocks are aligned), each is checkpointed and one transaction commits the
tick: results, the decisions of every member judged (in id order, each against the others'
scores *at this same step*), lineage events and checkpoint references. A member told to copy a
donor loads the donor's checkpoint of this very step at its next restore: copying a donor's
state from its previous ready point instead (``interval`` steps stale) measurably ruins PBT on
the paper's toy problem (see ``examples/toy_quadratic.py``).

A run killed at any point resumes from its last committed tick and, the trainables being
deterministic, produces exactly the history it would have without the interruption.
`Experiment.run()` without a storage uses this same executor on an in-memory storage. Unlike a
worker process, it keeps every running member's trainable live: lockstep needs them all.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING

from poptune.controller import PBT
from poptune.execution.lifecycle import (
    Committed,
    Heartbeat,
    InfrastructureError,
    Lifecycle,
    Trained,
    committing,
    deferred_interrupts,
)
from poptune.execution.session import (
    CheckpointBackend,
    ConfigurationStop,
    RunFailed,
    RunIdentity,
    RunOptions,
    controller_from,
    member_rows,
    new_worker_id,
    release_held,
    run_identity,
)
from poptune.storage.base import MemberBusy, MemberRow, ResultRow, Storage
from poptune.storage.checkpoints import DamagedCheckpoint
from poptune.trainable import Trainable, set_worker_device, worker_device

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = ["run_serial"]


class _SerialRun:
    """Runs one stored run in this process: claims every member, trains them, commits ticks."""

    def __init__(
        self,
        experiment: Experiment,
        storage: Storage,
        name: str,
        checkpoints: CheckpointBackend,
        options: RunOptions,
    ) -> None:
        self.exp, self.storage, self.name, self.options = experiment, storage, name, options
        self.worker = new_worker_id()
        self.ckpts = checkpoints
        self.rows: dict[int, MemberRow] = {}
        self.live: dict[int, tuple[str | None, Trainable]] = {}
        self.pending: dict[int, list[ResultRow]] = {}
        self.target: dict[int, int] = {}
        self.identity: RunIdentity | None = None  # the run claimed (`_claim_all`)

    # -- claiming and releasing ------------------------------------------------------------------

    def _claim_all(self) -> PBT:
        with deferred_interrupts(), self.storage.transaction(self.name) as tx:
            info = tx.run()
            rows = tx.members()
            known = {r.id: r for r in rows}
            for r in rows:
                try:
                    tx.claim(r.id, self.worker, self.options.heartbeat_timeout, known=known)
                except MemberBusy as e:
                    raise MemberBusy(
                        f"Run {self.name!r} is being trained by another worker: {e} Stop it "
                        f"first, or wait {self.options.heartbeat_timeout:.0f} s after it died."
                    ) from None
            pbt = controller_from(self.exp, info, rows)
            self.identity = run_identity(info)
            mine = {"owner": self.worker, "heartbeat": tx.now()}
            claimed = member_rows(pbt, known, {r.id: mine for r in rows})
            tx.put_members(claimed)
            tx.set_status("running")
        self.rows = {r.id: r for r in claimed}
        failed = sum(1 for r in claimed if r.state["status"] == "failed")
        self.life = Lifecycle(
            self.exp,
            self.storage,
            self.name,
            self.ckpts,
            self.options,
            self.worker,
            failed_before=failed,
        )
        return pbt

    def _release(self, status: str, exc: BaseException | None) -> None:
        error = None if exc is None or isinstance(exc, KeyboardInterrupt) else str(exc)
        try:
            with committing(self.storage, self.name, self.identity) as tx:
                release_held(tx, self.worker.__eq__)
                if tx.run().status != "failed":  # a failure recorded by the policy stays
                    tx.set_status(status, error)
        except Exception:
            if exc is None:
                raise
        for _, trainable in self.live.values():
            with contextlib.suppress(Exception):
                trainable.close()
        self.live.clear()

    def run(self) -> None:
        self.pbt = self._claim_all()
        beat = (
            contextlib.nullcontext()
            if self.storage.display_url.startswith("memory://")
            else Heartbeat(self.storage, self.name, self.worker, self.options.heartbeat_timeout)
        )
        try:
            with beat:
                self._loop()
        except BaseException as exc:
            # A ConfigurationStop blames no member: the run stays resumable.
            failed = isinstance(exc, RunFailed) and not isinstance(exc, ConfigurationStop)
            self._release("failed" if failed else "interrupted", exc)
            raise
        self._release("completed", None)

    # -- the lockstep loop -----------------------------------------------------------------------

    def _running(self) -> list[int]:
        return [mid for mid, m in self.pbt.members.items() if m.status == "running"]

    def _step_of(self, mid: int) -> int:
        return self.pbt.members[mid].step + len(self.pending.get(mid, ()))

    def _loop(self) -> None:
        for mid in self._running():
            self.target[mid] = self.pbt.next_ready(mid)
        while True:
            running = self._running()
            if not running:
                break
            for mid in running:
                if self._step_of(mid) < self.target[mid]:
                    self._advance(mid)
            due = [
                mid
                for mid in self._running()
                if mid in self.target and self._step_of(mid) >= self.target[mid]
            ]
            if due:
                self._commit(due)

    def _trainable(self, mid: int) -> Trainable:
        """The member's live trainable at its current step; restored (and the steps trained
        since its checkpoint replayed, after a retry) when it has none. User code."""
        held = self.live.get(mid)
        row = self.rows[mid]
        if (
            held is not None
            and held[0] == row.checkpoint
            and held[1].hparams == row.state["hparams"]
        ):
            return held[1]
        self.live.pop(mid, None)
        trainable = self.life.restore(row, held)
        self.live[mid] = (row.checkpoint, trainable)
        start = self.pbt.members[mid].step
        self.life.context(trainable, mid, start)
        for _ in self.pending.get(mid, ()):  # a retry: replay what was trained since
            trainable.step()
        # Then other draws for the step that failed (the replayed ones are already recorded).
        self.life.reseed_retry(trainable, row)
        return trainable

    def _advance(self, mid: int) -> None:
        """Trains the member one step; a failure takes the failure path until it succeeds or
        the member is replaced."""
        while self.pbt.members[mid].status == "running":
            step: int | None = None  # the step being trained, once restoring succeeded
            try:
                trainable = self._trainable(mid)
                step = self._step_of(mid) + 1
                row = self.life.step(trainable, mid, step, self.pbt.members[mid].segment)
            except InfrastructureError:
                raise
            except DamagedCheckpoint as exc:
                self._damaged(mid, exc)
                continue
            except Exception as exc:
                self._failed(mid, exc, step)
                continue
            self.pending.setdefault(mid, []).append(row)
            return

    def _save(self, mid: int) -> Trained | None:
        """Checkpoints a member (user code: ``state_dict``); None if it was replaced."""
        while self.pbt.members[mid].status == "running":
            try:
                trainable = self._trainable(mid)
                step = self._step_of(mid)
                location, size = self.life.save(trainable, mid, step)
            except InfrastructureError:
                raise
            except DamagedCheckpoint as exc:
                self._damaged(mid, exc)
                continue
            except Exception as exc:
                self._failed(mid, exc)
                continue
            self.live[mid] = (location, trainable)
            return Trained(mid, step, self.pending.pop(mid, []), location, size)
        return None

    def _commit(self, due: list[int]) -> None:
        trained = []
        for mid in sorted(set(due) | {m for m, r in self.pending.items() if r}):
            t = self._save(mid)
            if t is not None:
                trained.append(t)
        with committing(self.storage, self.name, self.identity) as tx:
            stored = {r.id: r for r in tx.members()}
            committed = self.life.commit(tx, self.pbt, trained, stored, keep_owner=True)
        self._after(committed)

    def _failed(self, mid: int, exc: BaseException, step: int | None = None) -> None:
        """Takes the failure path for ``mid``; ``step``: the step whose training raised
        (default: the member's step, for a failure restoring or checkpointing it)."""
        with committing(self.storage, self.name, self.identity) as tx:
            stored = {r.id: r for r in tx.members()}
            outcome, committed = self.life.record_failure(
                tx,
                self.pbt,
                mid,
                exc,
                stored,
                keep_owner=True,
                results=self.pending.get(mid, []),
                step=self._step_of(mid) if step is None else step,
            )
        held = self.live.pop(mid, None)
        if held is not None:
            with contextlib.suppress(Exception):
                held[1].close()
        if outcome == "retry":
            # Restored from its checkpoint at the next `_trainable`, which replays the steps
            # trained since (their results, already reported, are kept).
            self.rows[mid] = replace(self.rows[mid], attempts=self.rows[mid].attempts + 1)
            return
        assert committed is not None
        self.pending.pop(mid, None)
        self._after(committed)

    def _damaged(self, mid: int, exc: DamagedCheckpoint) -> None:
        """A checkpoint ``mid`` had to restore from is damaged (`Lifecycle.record_damaged`):
        the members that stood on it go back, their uncommitted steps and live state dropped."""
        with committing(self.storage, self.name, self.identity) as tx:
            stored = {r.id: r for r in tx.members()}
            committed = self.life.record_damaged(tx, self.pbt, mid, exc, stored, keep_owner=True)
        for back in [m for m, r in stored.items() if r.checkpoint == exc.location] + [mid]:
            self.pending.pop(back, None)
            held = self.live.pop(back, None)
            if held is not None:
                with contextlib.suppress(Exception):
                    held[1].close()
        self._after(committed)

    def _after(self, committed: Committed) -> None:
        """Takes in what a commit decided: rows, ready targets, closed members, retention."""
        self.rows = {r.id: r for r in committed.rows}
        for location in committed.doomed:
            self.ckpts.delete(location)
        for mid, m in self.pbt.members.items():
            if m.status == "running":
                if not self.pending.get(mid):
                    self.target[mid] = self.pbt.next_ready(mid)
            else:
                self.target.pop(mid, None)
                self.pending.pop(mid, None)
                held = self.live.pop(mid, None)
                if held is not None:
                    with contextlib.suppress(Exception):
                        held[1].close()


def run_serial(
    experiment: Experiment,
    storage: Storage,
    name: str,
    checkpoints: CheckpointBackend,
    options: RunOptions,
    device: str | None = None,
) -> None:
    """Trains a prepared run in this process until every member is finished or failed, its
    members on ``device`` (see `poptune.trainable.worker_device`)."""
    before = worker_device()
    set_worker_device(device)
    try:
        _SerialRun(experiment, storage, name, checkpoints, options).run()
    finally:
        set_worker_device(before)
