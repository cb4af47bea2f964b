"""Faults with real processes: killed workers, a killed run, a frozen worker."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import pytest
from helpers import SOURCE, check_complete, check_exact, experiment

import poptune as pt
from poptune.storage import open_storage
from poptune.storage.leases import process_state as proc_state

pytestmark = pytest.mark.slow


def results_count(url: str, name: str) -> int:
    try:
        store = open_storage(url)
        try:
            return len(store.results(name)) if store.get_run(name) else 0
        finally:
            store.close()
    except Exception:
        return 0


def wait_for_results(url: str, name: str, at_least: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while results_count(url, name) < at_least:
        if time.time() > deadline:
            raise AssertionError(f"no progress in run {name!r} after {timeout} s")
        time.sleep(0.05)


def check_no_unexplained_repeats(result: pt.Result) -> None:
    """A (member, step) appears twice only where an exploit sent the member back to an earlier
    step: work of a worker that lost its member never reaches the history."""
    counts = Tally((h.member, h.step) for h in result.history)
    for (member, step), n in counts.items():
        if n == 1:
            continue
        rewinds = [
            e
            for e in result.events
            if e.member == member and e.donor_step is not None and e.donor_step < step <= e.step
        ]
        assert len(rewinds) >= n - 1, (member, step, n)


def _run_killing_one_worker(env: Any, url: str) -> None:
    env(delay=0.02, pop=4, steps=40, interval=5)
    killed: list[int] = []

    def killer() -> None:
        wait_for_results(url, "r", 30)
        children = multiprocessing.active_children()
        assert children
        os.kill(children[0].pid, signal.SIGKILL)  # most of a worker's time is inside step()
        killed.append(children[0].pid)

    thread = threading.Thread(target=killer)
    thread.start()
    result = experiment().run(url, "r", workers=2, source=SOURCE)
    thread.join()
    assert killed
    check_complete(result, 40, 4)
    check_no_unexplained_repeats(result)
    assert not (env.locks / "VIOLATION").exists()


def test_sigkill_one_worker_sqlite(env: Any, tmp_path: Path) -> None:
    """SIGKILL a worker mid-step: the run completes with every member, population intact."""
    _run_killing_one_worker(env, f"sqlite:///{tmp_path}/runs.db")


@pytest.mark.postgres
def test_sigkill_one_worker_postgres(
    env: Any, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on PostgreSQL."""
    monkeypatch.chdir(tmp_path)
    _run_killing_one_worker(env, pg_url)


SCRIPT = """
import sys
from poptune.execution.source import load_experiment
exp, source = load_experiment(sys.argv[1])
exp.run(sys.argv[2], "r", workers=int(sys.argv[3]), source=source)
"""


