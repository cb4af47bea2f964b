"""poptune against Ray Tune's PopulationBasedTraining, on one local Ray instance, in one run.

Both frameworks train the very same members: the Ray Tune trainable (class API, as Tune's PBT
guide recommends: ``setup``/``step``/``save_checkpoint``/``load_checkpoint``/``reset_config``,
``reuse_actors=True``, a checkpoint every ``perturbation_interval``) wraps the poptune
`Trainable` of the example, so only the framework around ``step()`` differs. Tasks:

* **toy**: the paper's toy quadratic (``examples/toy_quadratic.py``), 200 steps, ready every 4,
  h drawn from U(0, 1); metric Q (the true objective);
* **lr**: the learning-rate schedule task (``examples/lr_schedule.py``, `OwnNoise`), 200 steps,
  ready every 5, lr drawn from U(1e-4, 0.02); metric acc;
* **saturating** (``benchmarks/workloads.py``): an accuracy-like member whose score saturates
  (PBT_NOTES trap 13), 8 members, 300 steps, ready every 10, about 3 ms of CPU per step.

Each at 8 and 32 members (saturating: 8). The same PBT everywhere: truncation 25%
(``quantile_fraction=0.25``), perturb x0.8/x1.2 with resample probability 0.25, ready every
``interval`` steps (``perturbation_interval``, ``time_attr="training_iteration"``),
asynchronous. Where a setting is Tune's own, it is the one that lowers Tune's overhead: its
automatic result loggers are off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``), actors' logs are
not forwarded to the driver, every checkpoint is kept (``num_to_keep`` forces experiment-state
snapshots).

Frameworks, in this order for every task, size and seed (interleaved, so that the machine's
load hits them alike):

* ``ray tune``: ``tune.Tuner(...).fit()``, one CPU per trial (2 trials at a time on the
  2-CPU instance), its checkpoints in a temporary folder;
* ``poptune ray``: ``executor="ray"``, 2 actors with one CPU each, on the same Ray instance;
* ``poptune procs``: ``executor="processes"``, 2 worker processes;
* ``poptune serial``: one process (reference);
* ``poptune ray shm`` (``--frameworks ... "poptune ray shm"``): ``poptune ray`` with its SQLite
  file and checkpoints in ``/dev/shm`` (memory: ``fsync`` costs nothing there), to tell the
  framework's own cost from the cost of making every commit durable on disk.

poptune runs use a fresh SQLite file (every result, decision and checkpoint reference
persisted). Figures per run:

* **wall s**: the call that trains (``Tuner.fit`` / ``Experiment.run``), start-up of actors
  and processes included, the Ray instance's own start (once, before everything) not;
* **us/ms**: overhead per member-step, ``(wall - compute) / member-steps``, where ``compute``
  is the time the same number of ``step()`` calls takes in a bare loop in this process;
* **marg us**: the marginal overhead per member-step from 8 to 32 members,
  ``(wall32 - wall8) / (member-steps32 - member-steps8)``: fixed start-up costs cancel out;
* the saturating task is compute-bound and trained by 2 workers at once, so ``wall - compute``
  says nothing there: its point is the **ratio** (and its wall time);
* **quality**: the best member's last score (toy: Q, ideal 1.1995; lr: acc, 200 is the task's
  goal); **ratio**: member-steps trained / budget (``population * steps``).

Run it:  python benchmarks/vs_ray_tune.py [--seeds 1] [--sizes 8 32] [--tasks toy lr saturating]

It prints a table and writes ``benchmarks/results/vs_ray_tune.json`` with every run, the load
average before and after each, and the versions. Needs the ``[ray]`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from modules import load as load_module  # benchmarks/modules.py

import poptune as pt

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
RESULTS = HERE.parent / "results" / "vs_ray_tune.json"
FRAMEWORKS = ("ray tune", "poptune ray", "poptune procs", "poptune serial", "poptune ray shm")
DEFAULT_FRAMEWORKS = FRAMEWORKS[:4]
SHM = "/dev/shm"
WORKERS = 2
QUANTILE, RESAMPLE, FACTORS = 0.25, 0.25, (0.8, 1.2)
TARGET_FACTOR = 10.0


def toy_module() -> ModuleType:
    return load_module("poptune_example_toy_quadratic", ROOT / "examples" / "toy_quadratic.py")


def lr_module() -> ModuleType:
    return load_module("poptune_example_lr_schedule", ROOT / "examples" / "lr_schedule.py")


def workloads_module() -> ModuleType:
    return load_module("poptune_bench_workloads", HERE.parent / "workloads.py")


# -- the tasks -----------------------------------------------------------------------------------


class Task:
    """One task: its poptune trainable, space, schedule and metric."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "toy":
            self.cls, self.space = toy_module().ToyQuadratic, toy_module().SPACE
            self.steps, self.interval, self.metric = 200, 4, "Q"
        elif name == "lr":
            self.cls, self.space = lr_module().OwnNoise, lr_module().SPACE
            self.steps, self.interval, self.metric = 200, 5, "acc"
        elif name == "saturating":
            wl = workloads_module()
            self.cls, self.space = wl.Saturating, wl.SATURATING_SPACE
            self.steps, self.interval, self.metric = 300, 10, "acc"
        else:
            raise ValueError(f"unknown task {name!r}")

    def experiment(self, size: int, seed: int) -> pt.Experiment:
        return pt.Experiment(
            trainable=self.cls,
            space=self.space,
            population_size=size,
            steps=self.steps,
            interval=self.interval,
            metric=self.metric,
            mode="max",
            exploit=pt.Truncation(QUANTILE),
            explore=pt.Perturb(factors=FACTORS, resample_probability=RESAMPLE),
            seed=seed,
        )


