"""The storage contract: what a run keeps, who may write it, and which writes are atomic.

A storage holds runs. For each run it keeps:

* the **run** record: name, full configuration (JSON), fingerprint of that configuration,
  source (``FILE.py:NAME`` when started from the command line), checkpoint root, status,
  controller-wide state (synchronous generation and pending decisions), error text;
* one **member** row per member: the controller's view of it (`poptune.MemberState`: hparams,
  step, last ready point, latest score and score window, status, decision count), plus who holds
  it (``owner``), the owner's last ``heartbeat``, its current checkpoint (location and step) and
  how many attempts in a row have failed;
* **results**: every reported step of every member, in commit order, each with the lineage
  ``segment`` it belongs to (the index of the event that began that stretch of the member's life;
  None for its initial stretch);
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
2. **Leases.** A member is trained only by the worker its ``owner`` field names (a worker id,
   see `poptune.storage.leases`); its ``heartbeat`` is when that worker last showed it was
   alive, on the storage's clock (rule 3). Leases change hands through the `Transaction`
   methods, which are the same for every backend:

   * `Transaction.claim` makes the caller the owner, with a fresh heartbeat, when the member is
     free, already the caller's, or held by an owner that may no longer be working on it
     (`poptune.storage.leases.owner_alive`: its heartbeat is ``timeout`` seconds old or older on
     the storage's clock, or it is a process of this host and PID namespace that has exited,
     zombies included). Otherwise it raises `MemberBusy` and changes nothing. Claims are made
     inside the exclusive transaction, so two workers never hold one member at once.
   * `Transaction.require_owner` raises `LeaseLost` unless the caller still holds the member.
     A worker calls it in the same transaction as every write it makes for a member it trained:
     a worker presumed dead whose member was claimed by another then has its late commit
     refused, and the exception rolls back everything it tried to write with it (rule 1).
     A lease whose heartbeat has expired but that nobody has claimed is still held.
   * `Transaction.release` and `Transaction.release_all` free the members an owner holds.

   `Transaction.put_members` writes rows as given, owners included: it is how the leases above
   are stored, and callers use it only for members they hold or that are free.
3. **One clock.** Heartbeats and lease ages are measured on the storage's clock, never compared
   across hosts: `Storage.now` and `Transaction.now` read it (PostgreSQL: the server's clock;
   SQLite and memory: this machine's, the only one that can open them), and `Storage.heartbeat`
   without ``now`` writes it (on PostgreSQL the server computes it in the update).
4. `Storage.heartbeat` is the only write outside a transaction: it touches only the
   ``heartbeat`` field of rows the caller owns.
5. Reads outside a transaction return snapshots (plain immutable records): they never change
   under the caller.
6. **Locks are bounded** (`poptune.storage.locks`). A transaction is short: nobody trains,
   sleeps or waits for anything else inside one. One that holds the run's lock longer than
   the run's heartbeat timeout is presumed frozen and is ended from outside (PostgreSQL: the
   server ends its session; SQLite: a waiter of the same run on this host SIGKILLs the holder
   if it is stopped); its writes are rolled back, and if its process wakes, the transaction
   raises `TransactionLost`. Waits are bounded too: a transaction that cannot take the lock
   within its patience raises `LockTimeout`, and so does a heartbeat, sooner.
7. Storage objects are safe to use from several threads of one process; each process opens its
   own (``open_storage(url)``). Nothing here is shared across processes but the database.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from poptune.storage.leases import owner_alive

__all__ = [
    "CheckpointRow",
    "FailureRow",
    "LeaseLost",
    "LockTimeout",
    "MemberBusy",
    "MemberRow",
    "ResultRow",
    "RunExists",
    "RunInfo",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "Transaction",
    "TransactionLost",
]

SCHEMA_VERSION = 3


class StorageError(RuntimeError):
    """A storage cannot be used (unreachable, wrong schema, not a poptune database), or refused
    a write that breaks its rules; the base of every storage error."""


class RunExists(StorageError):
    """A run with that name already exists."""


class MemberBusy(StorageError):
    """A member cannot be claimed: another worker holds it and may still be working on it."""


class LeaseLost(StorageError):
    """A worker no longer holds a member it wrote for: it was presumed dead and the member
    was claimed by another worker (or freed)."""


class LockTimeout(StorageError):
    """A run's lock could not be taken in time: another transaction held it all along (rule 6)."""


