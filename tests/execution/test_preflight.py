"""The first hour on real code: a member that cannot be built, checkpointed or restored stops the
run at once, saying why, and no member is failed for a mistake in the code."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the [torch] extra is not installed")

import poptune as pt  # noqa: E402
from poptune.execution import ConfigurationStop  # noqa: E402
from poptune.execution.session import describe  # noqa: E402
from poptune.execution.source import load_experiment  # noqa: E402
from poptune.storage import open_storage  # noqa: E402

#: A small MLP member on generated data. ``FORMAT`` (an environment variable) stands for
#: something outside the file that its checkpoints depend on (a library version, say).
MEMBER = """
import os

import torch

import poptune as pt
from poptune.torch import TorchTrainable

HIDDEN = {hidden}
_gen = torch.Generator().manual_seed(0)
X = torch.randn(256, 16, generator=_gen)
Y = (X[:, :4].sum(1) > 0).long()


class Net(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, HIDDEN)
        self.dropout = torch.nn.Dropout(p)
        self.fc2 = torch.nn.Linear(HIDDEN, 2)

    def forward(self, x):
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


class Member(TorchTrainable):
    hparam_targets = {{"lr": "optimizer.lr", "dropout": "{target}"}}

    def setup(self):
        self.model = Net(self.hparams["dropout"]).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.hparams["lr"])

    def extra_state(self):
        return {{"format": os.environ.get("FORMAT", "1")}}

    def load_extra_state(self, state):
        ours = os.environ.get("FORMAT", "1")
        if state["format"] != ours:
            raise ValueError(f"checkpoint format {{state['format']}} cannot be read by {{ours}}")

    def step(self):
        idx = torch.randint(0, 192, (32,))
        loss = torch.nn.functional.cross_entropy(self.model(X[idx]), Y[idx])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            acc = (self.model(X[192:]).argmax(1) == Y[192:]).float().mean().item()
        return {{"acc": acc}}


EXPERIMENT = pt.Experiment(
    Member,
    {{"lr": pt.Float(0.01, {lr_high}, log=True), "dropout": pt.Float(0.1, 0.5)}},
    population_size=4,
    steps=int(os.environ.get("STEPS", "4")),
    interval=2,
    metric="acc",
    seed=0,
)
"""


def write(folder: Path, hidden: int = 32, target: str = "model.dropout.p", lr_high: float = 0.1):
    path = folder / "exp.py"
    path.write_text(MEMBER.format(hidden=hidden, target=target, lr_high=lr_high))
    return path


def load(path: Path) -> pt.Experiment:
    """The experiment the file defines now (imported afresh: the file may have changed)."""
    for name in [m for m in sys.modules if m.startswith("_poptune_user_exp")]:
        del sys.modules[name]
    return load_experiment(str(path))[0]


def nobody_failed(url: str, retries_used: bool = False) -> None:
    """No member failed for good and none was replaced; unless ``retries_used``, no retry was
    used up either."""
    with open_storage(url) as store:
        rows = store.members("r")
        assert all(r.state["status"] != "failed" for r in rows), [r.state for r in rows]
        assert not [e for e in store.events("r") if e.get("kind") == "replace"]
        if not retries_used:
            assert all(r.attempts == 0 for r in rows), [r.attempts for r in rows]
            assert all(f.attempt == 0 for f in store.failures("r"))


def test_a_bad_hparam_target_stops_before_any_worker_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target naming an attribute the member does not have stops the run with that message
    and the stage; no worker process is started, nothing is trained, no member fails, and the
    run stays resumable (``created``): fixed, it trains."""
    path = write(tmp_path, target="model.dropout3.p")
    url = f"sqlite:///{tmp_path}/runs.db"
    import poptune.execution.processes as processes

    started: list[Any] = []
    real = processes.run_processes
    monkeypatch.setattr(processes, "run_processes", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigurationStop) as stop:
        load(path).run(url, "r", workers=2, source=str(path))
    text = str(stop.value)
    assert "hparam_targets['dropout'] = 'model.dropout3.p' does not exist" in text
    assert "member 0" in text and "in build: ValueError" in text
    assert started == []
    with open_storage(url) as store:
        info = store.get_run("r")
        assert info is not None and info.status == "created" and info.error == text
        assert store.results("r") == [] and store.failures("r") == []
    nobody_failed(url)
    monkeypatch.setattr(processes, "run_processes", real)
    write(tmp_path)  # fixed
    result = load(path).run(url, "r", workers=1, source=str(path))
    assert {m.status for m in result.members} == {"finished"}


