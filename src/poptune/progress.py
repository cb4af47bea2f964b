"""A live view of a run, read from its storage: what ``poptune run`` shows while it trains.

`RunProgress` reads a run through its own storage object (so it can live in a background
thread while the training owns the main thread) and renders it with rich: a header with the
run's name, member-steps trained against the budget, exploits, failures, elapsed and estimated
remaining time; a table of members; the best member's schedule so far; and the latest
exploits, as ``member 3 <- member 7 at step 120: lr 0.012 -> 0.0096`` (what explore changed in
the donor's hyperparameters).
`ProgressDisplay` drives it: a rich ``Live`` view on a terminal (and in a Jupyter notebook, in the
cell), a plain line every few seconds elsewhere (logs: no control codes), or nothing.
`Experiment.run` shows it by default on a terminal or in a notebook (``progress=``).

What the view says before the first ready point: nothing is committed until a member reaches
one, which may take minutes; the view says what is happening meanwhile (`RunProgress.activity`:
``starting 2 workers``, ``training: 8 members claimed, no ready point yet``) with the time
elapsed, and "estimating" in place of a remaining time. The remaining time (`estimate_remaining`)
is the member-steps left over the rate at which this execution has committed member-steps since
its workers began to train: a resumed run's earlier executions, the time it was stopped, and
the workers' start-up do not count.

Example:
    >>> from rich.console import Console
    >>> view = RunProgress("sqlite:///poptune.db", "toy_quadratic")  # doctest: +SKIP
    >>> Console().print(view.render())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from poptune.result import Event, MemberRecord, Result

if TYPE_CHECKING:
    from rich.live import Live

    from poptune.storage.base import MemberRow, RunInfo, Storage

__all__ = [
    "ProgressDisplay",
    "RunProgress",
    "Snapshot",
    "best_member",
    "compact_schedule",
    "describe_event",
    "estimate_remaining",
    "format_changes",
    "format_duration",
    "format_hparams",
    "format_score",
    "progress_mode",
]


def format_score(score: float | None) -> str:
    """A score in at most 6 significant digits; ``-`` when there is none yet."""
    if score is None:
        return "-"
    return f"{score:.6g}"


def format_value(value: Any) -> str:
    """A hyperparameter value, compactly: floats in 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_hparams(hparams: Mapping[str, Any]) -> str:
    """``name=value`` pairs separated by spaces, floats in 4 significant digits."""
    return " ".join(f"{k}={format_value(v)}" for k, v in hparams.items())


def format_duration(seconds: float, *, spaced: bool = False) -> str:
    """``12.3s``, ``4m05s`` or ``2h07m``; ``spaced``: ``12.3 s``, ``4 min 05 s``, ``2 h 07 min``."""
    s, m, h, gap = (" s", " min", " h", " ") if spaced else ("s", "m", "h", "")
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}{s}"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}{m}{gap}{secs:02d}{s}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}{h}{gap}{minutes:02d}{m}"


def best_member(info: RunInfo, rows: Sequence[MemberRow]) -> MemberRecord | None:
    """The best member by the rule of `poptune.Result.best`, from stored rows; None if empty."""
    if not rows:
        return None
    records = [MemberRecord.from_state(r.state) for r in rows]
    cfg = info.config
    view = Result(
        name=info.name,
        mode=str(cfg.get("mode", "max")),
        metric=str(cfg.get("metric", "score")),
        initial_hparams={},
        members=records,
        history=[],
        events=[],
    )
    return view.best


def format_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """``lr 0.012 -> 0.0096, batch 32 -> 64``: the hyperparameters whose value changed (as
    shown: a change too small for 4 significant digits is left out)."""
    pairs = ((k, format_value(before.get(k)), format_value(v)) for k, v in after.items())
    return ", ".join(f"{k} {old} -> {new}" for k, old, new in pairs if old != new)


