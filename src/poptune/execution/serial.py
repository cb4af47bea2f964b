"""The serial executor: the whole population in one process, stepped in lockstep.

Every tick, each running member trains one step and reports its score; then each member that
reached a ready point is judged, in id order, against the others' scores *at this same step*,
and an exploiting member copies its donor's state as it is now. Copying a donor's state from
its previous ready point instead (``interval`` steps stale) measurably ruins PBT on the paper's
toy problem (see ``examples/toy_quadratic.py``).

After each tick in which any member was judged, every member that changed is checkpointed and
the tick is committed to the storage in one transaction: results, decisions, lineage events and
checkpoint references together. A run killed at any point resumes from its last committed tick
and, the trainables being deterministic, produces exactly the history it would have without the
interruption. `Experiment.run()` without a storage uses this same executor on an in-memory
storage.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from poptune.controller import PBT, Decision
from poptune.execution.common import (
    apply_decision,
    build_member,
    event_from_decision,
    read_metrics,
)
from poptune.execution.session import (
    CheckpointBackend,
    RunFailed,
    RunOptions,
    controller_from,
    member_rows,
    new_worker_id,
    now,
    owner_alive,
    release_held,
    retention,
    write_population,
)
from poptune.result import Event, HistoryRecord
from poptune.storage.base import FailureRow, MemberRow, ResultRow, Storage, StorageError
from poptune.trainable import Trainable

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = ["Lockstep", "run_serial"]

FailureHandler = Callable[[int, BaseException], None]


class Lockstep:
    """Steps a population in lockstep and applies decisions.

    Args:
        experiment: The configuration.
        controller: The decision logic, possibly restored from a snapshot.
        trainables: Each running member's trainable, by id.
        on_tick: Called after each tick in which a member was judged or finished, with the
            tick's history records and events.
        on_failure: Called when a member's ``step()`` raises; it must repair the member
            (restore it, or fail and replace it) or raise. None: exceptions propagate.
        first_event_index: Index of the next lineage event.
    """

    def __init__(
        self,
        experiment: Experiment,
        controller: PBT,
        trainables: dict[int, Trainable],
        *,
        on_tick: Callable[[list[HistoryRecord], list[Event]], None] | None = None,
        on_failure: FailureHandler | None = None,
        first_event_index: int = 0,
    ) -> None:
        self.experiment = experiment
        self.controller = controller
        self.trainables = trainables
        self.on_tick = on_tick
        self.on_failure = on_failure
        self.next_event = first_event_index
        self.pending_history: list[HistoryRecord] = []
        self.pending_events: list[Event] = []

    def run(self) -> None:
        exp, pbt = self.experiment, self.controller
        metric, steps = exp.metric, exp.steps
        while True:
            active = [m for m in pbt.members.values() if m.status == "running"]
            if not active:
                break
            for m in active:
                while True:
                    try:
                        raw = self.trainables[m.id].step()
                        metrics, score = read_metrics(raw, metric)
                        break
                    except Exception as exc:
                        if self.on_failure is None:
                            raise
                        self.on_failure(m.id, exc)
                        if m.status != "running":
                            break
                if m.status != "running":
                    continue
                step = m.step + 1
                pbt.report(m.id, step, score)
                self.pending_history.append(HistoryRecord(m.id, step, metrics, score))
            judged = [
                m.id
                for m in active
                if m.status == "running" and (pbt.is_ready(m.id) or m.step >= steps)
            ]
            if judged:
                self._judge(judged)
            if judged or self.pending_events:
                self.flush()
        self.flush()

    def flush(self) -> None:
        """Hands the tick's records to ``on_tick``."""
        if not self.pending_history and not self.pending_events:
            return
        history, events = self.pending_history, self.pending_events
        self.pending_history, self.pending_events = [], []
        if self.on_tick is not None:
            self.on_tick(history, events)

    def _judge(self, judged: list[int]) -> None:
        pbt = self.controller
        if not pbt.synchronous:
            # Asynchronous: each decision sees the population as the previous ones left it.
            for mid in judged:
                d = pbt.decide(mid)
                if d.action in ("exploit", "explore"):
                    self.apply(d, self._state_of(d))
            return
        decisions: dict[int, Decision] = {}
        for mid in judged:
            d = pbt.decide(mid)
            if d.action != "wait":
                decisions[mid] = d
        for mid in judged:
            if mid not in decisions:
                decisions[mid] = pbt.poll(mid)
        # Synchronous: donors' states are taken at the barrier, before anyone changes.
        states = {mid: self._state_of(d) for mid, d in decisions.items() if d.copies_state}
        for mid in sorted(decisions):
            d = decisions[mid]
            if d.action in ("exploit", "explore"):
                self.apply(d, states.get(mid))

    def _state_of(self, d: Decision) -> Any:
        if not d.copies_state:
            return None
        assert d.donor is not None
        return copy.deepcopy(self.trainables[d.donor].state_dict())

    def apply(self, d: Decision, state: Any, kind: str | None = None) -> Event:
        """Applies a decision to the member's trainable and records its lineage event."""
        current = self.trainables.get(d.member)
        if current is None:
            current = build_member(self.experiment, d.member, d.hparams or {})
        self.trainables[d.member] = apply_decision(self.experiment, current, d, state)
        event = event_from_decision(self.next_event, d, kind)
        self.next_event += 1
        self.pending_events.append(event)
        return event


