"""The in-process runner: the whole population in this process, stepped in lockstep.

Every tick, each running member trains one step and reports its score; then each member that
reached a ready point is judged, in id order, against the others' scores *at this same step*,
and an exploiting member copies its donor's state as it is now. Copying a donor's state from
its previous ready point instead (``interval`` steps stale) measurably ruins PBT on the paper's
toy problem (see ``examples/toy_quadratic.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from poptune.controller import PBT, Decision
from poptune.execution.common import (
    apply_decision,
    build_member,
    event_from_decision,
    read_metrics,
)
from poptune.result import Event, HistoryRecord, MemberRecord, Result
from poptune.trainable import Trainable

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = ["Lockstep", "run_in_process"]


class Lockstep:
    """Steps a population in lockstep and applies decisions; the loop of the serial runners.

    Args:
        experiment: The configuration.
        controller: The decision logic, possibly restored from a snapshot.
        trainables: Each running member's trainable, by id.
        on_tick: Called after each tick in which any member was judged or finished, with the
            tick's history records and events; the persistent runner commits there.
    """

    def __init__(
        self,
        experiment: Experiment,
        controller: PBT,
        trainables: dict[int, Trainable],
        on_tick: Callable[[list[HistoryRecord], list[Event]], None] | None = None,
        first_event_index: int = 0,
    ) -> None:
        self.experiment = experiment
        self.controller = controller
        self.trainables = trainables
        self.on_tick = on_tick
        self.history: list[HistoryRecord] = []
        self.events: list[Event] = []
        self._next_event = first_event_index

    def run(self) -> None:
        exp, pbt, members = self.experiment, self.controller, self.controller.members
        metric = exp.metric
        pending_history: list[HistoryRecord] = []
        while True:
            active = [m for m in members.values() if m.status == "running"]
            if not active:
                break
            for m in active:
                metrics, score = read_metrics(self.trainables[m.id].step(), metric)
                step = m.step + 1
                pbt.report(m.id, step, score)
                pending_history.append(HistoryRecord(m.id, step, metrics, score))
            judged = [m.id for m in active if pbt.is_ready(m.id) or m.step >= exp.steps]
            if not judged:
                continue
            tick_events = self._judge(judged)
            self.history.extend(pending_history)
            if self.on_tick is not None:
                self.on_tick(pending_history, tick_events)
            pending_history = []
        if pending_history:
            self.history.extend(pending_history)
            if self.on_tick is not None:
                self.on_tick(pending_history, [])

    def _judge(self, judged: list[int]) -> list[Event]:
        pbt = self.controller
        tick_events: list[Event] = []
        if not pbt.synchronous:
            # Asynchronous: each decision sees the population as the previous ones left it.
            for mid in judged:
                d = pbt.decide(mid)
                if d.action in ("exploit", "explore"):
                    state = self._state_of(d)
                    tick_events.append(self._apply(d, state))
            return tick_events
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
                tick_events.append(self._apply(d, states.get(mid)))
        return tick_events

    def _state_of(self, d: Decision) -> Any:
        if not d.copies_state:
            return None
        assert d.donor is not None  # noqa: S101 (internal invariant)
        return copy.deepcopy(self.trainables[d.donor].state_dict())

    def _apply(self, d: Decision, state: Any) -> Event:
        self.trainables[d.member] = apply_decision(
            self.experiment, self.trainables[d.member], d, state
        )
        event = event_from_decision(self._next_event, d)
        self._next_event += 1
        self.events.append(event)
        return event


def run_in_process(experiment: Experiment, name: str = "run") -> Result:
    """Runs ``experiment`` in this process, in memory."""
    pbt = experiment.controller()
    initial = {mid: dict(m.hparams) for mid, m in pbt.members.items()}
    trainables = {mid: build_member(experiment, mid, hp) for mid, hp in initial.items()}
    loop = Lockstep(experiment, pbt, trainables)
    loop.run()
    return Result(
        name=name,
        mode=experiment.mode,
        metric=experiment.metric,
        initial_hparams=initial,
        members=final_members(pbt),
        history=loop.history,
        events=loop.events,
    )


def final_members(pbt: PBT) -> list[MemberRecord]:
    return [
        MemberRecord(m.id, dict(m.hparams), m.step, m.score, m.status, m.replaces)
        for m in sorted(pbt.members.values(), key=lambda m: m.id)
    ]
