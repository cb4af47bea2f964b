"""`LogFeed`: follows a run in its storage and feeds its loggers, off the training's path.

One mechanism for every executor: the feed reads what the executors commit (results and
lineage events, `poptune.storage.base.Storage.results` and ``events`` with ``start=``, so
each record is read once), from a thread of the process that started the run. Worker
processes never see a logger; the serial executor's thread only shares the interpreter with
the feed's reads and writes, which happen a batch at a time every ``interval`` seconds.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from poptune.loggers.base import LoggedRun, LoggedStep, Logger
from poptune.result import Event, HistoryRecord

if TYPE_CHECKING:
    from poptune.result import Result
    from poptune.storage.base import ResultRow, Storage

__all__ = ["LogFeed"]

_log = logging.getLogger("poptune")


class LogFeed:
    """Feeds run ``name``'s committed results and events to ``loggers``.

    Use it as a context manager around the training, or call `start` and `stop`. `poll` reads
    what is new and hands it on; `stop` reads the rest, then closes every logger with the
    run's `poptune.Result`.

    Args:
        storage: The run's storage (safe to share between threads, rule 6 of the contract).
        name: The run's name (the loggers start when it exists).
        loggers: The `poptune.loggers.Logger` objects to feed.
        interval: Seconds between reads.
    """

    def __init__(
        self, storage: Storage, name: str, loggers: Iterable[Logger], *, interval: float = 1.0
    ) -> None:
        self.storage, self.name = storage, name
        self.loggers = list(loggers)
        self.interval = interval
        self._results = 0  # results read so far
        self._events: list[Event] = []  # events read so far, by index
        self._emitted = 0  # events handed on so far
        self._backlog: collections.deque[ResultRow] = collections.deque()
        self._initial: Mapping[str, Mapping[str, Any]] = {}
        self._recent: dict[int, collections.deque[LoggedStep]] = {}
        self._history: list[HistoryRecord] = []  # for the Result handed to close()
        self._keep = 64
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    # -- driving -------------------------------------------------------------------------------

    def start(self) -> LogFeed:
        """Follows the run from a daemon thread (the loggers' `start` is called once the run
        exists)."""
        self._thread = threading.Thread(target=self._loop, name="poptune-loggers", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops following, hands on everything committed, and closes the loggers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.poll(final=True)
        except Exception:
            _log.warning("poptune loggers: reading run %r failed", self.name, exc_info=True)
        result: Result | None
        try:
            from poptune.execution.session import load_result

            result = load_result(self.storage, self.name, history=self._history)
        except Exception:
            result = None
        if self._started:
            for logger in list(self.loggers):
                self._call(logger, "close", result)
        self.loggers = []

    def __enter__(self) -> LogFeed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a storage hiccup: read again next time
                _log.debug("poptune loggers: reading run %r failed", self.name, exc_info=True)

    def _begin(self) -> bool:
        """Starts the loggers once the run exists; whether it does."""
        if self._started:
            return True
        info = self.storage.get_run(self.name)
        if info is None:
            return False  # not created yet: the loggers start when it is
        self._started = True
        cfg = info.config
        self._initial = dict(cfg.get("initial_population") or {})
        interval = int(cfg.get("interval") or 1)
        # The donor's steps an exploit may need (a member copies a donor at most a couple of
        # intervals ahead of it; max_lag is two intervals by default).
        self._keep = max(64, 8 * interval)
        run = LoggedRun(
            name=self.name,
            metric=str(cfg.get("metric", "score")),
            mode=str(cfg.get("mode", "max")),
            population_size=int(cfg.get("population_size") or 0),
            steps=int(cfg.get("steps") or 0),
            hparams=tuple(cfg.get("space") or ()),
        )
        for logger in list(self.loggers):
            self._call(logger, "start", run)
        return True

    # -- reading -------------------------------------------------------------------------------

    def poll(self, *, final: bool = False) -> int:
        """Reads what was committed since the last poll and hands it on; returns how many
        records (results and events) were handed on. ``final``: hand on every event read,
        even one whose results are not in yet (the run has stopped)."""
        with self._lock:
            if not self._begin():
                return 0
            # Events first: every event read now was committed before the results read next,
            # so the results it follows are among them.
            fresh = self.storage.events(self.name, start=len(self._events))
            self._events.extend(Event.from_dict(e) for e in fresh)
            known = len(self._events)
            rows = self.storage.results(self.name, start=self._results)
            self._results += len(rows)
            self._backlog.extend(rows)
            handed = 0
            while self._backlog:
                row = self._backlog[0]
                if row.segment is not None and row.segment >= known and not final:
                    break  # began by an event committed after the events were read
                if row.segment is not None:
                    handed += self._events_up_to(min(row.segment + 1, known))
                self._backlog.popleft()
                self._result(row)
                handed += 1
            handed += self._events_up_to(known)
            if handed:
                for logger in list(self.loggers):
                    self._call(logger, "flush")
            return handed

    def _events_up_to(self, end: int) -> int:
        count = 0
        while self._emitted < end:
            event = self._events[self._emitted]
            self._emitted += 1
            bridge = self._bridge(event)
            for logger in list(self.loggers):
                self._call(logger, "on_event", event, bridge)
            count += 1
        return count

    def _bridge(self, event: Event) -> Sequence[LoggedStep]:
        if event.donor is None or event.donor == event.member or event.donor_step is None:
            return ()
        return [
            s for s in self._recent.get(event.donor, ()) if event.step <= s.step <= event.donor_step
        ]

    def _result(self, row: ResultRow) -> None:
        if row.segment is not None and row.segment < len(self._events):
            hparams = self._events[row.segment].new_hparams
        else:
            hparams = self._initial.get(str(row.member), {})
        step = LoggedStep(
            member=row.member,
            step=row.step,
            metrics=row.metrics,
            score=row.score,
            hparams=hparams,
            segment=row.segment,
            device=row.device,
        )
        self._history.append(
            HistoryRecord(row.member, row.step, row.metrics, row.score, row.segment, row.device)
        )
        recent = self._recent.get(row.member)
        if recent is None:
            recent = self._recent[row.member] = collections.deque(maxlen=self._keep)
        recent.append(step)
        for logger in list(self.loggers):
            self._call(logger, "on_result", step)

    def _call(self, logger: Logger, hook: str, *args: Any) -> None:
        try:
            getattr(logger, hook)(*args)
        except Exception:
            # A logger must never stop the run: it is dropped, once, loudly.
            _log.warning(
                "poptune: logger %r raised in %s() and is dropped for the rest of run %r",
                logger,
                hook,
                self.name,
                exc_info=True,
            )
            if logger in self.loggers:
                self.loggers.remove(logger)
