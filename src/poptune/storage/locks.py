"""Locks that cannot be held forever: how long a run's lock may be held and waited for.

Every write to a run goes through its exclusive transaction (`poptune.storage.base`, rule 1),
and workers hold it only for a short transaction, never while they train. A process frozen
inside one (stopped by SIGSTOP or a debugger, or suspended with its session) would otherwise
stop the whole run: every other writer, heartbeats included, queues behind it, so no
heartbeat timeout ever fires. The rules here bound both sides.

**The bound** of a run is its heartbeat timeout (``execution["heartbeat_timeout"]``, as the
executors and ``poptune worker`` record it; `DEFAULT_BOUND` when none is recorded), at least
`MIN_BOUND`. A transaction that has held the run's lock for longer is presumed frozen, by the
same rule that presumes a silent worker dead.

* **PostgreSQL** ends such a session itself: every poptune connection sets
  ``idle_in_transaction_session_timeout`` to the bound, so a session that sends nothing inside
  a transaction for that long is ended by the server, which rolls its transaction back and
  releases its locks. Its ``lock_timeout`` is the bound too: a waiter that times out tries
  again (with backoff) until its patience (`patience`) is spent. Before it does, it ends
  (``pg_terminate_backend``) the session that holds the run's row if that session has waited
  for its client for longer than the bound: a client frozen in the middle of a pipeline
  (psycopg's ``executemany``) or of a large result is not "idle" to the server, whose own
  timeout then never fires. Where the role may not end others' sessions, waiters only wait.
  Connections are named ``poptune-PID`` (``application_name``) so that one process's sessions
  can be found in ``pg_stat_activity``. The frozen process, when it wakes, finds its
  connection gone: its transaction raises `poptune.storage.base.TransactionLost`, and a worker
  drops what it was committing and carries on as a fresh worker.
* **SQLite** has no server to end a session. Its writers queue on a ``flock`` beside the
  database file (`WritersQueue`), and the holder records there who it is: PID, host, PID
  namespace, run and since when. A waiter waits in short slices; it ends the holder with
  SIGKILL when *all* of these hold (`frozen_holder`):

  - the holder is in a transaction of the same run (never a process of another run, nor one
    writing no run: schema set-up);
  - it is a process of this host and PID namespace, other than the waiter's own;
  - it has held the lock for longer than the run's bound;
  - it is **stopped** (``/proc/PID/stat`` state ``T`` or ``t``), on two looks
    `CONFIRM_SECONDS` apart, still holding the same lock (``/proc/locks``).

  The kernel then releases its locks, and SQLite discards its uncommitted transaction (a
  killed writer never corrupts a database: that is what the journal is for). A process that
  is merely slow, however long its transaction takes, is running, not stopped, so it is never
  killed; nor is a whole process group suspended with Ctrl-Z and resumed together (its
  processes are running again when a waiter looks). Where ``/proc`` is missing (not Linux),
  nothing is killed and waiters only wait, up to their patience.

Waiting is bounded everywhere: a transaction waits at most `patience` for the lock, and a
heartbeat at most the bound (a missed beat is retried), then raises `LockTimeout`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from poptune.storage.base import LockTimeout
from poptune.storage.leases import namespace_id, process_state

try:
    import fcntl
except ImportError:  # Windows: SQLite's own waiting only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CONFIRM_SECONDS",
    "DEFAULT_BOUND",
    "MIN_BOUND",
    "Holder",
    "WritersQueue",
    "frozen_holder",
    "patience",
    "run_bound",
]

#: The bound of a run that records no heartbeat timeout: `poptune.RunOptions`'s default.
DEFAULT_BOUND = 30.0
#: The smallest bound: shorter heartbeat timeouts would end sessions over a scheduling hiccup.
MIN_BOUND = 1.0
#: Seconds between the two looks that must both find a holder stopped before it is killed.
CONFIRM_SECONDS = 0.2


def run_bound(execution: Mapping[str, Any] | None) -> float:
    """The bound of a run whose ``execution`` record is given (see the module docstring)."""
    value = (execution or {}).get("heartbeat_timeout")
    try:
        seconds = float(value) if value is not None else DEFAULT_BOUND
    except (TypeError, ValueError):
        seconds = DEFAULT_BOUND
    if not seconds > 0 or seconds == float("inf"):
        seconds = DEFAULT_BOUND
    return max(MIN_BOUND, seconds)


def patience(bound: float) -> float:
    """How long a transaction waits for a run's lock before it gives up (`LockTimeout`):
    long enough that a frozen holder is ended (at ``bound``) and the queue behind it served."""
    return max(60.0, 3 * bound)


@dataclass(frozen=True)
class Holder:
    """Who holds a SQLite database's writers' queue, as it recorded itself."""

    pid: int
    host: str
    namespace: str | None
    run: str | None
    since: float

    def describe(self) -> str:
        what = f"run {self.run!r}" if self.run is not None else "no run"
        return f"process {self.pid} on {self.host} ({what}, for {time.time() - self.since:.1f} s)"


def _holds_flock(pid: int, inode: int) -> bool:
    """Whether ``/proc/locks`` shows process ``pid`` holding a ``flock`` on inode ``inode``."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; waiters show "->" after the number.
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[3] != "WRITE":
            continue
        if parts[4] == str(pid) and parts[5].rpartition(":")[2] == str(inode):
            return True
    return False