class TransactionLost(StorageError):
    """A transaction was ended from outside before it committed: its session was ended while
    it held the run's lock past the bound (rule 6), or its connection broke. Its writes are
    rolled back; only a connection that broke during the commit itself leaves that unsure, so
    the caller drops what it meant to commit but keeps the files the writes referred to."""


class StorageUnavailable(StorageError):
    """The storage cannot be reached or written now: a database server down or restarting, a
    disk full or read-only. Nothing of the transaction was written; a later one may succeed
    (transactions are begun again with backoff, then the run stops as interrupted).

    Attributes:
        reason: What the database said, in one line (no password).
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


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
    execution: Mapping[str, Any] = field(default_factory=dict)


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
    """One reported step of one member.

    Attributes:
        member: The member's id.
        step: Its step after this report.
        score: The score read from the metrics (NaN when missing).
        metrics: What the member's ``step()`` returned.
        segment: The index of the lineage event (exploit, explore or replace of this member)
            that began the stretch of its life this step belongs to; None for its initial
            stretch, before any event.
        device: The device of the worker that trained the step (``"cuda:0"``), if it had one.
    """

    member: int
    step: int
    score: float
    metrics: Mapping[str, float]
    segment: int | None = None
    device: str | None = None


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

    def members_since(self, version: int | None) -> tuple[int, list[MemberRow]]:
        """The run's member version now, and (by id) every member whose row changed after
        ``version`` (a version this method returned earlier in this run); every member when
        ``version`` is None.

        A worker that keeps the rows it read reads only what other workers changed since, so
        a commit does not cost as much as the population. A storage that cannot tell which
        rows changed returns them all, which is always correct (the default).
        """
        return 0, self.members()

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
    def set_execution(self, execution: Mapping[str, Any]) -> None:
        """Replaces the run's ``execution`` record (see `Storage.update_run`): inside the
        transaction, so that workers agree on it (``poptune worker`` records the run's
        heartbeat timeout here when it is the first to set one)."""

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

    def add_checkpoints(self, rows: Sequence[tuple[int, int, str, int]]) -> None:
        """Records several completely written checkpoint files, ``(member, step, location,
        size)`` each, in this order: as `add_checkpoint` would one by one (ids growing), which
        a backend may do in one statement (a commit records one per member of its batch)."""
        for member, step, location, size in rows:
            self.add_checkpoint(member, step, location, size)

    @abc.abstractmethod
    def checkpoints(
        self, members: Collection[int] | None = None, locations: Collection[str] = ()
    ) -> list[CheckpointRow]:
        """Every checkpoint row of the run, oldest first; with ``members``, only those of
        these members and those at ``locations``.

        A worker's commit concerns a member or two: retention reads only their rows, where
        reading every row made each commit cost as much as the population.
        """

    @abc.abstractmethod
    def delete_checkpoints(self, locations: Sequence[str]) -> None:
        """Forgets these checkpoint rows (the caller deletes the files after commit)."""

    @abc.abstractmethod
    def add_failure(self, failure: FailureRow) -> None:
        """Records an exception raised by user code."""

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds since the epoch on the storage's clock (see `Storage.now`); a backend may
        read it once per transaction."""

    # -- leases (rule 2): written once here, in terms of the methods above -------------------

    def _member_row(self, member: int, known: Mapping[int, MemberRow] | None = None) -> MemberRow:
        if known is not None and member in known:
            return known[member]
        for row in self.members():
            if row.id == member:
                return row
        raise StorageError(
            f"Run {self.run().name!r} has no member {member}; its members are "
            f"{[r.id for r in self.members()]}."
        )

    def claim(
        self,
        member: int,
        owner: str,
        timeout: float,
        *,
        known: Mapping[int, MemberRow] | None = None,
    ) -> MemberRow:
        """Makes ``owner`` the holder of ``member``, its heartbeat the storage's clock now.

        Args:
            member: The member's id.
            owner: The claiming worker's id (`poptune.storage.leases.new_worker_id`).
            timeout: Seconds without a heartbeat after which a holder is presumed dead.
            known: The run's member rows as already read in this transaction (by id), so
                they are not read again.

        Returns:
            The member's row as claimed.

        Raises:
            MemberBusy: Another owner holds it and may still be working on it
                (`poptune.storage.leases.owner_alive`). Nothing is written.
            StorageError: The run has no such member.
        """
        if not owner:
            raise ValueError(f"`owner` must be a non-empty worker id, but got {owner!r}.")
        if not timeout > 0:
            raise ValueError(f"`timeout > 0` must hold, but got {timeout!r}.")
        row = self._member_row(member, known)
        now = self.now()
        if row.owner not in (None, owner) and owner_alive(row.owner, row.heartbeat, timeout, now):
            age = (
                "no heartbeat"
                if row.heartbeat is None
                else f"heartbeat {now - row.heartbeat:.1f} s ago"
            )
            raise MemberBusy(
                f"Member {member} of run {self.run().name!r} is held by {row.owner} ({age}, "
                f"timeout {timeout:g} s), which may still be training it; {owner} cannot claim it."
            )
        claimed = replace(row, owner=owner, heartbeat=now)
        self.put_members([claimed])
        return claimed

    def require_owner(
        self, member: int, owner: str, *, known: Mapping[int, MemberRow] | None = None
    ) -> MemberRow:
        """The member's row, if ``owner`` holds it (``known``: as for `claim`).

        Raises:
            LeaseLost: Another worker (or nobody) holds it now: ``owner`` was presumed dead,
                and whatever it meant to write for the member must not be written.
            StorageError: The run has no such member.
        """
        row = self._member_row(member, known)
        if row.owner != owner:
            holder = "nobody" if row.owner is None else row.owner
            raise LeaseLost(
                f"Member {member} of run {self.run().name!r} must be held by {owner} to write "
                f"for it, but {holder} holds it: {owner} was presumed dead (no heartbeat within "
                "the timeout, or its process had exited) and its work on the member is dropped."
            )
        return row

    def release(self, member: int, owner: str) -> None:
        """Frees ``member`` if ``owner`` holds it (no owner, no heartbeat); else does nothing.

        Raises:
            StorageError: The run has no such member.
        """
        row = self._member_row(member)
        if row.owner == owner:
            self.put_members([replace(row, owner=None, heartbeat=None)])

    def release_all(self, owner_matches: Callable[[str], bool]) -> list[int]:
        """Frees every member whose owner ``owner_matches``; returns their ids, ascending."""
        freed = [
            replace(r, owner=None, heartbeat=None)
            for r in self.members()
            if r.owner is not None and owner_matches(r.owner)
        ]
        self.put_members(freed)
        return sorted(r.id for r in freed)


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
        execution: Mapping[str, Any] | None = None,
    ) -> None:
        """Changes fields of a run's record (those given). ``execution``: how the run is executed
        (executor, workers, devices) and the configuration changes accepted on resume; JSON."""

    @abc.abstractmethod
    def transaction(self, name: str) -> contextlib.AbstractContextManager[Transaction]:
        """An exclusive, atomic transaction on one run's population."""

    @abc.abstractmethod
    def heartbeat(self, name: str, owner: str, now: float | None = None) -> int:
        """Refreshes the heartbeat of every member ``owner`` holds; returns how many.

        Args:
            name: The run.
            owner: The worker id whose members are refreshed.
            now: The time to write. None (the default, and the right choice for workers):
                the storage's clock (`Storage.now`), so that hosts with different clocks agree.
        """

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds since the epoch on the storage's clock, the one heartbeats are kept on.

        PostgreSQL: the server's clock (every host that shares the database reads the same
        one); SQLite and memory: this machine's, the only machine that can open them.
        """

    # -- reads ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def members(self, name: str) -> list[MemberRow]:
        """Every member of the run, by id."""

    @abc.abstractmethod
    def results(self, name: str, *, start: int = 0) -> list[ResultRow]:
        """Every result of the run, in commit order; from the ``start``-th on (0-based).

        Results are only ever appended, by exclusive transactions (rule 1), so a reader that
        has seen ``n`` results reads only the newer ones with ``start=n``: how loggers and the
        progress view follow a run without reading its whole history at every look.
        """

    @abc.abstractmethod
    def events(self, name: str, *, start: int = 0) -> list[dict[str, Any]]:
        """Every event of the run, by index; those with index ``start`` or more."""

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
