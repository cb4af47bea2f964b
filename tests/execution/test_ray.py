"""The Ray executor on a real local Ray instance (shared by these tests: `ray_local`).

Actors do not inherit the environment a test sets after Ray started, so each test writes its
workload's ``WL_*`` settings into a small experiment file (`baked_source`) that actors import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import check_complete, check_exact
from test_faults import check_no_unexplained_repeats, wait_for_results

import poptune as pt
from poptune.cli import main
from poptune.execution.ray import check_resources
from poptune.execution.session import load_result
from poptune.execution.source import load_experiment
from poptune.execution.worker import WorkReport, work
from poptune.storage import open_storage

HERE = Path(__file__).resolve().parent


def baked_source(env: Any, tmp_path: Path, **values: object) -> str:
    """An experiment file that sets ``values`` (as ``WL_*``, plus the lock and mark folders)
    in whichever process imports it, then builds `workloads.counter`. The same variables are
    set here through ``env`` (monkeypatch), so this process gets them back afterwards."""
    env(**values)
    wl = {k: v for k, v in os.environ.items() if k.startswith("WL_")}
    path = tmp_path / "ray_experiment.py"
    path.write_text(
        "import os, sys\n"
        f"os.environ.update({wl!r})\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from workloads import counter\n"
        "EXPERIMENT = counter()\n"
    )
    return f"{path}:EXPERIMENT"


def named_actors(ray: Any, run: str) -> list[Any]:
    """Handles of the run's live actors (named ``poptune:RUN:TAG``)."""
    names = [n for n in ray.util.list_named_actors() if n.startswith(f"poptune:{run}:")]
    out = []
    for n in names:
        with contextlib.suppress(ValueError):  # gone meanwhile
            out.append(ray.get_actor(n))
    return out


def test_ray_sqlite_run_completes_with_exploits_from_donor_checkpoints(
    ray_local: Any, env: Any, tmp_path: Path
) -> None:
    """Two actors train every member to the end; each recorded score is exactly what the
    lineage says (copies load the donor's checkpoint); no member is trained by two actors at
    once; the actors are reused (2 processes in all, none of them this one); the executor and
    its resources are recorded for `poptune resume`."""
    source = baked_source(env, tmp_path, noise=0, delay=0.002, pop=6, steps=30)
    url = f"sqlite:///{tmp_path}/runs.db"
    exp = load_experiment(source)[0]
    result = exp.run(url, "r", executor="ray", workers=2, source=source)
    check_complete(result, 30, 6)
    assert check_exact(result, synchronous=False) > 0
    assert not (env.locks / "VIOLATION").exists()
    pids = {int(h.metrics["pid"]) for h in result.history}
    assert os.getpid() not in pids and len(pids) <= 2
    assert max(h.metrics["live"] for h in result.history) <= pt.RunOptions().cache_size
    info = open_storage(url).get_run("r")
    assert info.status == "completed"
    assert info.execution["executor"] == "ray" and info.execution["workers"] == 2
    assert info.execution["resources"] == {"cpu": 1.0}


class Climb(pt.Trainable):
    """x grows by lr each step; defined here, so it reaches the actors pickled by value."""

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.x = 0.0

    def step(self) -> dict[str, float]:
        self.x += float(self.hparams["lr"])
        return {"score": self.x, "pid": float(os.getpid())}

    def state_dict(self) -> object:
        return {"x": self.x}

    def load_state_dict(self, state: Any) -> None:
        self.x = float(state["x"])


def test_ray_pickled_experiment(ray_local: Any, tmp_path: Path) -> None:
    """Without a source file the experiment travels to the actors pickled (by Ray's
    cloudpickle, which sends a script's classes by value), here with half a CPU per actor."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    exp = pt.Experiment(
        trainable=Climb, space={"lr": pt.Float(0.01, 1.0)}, population_size=4, steps=20, seed=1
    )
    url = f"sqlite:///{tmp_path}/runs.db"
    result = exp.run(url, "p", executor="ray", workers=2, resources={"cpu": 0.5})
    check_complete(result, 20, 4)
    assert open_storage(url).get_run("p").execution["resources"] == {"cpu": 0.5}
    with pytest.raises(ValueError, match="no actor could ever start"):
        exp.run(url, "g", executor="ray", resources={"gpu": 64})


def test_ray_arguments_are_checked(tmp_path: Path) -> None:
    """Ray's options are refused, before anything is written, where they cannot apply."""
    exp = pt.Experiment(trainable=lambda h, s: None, space={"lr": pt.Float(0.1, 1)})  # type: ignore[arg-type, return-value]
    url = f"sqlite:///{tmp_path}/runs.db"
    with pytest.raises(ValueError, match="resources"):
        exp.run(url, "a", executor="ray", resources={"gpu": -1})
    with pytest.raises(ValueError, match=r"more than one GPU must be a whole number.*1\.5"):
        exp.run(url, "a", executor="ray", resources={"cpu": 1, "GPU": 1.5})
    with pytest.raises(ValueError, match=r"units of 0\.0001"):
        exp.run(url, "a", executor="ray", resources={"gpu": 0.00001})
    shares = {"GPU": 0.25, "cpu": 1.5, "x": 2.5}  # fractions Ray accepts
    assert check_resources(shares) == {"gpu": 0.25, "cpu": 1.5, "x": 2.5}
    assert check_resources({"gpu": 2}) == {"gpu": 2.0}
    with pytest.raises(ValueError, match="executor='ray'"):
        exp.run(url, "a", executor="processes", workers=2, resources={"cpu": 1})
    with pytest.raises(ValueError, match="resources=\\{'gpu'"):
        exp.run(url, "a", executor="ray", devices=["cuda:0"])
    with pytest.raises(ValueError, match="workers share"):
        exp.run(None, "a", executor="ray")
    assert open_storage(url).get_run("a") is None


