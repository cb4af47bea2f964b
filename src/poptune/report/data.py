"""A run as plain data for its views: curves, lineage, schedule, population and summary.

Pure (no I/O, no plotting library): `build_report` turns a `poptune.Result` and the run's
stored record into a `Report` that every renderer (inline SVG for HTML, matplotlib for PNG,
the dashboard) draws from. `read_report` reads one from a storage, for a finished, a running or
a crashed run alike: it only reads.

A member's life is a sequence of *stretches*: the steps it trained between two lineage events
(history records share a ``segment``). A stretch that began with an exploit or a replacement
starts from the donor's state at ``donor_step``, so its curve starts at the donor's point there
(the jump). When ``donor_step`` is behind the step the member had reached, the new stretch is a
*branch* that overlaps the member's earlier steps; drawing each stretch on its own keeps that a
branch instead of a zigzag back along the step axis.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from poptune.result import Event, HistoryRecord, Result

if TYPE_CHECKING:
    from poptune.storage.base import FailureRow, RunInfo, Storage

__all__ = [
    "AncestryRun",
    "FailureNote",
    "HparamInfo",
    "MemberRow",
    "Report",
    "Stretch",
    "Summary",
    "build_report",
    "member_status",
    "read_report",
]

#: At most this many curve points are kept over all stretches; longer runs are thinned
#: evenly (first and last point of every stretch kept), so a view of a run with thousands of
#: rows per member stays light.
MAX_POINTS = 20_000


@dataclass(frozen=True)
class Stretch:
    """The steps one member trained between two lineage events.

    Attributes:
        member: The member.
        segment: Index of the event that began it (None: the member's initial stretch).
        kind: ``"initial"``, ``"exploit"``, ``"explore"`` or ``"replace"``.
        donor: The member whose state it started from (None for initial or fresh stretches).
        origin: ``(step, score)`` it starts from: the donor's point at the donor step for a
            copy, the member's own last point for an explore, None when unknown.
        steps: The steps trained (possibly thinned, first and last kept).
        scores: The score after each of them (NaN where non-finite).
        hparams: The hyperparameters in force.
        branch: It starts before the step the member had already reached (it went back).
        standing: How its last score ranked against the other members' scores at the same
            step, 1 the best and 0 the worst (NaN when unknown): relative fitness, which a
            raw score (rising for everyone over time) does not show.
    """

    member: int
    segment: int | None
    kind: str
    donor: int | None
    origin: tuple[int, float] | None
    steps: tuple[int, ...]
    scores: tuple[float, ...]
    hparams: Mapping[str, Any]
    branch: bool = False
    standing: float = math.nan

    @property
    def start(self) -> int:
        """The step it starts from (its origin's step, else one before its first step)."""
        if self.origin is not None:
            return self.origin[0]
        return self.steps[0] - 1 if self.steps else 0

    @property
    def end(self) -> int:
        return self.steps[-1] if self.steps else self.start

    @property
    def last_score(self) -> float:
        for s in reversed(self.scores):
            if math.isfinite(s):
                return s
        return math.nan


@dataclass(frozen=True)
class AncestryRun:
    """One piece of the best member's ancestry: ``member`` trained steps ``start+1 .. end``
    of it, in its stretch ``segment``, with ``hparams``."""

    member: int
    segment: int | None
    start: int
    end: int
    hparams: Mapping[str, Any]


@dataclass(frozen=True)
class HparamInfo:
    """How to draw a hyperparameter: its kind (float, int, choice), log axis, choices."""

    name: str
    kind: str = "float"
    log: bool = False
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int") or (
            bool(self.values) and all(_is_number(v) for v in self.values)
        )


@dataclass(frozen=True)
class MemberRow:
    """A row of the final population table."""

    id: int
    status: str
    step: int
    score: float | None
    rank: int | None
    hparams: Mapping[str, Any]
    copies: int  # exploits it made (it copied a donor)
    donated: int  # times another member copied it
    failures: int
    replaces: int | None


@dataclass(frozen=True)
class FailureNote:
    """One recorded exception: member, step, attempt and the traceback's last line."""

    member: int
    step: int
    attempt: int
    message: str
    final: bool  # the member failed for good (its status is failed)


@dataclass(frozen=True)
class Summary:
    """The run at a glance."""

    name: str
    status: str
    metric: str
    mode: str
    population: int
    steps: int
    member_steps: int  # history rows: every step trained, retrained ones included
    budget: int  # population * steps
    best_member: int | None
    best_score: float | None
    exploits: int
    explores: int
    replacements: int
    failures: int  # exceptions recorded
    failed_members: int  # members failed for good
    created: float
    updated: float
    wall_time: float  # seconds from creation to the last update (to now while running)
    error: str | None = None


@dataclass(frozen=True)
class Report:
    """Everything the views show, as plain data (see the module docstring)."""

    summary: Summary
    hparams: tuple[HparamInfo, ...]
    stretches: tuple[Stretch, ...]
    events: tuple[Event, ...]
    ancestry: tuple[AncestryRun, ...]
    members: tuple[MemberRow, ...]
    failures: tuple[FailureNote, ...]
    version: str = ""  # changes whenever the run does (dashboard refresh)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lanes(self) -> tuple[int, ...]:
        """Every member id that trained or exists, ascending: the lineage's lanes."""
        ids = {m.id for m in self.members} | {s.member for s in self.stretches}
        return tuple(sorted(ids))

    @property
    def better(self) -> int:
        """+1 when higher scores are better, -1 when lower are."""
        return 1 if self.summary.mode == "max" else -1

    def score_range(self) -> tuple[float, float] | None:
        """The smallest and largest finite score drawn, None without any."""
        values = [s for st in self.stretches for s in st.scores if math.isfinite(s)]
        values += [st.origin[1] for st in self.stretches if st.origin and _finite(st.origin[1])]
        if not values:
            return None
        return min(values), max(values)


#: Run statuses in which nothing trains: a member recorded as running there is stopped.
STOPPED_RUNS = frozenset({"interrupted", "failed"})


def member_status(status: str, run_status: str) -> str:
    """A member's status as views show it: ``stopped`` for a member recorded as ``running`` in
    a run that is interrupted or failed (nothing trains it; it goes on when the run is
    resumed), else as recorded. For display only: the stored state stays ``running``, which is
    what a resume continues from."""
    return "stopped" if status == "running" and run_status in STOPPED_RUNS else status


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _hparam_infos(space: Mapping[str, Any], result: Result) -> tuple[HparamInfo, ...]:
    names: list[str] = list(space)
    seen = set(names)
    for hp in [*result.initial_hparams.values(), *(m.hparams for m in result.members)]:
        for k in hp:
            if k not in seen:
                seen.add(k)
                names.append(k)
    out = []
    for name in names:
        d = space.get(name) or {}
        kind = str(d.get("kind", "float"))
        values = tuple(d.get("values") or ())
        out.append(
            HparamInfo(
                name=name,
                kind=kind,
                log=bool(d.get("log", False)),
                low=d.get("low"),
                high=d.get("high"),
                values=values,
            )
        )
    return tuple(out)


def _stretches(result: Result) -> list[Stretch]:
    events = list(result.events)
    history = list(result.history)
    # Records of one (member, segment), as history positions in training order; a step that
    # does not advance (a retrained step inside one segment) starts a new piece, so no curve
    # ever runs backwards.
    pieces: dict[int, list[tuple[int | None, list[int]]]] = {}
    # Every (member, step)'s records as (position, score): a donor's point at donor_step is
    # the last one it had before the copy, and position in history stands in for time.
    points: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for i, r in enumerate(history):
        own = pieces.setdefault(r.member, [])
        if own and own[-1][0] == r.segment and history[own[-1][1][-1]].step < r.step:
            own[-1][1].append(i)
        else:
            own.append((r.segment, [i]))
        points.setdefault((r.member, r.step), []).append((i, r.score))

    def point(member: int, step: int, before: int) -> tuple[int, float] | None:
        found = [score for i, score in points.get((member, step), ()) if i < before]
        return (step, found[-1]) if found else None

    # A member that copied a donor ahead of it reached the donor's step without training it:
    # it has no point there, its donor's point stands for it.
    copies: dict[int, list[Event]] = {}
    for e in events:
        if e.donor is not None and e.donor != e.member and e.donor_step is not None:
            copies.setdefault(e.member, []).append(e)

    def point_at(member: int, step: int, before: int, limit: int) -> tuple[int, float] | None:
        """The member's point at ``step`` (records before position ``before``), else, if it
        reached ``step`` by a copy (one of its events below index ``limit``), its donor's."""
        for _ in range(len(events) + 1):  # each hop goes to an earlier event
            found = point(member, step, before)
            if found is not None:
                return found
            via = [e for e in copies.get(member, ()) if e.index < limit and e.donor_step == step]
            if not via:
                return None
            assert via[-1].donor is not None
            member, limit = via[-1].donor, via[-1].index
        return None

    latest: dict[int, dict[int, float]] = {}  # step -> member -> its latest score there
    for r in history:
        latest.setdefault(r.step, {})[r.member] = r.score
    sign = 1.0 if result.mode == "max" else -1.0

    def standing(member: int, step: int, score: float) -> float:
        if not math.isfinite(score):
            return math.nan
        others = [v for m, v in latest.get(step, {}).items() if m != member]
        if not others:
            return math.nan
        worse = sum(1 for v in others if not math.isfinite(v) or sign * v < sign * score)
        ties = sum(1 for v in others if math.isfinite(v) and v == score)
        return (worse + 0.5 * ties) / len(others)

    stride = max(1, math.ceil(len(history) / MAX_POINTS))
    out: list[Stretch] = []
    for member, own in sorted(pieces.items()):
        reached = 0
        for segment, positions in own:
            records = [history[i] for i in positions]
            ev = events[segment] if segment is not None and segment < len(events) else None
            origin: tuple[int, float] | None = None
            if (
                ev is not None
                and ev.donor_step is not None
                and records[0].step == ev.donor_step + 1
            ):
                source = ev.donor if ev.donor is not None else member
                origin = point_at(source, ev.donor_step, positions[0], ev.index)
                if origin is None and ev.donor_step > 0:
                    origin = (ev.donor_step, math.nan)
            elif records[0].step > 1:
                # Retrained steps inside a segment, or a copy whose first steps are not
                # stored: from the member's own previous point.
                origin = point(member, records[0].step - 1, positions[0])
            start = origin[0] if origin is not None else records[0].step - 1
            kept = records if stride == 1 else _thin(records, stride)
            try:
                hparams = result.hparams_at(records[0])
            except (KeyError, IndexError):  # a record read before its event (running run)
                hparams = {}
            out.append(
                Stretch(
                    member=member,
                    segment=segment,
                    kind="initial" if ev is None else ev.kind,
                    donor=None if ev is None else ev.donor,
                    origin=origin,
                    steps=tuple(r.step for r in kept),
                    scores=tuple(r.score if math.isfinite(r.score) else math.nan for r in kept),
                    hparams=dict(hparams),
                    branch=start < reached,
                    standing=standing(member, records[-1].step, records[-1].score),
                )
            )
            reached = max(reached, records[-1].step)
    return out


def _thin(records: Sequence[HistoryRecord], stride: int) -> list[HistoryRecord]:
    kept = list(records[::stride])
    if kept[-1] is not records[-1]:
        kept.append(records[-1])
    return kept


def _ancestry(result: Result, member: int) -> list[AncestryRun]:
    """The stretches along ``member``'s ancestry, oldest first (as `Result.schedule` walks)."""
    by_member: dict[int, list[Event]] = {}
    for ev in result.events:
        by_member.setdefault(ev.member, []).append(ev)
    runs: list[AncestryRun] = []
    current, limit, end = member, len(result.events), result.member(member).step
    while True:
        earlier = [ev for ev in by_member.get(current, []) if ev.index < limit]
        if not earlier:
            hp = result.initial_hparams.get(current, {})
            runs.append(AncestryRun(current, None, 0, end, dict(hp)))
            break
        ev = earlier[-1]
        start = ev.donor_step if ev.donor_step is not None else 0
        runs.append(AncestryRun(current, ev.index, start, end, dict(ev.new_hparams)))
        if ev.donor is None:  # a fresh replacement: its ancestry starts here
            break
        current, end, limit = ev.donor, start, ev.index
    kept = [r for r in reversed(runs) if r.end > r.start]
    return kept or runs[:1]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def build_report(
    result: Result,
    info: RunInfo | None = None,
    failures: Sequence[FailureRow] = (),
    *,
    now: float | None = None,
) -> Report:
    """The `Report` of a run.

    Args:
        result: The run's result (`poptune.load` reads one from a storage).
        info: The run's stored record (status, configuration, times); None for a run that was
            never stored (then the status is ``finished`` and the configuration is unknown).
        failures: The exceptions recorded for the run.
        now: The time a running run's wall time is measured to (default: now).
    """
    cfg: Mapping[str, Any] = info.config if info is not None else {}
    status = info.status if info is not None else "finished"
    population = int(cfg.get("population_size") or len(result.members))
    steps = int(cfg.get("steps") or max((m.step for m in result.members), default=0))
    best = result.best if result.members else None
    stretches = _stretches(result)
    failed = {m.id for m in result.members if m.status == "failed"}
    kinds = [ev.kind for ev in result.events]
    created = info.created if info is not None else 0.0
    updated = info.updated if info is not None else 0.0
    end = (time.time() if now is None else now) if status == "running" else updated
    failure_count: dict[int, int] = {}
    for f in failures:
        failure_count[f.member] = failure_count.get(f.member, 0) + 1
    copies: dict[int, int] = {}
    donated: dict[int, int] = {}
    for ev in result.events:
        if ev.kind in ("exploit", "replace") and ev.donor is not None and ev.donor != ev.member:
            copies[ev.member] = copies.get(ev.member, 0) + 1
            donated[ev.donor] = donated.get(ev.donor, 0) + 1
    sign = -1.0 if result.mode == "max" else 1.0
    ranked = sorted(
        (m for m in result.members if m.status != "failed" and _finite(m.score)),
        key=lambda m: (sign * float(m.score or 0.0), m.id),
    )
    rank = {m.id: i + 1 for i, m in enumerate(ranked)}
    members = tuple(
        MemberRow(
            id=m.id,
            status=member_status(m.status, status),
            step=m.step,
            score=m.score,
            rank=rank.get(m.id),
            hparams=dict(m.hparams),
            copies=copies.get(m.id, 0),
            donated=donated.get(m.id, 0),
            failures=failure_count.get(m.id, 0),
            replaces=m.replaces,
        )
        for m in result.members
    )
    summary = Summary(
        name=result.name,
        status=status,
        metric=result.metric,
        mode=result.mode,
        population=population,
        steps=steps,
        member_steps=len(result.history),
        budget=population * steps,
        best_member=best.id if best is not None else None,
        best_score=best.score if best is not None else None,
        exploits=kinds.count("exploit"),
        explores=kinds.count("explore"),
        replacements=kinds.count("replace"),
        failures=len(failures),
        failed_members=len(failed),
        created=created,
        updated=updated,
        wall_time=max(0.0, end - created) if info is not None else 0.0,
        error=_last_line(info.error) if info is not None and info.error else None,
    )
    version = "|".join(
        [
            status,
            str(len(result.history)),
            str(len(result.events)),
            str(len(failures)),
            ",".join(f"{m.id}:{m.step}:{m.score}:{m.status}" for m in result.members),
        ]
    )
    return Report(
        summary=summary,
        hparams=_hparam_infos(cfg.get("space") or {}, result),
        stretches=tuple(stretches),
        events=tuple(result.events),
        ancestry=tuple(_ancestry(result, best.id)) if best is not None else (),
        members=members,
        failures=tuple(
            FailureNote(f.member, f.step, f.attempt, _last_line(f.traceback), f.member in failed)
            for f in failures
        ),
        version=_digest(version),
    )


def run_version(store: Storage, name: str) -> str:
    """A cheap fingerprint of a run's progress (status and every member's step and score):
    it changes whenever the run's report would. Reads only the run's record and members."""
    info = store.get_run(name)
    if info is None:
        return ""
    rows = store.members(name)
    parts = [info.status, str(info.updated)]
    parts += [
        f"{r.id}:{r.state.get('step')}:{r.state.get('score')}:{r.state.get('status')}" for r in rows
    ]
    return _digest("|".join(parts))


def read_report(store: Storage, name: str, *, now: float | None = None) -> Report:
    """The `Report` of run ``name`` in ``store``, read now (the run may be running).

    Raises:
        poptune.storage.base.StorageError: No such run.
    """
    from poptune.execution.session import load_result
    from poptune.storage.base import StorageError

    # The version is read first: if the run moves on while it is read, the report carries
    # an older version than its content and a dashboard reads it again, never the reverse.
    version = run_version(store, name)
    info = store.get_run(name)
    if info is None:
        raise StorageError(f"No run named {name!r} in {store.display_url}.")
    result = load_result(store, name)
    report = build_report(result, info, store.failures(name), now=now)
    return _with_version(report, version)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _with_version(report: Report, version: str) -> Report:
    from dataclasses import replace

    return replace(report, version=version)
