"""Math-library threads outside the run's workers: a joined `poptune worker`, a replay and
`Result.load_member` get a share of the cores, as the processes executor's workers do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import poptune as pt
from poptune.execution.source import load_experiment
from poptune.execution.threads import (
    limited_threads,
    local_processes,
    member_threads,
    worker_threads,
)
from poptune.storage import open_storage
from poptune.storage.base import MemberRow
from poptune.storage.leases import namespace_id

pytestmark = pytest.mark.skipif(
    namespace_id() is None, reason="process ids of this machine cannot be told here"
)


def _row(member: int, owner: str | None) -> MemberRow:
    return MemberRow({"id": member, "step": 0, "status": "running"}, owner=owner)


def _owner(pid: int, host: str | None = None) -> str:
    return f"{host or socket.gethostname()}:{pid}:{namespace_id()}:tok{pid}"


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_a_joining_worker_shares_the_cores_with_the_local_processes_holding_members(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two live processes of this machine hold members (one of them two): a joining worker is
    the third. Dead processes, other machines, free members and this process do not count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = [
        _row(0, _owner(os.getppid())),
        _row(1, _owner(1)),
        _row(2, _owner(1)),
        _row(3, _owner(_dead_pid())),
        _row(4, _owner(os.getppid(), host="elsewhere")),
        _row(5, None),
        _row(6, _owner(os.getpid())),
    ]
    assert local_processes(rows) == 2
    assert worker_threads(None, rows) == pt.RunOptions().threads_per_worker(3)
    assert worker_threads(None, []) == pt.RunOptions().threads_per_worker(1)
    assert worker_threads(5, rows) == 5  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(None, rows) == 3  # the user's setting is kept


def test_a_member_outside_the_workers_gets_the_share_each_worker_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = pt.RunOptions().threads_per_worker(1)
    assert member_threads(None, {"executor": "processes", "workers": 2}) == max(1, cores // 2)
    assert member_threads(None, {"executor": "serial", "workers": 1}) == cores
    assert member_threads(None, {}) == cores  # an in-memory run records no execution
    assert member_threads(None, {"executor": "ray", "resources": {"cpu": 2.0}}) == 2
    assert member_threads(4, {"executor": "processes", "workers": 2}) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert member_threads(None, {"executor": "processes", "workers": 2}) == 3


def test_limited_threads_puts_the_setting_back() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS")
    target = 1 if before != 1 else 2
    with limited_threads(target):
        assert torch.get_num_threads() == target
        assert os.environ["OMP_NUM_THREADS"] == str(target)
    assert torch.get_num_threads() == before
    assert os.environ.get("OMP_NUM_THREADS") == omp


def test_replay_and_load_member_train_with_the_runs_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`poptune replay` (a process of its own) and `Result.load_member` set the threads the
    member reports: the run's workers' share by default, ``--threads`` when given."""
    torch = pytest.importorskip("torch")
    workload = Path(__file__).resolve().parents[1] / "torch_workload.py"
    source = f"{workload}:stream"
    url = f"sqlite:///{tmp_path}/runs.db"
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    monkeypatch.setenv("TW_POP", "2")
    monkeypatch.setenv("TW_STEPS", "4")
    exp = load_experiment(source)[0]
    exp.run(url, "r", options=pt.RunOptions(threads=1), source=source)
    store = open_storage(url)
    # As if the run had been trained by 2 worker processes (each had half the cores).
    store.update_run("r", execution={"executor": "processes", "workers": 2})
    store.close()
    expected = max(1, pt.RunOptions().threads_per_worker(1) // 2)

    def replay(*args: str) -> dict[str, float]:
        done = subprocess.run(
            [sys.executable, "-m", "poptune", "replay", "r", "--storage", url, *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**environ, "TW_POP": "2", "TW_STEPS": "4"},
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        name = args[args.index("--name") + 1]
        return dict(pt.load(url, name).history[-1].metrics)

    default = replay("--name", "by-default")
    assert (default["omp"], default["torch_threads"]) == (expected, expected)
    given = replay("--name", "given", "--threads", "3")
    assert (given["omp"], given["torch_threads"]) == (3, 3)

    before = torch.get_num_threads()
    omp = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        member = pt.load(url, "r").load_member(experiment=exp)
        assert member.step()["torch_threads"] == expected
        assert "OMP_NUM_THREADS" not in os.environ  # not taken for the user's own later
        pt.load(url, "r").load_member(experiment=exp, threads=3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
        if omp is not None:
            os.environ["OMP_NUM_THREADS"] = omp
