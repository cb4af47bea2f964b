"""The storage contract: what a run keeps, who may write it, and which writes are atomic.

A storage holds runs. For each run it keeps:

* the **run** record: name, full configuration (JSON), fingerprint of that configuration,
  source (``FILE.py:NAME`` when started from the command line), checkpoint root, status,
  controller-wide state (synchronous generation and pending decisions), error text;
* one **member** row per member: the controller's view of it (`poptune.MemberState`: hparams,
  step, last ready point, latest score and score window, status, decision count), plus who holds
  it (``owner``), the owner's last ``heartbeat``, its current checkpoint (location and step) and
  how many attempts in a row have failed;
* **results**: every reported step of every member, in commit order;
* **events**: the lineage, every exploit/explore/replace, numbered 0, 1, 2... per run;
* **checkpoints**: every checkpoint file written (member, step, location, size);
* **failures**: every exception raised by user code, with its traceback.

Rules (every backend obeys them, and the conformance suite in ``tests/storage`` checks them):

1. All writes to a run's population go through `Storage.transaction`, which is *exclusive per
   run* (a row lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite, a lock in memory) and
   *atomic*: either every write in it is visible afterwards, or none is (an exception inside
   the ``with`` block rolls everything back). Decisions, claims, results, events and
   checkpoint references are written together, so a crash never leaves a checkpoint row
   without its results or an event without its member update.
2. A member is trained only by the worker named in its ``owner`` field. A worker claims a
   member inside a transaction (so two workers never claim the same one) and every later write
   for that member checks it still owns it. A member whose owner's heartbeat is older than the
   run's timeout may be claimed by another worker; the old owner's writes are then refused.
3. `Storage.heartbeat` is the only write outside a transaction: it touches only the
   ``heartbeat`` field of rows the caller owns.
4. Reads outside a transaction return snapshots (plain immutable records): they never change
   under the caller.
5. Storage objects are safe to use from several threads of one process; each process opens its
   own (``open_storage(url)``). Nothing here is shared across processes but the database.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CheckpointRow",
    "FailureRow",
    "MemberRow",
    "ResultRow",
    "RunExists",
    "RunInfo",
    "Storage",
    "StorageError",
    "Transaction",
]

SCHEMA_VERSION = 1


class StorageError(RuntimeError):
    """A storage cannot be used: unreachable, wrong schema, or not a poptune database."""


class RunExists(StorageError):
    """A run with that name already exists."""


@dataclass(frozen=True)
class RunInfo:
    """A run's record."""

    name: str
    config: Mapping[str, Any]
    fingerprint: str
    status: str
    source: str | None
    checkpoint_root: str | None
    created: float
    updated: float
    error: str | None = None
    generation: int = 0
    pending: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberRow:
    """A member's row: the controller's state of it plus who holds it and its checkpoint."""

    state: Mapping[str, Any]  # MemberState.to_dict()
    owner: str | None = None
    heartbeat: float | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    attempts: int = 0

    @property
    def id(self) -> int:
        return int(self.state["id"])


@dataclass(frozen=True)
class ResultRow:
    """One reported step of one member."""

    member: int
    step: int
    score: float
    metrics: Mapping[str, float]
    segment: int | None = None


@dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint file. ``id`` grows with every checkpoint written (oldest first)."""

    id: int
    member: int
    step: int
    location: str
    size: int
    created: float


@dataclass(frozen=True)
class FailureRow:
    """One exception raised by user code."""

    member: int
    step: int
    attempt: int
    traceback: str
    time: float


class Transaction(abc.ABC):
    """Writes to one run's population, exclusive and atomic (see the module docstring)."""

    @abc.abstractmethod
    def run(self) -> RunInfo:
        """The run's record as of this transaction."""

    @abc.abstractmethod
    def members(self) -> list[MemberRow]:
        """Every member of the run, by id."""

    @abc.abstractmethod
    def put_members(self, rows: Sequence[MemberRow]) -> None:
        """Inserts or replaces these members' rows."""

    @abc.abstractmethod
    def set_controller(self, generation: int, pending: Mapping[str, Any]) -> None:
        """Stores the controller-wide state (synchronous generation, pending decisions)."""

    @abc.abstractmethod
    def set_status(self, status: str, error: str | None = None) -> None:
        """Sets the run's status (and error text)."""

    @abc.abstractmethod
    def add_results(self, rows: Sequence[ResultRow]) -> None:
        """Appends results, in order."""

    @abc.abstractmethod
    def add_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Appends lineage events (dicts with the fields of `poptune.Event`, ``index`` included)."""

    @abc.abstractmethod
    def event_count(self) -> int:
        """How many events the run has: the index of the next one."""

    @abc.abstractmethod
    def add_checkpoint(self, member: int, step: int, location: str, size: int) -> CheckpointRow:
        """Records a checkpoint file that has been completely written."""

    @abc.abstractmethod
    def checkpoints(self) -> list[CheckpointRow]:
        """Every checkpoint row of the run, oldest first."""

    @abc.abstractmethod
    def delete_checkpoints(self, locations: Sequence[str]) -> None:
        """Forgets these checkpoint rows (the caller deletes the files after commit)."""

    @abc.abstractmethod
    def add_failure(self, failure: FailureRow) -> None:
        """Records an exception raised by user code."""


class Storage(abc.ABC):
    """Where runs live. See the module docstring for the rules every backend keeps."""

    #: A URL naming this storage, password removed; safe to print.
    display_url: str = "memory://"

    # -- runs ----------------------------------------------------------------------------------

    @abc.abstractmethod
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
        """Creates a run and its initial members atomically; raises `RunExists` if taken."""

    @abc.abstractmethod
    def get_run(self, name: str) -> RunInfo | None:
        """The run's record, or None."""

    @abc.abstractmethod
    def list_runs(self) -> list[RunInfo]:
        """Every run, oldest first."""

    @abc.abstractmethod
    def update_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        fingerprint: str | None = None,
        source: str | None = None,
        status: str | None = None,
        error: str | None = None,
    ) -> None:
        """Changes fields of a run's record (those given)."""

    @abc.abstractmethod
    def transaction(self, name: str) -> contextlib.AbstractContextManager[Transaction]:
        """An exclusive, atomic transaction on one run's population."""

    @abc.abstractmethod
    def heartbeat(self, name: str, owner: str, now: float) -> int:
        """Refreshes the heartbeat of every member ``owner`` holds; returns how many."""

    # -- reads ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def members(self, name: str) -> list[MemberRow]:
        """Every member of the run, by id."""

    @abc.abstractmethod
    def results(self, name: str) -> list[ResultRow]:
        """Every result of the run, in commit order."""

    @abc.abstractmethod
    def events(self, name: str) -> list[dict[str, Any]]:
        """Every event of the run, by index."""

    @abc.abstractmethod
    def checkpoints(self, name: str) -> list[CheckpointRow]:
        """Every checkpoint row of the run, oldest first."""

    @abc.abstractmethod
    def failures(self, name: str) -> list[FailureRow]:
        """Every recorded failure of the run, oldest first."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases connections."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
