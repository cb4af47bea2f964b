"""The first hour with the ``poptune`` command: mistakes it catches and states it shows plainly
(a live run run again, a worker for a serial run, stopped members, an empty storage, a script
that trains at import, weights for ``load_state_dict``)."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
from test_cli import TINY, assert_one_line_error, poptune, pt_storage, tiny

import poptune as pt
from poptune.execution.session import new_worker_id
from poptune.report.data import read_report
from poptune.storage import open_storage


def completed_run(folder: Path) -> str:
    """``poptune run exp.py`` (2 members, 10 steps) in ``folder``; returns the storage URL."""
    tiny(folder / "exp.py")
    proc = poptune("run", "exp.py", "--no-progress", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return f"sqlite:///{folder / 'poptune.db'}"


def hold(url: str, owner: str, executor: str, members: int = 1) -> None:
    """Marks run exp running, its first ``members`` members held by ``owner`` right now."""
    with pt_storage(url) as store, store.transaction("exp") as tx:
        rows = tx.members()[:members]
        tx.put_members([replace(r, owner=owner, heartbeat=tx.now()) for r in rows])
        tx.set_execution({**tx.run().execution, "executor": executor})
        tx.set_status("running")


def owners(url: str) -> list[str | None]:
    with pt_storage(url) as store:
        return [r.owner for r in store.members("exp")]


# -- a live run is not joined by running it again ----------------------------------------------


@pytest.mark.parametrize("command", [["run", "exp.py"], ["resume", "exp"]])
def test_running_a_live_run_again_names_its_worker_and_changes_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    """A run whose member a live worker holds (here this test process) is refused in one
    line naming the worker and its host and what to do; before, a processes run was joined
    silently by a second set of workers."""
    url = completed_run(tmp_path)
    worker = new_worker_id()
    hold(url, worker, "processes")
    # The holder stays: no need to wait long for it to go (workers of a killed driver do go).
    quick = {"POPTUNE_LIVE_GRACE": "1"}
    line = assert_one_line_error(poptune(*command, "--no-progress", cwd=tmp_path, env=quick))
    assert f"Run 'exp' is being trained right now: worker {worker} (host " in line
    assert socket.gethostname() in line
    assert "`poptune worker exp`" in line and "`poptune delete exp --force`" in line
    assert owners(url) == [worker, None]
    with pt_storage(url) as store:
        info = store.get_run("exp")
    assert info is not None and info.status == "running"


def test_a_live_serial_run_says_no_worker_can_join(tmp_path: Path) -> None:
    url = completed_run(tmp_path)
    hold(url, new_worker_id(), "serial", members=2)
    quick = {"POPTUNE_LIVE_GRACE": "1"}
    line = assert_one_line_error(poptune("run", "exp.py", "--no-progress", cwd=tmp_path, env=quick))
    assert "serial executor, which holds every member" in line
    assert "poptune worker" not in line


# -- a worker for a run the serial executor trains ------------------------------------------------


def test_a_worker_for_a_live_serial_run_exits_at_once_saying_why(tmp_path: Path) -> None:
    """The serial executor holds every member until it stops: the worker says it can never
    claim one and exits 1 without touching the run (it used to wait in silence)."""
    url = completed_run(tmp_path)
    driver = new_worker_id()
    hold(url, driver, "serial", members=2)
    with pt_storage(url) as store:
        before = store.get_run("exp")
    proc = poptune("worker", "exp", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert proc.returncode == 1
    assert "Run 'exp' is trained by the serial executor, which holds every member" in line
    assert f"worker {driver}" in line and "a worker can never claim one while it runs" in line
    assert "poptune resume exp --executor processes" in line
    with pt_storage(url) as store:
        assert store.get_run("exp") == before
    assert owners(url) == [driver, driver]


# -- members of a run that is not running ------------------------------------------------------


def test_members_of_an_interrupted_run_show_as_stopped_but_stay_running(tmp_path: Path) -> None:
    """Members recorded as running in an interrupted run are shown as stopped by status and
    report; what is stored (what a resume continues from) is not changed."""
    url = completed_run(tmp_path)
    with pt_storage(url) as store, store.transaction("exp") as tx:
        tx.put_members(
            [replace(r, state={**r.state, "status": "running"}, owner=None) for r in tx.members()]
        )
        tx.set_status("interrupted")
    proc = poptune("status", "exp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if "10/10" in ln]
    assert len(rows) == 2 and all("stopped" in ln for ln in rows), proc.stdout
    assert "running" not in "".join(rows)
    with open_storage(url) as store:
        assert [m.status for m in read_report(store, "exp").members] == ["stopped", "stopped"]
        assert [r.state["status"] for r in store.members("exp")] == ["running", "running"]
    report = poptune("report", "exp", "--no-png", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "exp-report" / "report.html").read_text()
    assert html.count('<td class="l">stopped</td>') == 2


# -- an empty storage ----------------------------------------------------------------------------


def test_status_of_a_storage_without_runs_is_no_error(tmp_path: Path) -> None:
    """No file yet, an empty file, a database without runs: "No runs in STORAGE yet.", exit 0,
    and nothing is created."""
    proc = poptune("status", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "No runs in sqlite:///poptune.db yet.")
    assert not (tmp_path / "poptune.db").exists()
    other = poptune("status", "--storage", "sqlite:///absent.db", cwd=tmp_path)
    assert (other.returncode, other.stdout.strip()) == (0, "No runs in sqlite:///absent.db yet.")
    assert not (tmp_path / "absent.db").exists()
    (tmp_path / "empty.db").write_bytes(b"")
    empty = poptune("status", "--storage", "empty.db", cwd=tmp_path)
    assert (empty.returncode, empty.stdout.strip()) == (0, "No runs in sqlite:///empty.db yet.")
    open_storage(f"sqlite:///{tmp_path / 'schema.db'}").close()  # a schema, no run
    schema = poptune("status", "--storage", "schema.db", cwd=tmp_path)
    assert schema.returncode == 0, schema.stderr
    assert schema.stdout.strip() == "No runs in sqlite:///schema.db yet."


# -- a script that calls run() at its top level ------------------------------------------------


def test_a_top_level_run_call_is_refused_before_anything_trains(tmp_path: Path) -> None:
    """`poptune run FILE` imports FILE: a run() at its top level would train there first.
    It stops in one line that says where the call belongs, and nothing is stored."""
    script = TINY.format(steps=10, population=2, delay=0)
    (tmp_path / "top.py").write_text(script + "EXPERIMENT.run('sqlite:///other.db', 'x')\n")
    line = assert_one_line_error(poptune("run", "top.py", "--no-progress", cwd=tmp_path))
    assert "Experiment.run() was called while poptune imported" in line
    assert 'under `if __name__ == "__main__":`' in line
    assert not (tmp_path / "poptune.db").exists() and not (tmp_path / "other.db").exists()
    guarded = script + 'if __name__ == "__main__":\n    EXPERIMENT.run("sqlite:///other.db")\n'
    (tmp_path / "guarded.py").write_text(guarded)
    proc = poptune("run", "guarded.py", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "other.db").exists()


# -- model weights for load_state_dict ---------------------------------------------------------

TORCH = """
import torch

