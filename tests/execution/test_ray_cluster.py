"""The Ray executor on Ray clusters of several nodes on this machine (`ray.cluster_utils.Cluster`).

A process holds one Ray connection, and the tests of test_ray.py share theirs (`ray_local`),
so each scenario runs in a Python process of its own: this file, run as a script, builds the
cluster, runs the experiment from that process (the driver) and prints one JSON line of what
it saw; the test checks that and the run's storage.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import check_complete, check_exact
from test_faults import check_no_unexplained_repeats, wait_for_results
from test_ray import baked_source, named_actors

import poptune as pt
from poptune.execution.session import load_result
from poptune.storage import open_storage

pytestmark = pytest.mark.slow


def scenario(*args: str, timeout: float = 240) -> dict[str, Any]:
    """Runs ``python THIS_FILE ARGS...`` (with this process's poptune importable) and returns
    the JSON it printed last; fails with its output when it did not end well. The script and
    the Ray processes it starts form a process group of their own: whatever of it is left
    afterwards (timed out, say) is killed."""
    src = str(Path(pt.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, path]) if path else src}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the scenario took over {timeout} s:\n{out}\n{err}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"{out}\n{err}"
    facts: dict[str, Any] = json.loads(lines[-1])
    return facts


# -- a node lost ---------------------------------------------------------------------------------


def test_node_lost_mid_run_actors_replaced_on_a_new_node(
    env: Any, tmp_path: Path, pg_url: str
) -> None:
    """Both actors run on a worker node (the only one with the custom resource they ask for),
    with a PostgreSQL storage, which actors on any node commit to. That node is removed from
    the cluster mid-run, taking the actors' processes with it, and a fresh node with the
    resource is added: the driver releases their members, starts replacements there, and the
    run completes with every member at its last step, every score exactly what its lineage
    says, no step recorded twice except where an exploit rewound it, and results both from the
    lost actors and from their replacements. Before that, asking for more CPUs than any one
    node has (though the cluster has them in all) is refused up front."""
    source = baked_source(env, tmp_path, noise=0, delay=0.02, pop=4, steps=40, interval=5)
    facts = scenario("node_lost", pg_url, source, str(tmp_path / "checkpoints"))
    assert "no node of this Ray instance has that much" in facts["too_big"]
    assert facts["driver"] == "returned"
    store = open_storage(pg_url)
    assert store.get_run("n").status == "completed"
    result = load_result(store, "n")
    check_complete(result, 40, 4)
    check_exact(result, synchronous=False)
    check_no_unexplained_repeats(result)
    assert not (env.locks / "VIOLATION").exists()
    pids = {int(h.metrics["pid"]) for h in result.history}
    lost = set(facts["lost_pids"])
    assert len(lost) == 2 and lost <= pids  # both actors trained on the lost node...
    assert pids - lost  # ...and replacements on the new one finished the run


def _node_lost(url: str, source: str, checkpoints: str) -> dict[str, Any]:
    """A head node with one CPU and a worker node with two CPUs and two ``lost`` units; the
    run's actors ask for one CPU and one ``lost`` each, so both run on the worker node."""
    import ray
    from ray.cluster_utils import Cluster

    from poptune.execution.source import load_experiment

    exp = load_experiment(source)[0]
    facts: dict[str, Any] = {}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        node = cluster.add_node(num_cpus=2, resources={"lost": 2})
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        try:  # 3 CPUs in all, but no node has 3: no actor could ever start
            exp.run(url, "big", executor="ray", resources={"cpu": 3}, checkpoints=checkpoints)
        except ValueError as e:
            facts["too_big"] = str(e)
        outcome: list[str] = []

        def driver() -> None:
            try:
                exp.run(
                    url,
                    "n",
                    executor="ray",
                    workers=2,
                    source=source,
                    resources={"cpu": 1, "lost": 1},
                    checkpoints=checkpoints,
                )
                outcome.append("returned")
            except BaseException as e:
                outcome.append(repr(e))

        thread = threading.Thread(target=driver, daemon=True)
        thread.start()
        wait_for_results(url, "n", 30)
        actors = named_actors(ray, "n")
        facts["lost_pids"] = ray.get([a.pid.remote() for a in actors], timeout=30)
        cluster.remove_node(node)  # kills the node's processes, the actors' included
        cluster.add_node(num_cpus=2, resources={"lost": 2})
        thread.join(timeout=150)
        facts["driver"] = outcome[0] if outcome else "still running"
    finally:
        ray.shutdown()
        cluster.shutdown()
    return facts


# -- GPU fractions -------------------------------------------------------------------------------


class GpuProbe(pt.Trainable):
    """x grows by lr each step; reports the GPU Ray gave its actor, and whether another
    process was training at the same time. Defined in the script, so it reaches the actors
    pickled by value."""

    met: bool | None = None  # in this process: another process trained while this one did

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.x = 0.0

    def step(self) -> dict[str, float]:
        import ray

        from poptune.trainable import worker_device

        if GpuProbe.met is None:  # its first step: wait (a while) for the other actor
            GpuProbe.met = _meet(os.environ["PROBE_MEET"], 2, timeout=60)
        self.x += float(self.hparams["lr"])
        ids = [int(i) for i in ray.get_gpu_ids()]
        return {
            "score": self.x,
            "pid": float(os.getpid()),
            "gpus": float(len(ids)),
            "gpu": float(ids[0]) if ids else -1.0,
            "visible0": float(os.environ.get("CUDA_VISIBLE_DEVICES") == "0"),
            "met": float(GpuProbe.met),
            "cuda0": float(worker_device() == "cuda:0"),
        }

    def state_dict(self) -> object:
        return {"x": self.x}

    def load_state_dict(self, state: Any) -> None:
        self.x = float(state["x"])


def _meet(folder: str, processes: int, timeout: float) -> bool:
    """Leaves this process's mark in ``folder`` and waits until ``processes`` processes have
    left one (True), or ``timeout`` seconds passed (False)."""
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(os.listdir(folder)) < processes:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_gpu_fractions_two_actors_share_one_gpu(tmp_path: Path) -> None:
    """On a cluster whose one node has a single (logical: this machine has no CUDA) GPU, two
    actors asking for half a GPU each are placed at once: each trained while the other did,
    both were given GPU 0 (the only one Ray makes visible to them), and every result records
    the device `poptune.trainable.worker_device` gave its member, ``cuda:0``. The members
    here ignore the device, so the run completes without CUDA."""
    meet = tmp_path / "meet"
    meet.mkdir()
    url = f"sqlite:///{tmp_path}/runs.db"
    facts = scenario("gpu_share", url, str(meet))
    assert facts["driver"] == "returned" and facts["gpus"] == 1.0
    result = load_result(open_storage(url), "g")
    check_complete(result, 10, 4)
    assert len({h.metrics["pid"] for h in result.history}) == 2
    assert len(os.listdir(meet)) == 2
    for h in result.history:
        assert h.metrics["met"] == 1.0, "the two actors did not train at the same time"
        assert (h.metrics["gpus"], h.metrics["gpu"], h.metrics["visible0"]) == (1.0, 0.0, 1.0)
        assert h.metrics["cuda0"] == 1.0 and h.device == "cuda:0"
    info = open_storage(url).get_run("g")
    assert info.execution["resources"] == {"cpu": 1.0, "gpu": 0.5}


def _gpu_share(url: str, meet: str) -> dict[str, Any]:
    """A one-node cluster with two CPUs and one GPU; two actors ask for half of it each."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PROBE_MEET"] = meet  # before the node starts: its workers inherit it
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False},
    )
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        exp = pt.Experiment(
            trainable=GpuProbe,
            space={"lr": pt.Float(0.01, 1.0)},
            population_size=4,
            steps=10,
            interval=5,
            seed=1,
        )
        exp.run(url, "g", executor="ray", workers=2, resources={"cpu": 1, "gpu": 0.5})
        return {"driver": "returned", "gpus": ray.cluster_resources().get("GPU", 0.0)}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    SCENARIOS = {"node_lost": _node_lost, "gpu_share": _gpu_share}
    print(json.dumps(SCENARIOS[sys.argv[1]](*sys.argv[2:])), flush=True)