def describe_event(event: Event, donor_hparams: Mapping[str, Any] | None) -> str:
    """One line for a lineage event, e.g. ``member 3 <- member 7 at step 120: lr 0.012 ->
    0.0096``: who copied whom at which step, and what explore changed in the hyperparameters
    it took (``donor_hparams``, the donor's at the time; the member's own for an explore).
    """
    if event.kind == "schedule":  # a replay switching hyperparameters (poptune.replay)
        head = f"member {event.member} follows its schedule at step {event.step}"
        changes = format_changes(event.old_hparams, event.new_hparams)
    elif event.kind == "explore" or event.donor == event.member:
        head = f"member {event.member} explores at step {event.step}"
        changes = format_changes(event.old_hparams, event.new_hparams)
    elif event.donor is None:
        head = f"member {event.member} (new) at step {event.step}"
        changes = format_hparams(event.new_hparams)
    else:
        who = "replacement " if event.kind == "replace" else ""
        head = f"{who}member {event.member} <- member {event.donor} at step {event.step}"
        if event.donor_step is not None and event.donor_step != event.step:
            head += f" (member {event.donor}'s step {event.donor_step})"
        changes = format_changes(donor_hparams or {}, event.new_hparams)
    return f"{head}: {changes or 'no change'}"


def compact_schedule(
    segments: Sequence[tuple[int, int, int, Mapping[str, Any]]], last: int = 4
) -> str:
    """``1-8 h0=1 h1=0 | 9-40 h0=0.93 | 41-200 h1=0.12``: the stretches of a schedule
    (`poptune.Result.schedule_segments`) with their hyperparameters, the first shown in full
    and the others by what changed; stretches with equal hyperparameters merged; only the
    ``last`` ones, after a count of the earlier."""
    merged: list[list[Any]] = []
    for first, end, _, hparams in segments:
        if end < first:
            continue
        if merged and merged[-1][2] == dict(hparams):
            merged[-1][1] = end
        else:
            merged.append([first, end, dict(hparams)])
    if not merged:
        return ""
    shown = merged[-last:]
    parts = []
    previous: Mapping[str, Any] | None = None
    for first, end, hparams in shown:
        span = f"{first}-{end}" if end > first else f"{first}"
        if previous is None:
            text = format_hparams(hparams)
        else:
            text = " ".join(
                f"{k}={format_value(v)}" for k, v in hparams.items() if previous.get(k) != v
            )
        parts.append(f"{span} {text}".rstrip())
        previous = hparams
    earlier = len(merged) - len(shown)
    return (f"({earlier} earlier) " if earlier else "") + " | ".join(parts)


@dataclass(frozen=True)
class Snapshot:
    """What `RunProgress` last read of a run.

    Attributes:
        info: The run's record; None while the run does not exist yet.
        members: Its members' rows.
        exploits: Events of kind ``exploit``.
        events: Events of every kind.
        failures: Exceptions recorded from user code.
        taken: ``time.monotonic()`` when it was read.
        trained: Member-steps committed (results recorded, retrained steps included).
        recent: The latest lineage events as lines (`describe_event`), oldest first.
        schedule: The best member's schedule so far, compactly (`compact_schedule`).
        claimed: Members a worker holds now (an owner in their row).
    """

    info: RunInfo | None
    members: tuple[MemberRow, ...] = ()
    exploits: int = 0
    events: int = 0
    failures: int = 0
    taken: float = 0.0
    trained: int = 0
    recent: tuple[str, ...] = ()
    schedule: str = ""
    claimed: int = 0

    @property
    def budget(self) -> int:
        """Member-steps the run is to train: ``population * steps``."""
        return self.population * self.steps

    @property
    def population(self) -> int:
        if self.info is None:
            return 0
        return int(self.info.config.get("population_size") or len(self.members) or 1)

    @property
    def steps(self) -> int:
        if self.info is None:
            return 0
        return int(self.info.config.get("steps") or 1)

    @property
    def fraction(self) -> float:
        """Steps trained over ``population * steps``, failed members left out, in [0, 1]."""
        if self.info is None:
            return 0.0
        done = sum(
            min(int(r.state.get("step") or 0), self.steps)
            for r in self.members
            if r.state.get("status") != "failed"
        )
        return min(1.0, done / max(1, self.population * self.steps))


def in_flight(snap: Snapshot) -> int:
    """Member-steps the members held by workers now will commit at their next ready points:
    what the workers are training (each member's next ready point less its step)."""
    if snap.info is None:
        return 0
    from poptune.controller import ready_step

    cfg = snap.info.config
    interval, burn_in = int(cfg.get("interval") or 1), int(cfg.get("burn_in") or 0)
    return sum(
        ready_step(
            int(r.state["step"]), int(r.state.get("last_ready") or 0), interval, burn_in, snap.steps
        )
        - int(r.state["step"])
        for r in snap.members
        if r.owner is not None and r.state.get("status") == "running"
    )