import poptune as pt
from poptune.torch import TorchTrainable


class Member(TorchTrainable):
    hparam_targets = {{"lr": "optimizer.lr"}}

    def setup(self):
        self.model = torch.nn.Linear(3, 1)
        {second}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.hparams["lr"])

    def step(self):
        loss = (self.model(torch.ones(4, 3)) - 1.0).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {{"score": -loss.item()}}


EXPERIMENT = pt.Experiment(
    Member, {{"lr": pt.Float(0.01, 0.1)}}, population_size=2, steps=4, interval=2, seed=0
)
"""


@pytest.mark.parametrize("modules", [1, 2])
def test_weights_only_writes_a_state_dict_that_load_state_dict_takes(
    tmp_path: Path, modules: int
) -> None:
    """--weights-only: the best member's model weights, as a plain state_dict that
    torch.load(weights_only=True) reads (with two modules, a dict of them by name)."""
    torch = pytest.importorskip("torch")
    second = "self.head = torch.nn.Linear(1, 2)" if modules == 2 else ""
    (tmp_path / "net.py").write_text(TORCH.format(second=second))
    assert poptune("run", "net.py", "--no-progress", cwd=tmp_path).returncode == 0
    proc = poptune("export", "net", "--checkpoint", "w.pt", "--weights-only", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    parts = pt.load(f"sqlite:///{tmp_path / 'poptune.db'}", "net").load_state()["parts"]
    if modules == 1:
        model = torch.nn.Linear(3, 1)
        model.load_state_dict(weights)
        assert torch.equal(model.weight, parts["model"]["weight"])
    else:
        assert sorted(weights) == ["head", "model"]  # not the optimizer
        head = torch.nn.Linear(1, 2)
        head.load_state_dict(weights["head"])
        assert torch.equal(head.bias, parts["head"]["bias"])


def test_weights_only_of_a_state_without_modules_is_one_line(tmp_path: Path) -> None:
    completed_run(tmp_path)
    line = assert_one_line_error(
        poptune("export", "exp", "--checkpoint", "w.pt", "--weights-only", cwd=tmp_path)
    )
    assert "--weights-only needs a state written by poptune.torch.TorchTrainable" in line
    assert not (tmp_path / "w.pt").exists()
    usage = poptune("export", "exp", "--weights-only", cwd=tmp_path)
    assert "add --checkpoint PATH" in assert_one_line_error(usage)
    assert usage.returncode == 2
