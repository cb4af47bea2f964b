"""Locks that cannot be held forever (`poptune.storage.locks`), with real processes.

A process stopped inside a transaction of a run: on SQLite a waiter of the same run ends it
once it has held the lock past the run's heartbeat timeout, and never a process of another
run or one that is merely slow; on PostgreSQL the server ends its session. Waits are bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import poptune
from poptune.storage import LockTimeout, TransactionLost, locks, open_storage
from poptune.storage.leases import process_state as proc_state
from poptune.storage.sql import SQLStorage

#: A child that opens the storage, writes in a transaction of RUN, then stops itself (SIGSTOP)
#: or sleeps inside it.
HOLDER = """
import os, signal, sys, time
from poptune.storage import open_storage
url, run, how = sys.argv[1:4]
with open_storage(url) as store:
    with store.transaction(run) as tx:
        tx.set_status("holder")
        print("inside", flush=True)
        if how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(float(how))
"""


pytestmark = pytest.mark.skipif(
    locks.fcntl is None or not os.path.exists("/proc/locks"), reason="needs flock and /proc"
)


def new_run(url: str, name: str, timeout: float) -> None:
    with open_storage(url) as store:
        store.create_run(name, {}, "fp")
        store.update_run(name, execution={"heartbeat_timeout": timeout})


@pytest.fixture
def holder() -> Iterator[Any]:
    """Starts HOLDER children; kills and reaps whatever is left of them afterwards."""
    children: list[subprocess.Popen[str]] = []
    src = str(Path(poptune.__file__).resolve().parent.parent)

    def start(url: str, run: str, how: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": src}
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, run, how],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        children.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "inside"
        if how == "stop":
            deadline = time.monotonic() + 30
            while proc_state(child.pid) != "T":
                assert time.monotonic() < deadline, proc_state(child.pid)
                time.sleep(0.01)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def test_a_stopped_holder_of_the_run_is_ended_after_the_bound(tmp_path: Path, holder: Any) -> None:
    """A process stopped inside a transaction of the run is killed by a writer of that run
    once it has held the lock past the run's heartbeat timeout; its write is rolled back."""
    url = f"sqlite:///{tmp_path}/p.db"
    new_run(url, "r", 1.0)
    child = holder(url, "r", "stop")
    with open_storage(url) as store:
        with store.transaction("r") as tx:  # waits for the bound, then ends the holder
            assert tx.run().status == "created"  # the holder's write never happened
            tx.set_status("running")
        assert child.wait(timeout=30) == -signal.SIGKILL
        assert store.get_run("r").status == "running"
        assert store.heartbeat("r", "w") == 0  # the database is healthy afterwards


def test_a_stopped_holder_of_another_run_is_never_ended(tmp_path: Path, holder: Any) -> None:
    """A writer of run ``r`` never ends a process of another run: its heartbeat gives up
    after the bound (`LockTimeout`) and the stopped holder stays."""
    url = f"sqlite:///{tmp_path}/p.db"
    new_run(url, "r", 1.0)
    new_run(url, "other", 1.0)
    child = holder(url, "other", "stop")
    with open_storage(url) as store:
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=f"process {child.pid} "):
            store.heartbeat("r", "w")
        assert time.monotonic() - started >= 1.0  # it did wait (for its bound)
    assert proc_state(child.pid) == "T"


def test_a_slow_holder_is_never_ended(tmp_path: Path, holder: Any) -> None:
    """A holder that is running (here asleep inside its transaction) past the bound is never
    killed: a heartbeat gives up, and a transaction waits until the holder commits."""
    url = f"sqlite:///{tmp_path}/p.db"
    new_run(url, "r", 1.0)
    child = holder(url, "r", "4")
    with open_storage(url) as store:
        with pytest.raises(LockTimeout):
            store.heartbeat("r", "w")
        with store.transaction("r") as tx:
            assert tx.run().status == "holder"  # the holder committed, undisturbed
    assert child.wait(timeout=30) == 0


def test_the_holder_records_itself_in_the_writers_queue(tmp_path: Path) -> None:
    """Inside a transaction the queue file names this process, its run and since when; the
    record is cleared when the transaction ends."""
    url = f"sqlite:///{tmp_path}/p.db"
    new_run(url, "r", 5.0)
    path = f"{tmp_path}/p.db-poptune-lock"
    fd = os.open(path, os.O_RDONLY)
    try:
        with open_storage(url) as store, store.transaction("r"):
            record = locks.WritersQueue.holder(fd)
            assert record is not None
            assert (record.pid, record.run) == (os.getpid(), "r")
            assert record.namespace == poptune.storage.leases.namespace_id()
            assert not locks.frozen_holder(record, "r", 5.0, os.fstat(fd).st_ino)  # itself
        assert locks.WritersQueue.holder(fd) is None
    finally:
        os.close(fd)


