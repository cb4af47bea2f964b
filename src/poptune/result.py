"""What a run leaves: members, history, lineage events, and schedules read from them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poptune.replay import Replay

__all__ = ["Event", "HistoryRecord", "MemberRecord", "Result", "ScheduleStep", "StateAccess"]


@dataclass(frozen=True)
class MemberRecord:
    """A member's final record.

    Attributes:
        id: Member id.
        hparams: Its hyperparameters at the end.
        step: Its step at the end.
        score: Its latest score (as reported, not oriented).
        status: running, finished, failed (an interrupted run's unfinished members stay
            running; `poptune status` and reports show them as stopped).
        replaces: The failed member it replaced, if any.
    """

    id: int
    hparams: Mapping[str, Any]
    step: int
    score: float | None
    status: str
    replaces: int | None = None

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MemberRecord:
        """The record of a member from its stored state (`poptune.MemberState.to_dict`)."""
        score = state.get("score")
        return cls(
            id=int(state["id"]),
            hparams=dict(state.get("hparams") or {}),
            step=int(state.get("step") or 0),
            score=None if score is None else float(score),
            status=str(state.get("status", "?")),
            replaces=state.get("replaces"),
        )


@dataclass(frozen=True)
class HistoryRecord:
    """One step of one member: the metrics its `step()` returned and the score read from them.

    Attributes:
        member: The member that trained the step.
        step: The step (the member's step count after it).
        metrics: What ``step()`` returned.
        score: The metric that is the score (NaN when non-finite values were returned).
        segment: Which stretch of the member's life the step belongs to: the index of the
            lineage event (exploit, explore, replace) that began it, or None for the member's
            initial stretch. The hyperparameters in force are that event's ``new_hparams``
            (`Result.hparams_at`).
        device: The device of the worker that trained it (``devices=`` of `Experiment.run`),
            None when none was given.
    """

    member: int
    step: int
    metrics: Mapping[str, float]
    score: float
    segment: int | None = None
    device: str | None = None


@dataclass(frozen=True)
class Event:
    """One exploit or explore, in the order they happened.

    Attributes:
        index: Position in the run's lineage (0, 1, 2...).
        member: The member that changed.
        step: Its step when judged.
        donor: The member whose state and hyperparameters it took (itself for an explore only,
            None for a fresh replacement).
        donor_step: Step of the donor's state it loaded.
        old_hparams: Its hyperparameters before.
        new_hparams: Its hyperparameters after.
        operations: What explore did to each hyperparameter it touched.
        kind: ``"exploit"``, ``"explore"``, ``"replace"``, or ``"rollback"``: the state the
            member stood on was damaged or missing, and it went back to the checkpoint
            ``donor`` saved at ``donor_step`` (its own previous one, or that of the member
            whose file it had copied; ``donor`` None: from scratch), keeping its
            hyperparameters. That file holds the donor's state as it trained it to that step,
            before any decision made there. ``step`` is the step it went back to.
    """

    index: int
    member: int
    step: int
    donor: int | None
    donor_step: int | None
    old_hparams: Mapping[str, Any]
    new_hparams: Mapping[str, Any]
    operations: Mapping[str, str] = field(default_factory=dict)
    kind: str = "exploit"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data (how storages and exports keep an event)."""
        # Spelled out: dataclasses.asdict deep-copies recursively, several times slower, and
        # every exploit of a run goes through here.
        return {
            "index": self.index,
            "member": self.member,
            "step": self.step,
            "donor": self.donor,
            "donor_step": self.donor_step,
            "old_hparams": dict(self.old_hparams),
            "new_hparams": dict(self.new_hparams),
            "operations": dict(self.operations),
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """The event `to_dict` described."""
        return cls(**{f: data[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ScheduleStep:
    """The hyperparameters that produced ``step``, and the ancestor that trained it."""

    step: int
    member: int
    hparams: Mapping[str, Any]


@dataclass(frozen=True)
class StateAccess:
    """Where a run's member states are: each member's current checkpoint location, the store
    that reads them (or a function returning it, opened when first needed), how to build
    a member (the experiment, or the ``FILE.py:NAME`` it was loaded from), and the storage
    the run is kept in (a URL or a `poptune.storage.base.Storage`; `Result.replay` records
    there), and how it was last executed (`poptune.storage.base.RunInfo.execution`: its
    workers, for the threads a member gets outside them)."""

    locations: Mapping[int, str | None]
    store: Any = None
    experiment: Any = None
    source: str | None = None
    storage: Any = None
    execution: Mapping[str, Any] = field(default_factory=dict)

    def opened(self) -> Any:
        store = self.store
        if store is not None and not hasattr(store, "load"):
            store = store()  # a factory: the run's checkpoint folder
        return store


@dataclass(frozen=True)
class Result:
    """Everything a run produced. Returned by `Experiment.run` and by `poptune.load`.

    Attributes:
        name: The run's name.
        mode: ``"max"`` or ``"min"``.
        metric: The metric that is the score.
        initial_hparams: Each member's hyperparameters at step 0, by member id.
        members: Every member's final record, by id.
        history: One record per member per step, in the order they were trained.
        events: Every exploit and explore, in order.
    """

    name: str
    mode: str
    metric: str
    initial_hparams: Mapping[int, Mapping[str, Any]]
    members: Sequence[MemberRecord]
    history: Sequence[HistoryRecord]
    events: Sequence[Event]
    states: StateAccess | None = field(default=None, repr=False, compare=False)

    def load_state(self, member: int | None = None) -> Any:
        """A member's latest state, as its trainable's ``state_dict`` returned it: the weights
        (and optimizer, RNG...) of the best member by default. Read from the run's own
        checkpoints (an in-memory run's too).

        Raises:
            KeyError: No such member.
            ValueError: The member has no checkpoint (it never reached a ready point, or
                failed before), or this result has no access to the checkpoints.
        """
        record = self.best if member is None else self.member(member)
        if self.states is None or self.states.store is None:
            raise ValueError(
                f"Run {self.name!r}: this Result has no access to its checkpoints; read it "
                "with pt.load(storage, name) or use the one Experiment.run returned."
            )
        location = self.states.locations.get(record.id)
        if location is None:
            raise ValueError(
                f"Member {record.id} of run {self.name!r} has no checkpoint (it never reached "
                "a ready point, or failed before it did)."
            )
        return self.states.opened().load(location)

    def load_member(
        self,
        member: int | None = None,
        *,
        device: str | None = None,
        experiment: Any = None,
        threads: int | None = None,
    ) -> Any:
        """A member's trainable, ready to use: built with its hyperparameters (on ``device``
        for a `poptune.torch.TorchTrainable`), its latest state loaded, then its
        hyperparameters applied. The best member by default.

        It sets this process's torch threads (``torch.set_num_threads``, when torch is
        imported) as a worker process's are set, for the member it returns to train or
        evaluate here as it did in the run: ``threads``; else ``OMP_NUM_THREADS`` when the
        environment sets it; else the share of the cores each of the run's workers had (all
        of them for a run trained in one process). See `poptune.execution.threads`.

        Args:
            member: The member's id; the best member when None.
            device: Where to build it (``"cpu"``, ``"cuda:0"``); by default the member's own
                default.
            experiment: The `poptune.Experiment` that builds members; by default the one that
                ran (or, for `poptune.load`, the one its ``FILE.py:NAME`` source defines).
            threads: This process's torch threads from now on (>= 1); None: as said above.
        """
        from poptune.execution.lifecycle import build_member
        from poptune.execution.threads import member_threads, set_torch_threads
        from poptune.trainable import set_worker_device, worker_device

        record = self.best if member is None else self.member(member)
        state = self.load_state(record.id)
        exp = experiment or (self.states.experiment if self.states else None)
        if exp is None and self.states is not None and self.states.source:
            from poptune.execution.source import load_experiment

            exp = load_experiment(self.states.source)[0]
        if exp is None:
            raise ValueError(
                f"Run {self.name!r}: pass experiment= to build its members (it was not "
                "started from a file poptune can load again)."
            )
        _check_threads(threads)
        set_torch_threads(member_threads(threads, self.states.execution if self.states else {}))
        before = worker_device()
        set_worker_device(device if device is not None else before)
        try:
            trainable = build_member(exp, record.id, record.hparams)
            trainable.load_state_dict(state)
            trainable.set_hparams(record.hparams)
        finally:
            set_worker_device(before)
        return trainable

    def replay(
        self,
        member: int | None = None,
        *,
        experiment: Any = None,
        storage: Any = None,
        name: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> Replay:
        """Trains one fresh member from scratch along a member's schedule (the best member's
        by default), records it as a run of its own (``RUN-replay-mID``, in this run's
        storage unless ``storage`` says otherwise) and returns a `poptune.replay.Replay`:
        its score beside the original's, and its `Result`.

        The member is built by ``experiment`` (by default the one that ran, or the one its
        ``FILE.py:NAME`` source defines) with the seed of the schedule's root ancestor, or
        ``seed``, with the math-library threads the run's workers had, or ``threads``. See
        `poptune.replay.replay` for the arguments and the seed rule.

        Example:
            >>> replay = result.replay()  # doctest: +SKIP
            >>> print(replay)  # doctest: +SKIP
            Q (max) at step 200: original 1.19883 (run quad, member 1), replayed 1.19883 ...
        """
        from poptune.replay import replay

        return replay(
            self,
            member,
            experiment=experiment,
            storage=storage,
            name=name,
            seed=seed,
            device=device,
            threads=threads,
        )

    @property
    def best(self) -> MemberRecord:
        """The member with the best latest score (failed members excluded; NaN ranks worst)."""
        pool = [m for m in self.members if m.status != "failed"] or list(self.members)

        def key(m: MemberRecord) -> tuple[float, int]:
            s = m.score
            if s is None or not math.isfinite(s):
                return (math.inf, m.id)
            return (-s if self.mode == "max" else s, m.id)

        return min(pool, key=key)

    def hparams_at(self, record: HistoryRecord) -> Mapping[str, Any]:
        """The hyperparameters a history record was trained with (from its segment)."""
        if record.segment is None:
            return self.initial_hparams[record.member]
        return self.events[record.segment].new_hparams

    def member(self, member_id: int) -> MemberRecord:
        """The final record of one member."""
        for m in self.members:
            if m.id == member_id:
                return m
        raise KeyError(f"No member {member_id!r} in run {self.name!r}.")

    def schedule(self, member_id: int | None = None) -> list[ScheduleStep]:
        """The hyperparameters in force at every step along a member's ancestry.

        Walks back from the member's final state through every exploit that made it, so the
        schedule says, for each step ``1 .. final step``, which ancestor trained that step and
        with which hyperparameters: the schedule to replay from scratch.

        Args:
            member_id: The member; the best member when None.
        """
        out: list[ScheduleStep] = []
        for start, stop, member, hparams in self.schedule_segments(member_id):
            out.extend(ScheduleStep(s, member, hparams) for s in range(start, stop + 1))
        return out

    def schedule_segments(
        self, member_id: int | None = None
    ) -> list[tuple[int, int, int, Mapping[str, Any]]]:
        """`schedule` in stretches, oldest first: ``(first step, last step, ancestor,
        hyperparameters)`` for each stretch of the ancestry one ancestor trained with one set of
        hyperparameters (what a compact view shows; a stretch may be empty when an exploit came
        before the ancestor's first step).

        Args:
            member_id: The member; the best member when None.
        """
        if member_id is None:
            member_id = self.best.id
        end = self.member(member_id).step
        by_member: dict[int, list[Event]] = {}
        for ev in self.events:
            by_member.setdefault(ev.member, []).append(ev)
        segments: list[tuple[int, int, int, Mapping[str, Any]]] = []
        current, limit = member_id, len(self.events)
        while True:
            earlier = [ev for ev in by_member.get(current, []) if ev.index < limit]
            if not earlier:
                segments.append((0, end, current, self.initial_hparams[current]))
                break
            ev = earlier[-1]
            start = ev.donor_step if ev.donor_step is not None else 0
            segments.append((start, end, current, ev.new_hparams))
            if ev.donor is None:  # a fresh replacement: its ancestry starts here
                break
            current, end, limit = ev.donor, start, ev.index
        return [(start + 1, stop, member, hp) for start, stop, member, hp in reversed(segments)]

    def lineage(self, member_id: int | None = None) -> list[Event]:
        """The events that made a member's final state, oldest first."""
        if member_id is None:
            member_id = self.best.id
        chain: list[Event] = []
        current, limit = member_id, len(self.events)
        while True:
            earlier = [ev for ev in self.events if ev.member == current and ev.index < limit]
            if not earlier:
                break
            ev = earlier[-1]
            chain.append(ev)
            if ev.donor is None:
                break
            current, limit = ev.donor, ev.index
        return chain[::-1]


def _check_threads(threads: object) -> None:
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"`threads` must be None or an integer >= 1, but got {threads!r}.")