def frozen_holder(holder: Holder | None, run: str | None, bound: float, inode: int) -> bool:
    """Whether a waiter of ``run`` may end ``holder`` (one look; see the module docstring)."""
    if holder is None or run is None or holder.run != run:
        return False
    if holder.pid == os.getpid() or holder.pid <= 0:
        return False
    if holder.host != socket.gethostname() or holder.namespace is None:
        return False
    if holder.namespace != namespace_id():
        return False
    if time.time() - holder.since <= bound:
        return False
    if process_state(holder.pid) not in ("T", "t"):
        return False
    return _holds_flock(holder.pid, inode)


class _BlockingFlock:
    """Waits for an exclusive ``flock`` on ``fd`` in a thread of its own, so that the caller
    can wait for it in slices and give up, while it is still woken by the kernel the moment
    the lock is free (polling would sleep through free moments)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = threading.Event()
        self.error: OSError | None = None
        self._guard = threading.Lock()
        self._abandoned = False
        threading.Thread(target=self._wait, name="poptune-lock-wait", daemon=True).start()

    def _wait(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as e:
            self.error = e
        with self._guard:
            if self._abandoned:
                os.close(self.fd)  # nobody wants it any more: release it at once
                return
            self.done.set()

    def abandon(self) -> bool:
        """Gives the wait up; False when the lock was taken meanwhile (the caller has it)."""
        with self._guard:
            if self.done.is_set():
                return False
            self._abandoned = True  # the thread closes ``fd`` when its wait ends
            return True


class WritersQueue:
    """An exclusive ``flock`` on a file beside a SQLite database, taken for every write.

    SQLite makes a writer that finds the database locked sleep and retry (1, 2, 5, 10 ms and
    longer), so two workers committing in turn lost milliseconds per commit asleep while the
    lock was free. Writers that queue on a file lock first are woken by the kernel the moment
    the lock is released. Where no such lock can be taken (a read-only folder, a file system
    without ``flock``), SQLite's own waiting remains, which is correct, only slower.

    The holder records itself in the file (`Holder`, as JSON) and clears the record before it
    lets go; waiters wait in slices and end a frozen holder (see the module docstring).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path if fcntl is not None else None

    @contextlib.contextmanager
    def hold(self, run: str | None, bound: float, deadline: float) -> Iterator[None]:
        """Holds the queue for a write to ``run``, waiting until ``deadline`` (monotonic).

        Raises:
            LockTimeout: Another writer held it until ``deadline``.
        """
        if self.path is None:
            yield
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield
            return
        owned = True  # whether ``fd`` is ours to close (an abandoned wait closes its own)
        try:
            try:
                locked = self._acquire(fd, run, bound, deadline)
            except _GaveUp as e:
                owned = False
                raise LockTimeout(str(e)) from None
            if locked:
                self._record(fd, run)
            try:
                yield
            finally:
                if locked:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
        finally:
            if owned:
                os.close(fd)  # releases the lock

    def _acquire(self, fd: int, run: str | None, bound: float, deadline: float) -> bool | None:
        """True once ``fd`` holds the lock; False when ``flock`` cannot be used here (SQLite's
        own waiting remains). Raises `_GaveUp` when ``deadline`` passed first (``fd`` then
        belongs to the abandoned wait, which closes it)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False
        wait = _BlockingFlock(fd)
        look = min(0.5, max(0.05, bound / 8))
        inode = os.fstat(fd).st_ino
        while True:
            if wait.done.wait(look):
                return wait.error is None
            holder = self.holder(fd)
            if frozen_holder(holder, run, bound, inode):
                assert holder is not None
                self._end(fd, holder, run, bound, inode)
            if time.monotonic() > deadline:
                message = self._timeout_message(fd, run)  # before ``fd`` is given up
                if wait.abandon():
                    raise _GaveUp(message)
                return wait.error is None

    def _end(self, fd: int, holder: Holder, run: str | None, bound: float, inode: int) -> None:
        """SIGKILLs a holder found frozen, after a second look confirms it."""
        time.sleep(CONFIRM_SECONDS)
        again = self.holder(fd)
        if again != holder or not frozen_holder(again, run, bound, inode):
            return
        with contextlib.suppress(OSError):
            os.kill(holder.pid, signal.SIGKILL)
        logging.getLogger("poptune").warning(
            "Ended %s with SIGKILL: it was stopped while holding the write lock of run %r "
            "for longer than the run's heartbeat timeout (%g s), which stopped every other "
            "worker; its transaction is rolled back and its members are reclaimed.",
            holder.describe(),
            run,
            bound,
        )

    @staticmethod
    def _record(fd: int, run: str | None) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "namespace": namespace_id(),
            "run": run,
            "since": time.time(),
        }
        data = json.dumps(record).encode()
        with contextlib.suppress(OSError):
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))

    @staticmethod
    def holder(fd: int) -> Holder | None:
        """The holder as recorded in the queue file open at ``fd``; None when none is (the
        record is cleared between holders, and may be read half-written)."""
        try:
            data = os.pread(fd, 4096, 0)
            r = json.loads(data)
            return Holder(
                int(r["pid"]),
                str(r["host"]),
                None if r["namespace"] is None else str(r["namespace"]),
                None if r["run"] is None else str(r["run"]),
                float(r["since"]),
            )
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def _timeout_message(self, fd: int, run: str | None) -> str:
        holder = self.holder(fd)
        who = holder.describe() if holder is not None else "another process"
        return (
            f"The write lock of {self.path} is held by {who}; "
            f"{'run ' + repr(run) if run is not None else 'this write'} gave up waiting for it. "
            "A process stopped while holding it is ended only by writers of its own run, on "
            "this host, once it has held it longer than the run's heartbeat timeout."
        )


class _GaveUp(Exception):
    """A wait for the writers' queue reached its deadline (its message says who holds it)."""