def test_the_cli_prints_why_the_run_stopped(tmp_path: Path) -> None:
    """`poptune run` says the whole cause on the terminal, not "see status"."""
    write(tmp_path, target="model.dropout3.p")
    env = {**os.environ, "PYTHONPATH": str(Path(pt.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "poptune", "run", "exp.py", "--workers", "2", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 1
    assert "'model.dropout3.p' does not exist on this member" in proc.stderr
    assert "poptune status" not in proc.stderr


class Box:
    """An object of the user's own class, which safe loading refuses."""


class Boxed(pt.Trainable):
    def step(self) -> float:
        return 1.0

    def state_dict(self) -> object:
        return {"box": Box()}

    def load_state_dict(self, state: Any) -> None:
        pass


def test_a_worker_that_cannot_build_members_does_not_join(tmp_path: Path) -> None:
    """`poptune worker` checks a member before it joins: with the bad target it prints the
    cause and exits 1, having claimed nothing and left the run as it was."""
    path = write(tmp_path, target="model.dropout3.p")
    url = f"sqlite:///{tmp_path}/runs.db"
    with pytest.raises(ConfigurationStop):
        load(path).run(url, "r", source=str(path))
    with open_storage(url) as store:
        before = store.get_run("r")
    env = {**os.environ, "PYTHONPATH": str(Path(pt.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "poptune", "worker", "r", "exp.py", "--storage", url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "'model.dropout3.p' does not exist on this member" in proc.stderr
    assert "the run is left as it was" in proc.stderr
    with open_storage(url) as store:
        after = store.get_run("r")
        assert after is not None and before is not None
        assert (after.status, after.error) == (before.status, before.error)
        assert all(r.owner is None for r in store.members("r"))


def test_a_state_safe_loading_refuses_stops_in_the_save_stage(tmp_path: Path) -> None:
    """The checkpoint format is part of the check: a state holding an object of the user's own
    class, without allow_pickle, stops the run at the save stage naming the opt-in."""

    exp = pt.Experiment(Boxed, {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=4)
    with pytest.raises(ConfigurationStop, match=r"(?s)in save.*allow_pickle=True"):
        exp.run(f"sqlite:///{tmp_path}/runs.db", "r")


def _first_run(path: Path, url: str) -> None:
    """Trains the run to step 4 (serial: quicker), so that its members have checkpoints."""
    result = load(path).run(url, "r", workers=1, source=str(path))
    assert {m.step for m in result.members} == {4}


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Sets the experiment's ``steps`` (4 until told otherwise), for worker processes too."""
    monkeypatch.setenv("STEPS", "4")
    return lambda n: monkeypatch.setenv("STEPS", str(n))


def test_a_model_edited_before_resume_stops_naming_the_file_and_reverting_it_resumes(
    tmp_path: Path, steps: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """hidden 32 -> 64 before a resume with 2 workers: the run stops before any worker starts,
    naming the file and the size mismatch, and no member fails. With the file reverted, the
    resumed run completes: every original lineage finished, nothing replaced."""
    path = write(tmp_path, hidden=32)
    url = f"sqlite:///{tmp_path}/runs.db"
    _first_run(path, url)
    write(tmp_path, hidden=64)
    steps(8)
    with caplog.at_level(logging.WARNING, logger="poptune"), pytest.raises(ConfigurationStop) as e:
        load(path).run(url, "r", resume=True, workers=2, source=str(path))
    text = str(e.value)
    assert "code changed since the run's checkpoints were written (exp.py)" in text
    assert "size mismatch" in text and "revert the file" in text.lower()
    assert "changed code: exp.py changed" in caplog.text
    nobody_failed(url)
    with open_storage(url) as store:
        info = store.get_run("r")
        assert info is not None and info.status == "interrupted"
    write(tmp_path, hidden=32)
    result = load(path).run(url, "r", resume=True, workers=2, source=str(path))
    assert [(m.status, m.step) for m in result.members] == [("finished", 8)] * 4
    nobody_failed(url)


def test_a_restore_failing_in_a_worker_after_a_code_change_stops_without_failing_members(
    tmp_path: Path, steps: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the check before the workers did not load a checkpoint (skipped here), the first
    worker whose restore fails after the code changed stops the run: no member fails, no retry
    is used up, and the message names the file."""
    path = write(tmp_path, hidden=32)
    url = f"sqlite:///{tmp_path}/runs.db"
    _first_run(path, url)
    import poptune.execution.preflight as preflight

    monkeypatch.setattr(preflight, "preflight", lambda *a, **k: None)
    write(tmp_path, hidden=64)
    steps(8)
    with pytest.raises(ConfigurationStop) as e:
        load(path).run(url, "r", resume=True, workers=2, source=str(path))
    text = str(e.value)
    assert "code changed since the run's checkpoints were written (exp.py)" in text
    assert "size mismatch" in text
    nobody_failed(url)
    with open_storage(url) as store:
        assert store.failures("r"), "the restore failure is recorded"
        info = store.get_run("r")
        assert info is not None and info.status == "interrupted"


def test_every_restore_failing_the_same_way_stops_without_failing_members(
    tmp_path: Path, steps: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file changed, but no checkpoint loads any more (``FORMAT`` changed, as a library
    upgrade might): the second member whose restore fails with the same exception stops the
    run, naming both and the exception, without failing any member."""
    path = write(tmp_path)
    url = f"sqlite:///{tmp_path}/runs.db"
    _first_run(path, url)
    monkeypatch.setenv("FORMAT", "2")
    steps(8)
    with pytest.raises(ConfigurationStop) as e:
        load(path).run(url, "r", resume=True, workers=2, source=str(path))
    text = str(e.value)
    assert "every restore fails the same way" in text
    assert "ValueError: checkpoint format 1 cannot be read by 2" in text
    # The first failure counts as a retry (nothing told it from a member's own fault yet).
    nobody_failed(url, retries_used=True)
    monkeypatch.setenv("FORMAT", "1")
    result = load(path).run(url, "r", resume=True, workers=2, source=str(path))
    assert [(m.status, m.step) for m in result.members] == [("finished", 8)] * 4


def test_the_resume_warning_names_each_changed_bound(
    tmp_path: Path, steps: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Resuming with a wider space says which parameter and bound changed, and how."""
    path = write(tmp_path, lr_high=0.1)
    url = f"sqlite:///{tmp_path}/runs.db"
    _first_run(path, url)
    write(tmp_path, lr_high=0.2)
    with caplog.at_level(logging.WARNING, logger="poptune"):
        load(path).run(url, "r", resume=True, source=str(path))
    assert "space.lr.high 0.1 -> 0.2" in caplog.text
    assert "changed code: exp.py changed" in caplog.text


def test_describe_names_nested_values() -> None:
    """Inside dicts each changed value is named by its path; other keys as before."""
    changes = {
        "changed": {
            "steps": [40, 80],
            "space": [{"lr": {"low": 0.1, "high": 0.1}}, {"lr": {"low": 0.1, "high": 0.2}}],
            "explore": [{"factors": [0.8, 1.2]}, {"factors": [0.7, 1.3]}],
            "exploit": [None, {"kind": "Truncation"}],
        }
    }
    assert describe(changes) == (
        "steps 40 -> 80; space.lr.high 0.1 -> 0.2; explore.factors [0.8, 1.2] -> [0.7, 1.3]; "
        "exploit None -> {'kind': 'Truncation'}"
    )