def _start_run(url: str, workers: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, SOURCE, url, str(workers)],
        start_new_session=True,  # its own process group: one SIGKILL takes all its workers
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_whole_run_then_resume(env: Any, tmp_path: Path) -> None:
    """SIGKILL the coordinator and its workers at once; running it again completes it."""
    env(delay=0.01, pop=4, steps=40, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    proc = _start_run(url, 2)
    wait_for_results(url, "r", 40)
    _kill_group(proc)
    store = open_storage(url)
    assert store.get_run("r").status == "running"  # nobody had the chance to say otherwise
    result = experiment().run(url, "r", workers=2, source=SOURCE)
    check_complete(result, 40, 4)
    check_no_unexplained_repeats(result)
    assert store.get_run("r").status == "completed"


def test_a_driver_that_fails_stops_its_workers_and_marks_the_run_interrupted(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the processes executor's own process fails (here its storage raises while it
    starts the second worker), its workers stop and the run is marked interrupted, so that
    `poptune resume` finds it as it is. Before, only Ctrl-C did that: the error left the run
    "running" and the first worker training on with nobody watching it."""
    import sqlite3

    import sqlalchemy as sa

    from poptune.execution import processes

    env(delay=0.01, pop=4, steps=40, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"

    def devices_then_failure(workers: int, devices: Any) -> Any:
        yield None  # the first worker starts
        wait_for_results(url, "r", 5)  # and trains
        raise sa.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(processes, "assign_devices", devices_then_failure)
    with pytest.raises(sa.exc.OperationalError, match="disk I/O error"):
        experiment().run(url, "r", workers=2, source=SOURCE)
    assert multiprocessing.active_children() == []
    with open_storage(url) as store:
        assert store.get_run("r").status == "interrupted"
        assert all(m.owner is None for m in store.members("r"))
    monkeypatch.undo()
    check_complete(experiment().run(url, "r", workers=2, source=SOURCE), 40, 4)


def test_serial_run_killed_and_resumed_has_identical_history(env: Any, tmp_path: Path) -> None:
    """Same seed, serial executor: killed with SIGKILL and resumed, the history and lineage are
    exactly those of a run never interrupted."""
    env(delay=0.004, pop=4, steps=40, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    proc = _start_run(url, 1)
    wait_for_results(url, "r", 60)
    _kill_group(proc)
    done = results_count(url, "r")
    assert 0 < done < 160  # it really was interrupted half-way
    resumed = experiment().run(url, "r")
    uninterrupted = experiment().run()
    assert [(h.member, h.step, h.score) for h in resumed.history] == [
        (h.member, h.step, h.score) for h in uninterrupted.history
    ]
    assert resumed.events == uninterrupted.events
    assert resumed.members == uninterrupted.members


def held_by(url: str, pid: int) -> list[int]:
    """The members a worker process of this host holds, by its PID."""
    prefix = f"{socket.gethostname()}:{pid}:"
    with open_storage(url) as store:
        return [m.id for m in store.members("r") if (m.owner or "").startswith(prefix)]


def owners(url: str) -> list[tuple[int, int, str | None, float | None]]:
    with open_storage(url) as store:
        now = store.now()
        return [
            (m.id, m.state["step"], m.owner, m.heartbeat and now - m.heartbeat)
            for m in store.members("r")
        ]


def workers() -> list[int]:
    """The PIDs of this process's worker processes (those the processes executor started)."""
    return [p.pid for p in multiprocessing.active_children() if p.name.startswith("poptune-w")]


def test_frozen_worker_loses_its_member_and_its_work(env: Any, tmp_path: Path) -> None:
    """A worker frozen past the heartbeat timeout while it trains (holding a member, outside
    any transaction) loses its member to another worker; when it wakes, its commit is refused
    and its stale work never reaches the run."""
    env(delay=0.02, pop=3, steps=30, interval=5, noise=0)
    monkeypatch_locks = os.environ.pop("WL_LOCKS")  # a lease expiry is two holders by design
    try:
        url = f"sqlite:///{tmp_path}/runs.db"
        queue = f"{tmp_path}/runs.db-poptune-lock"
        seen: dict[str, Any] = {}

        def freezer() -> None:
            wait_for_results(url, "r", 15)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pids = workers()
                if not pids:
                    time.sleep(0.01)
                    continue
                victim = pids[0]
                os.kill(victim, signal.SIGSTOP)
                held = held_by(url, victim)
                if held and not holds_flock(victim, queue):
                    break  # frozen holding a member, and not inside a transaction
                os.kill(victim, signal.SIGCONT)
                time.sleep(0.01)
            else:
                seen["error"] = "never found a worker holding a member outside a transaction"
                return
            try:
                # Frozen past the timeout (1 s): another worker takes its member meanwhile.
                taken = time.monotonic() + 30
                while set(held) & set(held_by(url, victim)):
                    if time.monotonic() > taken:
                        seen["error"] = f"members {held} of frozen {victim} never reclaimed"
                        return
                    time.sleep(0.05)
                seen["victim"], seen["held"] = victim, held
                seen["state when woken"] = proc_state(victim)
            finally:
                os.kill(victim, signal.SIGCONT)

        thread = threading.Thread(target=freezer)
        thread.start()
        result = experiment().run(
            url,
            "r",
            workers=2,
            source=SOURCE,
            options=pt.RunOptions(heartbeat_timeout=1.0),
        )
        thread.join()
    finally:
        os.environ["WL_LOCKS"] = monkeypatch_locks
    assert "error" not in seen, seen["error"]
    # Frozen while it held a member, it was still there, stopped, when woken: a worker frozen
    # outside any transaction blocks nobody, and nobody ends it.
    assert seen["held"] and seen["state when woken"] == "T"
    check_complete(result, 30, 3)
    check_no_unexplained_repeats(result)
    check_exact(result, synchronous=False)


# -- a worker frozen inside a transaction ----------------------------------------------------


def holds_flock(pid: int, path: str) -> bool:
    """Whether process ``pid`` holds a ``flock`` on ``path``, as ``/proc/locks`` shows: how a
    SQLite writer holding the writers' queue (inside a write transaction) is seen from
    outside."""
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"
            if len(parts) < 6 or parts[1] != "FLOCK" or parts[4] != str(pid):
                continue  # (a waiter's line reads "1: -> FLOCK ...")
            if parts[5].rpartition(":")[2] == str(inode):
                return True
    return False


#: Backends of a process (by ``application_name``) inside a write transaction on a run: it has
#: locked the run's row (``FOR UPDATE`` takes ROW SHARE on the table) and is not waiting for
#: a lock; ``xact_start`` is set. One row per such backend.
IN_TRANSACTION = """
SELECT a.pid, a.state FROM pg_stat_activity a
JOIN pg_locks l ON l.pid = a.pid AND l.granted AND l.mode = 'RowShareLock'
JOIN pg_class c ON c.oid = l.relation AND c.relname = 'poptune_runs'
WHERE a.application_name = :name AND a.xact_start IS NOT NULL
  AND a.state IN ('idle in transaction', 'active')
  AND a.wait_event_type IS DISTINCT FROM 'Lock'
"""


class Inside:
    """Tells whether a worker process is inside a write transaction of the run, from outside:
    ``/proc/locks`` on SQLite, ``pg_stat_activity`` on PostgreSQL."""

    def __init__(self, url: str, queue: str | None) -> None:
        self.url, self.queue = url, queue
        self.engine: Any = None
        if queue is None:
            import sqlalchemy as sa
            from sqlalchemy.pool import NullPool

            self.engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")

    def __call__(self, pid: int, state: str | None = None) -> bool:
        if self.queue is not None:
            return holds_flock(pid, self.queue)
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(IN_TRANSACTION), {"name": f"poptune-{pid}"}).all()
        return any(state is None or r.state == state for r in rows)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def freeze_inside_transaction(inside: Inside, sqlite: bool) -> int:
    """SIGSTOPs a worker process while it is inside a write transaction (checked again once it
    is stopped, and given up otherwise); returns its PID."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for victim in workers():
            if not inside(victim):
                continue
            os.kill(victim, signal.SIGSTOP)
            if sqlite:
                frozen = inside(victim)
            else:  # a statement under way finishes; then the session waits for the client
                settle = time.monotonic() + 2
                frozen = inside(victim, "idle in transaction")
                while not frozen and inside(victim) and time.monotonic() < settle:
                    time.sleep(0.02)
                    frozen = inside(victim, "idle in transaction")
            if frozen:
                return victim
            os.kill(victim, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("never caught a worker inside a transaction")


def _freeze_a_worker_inside_a_transaction(
    env: Any, url: str, sqlite: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    timeout = 2.0
    env(delay=0.03, pop=4, steps=60, interval=5, noise=0)
    queue = url.removeprefix("sqlite:///") + "-poptune-lock" if sqlite else None
    seen: dict[str, Any] = {}

    def freezer() -> None:
        inside = Inside(url, queue)
        victim = 0
        try:
            wait_for_results(url, "r", 20)
            victim = freeze_inside_transaction(inside, sqlite)
            seen["victim"] = victim
            seen["held"] = held_by(url, victim)
            before = results_count(url, "r")
            # The others go on committing while it is frozen, and take its members.
            limit = time.monotonic() + 60
            while results_count(url, "r") < before + 20 or set(seen["held"]) & set(
                held_by(url, victim)
            ):
                assert time.monotonic() < limit, (
                    f"no progress while {victim} was frozen: {before} -> "
                    f"{results_count(url, 'r')} results; it held {seen['held']}, now "
                    f"{held_by(url, victim)}; holders {owners(url)}"
                )
                time.sleep(0.05)
            if sqlite:
                # A waiter of the run ended it: SIGKILL, so the kernel released its locks.
                assert proc_state(victim) in (None, "Z"), proc_state(victim)
            else:
                assert proc_state(victim) == "T"  # still frozen: the server ended its session
                assert not inside(victim)
            seen["frozen until"] = results_count(url, "r")
        except BaseException as e:
            seen["error"] = e
        finally:
            if victim and proc_state(victim) == "T":
                os.kill(victim, signal.SIGCONT)
            inside.close()

    thread = threading.Thread(target=freezer)
    thread.start()
    try:
        result = experiment().run(
            url,
            "r",
            workers=2,
            source=SOURCE,
            options=pt.RunOptions(heartbeat_timeout=timeout),
        )
    finally:
        thread.join()
    if "error" in seen:
        raise seen["error"]
    check_complete(result, 60, 4)
    check_exact(result, synchronous=False)  # also: no step of any member committed twice
    assert not (env.locks / "VIOLATION").exists()  # (SQLite: a killed holder trains nothing)
    victim = seen["victim"]
    if sqlite:
        assert f"Ended process {victim} " in capfd.readouterr().err
    else:
        # It woke without its session, dropped what it was committing and carried on as a
        # fresh worker: it committed again (never crashed, never restarted).
        later = result.history[seen["frozen until"] :]
        assert any(int(h.metrics["pid"]) == victim for h in later)


def test_worker_frozen_inside_a_transaction_sqlite(
    env: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker SIGSTOPped while it holds SQLite's write lock is ended (SIGKILL) by a waiter of
    its run once it has held the lock past the heartbeat timeout: the others go on, its
    members are reclaimed, and the run completes exactly."""
    _freeze_a_worker_inside_a_transaction(env, f"sqlite:///{tmp_path}/runs.db", True, capfd)