def __getattr__(name: str) -> Callable[[], pt.Experiment]:
    """``vs_ray_tune.py:toy_8_s0``: the source form worker processes and actors import."""
    task, size, seed = name.rsplit("_", 2) if name.count("_") >= 2 else ("", "", "")
    if task in ("toy", "lr", "saturating") and size.isdigit() and seed[1:].isdigit():
        return lambda: Task(task).experiment(int(size), int(seed[1:]))
    raise AttributeError(name)


def bare_compute(task: Task, size: int) -> float:
    """Seconds that ``size * steps`` step() calls take in a bare loop here (no framework)."""
    rng = np.random.default_rng(0)
    members = [task.cls({k: p.sample(rng) for k, p in task.space.items()}, i) for i in range(size)]
    t0 = time.perf_counter()
    for _ in range(task.steps):
        for m in members:
            m.step()
    return time.perf_counter() - t0


# -- Ray Tune ------------------------------------------------------------------------------------


def tune_trainable(task: Task) -> type:
    """A Tune class trainable that wraps the task's poptune trainable."""
    from ray import tune

    member_cls = task.cls

    class Wrapped(tune.Trainable):  # type: ignore[misc]
        def setup(self, config: dict[str, Any]) -> None:
            seed = abs(hash(self.trial_id)) % 2**31
            self.member = member_cls(dict(config), seed)

        def step(self) -> dict[str, float]:
            out: dict[str, float] = self.member.step()
            return out

        def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
            return {"state": self.member.state_dict()}

        def load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            self.member.load_state_dict(checkpoint["state"])
            self.member.set_hparams(dict(self.config))  # after the load (trap 7)

        def reset_config(self, new_config: dict[str, Any]) -> bool:
            self.member = member_cls(dict(new_config), abs(hash(self.trial_id)) % 2**31)
            return True

    return Wrapped


class _Count:
    """A Tune callback that counts reported results (one per step() call)."""

    def __init__(self) -> None:
        from ray import tune

        outer = self

        class Cb(tune.Callback):  # type: ignore[misc]
            def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: Any) -> None:
                outer.results += 1

        self.results = 0
        self.callback = Cb()


