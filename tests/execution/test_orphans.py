"""What a killed driver leaves behind, with real processes: its worker processes end within
seconds, and the files of their uncommitted batches are removed when the run is resumed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import SOURCE, check_complete, experiment, unreferenced

from poptune.storage import open_storage
from poptune.storage.leases import parse_worker_id, process_alive

DRIVER = """
import sys
import poptune as pt
from poptune.execution.source import load_experiment
exp, source = load_experiment(sys.argv[1])
options = pt.RunOptions(claim_batch=int(sys.argv[4]))
exp.run(sys.argv[2], "r", workers=int(sys.argv[3]), executor="processes", source=source,
        checkpoints=sys.argv[5], options=options)
"""


def start_driver(url: str, root: Path, workers: int, batch: int) -> subprocess.Popen[bytes]:
    """A driver process running run ``r`` with ``workers`` worker processes, in a process group
    of its own (a SIGKILL of the group ends them all)."""
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, SOURCE, url, str(workers), str(batch), str(root)],
        start_new_session=True,
    )


def wait_until(what: str, holds: Any, timeout: float = 90.0) -> Any:
    """Waits (generously: the machine may be loaded) until ``holds()`` is truthy; returns it."""
    deadline = time.monotonic() + timeout
    while not (value := holds()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.05)
    return value


def holders(url: str) -> set[str]:
    with contextlib.suppress(Exception), open_storage(url) as store:
        return {m.owner for m in store.members("r") if m.owner is not None}
    return set()


def saved(root: Path) -> bool:
    """Whether a checkpoint of run ``r`` was saved (a temporary file is not one)."""
    files = (root / "r").glob("member-*/*.ckpt")
    return any(not f.name.startswith(".tmp-") for f in files)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("delay", "interval"),
    [(1.0, 40), (120.0, 2)],
    ids=["stops-between-steps", "ends-itself-mid-step"],
)
def test_the_workers_of_a_killed_driver_end_within_seconds(
    env: Any, tmp_path: Path, delay: float, interval: int
) -> None:
    """SIGKILL the driver while its workers are in the middle of a batch that takes 40 s or
    more: each worker notices its parent is gone and ends within 30 s, after its current step
    (1 s) or, when the step itself is long (120 s), in the middle of it, and releases the
    members it held."""
    env(delay=delay, pop=4, steps=2 * interval, interval=interval)
    url, root = f"sqlite:///{tmp_path}/runs.db", tmp_path / "ckpts"
    proc = start_driver(url, root, workers=2, batch=2)
    try:
        owners = wait_until(
            "both workers hold members", lambda: len(holders(url)) == 2 and holders(url)
        )
        pids = set()
        for owner in owners:
            identity = parse_worker_id(owner)
            assert identity is not None
            pids.add(identity.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(
            "every worker of the killed driver ended",
            lambda: not any(process_alive(pid) for pid in pids),
            timeout=30.0,
        )
    finally:
        kill_group(proc)
    assert holders(url) == set()


def test_files_of_a_killed_batch_are_removed_when_the_run_is_resumed(
    env: Any, tmp_path: Path
) -> None:
    """SIGKILL a run while a worker has saved a member's checkpoint but not committed its
    batch: the file is left behind, named by no row. Resumed to completion, the run leaves no
    file in its folder that no row names."""
    env(delay=1.0, pop=2, steps=4, interval=2)
    url, root = f"sqlite:///{tmp_path}/runs.db", tmp_path / "ckpts"
    # One worker claims both members; it saves the first (at step 2) two seconds before it
    # commits the two together.
    proc = start_driver(url, root, workers=1, batch=2)
    try:
        wait_until("a checkpoint saved", lambda: saved(root))
    finally:
        kill_group(proc)
    assert unreferenced(url, root)  # the killed batch's
    result = experiment().run(url, "r", workers=1)
    check_complete(result, 4, 2)
    assert unreferenced(url, root) == []