@pytest.mark.postgres
def test_worker_frozen_inside_a_transaction_postgres(
    env: Any,
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A worker SIGSTOPped inside a transaction on PostgreSQL: the server ends its session
    (idle in transaction past the heartbeat timeout), the others go on and take its members;
    woken, it drops its work and carries on, and the run completes exactly."""
    monkeypatch.chdir(tmp_path)
    # Frozen in its heartbeat thread's transaction, its main thread may be inside a step when
    # it wakes, and finish it though another worker holds the member now: a lease expiry is
    # two holders by design (the late commit is refused; `check_exact` sees that).
    monkeypatch.delenv("WL_LOCKS")
    _freeze_a_worker_inside_a_transaction(env, pg_url, False, capfd)


def test_resume_right_after_killing_a_whole_run_is_not_refused(env: Any, tmp_path: Path) -> None:
    """SIGKILL a processes run with its workers, then resume it at once with the serial
    executor: the killed workers' members are free although their heartbeats are fresh, even
    where the workers linger as zombies (a container's init that never reaps orphans)."""
    env(delay=0.01, pop=4, steps=40, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    proc = _start_run(url, 2)
    wait_for_results(url, "r", 20)
    with open_storage(url) as store:
        workers = {m.owner for m in store.members("r") if m.owner is not None}
        _kill_group(proc)
        assert workers, "no member was held when the run was killed"
        assert store.get_run("r").status == "running"
    result = experiment().run(url, "r", workers=1, options=pt.RunOptions(heartbeat_timeout=600.0))
    check_complete(result, 40, 4)