@pytest.mark.slow
def test_killed_actor_mid_step_run_completes_exactly(
    ray_local: Any, env: Any, tmp_path: Path
) -> None:
    """SIGKILL an actor's process while it trains: its members are released and re-claimed,
    a new actor takes its place, and the run completes with every member at its last step and
    no step recorded twice (the killed actor's uncommitted stretch is lost, nothing else)."""
    source = baked_source(env, tmp_path, noise=0, delay=0.02, pop=4, steps=40, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    killed: list[int] = []

    def killer() -> None:
        wait_for_results(url, "k", 30)
        actors = named_actors(ray_local, "k")
        assert actors
        pid = ray_local.get(actors[0].pid.remote())
        os.kill(pid, signal.SIGKILL)  # most of an actor's time is inside step()
        killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    exp = load_experiment(source)[0]
    result = exp.run(url, "k", executor="ray", workers=2, source=source)
    thread.join()
    assert killed
    check_complete(result, 40, 4)
    check_exact(result, synchronous=False)
    check_no_unexplained_repeats(result)
    assert not (env.locks / "VIOLATION").exists()
    pids = {int(h.metrics["pid"]) for h in result.history}
    assert killed[0] in pids and len(pids) >= 2  # a replacement actor trained after the kill


@pytest.mark.slow
def test_driver_killed_then_poptune_resume_completes(
    ray_local: Any, env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`poptune run --executor ray` (a driver connected to the shared Ray instance) is killed
    with SIGKILL mid-run; Ray ends its actors; `poptune resume` completes the run with the
    executor recorded for it, every member present and no step recorded twice."""
    source = baked_source(env, tmp_path, noise=0, delay=0.01, pop=4, steps=40, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    address = ray_local.get_runtime_context().gcs_address
    argv = [
        *("run", source, "--name", "d", "--storage", url, "--executor", "ray"),
        *("--workers", "2", "--ray-address", address, "--no-progress"),
    ]
    code = "import sys; from poptune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], start_new_session=True)
    try:
        wait_for_results(url, "d", 40, timeout=120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    store = open_storage(url)
    assert store.get_run("d").status == "running"  # the driver had no chance to say otherwise
    assert store.get_run("d").execution["executor"] == "ray"
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    assert (
        main(["resume", "d", "--storage", url, "--no-progress", "--heartbeat-timeout", "10"]) == 0
    )
    assert time.monotonic() - started < 120
    result = load_result(store, "d")
    assert store.get_run("d").status == "completed"
    check_complete(result, 40, 4)
    check_exact(result, synchronous=False)
    assert Tally((h.member, h.step) for h in result.history).most_common(1)[0][1] == 1


def test_cli_resources_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resources` must list NAME=AMOUNT pairs; anything else is a usage error."""
    toy = str(HERE.parent.parent / "examples" / "toy_quadratic.py")
    url = f"sqlite:///{tmp_path}/runs.db"
    for bad in ("gpu", "cpu=x", "gpu=-1", "gpu=1.5", ","):
        argv = ["run", toy, "--storage", url, "--executor", "ray", "--resources", bad]
        assert main(argv) == 2, bad
        assert "--resources cpu=1,gpu=0.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "env", "expected"),
    [
        (None, None, "local"),
        (None, "10.0.0.5:6379", "10.0.0.5:6379"),
        ("auto", "10.0.0.5:6379", "auto"),
        ("10.0.0.7:6379", None, "10.0.0.7:6379"),
    ],
)
def test_connect_starts_a_local_instance_unless_told_where(
    monkeypatch: pytest.MonkeyPatch, address: str | None, env: str | None, expected: str
) -> None:
    """No address and no RAY_ADDRESS: a new local instance (``address="local"``), never a
    cluster that Ray finds left running on the machine (``ray.init()``'s own default);
    RAY_ADDRESS, then ``address``, when given. A connection the process holds is kept."""
    from poptune.execution import ray as ray_executor

    calls: list[dict[str, Any]] = []

    class FakeRay:
        initialized = False

        def is_initialized(self) -> bool:
            return self.initialized

        def init(self, **kwargs: Any) -> None:
            calls.append(kwargs)

    monkeypatch.setattr(ray_executor, "import_ray", FakeRay)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    ray_executor.connect(address)
    assert [c["address"] for c in calls] == [expected]
    FakeRay.initialized = True
    ray_executor.connect(address)
    assert len(calls) == 1


def test_actors_that_cannot_import_the_experiment_interrupt_the_run(
    ray_local: Any, env: Any, tmp_path: Path
) -> None:
    """The experiment file imports in the driver but raises in every actor: the driver neither
    hangs nor returns as if the run had finished; it raises `RunInterrupted` with the actors'
    error, and leaves the run interrupted. Once the file imports everywhere, running it again
    completes it."""
    source = baked_source(env, tmp_path, noise=0, delay=0.002, pop=4, steps=10)
    path = Path(source.partition(":")[0])
    blocked = tmp_path / "blocked"
    blocked.touch()
    path.write_text(
        "import os\n"
        f"if os.path.exists({str(blocked)!r}) and os.getpid() != {os.getpid()}:\n"
        "    raise RuntimeError('this file imports in the driver only')\n" + path.read_text()
    )
    url = f"sqlite:///{tmp_path}/runs.db"
    exp = load_experiment(source)[0]
    why = "no Ray actor could start: .*SourceError: .*RuntimeError: this file imports in the driver"
    with pytest.raises(pt.RunInterrupted, match=why):
        exp.run(url, "i", executor="ray", workers=2, source=source)
    info = open_storage(url).get_run("i")
    assert info.status == "interrupted"
    assert not named_actors(ray_local, "i")
    blocked.unlink()
    result = exp.run(url, "i", executor="ray", workers=2, source=source)
    check_complete(result, 10, 4)


def test_actors_no_node_can_host_interrupt_the_run(
    ray_local: Any, env: Any, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Actors that ask for a resource no node has, on a cluster given by address (which might
    be autoscaled, so nothing is refused up front) and a PostgreSQL storage (no node pinning,
    so Ray only waits): once no node has come for `PLACEMENT_TIMEOUT`, the driver raises
    `RunInterrupted` saying what the actors ask for, instead of waiting forever, and leaves the
    run interrupted with no actor left. Asking for what the cluster has then completes it."""
    from poptune.execution import ray as ray_executor

    monkeypatch.setattr(ray_executor, "PLACEMENT_TIMEOUT", 1.0)
    source = baked_source(env, tmp_path, noise=0, delay=0.002, pop=4, steps=10)
    address = ray_local.get_runtime_context().gcs_address
    exp = load_experiment(source)[0]
    kwargs: dict[str, Any] = {
        "executor": "ray",
        "workers": 2,
        "source": source,
        "ray_address": address,
        "checkpoints": str(tmp_path / "checkpoints"),
    }
    with pytest.raises(pt.RunInterrupted, match=r"no live node has .*'nowhere': 1\.0"):
        exp.run(pg_url, "u", resources={"cpu": 1, "nowhere": 1}, **kwargs)
    assert open_storage(pg_url).get_run("u").status == "interrupted"
    assert not named_actors(ray_local, "u")
    result = exp.run(pg_url, "u", resources={"cpu": 1}, **kwargs)
    check_complete(result, 10, 4)


def test_actors_waiting_for_a_place_end_with_a_run_completed_elsewhere(
    ray_local: Any, env: Any, tmp_path: Path, pg_url: str
) -> None:
    """While the run's actors wait for a node that could host them, a `poptune worker` (here
    `work` in a thread) completes the run: the driver ends its waiting actors and returns the
    completed run, rather than waiting on or reporting it interrupted."""
    source = baked_source(env, tmp_path, noise=0, delay=0.002, pop=4, steps=10)
    address = ray_local.get_runtime_context().gcs_address
    exp = load_experiment(source)[0]
    reports: list[WorkReport] = []

    def elsewhere() -> None:
        store = open_storage(pg_url)
        deadline = time.monotonic() + 60
        while (info := store.get_run("e")) is None or info.status != "running":
            assert time.monotonic() < deadline, "the driver never started the run"
            time.sleep(0.05)
        reports.append(work(pg_url, "e", info.checkpoint_root, pt.RunOptions(), experiment=exp))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    result = exp.run(
        pg_url,
        "e",
        executor="ray",
        workers=2,
        source=source,
        resources={"cpu": 1, "nowhere": 1},
        ray_address=address,
        checkpoints=str(tmp_path / "checkpoints"),
    )
    thread.join()
    check_complete(result, 10, 4)
    assert reports[0].status == "completed" and reports[0].steps == len(result.history)
    assert not named_actors(ray_local, "e")