def run_tune(task: Task, size: int, seed: int, folder: str) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    mutations = {
        k: (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
        for k, p in task.space.items()
    }
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=task.interval,
        hyperparam_mutations=mutations,
        quantile_fraction=QUANTILE,
        resample_probability=RESAMPLE,
        perturbation_factors=(FACTORS[1], FACTORS[0]),
    )
    count = _Count()
    tuner = tune.Tuner(
        tune.with_resources(tune_trainable(task), {"cpu": 1}),
        param_space=dict(mutations),
        tune_config=tune.TuneConfig(
            scheduler=pbt,
            metric=task.metric,
            mode="max",
            num_samples=size,
            reuse_actors=True,
            search_alg=tune.search.BasicVariantGenerator(random_state=seed),
        ),
        run_config=tune.RunConfig(
            name=f"{task.name}_{size}_s{seed}",
            storage_path=folder,
            stop={"training_iteration": task.steps},
            # Every checkpoint kept: num_to_keep forces a snapshot of Tune's experiment state
            # each time a trial has saved that many, which would only slow it down.
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=task.interval),
            callbacks=[count.callback],
            verbose=0,
        ),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    errors = [str(r.error) for r in grid if r.error is not None]
    last = [float(r.metrics.get(task.metric, np.nan)) for r in grid if r.metrics]
    return {
        "wall_s": wall,
        "member_steps": count.results,
        "quality": max(last) if last else float("nan"),
        "errors": errors[:3],
    }


# -- poptune -------------------------------------------------------------------------------------


def run_poptune(framework: str, task: Task, size: int, seed: int, folder: str) -> dict[str, Any]:
    from poptune.storage import open_storage

    source = f"{HERE}:{task.name}_{size}_s{seed}"
    exp = Task(task.name).experiment(size, seed)
    url = f"sqlite:///{folder}/{framework.replace(' ', '_')}.db"
    kwargs: dict[str, Any] = {"source": source, "checkpoints": f"{folder}/checkpoints"}
    if framework in ("poptune ray", "poptune ray shm"):
        kwargs.update(executor="ray", workers=WORKERS, resources={"cpu": 1})
    elif framework == "poptune procs":
        kwargs.update(executor="processes", workers=WORKERS)
    else:
        kwargs.update(executor="serial")
    t0 = time.perf_counter()
    result = exp.run(url, "r", **kwargs)
    wall = time.perf_counter() - t0
    store = open_storage(url)
    steps = len(store.results("r"))
    store.close()
    return {"wall_s": wall, "member_steps": steps, "quality": float(result.best.score or np.nan)}


# -- the benchmark -------------------------------------------------------------------------------


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def one(framework: str, task: Task, size: int, seed: int) -> dict[str, Any]:
    where = SHM if framework.endswith(" shm") else None
    with tempfile.TemporaryDirectory(prefix="vs_ray_tune_", dir=where) as folder:
        before = load()
        if framework == "ray tune":
            out = run_tune(task, size, seed, folder)
        else:
            out = run_poptune(framework, task, size, seed, folder)
    compute = bare_compute(task, size) * out["member_steps"] / (size * task.steps)
    out.update(
        framework=framework,
        task=task.name,
        size=size,
        seed=seed,
        budget=size * task.steps,
        compute_s=compute,
        overhead_us=(out["wall_s"] - compute) / max(1, out["member_steps"]) * 1e6,
        load_before=before,
        load_after=load(),
    )
    return out


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in runs if r[key] == r[key]]
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        for framework in FRAMEWORKS:
            sizes = sorted({r["size"] for r in runs if r["task"] == task})
            walls: dict[int, tuple[float, float]] = {}
            for size in sizes:
                sel = [
                    r
                    for r in runs
                    if r["task"] == task and r["framework"] == framework and r["size"] == size
                ]
                if not sel:
                    continue
                walls[size] = (median(sel, "wall_s"), median(sel, "member_steps"))
                rows.append(
                    {
                        "task": task,
                        "framework": framework,
                        "size": size,
                        "runs": len(sel),
                        "wall_s": median(sel, "wall_s"),
                        "overhead_us": median(sel, "overhead_us"),
                        "quality": median(sel, "quality"),
                        "ratio": median(sel, "member_steps") / sel[0]["budget"],
                        "marginal_us": None,
                    }
                )
            if len(walls) >= 2:
                lo, hi = walls[min(walls)], walls[max(walls)]
                marginal = (hi[0] - lo[0]) / max(1.0, hi[1] - lo[1]) * 1e6
                for row in rows:
                    if row["task"] == task and row["framework"] == framework:
                        row["marginal_us"] = marginal
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'task':<11}{'framework':<16}{'size':>5}{'wall s':>9}{'us/ms':>9}{'marg us':>9}"
        f"{'quality':>10}{'ratio':>7}"
    )
    lines = [head]
    for r in rows:
        marginal = f"{r['marginal_us']:.0f}" if r["marginal_us"] is not None else "-"
        # Compute-bound with 2 workers in parallel: wall - (serial compute) means nothing.
        overhead = "-" if r["task"] == "saturating" else f"{r['overhead_us']:.0f}"
        lines.append(
            f"{r['task']:<11}{r['framework']:<16}{r['size']:>5}{r['wall_s']:>9.2f}"
            f"{overhead:>9}{marginal:>9}{r['quality']:>10.4f}{r['ratio']:>7.3f}"
        )
    return "\n".join(lines)


