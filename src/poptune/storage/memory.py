"""In-memory storage: the library default and the reference backend of the conformance suite."""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from poptune.storage.base import (
    CheckpointRow,
    FailureRow,
    MemberRow,
    ResultRow,
    RunExists,
    RunInfo,
    Storage,
    StorageError,
    Transaction,
)

__all__ = ["InMemoryStorage"]


@dataclass
class _Run:
    info: RunInfo
    members: dict[int, MemberRow] = field(default_factory=dict)
    results: list[ResultRow] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)


def _freeze_member(row: MemberRow) -> MemberRow:
    state = row.state
    hparams, window = state.get("hparams"), state.get("window")
    if isinstance(hparams, dict) and isinstance(window, list):
        # MemberState.to_dict(): flat values plus these two containers of plain values.
        copied = dict(state)
        copied["hparams"], copied["window"] = dict(hparams), list(window)
        if all(not isinstance(v, (dict, list)) for v in copied["hparams"].values()):
            return replace(row, state=copied)
    return replace(row, state=copy.deepcopy(dict(state)))


# Stored records are copied on the way in and on the way out (contract rule 4): a caller that
# mutates a dict it passed in or got back never changes what the storage holds.
def _copy_info(info: RunInfo) -> RunInfo:
    return replace(
        info,
        config=copy.deepcopy(dict(info.config)),
        pending=copy.deepcopy(dict(info.pending)),
        execution=copy.deepcopy(dict(info.execution)),
    )


def _copy_result(row: ResultRow) -> ResultRow:
    return replace(row, metrics=dict(row.metrics))


class _MemoryTransaction(Transaction):
    """Stages every write; `InMemoryStorage.transaction` applies them on success."""

    def __init__(self, storage: InMemoryStorage, run: _Run) -> None:
        self._storage, self._run = storage, run
        self._members: dict[int, MemberRow] = {}
        self._results: list[ResultRow] = []
        self._events: list[dict[str, Any]] = []
        self._checkpoints: list[CheckpointRow] = []
        self._deleted: set[str] = set()
        self._failures: list[FailureRow] = []
        self._info = run.info
        self._now: float | None = None

    def run(self) -> RunInfo:
        return _copy_info(self._info)

    def members(self) -> list[MemberRow]:
        merged = dict(self._run.members)
        merged.update(self._members)
        return [_freeze_member(merged[k]) for k in sorted(merged)]

    def put_members(self, rows: Sequence[MemberRow]) -> None:
        for row in rows:
            self._members[row.id] = _freeze_member(row)

    def set_controller(self, generation: int, pending: Mapping[str, Any]) -> None:
        pending = copy.deepcopy(dict(pending))
        self._info = replace(self._info, generation=generation, pending=pending)

    def set_status(self, status: str, error: str | None = None) -> None:
        self._info = replace(self._info, status=status, error=error)

    def set_execution(self, execution: Mapping[str, Any]) -> None:
        self._info = replace(self._info, execution=copy.deepcopy(dict(execution)))

    def add_results(self, rows: Sequence[ResultRow]) -> None:
        self._results.extend(_copy_result(r) for r in rows)

    def add_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        self._events.extend(copy.deepcopy(dict(e)) for e in events)

    def event_count(self) -> int:
        return len(self._run.events) + len(self._events)

    def add_checkpoint(self, member: int, step: int, location: str, size: int) -> CheckpointRow:
        row = CheckpointRow(self._storage._next_id(), member, step, location, size, time.time())
        self._checkpoints.append(row)
        return row

    def checkpoints(
        self, members: Collection[int] | None = None, locations: Collection[str] = ()
    ) -> list[CheckpointRow]:
        rows = self._run.checkpoints + self._checkpoints
        wanted, at = (None if members is None else set(members)), set(locations)
        return [
            r
            for r in rows
            if r.location not in self._deleted
            and (wanted is None or r.member in wanted or r.location in at)
        ]

    def delete_checkpoints(self, locations: Sequence[str]) -> None:
        self._deleted.update(locations)

    def add_failure(self, failure: FailureRow) -> None:
        self._failures.append(failure)

    def now(self) -> float:
        if self._now is None:
            self._now = self._storage.now()
        return self._now

    def _apply(self) -> None:
        run = self._run
        run.members.update(self._members)
        run.results.extend(self._results)
        run.events.extend(self._events)
        run.checkpoints.extend(self._checkpoints)
        if self._deleted:
            run.checkpoints = [c for c in run.checkpoints if c.location not in self._deleted]
        run.failures.extend(self._failures)
        run.info = replace(self._info, updated=time.time())