def estimate_remaining(
    snap: Snapshot,
    origin: tuple[float, int] | None,
    first: tuple[float, int] | None = None,
    flight: int = 0,
) -> float | None:
    """Seconds left at the rate this execution commits member-steps; None while it cannot tell.

    ``origin`` is ``(time, trained)``: when this execution started (``time.monotonic()``) and
    how many member-steps the run had committed then. The rate is the member-steps committed
    since over the time since, so a resumed run's earlier executions, and the time it spent
    stopped, do not count, and neither does a run not started yet. None before this execution's
    first commit (a ready point): until then a number would be a guess, and a wild one.

    That rate is low at first: at any moment the members in training hold steps not committed
    yet (up to an ``interval`` each). ``first``, ``(time, trained)`` when this execution's
    first commit was seen, gives a better one once as much time has passed since it as before
    it (a stretch of training, for every worker to commit again): the member-steps committed
    since the first commit over the time since.

    Between the two, ``flight``, the member-steps the workers held when this execution's
    training began (`in_flight`), gives the rate from the first ready point on: they are what
    the workers trained until their first commits, in the time the first one took. (The
    committed steps alone count one worker's first batch against every worker's time: with 2
    workers that made the first estimate twice too long.)

    Example:
        >>> from poptune.storage.base import MemberRow, RunInfo
        >>> info = RunInfo("r", {"population_size": 2, "steps": 10}, "", "running", None, None,
        ...                0.0, 0.0)
        >>> rows = tuple(MemberRow({"id": i, "step": 5, "status": "running"}) for i in (0, 1))
        >>> snap = Snapshot(info, rows, taken=160.0, trained=10)
        >>> estimate_remaining(snap, (100.0, 0))  # 10 member-steps in 60 s, 10 to go
        60.0
    """
    if origin is None or snap.info is None:
        return None
    if snap.fraction >= 1.0:
        return 0.0
    t0, trained0 = origin
    done = snap.trained - trained0
    if done <= 0 or snap.taken <= t0:
        return None
    rate = done / (snap.taken - t0)
    if first is not None:
        t1, trained1 = first
        if snap.trained > trained1 and snap.taken - t1 >= t1 - t0 > 0:
            rate = (snap.trained - trained1) / (snap.taken - t1)
        elif flight > 0 and t1 > t0:
            rate = max(rate, flight / (t1 - t0))
    return snap.budget * (1.0 - snap.fraction) / rate