class _SerialRun:
    """Runs one stored run in this process: claims it, restores it, trains it, commits ticks."""

    def __init__(
        self,
        experiment: Experiment,
        storage: Storage,
        name: str,
        checkpoints: CheckpointBackend,
        options: RunOptions,
    ) -> None:
        self.exp, self.storage, self.name = experiment, storage, name
        self.ckpts, self.options = checkpoints, options
        self.worker = new_worker_id()
        self.rows: dict[int, MemberRow] = {}
        self.failures = 0
        self.max_failures = options.max_failures or 2 * experiment.population_size
        self._stop_heartbeat = threading.Event()

    def _claim_all(self) -> PBT:
        with self.storage.transaction(self.name) as tx:
            info = tx.run()
            rows = tx.members()
            t = now()
            for r in rows:
                if r.owner not in (None, self.worker) and owner_alive(
                    r.owner, r.heartbeat, self.options.heartbeat_timeout, t
                ):
                    raise StorageError(
                        f"Run {self.name!r} is being trained by another worker ({r.owner}, "
                        f"heartbeat {t - (r.heartbeat or t):.0f} s ago). Stop it first, or wait "
                        f"{self.options.heartbeat_timeout:.0f} s after it died."
                    )
            pbt = controller_from(self.exp, info, rows)
            mine = {"owner": self.worker, "heartbeat": t}
            claimed = member_rows(pbt, {r.id: r for r in rows}, {r.id: mine for r in rows})
            tx.put_members(claimed)
            tx.set_status("running")
            self.rows = {r.id: r for r in claimed}
            self.first_event = tx.event_count()
        return pbt

    def _restore(self, pbt: PBT) -> dict[int, Trainable]:
        trainables: dict[int, Trainable] = {}
        for mid, m in pbt.members.items():
            if m.status in ("running", "waiting"):
                trainables[mid] = self._rebuild(mid, m.hparams)
        return trainables

    def _rebuild(self, mid: int, hparams: Any) -> Trainable:
        """A member's trainable as of its last committed checkpoint (fresh if it has none)."""
        trainable = build_member(self.exp, mid, hparams)
        row = self.rows.get(mid)
        if row is not None and row.checkpoint is not None:
            trainable.load_state_dict(self.ckpts.load(row.checkpoint))
            trainable.set_hparams(hparams)
        return trainable

    def _heartbeat(self) -> None:
        interval = self.options.heartbeat_timeout / 4
        while not self._stop_heartbeat.wait(interval):
            with contextlib.suppress(Exception):  # a missed beat is retried
                self.storage.heartbeat(self.name, self.worker, now())

    def run(self) -> None:
        pbt = self._claim_all()
        loop = Lockstep(
            self.exp,
            pbt,
            self._restore(pbt),
            on_tick=self._commit,
            on_failure=self._on_failure,
            first_event_index=self.first_event,
        )
        self.loop = loop
        beat = None
        if not self.storage.display_url.startswith("memory://"):
            beat = threading.Thread(target=self._heartbeat, name="poptune-heartbeat", daemon=True)
            beat.start()
        try:
            loop.run()
        except BaseException as exc:
            self._release("failed" if isinstance(exc, RunFailed) else "interrupted", exc)
            raise
        finally:
            self._stop_heartbeat.set()
            if beat is not None:
                beat.join(timeout=5)
        self._release("completed", None)

    def _release(self, status: str, exc: BaseException | None) -> None:
        error = None if exc is None or isinstance(exc, KeyboardInterrupt) else str(exc)
        try:
            with self.storage.transaction(self.name) as tx:
                release_held(tx, self.worker.__eq__)
                tx.set_status(status, error)
        except Exception:
            if exc is None:
                raise

    # -- committing ticks ------------------------------------------------------------------------

    def _commit(self, history: list[HistoryRecord], events: list[Event]) -> None:
        pbt, loop = self.loop.controller, self.loop
        saved: dict[int, Any] = {}
        changed = {h.member for h in history} | {e.member for e in events}
        for mid in sorted(changed):
            m = pbt.members[mid]
            if m.status == "failed" or mid not in loop.trainables:
                continue
            saved[mid] = self.ckpts.save(self.name, mid, m.step, loop.trainables[mid].state_dict())
        doomed: list[str] = []
        with self.storage.transaction(self.name) as tx:
            stored = {r.id: r for r in tx.members()}
            for mid, r in stored.items():
                if r.owner not in (None, self.worker):
                    raise StorageError(
                        f"Member {mid} of run {self.name!r} was claimed by another worker "
                        f"({r.owner}): two processes are training this run."
                    )
            changes: dict[int, dict[str, Any]] = {}
            for mid, info in saved.items():
                tx.add_checkpoint(mid, pbt.members[mid].step, info.location, info.size)
                changes[mid] = {
                    "checkpoint": info.location,
                    "checkpoint_step": pbt.members[mid].step,
                    "attempts": 0,
                    "owner": self.worker,
                    "heartbeat": now(),
                }
            rows = member_rows(pbt, self.rows, changes)
            write_population(tx, pbt, rows)
            tx.add_results([ResultRow(h.member, h.step, h.score, h.metrics) for h in history])
            tx.add_events([e.to_dict() for e in events])
            doomed = retention(tx, self.options.keep_checkpoints, rows)
            self.rows = {r.id: r for r in rows}
        for location in doomed:
            self.ckpts.delete(location)

    # -- failures --------------------------------------------------------------------------------

    def _on_failure(self, mid: int, exc: BaseException) -> None:
        pbt, loop = self.loop.controller, self.loop
        m = pbt.members[mid]
        row = self.rows[mid]
        attempt = row.attempts + 1
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.failures += 1
        with self.storage.transaction(self.name) as tx:
            tx.add_failure(FailureRow(mid, m.step, attempt, text, now()))
        self.rows[mid] = replace(row, attempts=attempt)
        if self.failures > self.max_failures:
            raise RunFailed(
                f"Run {self.name!r} stopped: {self.failures} failures in user code (more than "
                f"max_failures={self.max_failures}). Last one, member {mid} at step {m.step}:\n"
                f"{text}"
            ) from exc
        if attempt <= self.options.max_retries:
            self._retry(mid)
            return
        # Out of retries: the member fails and a copy of a top member takes its place.
        loop.trainables.pop(mid, None)
        d = pbt.replace(mid)
        state = self.loop._state_of(d) if d.copies_state else None
        loop.apply(d, state, kind="replace")

    def _retry(self, mid: int) -> None:
        """Restores the member from its last checkpoint and replays it up to its step.

        A failure during the replay counts as another attempt (and so, in the end, fails and
        replaces the member like any other).
        """
        m = self.loop.controller.members[mid]
        row = self.rows.get(mid)
        start = row.checkpoint_step if row is not None and row.checkpoint_step is not None else 0
        try:
            trainable = self._rebuild(mid, m.hparams)
            for _ in range(max(0, m.step - start)):
                trainable.step()
        except Exception as exc:
            self._on_failure(mid, exc)
            return
        self.loop.trainables[mid] = trainable


def run_serial(
    experiment: Experiment,
    storage: Storage,
    name: str,
    checkpoints: CheckpointBackend,
    options: RunOptions,
) -> None:
    """Trains a prepared run in this process until every member is finished or failed."""
    _SerialRun(experiment, storage, name, checkpoints, options).run()
