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
from helpers import SOURCE, check_complete, experiment

import poptune as pt
from poptune.storage import open_storage

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


def test_frozen_worker_loses_its_member_and_its_work(env: Any, tmp_path: Path) -> None:
    """A worker frozen past the heartbeat timeout loses its member to another worker; when it
    wakes, its commit is refused and its stale work never reaches the run."""
    env(delay=0.02, pop=3, steps=30, interval=5)
    monkeypatch_locks = os.environ.pop("WL_LOCKS")  # a lease expiry is two holders by design
    try:
        url = f"sqlite:///{tmp_path}/runs.db"
        frozen: list[int] = []

        def freezer() -> None:
            wait_for_results(url, "r", 15)
            store = open_storage(url)
            for _ in range(200):  # freeze a worker while it holds a member
                victim = multiprocessing.active_children()[0]
                os.kill(victim.pid, signal.SIGSTOP)
                prefix = f"{socket.gethostname()}:{victim.pid}:"
                if any((m.owner or "").startswith(prefix) for m in store.members("r")):
                    break
                os.kill(victim.pid, signal.SIGCONT)
                time.sleep(0.01)
            frozen.append(victim.pid)
            time.sleep(3.0)  # > heartbeat_timeout: its member is reclaimed meanwhile
            os.kill(victim.pid, signal.SIGCONT)

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
    assert frozen
    check_complete(result, 30, 3)
    check_no_unexplained_repeats(result)


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