def factors(rows: list[dict[str, Any]]) -> list[str]:
    """Ray Tune's overhead per member-step divided by poptune ray's, per task and size."""
    out = []
    by = {(r["task"], r["framework"], r["size"]): r for r in rows}
    for (task, framework, size), r in by.items():
        if framework != "ray tune" or (task, "poptune ray", size) not in by:
            continue
        ours = by[(task, "poptune ray", size)]
        if task == "saturating":  # compute-bound on 2 workers: wall - compute means nothing
            out.append(
                f"{task} {size}: member-steps per budget, Ray Tune {r['ratio']:.3f} against "
                f"poptune ray {ours['ratio']:.3f}; quality {r['quality']:.4f} vs "
                f"{ours['quality']:.4f}"
            )
            continue
        f = r["overhead_us"] / max(1e-9, ours["overhead_us"])
        line = f"{task} {size}: Ray Tune / poptune ray overhead per member-step = {f:.1f}x"
        if r["marginal_us"] and ours["marginal_us"]:
            line += f" (marginal: {r['marginal_us'] / max(1e-9, ours['marginal_us']):.1f}x)"
        line += f"; quality {r['quality']:.4f} vs {ours['quality']:.4f}"
        out.append(line)
    return out


def versions() -> dict[str, str]:
    import ray

    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return {
        "ray": ray.__version__,
        "poptune": pt.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tasks", nargs="+", default=["toy", "lr", "saturating"])
    parser.add_argument(
        "--frameworks", nargs="+", default=list(DEFAULT_FRAMEWORKS), choices=FRAMEWORKS
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    for module in (toy_module(), lr_module(), workloads_module()):
        ray.cloudpickle.register_pickle_by_value(module)  # Tune's actors cannot import them
    t0 = time.perf_counter()
    # log_to_driver=False: Tune's trial actors log every save and restore; poptune's are silent.
    ray.init(  # "local": a new instance, never a cluster another program left running
        address="local",
        num_cpus=WORKERS,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    ray_start = time.perf_counter() - t0
    frameworks = [f for f in FRAMEWORKS if f in args.frameworks]
    runs: list[dict[str, Any]] = []
    for task_name in args.tasks:
        task = Task(task_name)
        sizes = [8] if task_name == "saturating" else args.sizes
        for size in sizes:
            for seed in range(args.seeds):
                for framework in frameworks:
                    run = one(framework, task, size, seed)
                    runs.append(run)
                    print(
                        f"{task_name:<11}{framework:<16}{size:>4} seed {seed}: wall "
                        f"{run['wall_s']:.2f} s, {run['overhead_us']:.0f} us/member-step, "
                        f"quality {run['quality']:.4f}, ratio "
                        f"{run['member_steps'] / run['budget']:.3f}, load {run['load_after']}",
                        flush=True,
                    )
    rows = summarise(runs)
    print()
    print(table(rows))
    print()
    for line in factors(rows):
        print(line)
    print(f"Ray instance start: {ray_start:.1f} s (not in any wall time); load {load()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "ray_start_s": ray_start,
        "target_factor": TARGET_FACTOR,
        "summary": rows,
        "runs": runs,
    }
    args.out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