class RunProgress:
    """Reads run ``name`` from ``storage`` and renders it.

    Given a URL, it opens its own storage (`poptune.storage.open_storage`) on the first `poll`,
    so it may be used from a thread other than the one training; a `Storage` object (an
    in-memory run's) is read as it is (storages are safe to share between threads) and left
    open. Reading errors are swallowed: the view keeps its last snapshot (or shows "starting"
    until the run exists).

    Remaining time (`estimate_remaining`): at the rate of the member-steps committed since the
    view first saw a member claimed (the workers' start-up is a fixed cost, not a rate; when it
    saw none before a commit, since the view was made), counting only those committed after
    its first read; then, one stretch after the first commit, at the rate since that commit.
    Make it when the execution starts, before its workers.

    Args:
        storage: The run's storage URL, or the storage.
        name: The run's name.
        recent: How many of the latest lineage events the view shows.
    """

    def __init__(self, storage: str | Storage, name: str, *, recent: int = 5) -> None:
        self.storage_url = storage if isinstance(storage, str) else storage.display_url
        self.name = name
        self.recent = recent
        self.started = time.monotonic()
        self._borrowed = None if isinstance(storage, str) else storage
        self._store: Storage | None = self._borrowed
        self._snapshot: Snapshot | None = None
        # (when this execution started training, member-steps committed then): the first
        # read's count, and the time of the first read that saw a member claimed.
        self._origin: tuple[float, int] | None = None
        self._working = False
        self._flight = 0  # member-steps held by workers when training began (`in_flight`)
        self._first: tuple[float, int] | None = None  # when this execution's first commit was seen
        self._lock = threading.Lock()
        # Followed incrementally (`Storage.results` and `events` with start=): each record is
        # read once, not at every look.
        self._trained = 0
        self._events: list[Event] = []
        self._lines: list[str] = []
        self._hparams: dict[int, Mapping[str, Any]] = {}  # each member's, after the events read

    def poll(self) -> Snapshot:
        """Reads the run now; returns the new snapshot, or the last one if reading failed."""
        with self._lock:
            try:
                snap = self._read()
            except Exception:
                if self._store is not None and self._borrowed is None:
                    self._close_store()
                return self._snapshot or Snapshot(info=None, taken=time.monotonic())
            if snap.info is not None and self._origin is None:
                self._origin = (self.started, snap.trained)
            if (
                not self._working
                and self._origin is not None
                and snap.claimed
                and snap.trained == self._origin[1]
            ):
                # The workers are up: their start (spawning, importing torch) is a fixed cost,
                # not a rate that the rest of the run will go at.
                self._working = True
                self._origin = (snap.taken, snap.trained)
                self._flight = in_flight(snap)
            if self._first is None and self._origin and snap.trained > self._origin[1]:
                self._first = (snap.taken, snap.trained)
            self._snapshot = snap
            return snap

    def _read(self) -> Snapshot:
        if self._store is None:
            from poptune.storage import open_storage

            self._store = open_storage(self.storage_url)
        store = self._store
        info = store.get_run(self.name)
        if info is None:
            return Snapshot(info=None, taken=time.monotonic())
        members = tuple(store.members(self.name))
        initial = info.config.get("initial_population") or {}
        for data in store.events(self.name, start=len(self._events)):
            event = Event.from_dict(data)
            donor = None
            if event.donor is not None:
                donor = self._hparams.get(event.donor, initial.get(str(event.donor)))
            self._lines.append(describe_event(event, donor))
            self._hparams[event.member] = event.new_hparams
            self._events.append(event)
        self._trained += len(store.results(self.name, start=self._trained))
        return Snapshot(
            info=info,
            members=members,
            exploits=sum(1 for e in self._events if e.kind == "exploit"),
            events=len(self._events),
            failures=len(store.failures(self.name)),
            taken=time.monotonic(),
            trained=self._trained,
            recent=tuple(self._lines[-self.recent :]),
            schedule=self._schedule(info, members, initial),
            claimed=sum(1 for r in members if r.owner is not None),
        )

    def _schedule(
        self, info: RunInfo, members: Sequence[MemberRow], initial: Mapping[str, Any]
    ) -> str:
        best = best_member(info, members)
        if best is None or best.score is None:
            return ""
        view = Result(
            name=info.name,
            mode=str(info.config.get("mode", "max")),
            metric=str(info.config.get("metric", "score")),
            initial_hparams={int(k): v for k, v in initial.items()},
            members=[MemberRecord.from_state(r.state) for r in members],
            history=[],
            events=self._events,
        )
        try:
            return f"member {best.id}: " + compact_schedule(view.schedule_segments(best.id))
        except KeyError:  # an ancestor this view cannot see (written by an older version)
            return ""

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None and store is not self._borrowed:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                store.close()

    def close(self) -> None:
        """Releases the storage's connections."""
        with self._lock:
            self._close_store()

    @property
    def snapshot(self) -> Snapshot:
        """The last snapshot read (reads one if none has been)."""
        return self._snapshot or self.poll()

    def remaining(self, snap: Snapshot) -> float | None:
        """Estimated seconds left (`estimate_remaining`), from the member-steps committed since
        this view started; None before the first of them."""
        return estimate_remaining(snap, self._origin, self._first, self._flight)

    def activity(self, snap: Snapshot | None = None) -> str:
        """What the run is doing now, in words; it changes before anything is committed:
        ``starting``, ``starting 2 workers``, ``training: 8 members claimed, no ready point
        yet``, ``training: 6 members claimed``, or the run's status once it is over."""
        snap = snap or self.snapshot
        info = snap.info
        if info is None:
            return "starting"
        committed = self._origin is not None and snap.trained > self._origin[1]
        if info.status in ("completed", "failed") or (info.status != "running" and committed):
            return info.status
        if snap.claimed == 0 and not committed:
            workers = info.execution.get("workers")
            executor = info.execution.get("executor")
            if executor in ("processes", "ray") and workers:
                return f"starting {workers} worker{'s' if workers != 1 else ''}"
            return "starting"
        claimed = f"{snap.claimed} member{'s' if snap.claimed != 1 else ''} claimed"
        if not committed:
            return f"training: {claimed}, no ready point yet"
        return f"training: {claimed}"

    def _left(self, snap: Snapshot) -> str:
        left = self.remaining(snap)
        return "estimating" if left is None else "~" + format_duration(left) + " left"

    def header(self, snap: Snapshot | None = None) -> Text:
        """One line: run, status, progress, member-steps trained against the budget
        (``population * steps``), exploits, failures, elapsed, remaining."""
        snap = snap or self.snapshot
        elapsed = format_duration(time.monotonic() - self.started)
        text = Text()
        text.append(f"run {self.name}", style="bold")
        if snap.info is None:
            text.append(f" · starting · {elapsed} elapsed")
            return text
        text.append(f" · {snap.info.status} {snap.fraction:.0%}")
        text.append(f" · {snap.trained}/{snap.budget} member-steps")
        text.append(f" · {snap.exploits} exploits")
        text.append(f" · {snap.failures} failures", style="red" if snap.failures else "")
        text.append(f" · {elapsed} elapsed")
        text.append(f" · {self._left(snap)}")
        return text

    def table(self, snap: Snapshot | None = None) -> Table:
        """The members: id, step/steps, score, hyperparameters, status (best in bold)."""
        snap = snap or self.snapshot
        cfg: Mapping[str, Any] = snap.info.config if snap.info is not None else {}
        metric, mode = cfg.get("metric", "score"), cfg.get("mode", "max")
        best = best_member(snap.info, snap.members) if snap.info is not None else None
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("member", justify="right")
        table.add_column("step", justify="right")
        table.add_column(f"{metric} ({mode})", justify="right")
        table.add_column("hyperparameters", overflow="fold")
        table.add_column("status")
        for row in snap.members:
            m = MemberRecord.from_state(row.state)
            is_best = best is not None and m.id == best.id and m.score is not None
            table.add_row(
                f"{m.id}{' *' if is_best else ''}",
                f"{m.step}/{snap.steps}",
                format_score(m.score),
                format_hparams(m.hparams),
                m.status,
                style="bold green" if is_best else ("red" if m.status == "failed" else None),
            )
        return table

    def lineage(self, snap: Snapshot | None = None) -> Text:
        """The best member's schedule so far and the latest exploits, one per line."""
        snap = snap or self.snapshot
        text = Text()
        if snap.schedule:
            text.append("best schedule ", style="bold")
            text.append(snap.schedule)
        if snap.recent:
            if snap.schedule:
                text.append("\n")
            text.append("latest exploits", style="bold")
            for line in snap.recent:
                text.append("\n  " + line)
        return text

    def render(self) -> RenderableType:
        """The header, the member table, the best member's schedule and the latest exploits,
        from the last snapshot (reads one if none)."""
        snap = self.snapshot
        if snap.info is None:
            return self.header(snap)
        parts: list[RenderableType] = [self.header(snap), Text(self.activity(snap), style="dim")]
        parts.append(self.table(snap))
        if snap.schedule or snap.recent:
            parts.append(self.lineage(snap))
        return Group(*parts)

    def line(self, snap: Snapshot | None = None) -> str:
        """The view as one plain line, for logs."""
        snap = snap or self.snapshot
        elapsed = format_duration(time.monotonic() - self.started)
        if snap.info is None:
            return f"[{elapsed}] run {self.name}: starting"
        best = best_member(snap.info, snap.members)
        left = self.remaining(snap)
        best_text = (
            f"best {format_score(best.score)} (member {best.id})"
            if best is not None and best.score is not None
            else "best -"
        )
        return (
            f"[{elapsed}] run {self.name}: {self.activity(snap)}; {snap.fraction:.0%}, "
            f"{best_text}, {snap.trained}/{snap.budget} member-steps, "
            f"exploits {snap.exploits}, failures {snap.failures}, "
            f"remaining {'~' + format_duration(left) if left is not None else 'estimating'}"
        )