class InMemoryStorage(Storage):
    """Keeps runs in this process's memory; gone when the process ends."""

    display_url = "memory://"

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()
        self._ids = 0

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _get(self, name: str) -> _Run:
        try:
            return self._runs[name]
        except KeyError:
            raise StorageError(f"No run named {name!r} in {self.display_url}.") from None

    def create_run(
        self,
        name: str,
        config: Mapping[str, Any],
        fingerprint: str,
        *,
        source: str | None = None,
        checkpoint_root: str | None = None,
        members: Sequence[MemberRow] = (),
    ) -> RunInfo:
        with self._lock:
            if name in self._runs:
                raise RunExists(f"A run named {name!r} already exists in {self.display_url}.")
            now = time.time()
            info = RunInfo(
                name=name,
                config=copy.deepcopy(dict(config)),
                fingerprint=fingerprint,
                status="created",
                source=source,
                checkpoint_root=checkpoint_root,
                created=now,
                updated=now,
            )
            run = _Run(info)
            run.members = {m.id: _freeze_member(m) for m in members}
            self._runs[name] = run
            return _copy_info(info)

    def get_run(self, name: str) -> RunInfo | None:
        with self._lock:
            run = self._runs.get(name)
            return None if run is None else _copy_info(run.info)

    def list_runs(self) -> list[RunInfo]:
        with self._lock:
            infos = sorted((r.info for r in self._runs.values()), key=lambda i: i.created)
            return [_copy_info(i) for i in infos]

    def update_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        fingerprint: str | None = None,
        source: str | None = None,
        status: str | None = None,
        error: str | None = None,
        execution: Mapping[str, Any] | None = None,
    ) -> None:
        with self._lock:
            run = self._get(name)
            changes: dict[str, Any] = {"updated": time.time()}
            if config is not None:
                changes["config"] = copy.deepcopy(dict(config))
            if fingerprint is not None:
                changes["fingerprint"] = fingerprint
            if source is not None:
                changes["source"] = source
            if execution is not None:
                changes["execution"] = copy.deepcopy(dict(execution))
            if status is not None:
                changes["status"] = status
                changes["error"] = error
            run.info = replace(run.info, **changes)

    @contextlib.contextmanager
    def transaction(self, name: str) -> Iterator[Transaction]:
        with self._lock:
            tx = _MemoryTransaction(self, self._get(name))
            yield tx
            tx._apply()

    def heartbeat(self, name: str, owner: str, now: float | None = None) -> int:
        with self._lock:
            run = self._get(name)
            if now is None:
                now = self.now()
            count = 0
            for mid, row in run.members.items():
                if row.owner == owner:
                    run.members[mid] = replace(row, heartbeat=now)
                    count += 1
            return count

    def now(self) -> float:
        return time.time()  # only this process can open an in-memory storage

    def members(self, name: str) -> list[MemberRow]:
        with self._lock:
            run = self._get(name)
            return [_freeze_member(run.members[k]) for k in sorted(run.members)]

    def results(self, name: str, *, start: int = 0) -> list[ResultRow]:
        with self._lock:
            return [_copy_result(r) for r in self._get(name).results[max(0, start) :]]

    def events(self, name: str, *, start: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._get(name).events[max(0, start) :])

    def checkpoints(self, name: str) -> list[CheckpointRow]:
        with self._lock:
            return list(self._get(name).checkpoints)

    def failures(self, name: str) -> list[FailureRow]:
        with self._lock:
            return list(self._get(name).failures)


class MemoryCheckpointStore:
    """Checkpoints kept as deep copies in this process's memory (for in-memory runs)."""

    def __init__(self) -> None:
        self._states: dict[str, object] = {}
        self._count = 0

    def save(self, run: str, member: int, step: int, state: object) -> Any:
        self._count += 1
        location = f"{run}/member-{member:05d}/step-{step:09d}-{self._count}"
        self._states[location] = copy.deepcopy(state)
        return SimpleNamespace(location=location, size=0, format="memory")

    def load(self, location: str) -> object:
        try:
            return copy.deepcopy(self._states[location])
        except KeyError:
            raise FileNotFoundError(f"No checkpoint {location!r} in memory.") from None

    def delete(self, location: str) -> None:
        self._states.pop(location, None)

    def exists(self, location: str) -> bool:
        return location in self._states

    def cleanup_temporary(self, run: str) -> int:
        return 0