def test_run_bound_reads_the_heartbeat_timeout() -> None:
    assert locks.run_bound({"heartbeat_timeout": 7.5}) == 7.5
    assert locks.run_bound({}) == locks.DEFAULT_BOUND
    assert locks.run_bound(None) == locks.DEFAULT_BOUND
    assert locks.run_bound({"heartbeat_timeout": 0.01}) == locks.MIN_BOUND
    assert locks.run_bound({"heartbeat_timeout": "x"}) == locks.DEFAULT_BOUND


# -- PostgreSQL --------------------------------------------------------------------------------


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def test_postgres_sessions_are_named_and_bounded_by_the_run(pg_url: str) -> None:
    """Sessions are named ``poptune-PID``; a run's transactions run with the run's heartbeat
    timeout as their lock wait and idle-in-transaction limits."""
    new_run(pg_url, "r", 2.0)
    with open_storage(pg_url) as store:
        assert isinstance(store, SQLStorage)
        with store.transaction("r") as tx:
            conn = tx._conn  # type: ignore[attr-defined]
            show = {
                k: conn.exec_driver_sql(f"SHOW {k}").scalar_one()
                for k in ("application_name", "lock_timeout", "idle_in_transaction_session_timeout")
            }
    assert show == {
        "application_name": f"poptune-{os.getpid()}",
        "lock_timeout": "2s",
        "idle_in_transaction_session_timeout": "2s",
    }


def test_postgres_a_slow_holder_is_waited_for_never_ended(pg_url: str) -> None:
    """While another session holds the run's row lock and works (a statement running), a
    heartbeat gives up after the run's bound (`LockTimeout`) instead of waiting forever, and
    the holder is left alone."""
    new_run(pg_url, "r", 1.0)
    other = sa.create_engine(pg_url, poolclass=NullPool)
    locked, finished = threading.Event(), threading.Event()

    def hold() -> None:
        with other.connect() as conn, conn.begin():
            conn.exec_driver_sql("SELECT 1 FROM poptune_runs WHERE name = 'r' FOR UPDATE")
            locked.set()
            conn.exec_driver_sql("SELECT pg_sleep(4)")
        finished.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(30)
        with open_storage(pg_url) as store, pytest.raises(LockTimeout):
            store.heartbeat("r", "w")
    finally:
        thread.join()
        other.dispose()
    assert finished.is_set()  # it committed: nobody ended its session


def test_postgres_a_session_waiting_for_its_client_past_the_bound_is_ended(pg_url: str) -> None:
    """A session that holds the run's row lock and has waited for its client past the run's
    bound (here one with no idle-in-transaction limit of its own) is ended by a waiter, which
    then takes the lock."""
    new_run(pg_url, "r", 1.0)
    other = sa.create_engine(pg_url, poolclass=NullPool)
    try:
        with other.connect() as conn:
            conn.exec_driver_sql("SELECT 1 FROM poptune_runs WHERE name = 'r' FOR UPDATE")
            with open_storage(pg_url) as store:
                with store.transaction("r") as tx:
                    tx.set_status("running")
                assert store.get_run("r").status == "running"
            with pytest.raises(sa.exc.DBAPIError):
                conn.exec_driver_sql("SELECT 1")  # its session is gone
    finally:
        other.dispose()


def test_postgres_ends_a_session_idle_in_a_transaction_past_the_bound(pg_url: str) -> None:
    """A transaction that sits idle past the run's bound loses its session: its writes are
    rolled back, it raises `TransactionLost`, and the storage goes on with a new session."""
    new_run(pg_url, "r", 1.0)
    with open_storage(pg_url) as store:
        with pytest.raises(TransactionLost), store.transaction("r") as tx:
            tx.set_status("lost")
            time.sleep(3.0)  # frozen, as far as the server can tell
            tx.set_execution({"heartbeat_timeout": 1.0})
        assert store.get_run("r").status == "created"
        with store.transaction("r") as tx:
            tx.set_status("running")
        assert store.get_run("r").status == "running"