Mode = Literal["live", "lines", "off"]


def progress_mode(console: Console | None = None, *, terminal: bool | None = None) -> Mode:
    """How to show progress on ``console`` (stdout's by default): ``"live"`` on a terminal and
    in a Jupyter notebook with ipywidgets (rich draws the view in the cell), ``"lines"``
    elsewhere (logs, pipes, a notebook without ipywidgets). ``terminal``: whether stdout is a
    terminal, when known better than ``console`` knows it."""
    console = console or Console()
    if console.is_jupyter:
        import importlib.util

        # rich's Live draws in a notebook through ipywidgets; without it, only at the end.
        return "live" if importlib.util.find_spec("ipywidgets") is not None else "lines"
    tty = console.is_terminal if terminal is None else terminal
    return "live" if tty and not console.is_dumb_terminal else "lines"


class ProgressDisplay:
    """Shows a run's progress while the calling thread trains it.

    A background thread polls the storage every ``interval`` seconds. ``"live"`` redraws a rich
    ``Live`` view; ``"lines"`` prints `RunProgress.line` at once, then every ``line_every``
    seconds, and once more at the end; ``"off"`` shows nothing. Use it as a context manager
    around the training, entered before the workers start: the view's clock, and the rate its
    remaining time is estimated from, start when it is made.

    Args:
        storage: The run's storage URL, or the storage (see `RunProgress`).
        name: The run's name.
        mode: ``"live"``, ``"lines"`` or ``"off"``; see `progress_mode`.
        console: Where to draw (stdout by default).
        interval: Seconds between reads of the storage.
        line_every: Seconds between plain lines.
    """

    def __init__(
        self,
        storage: str | Storage,
        name: str,
        *,
        mode: Mode = "live",
        console: Console | None = None,
        interval: float = 0.5,
        line_every: float = 5.0,
    ) -> None:
        self.progress = RunProgress(storage, name)
        self.mode = mode
        self.console = console or Console()
        self.interval = interval
        self.line_every = line_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def _safe_render(self) -> RenderableType:
        try:
            return self.progress.render()
        except Exception:
            return Text(f"run {self.progress.name}")

    def _print_line(self) -> None:
        with contextlib.suppress(Exception):  # never let the view break the run
            self.console.print(self.progress.line(), markup=False, highlight=False, soft_wrap=True)

    def _loop(self) -> None:
        last_line = time.monotonic()
        if self.mode == "lines":
            self.progress.poll()
            self._print_line()  # at once: something to see before any worker has started
        while not self._stop.wait(self.interval):
            self.progress.poll()
            if self.mode == "lines" and time.monotonic() - last_line >= self.line_every:
                last_line = time.monotonic()
                self._print_line()

    def __enter__(self) -> ProgressDisplay:
        if self.mode == "off":
            return self
        if self.mode == "live":
            from rich.live import Live

            self._live = Live(
                get_renderable=self._safe_render,
                console=self.console,
                refresh_per_second=4,
            )
            self._live.start()
        self._thread = threading.Thread(target=self._loop, name="poptune-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.mode != "off" and exc_type is None:
            self.progress.poll()  # the final state, not the one of half a second ago
            if self.mode == "lines":
                self._print_line()
        if self._live is not None:
            self._live.stop()
        self.progress.close()


def display_for(
    storage: str | Storage | None, name: str, progress: bool | Console | None
) -> tuple[str | Storage | None, ProgressDisplay | None]:
    """The progress display `Experiment.run` shows, and the storage to run with.

    ``progress``: None shows it when stdout is a terminal or a Jupyter notebook; True always
    (as `progress_mode` says: live on a terminal or in a notebook, plain lines elsewhere);
    False never; a rich ``Console``: on that console, as `progress_mode` says for it. An
    in-memory run (``storage`` None or ``memory://``) is created here, so that the display can
    read the very storage the run is kept in.
    """
    import sys

    if progress is None:
        console = Console()
        if not (sys.stdout.isatty() or console.is_jupyter):
            return storage, None
    elif progress is False:
        return storage, None
    elif progress is True:
        console = Console()
    elif isinstance(progress, Console):
        console = progress
    else:
        raise ValueError(
            f"`progress` must be None, True, False or a rich Console, but got {progress!r}."
        )
    from poptune.storage import open_storage, storage_url
    from poptune.storage.base import Storage

    source: str | Storage
    if isinstance(storage, Storage):
        source = storage
    else:
        try:
            url = storage_url(storage) if storage is not None else "memory://"
        except Exception:
            return storage, None  # the run itself says what is wrong with it
        if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
            return storage, None  # SQLite in memory: another connection sees another database
        source = open_storage(url) if url.startswith("memory://") else url
        storage = source if url.startswith("memory://") else storage
    terminal = sys.stdout.isatty() if console.file is sys.stdout else None
    mode = progress_mode(console, terminal=terminal)
    return storage, ProgressDisplay(source, name, mode=mode, console=console)
