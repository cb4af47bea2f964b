"""How far one PostgreSQL run scales: many members, many worker processes, ready at every step.

A member whose step costs about a microsecond (``x += lr``), ready at every step (interval 1),
so that every step is a ready event: a checkpoint, a commit of its result and of the
controller's decision, and the claim of the next member. That is the worst case for the
coordination through the storage, and what this measures. For each population size (100, 300
and 1,000 members by default) and number of worker processes (2, 4 and 16), a run is created on
a fresh PostgreSQL database without a driver, and that many processes run
`poptune.execution.worker.work` (the loop of the processes executor and of ``poptune worker``)
on it. Once every worker has trained a step, the figures are taken over a window of
``--seconds``; then the workers are told to stop (the run is far from done: steady state is
what is measured, not the start-up of 16 interpreters nor the tail of a run).

Figures, over the window:

* **ready events/s**: ready events (commits) per second, all workers together;
* **commit p50 / p99**: how long a worker's commit transaction takes, waiting for the run's
  lock included (`poptune.execution.worker.Stretch.commit_seconds`), over commits;
* **members/commit**: the mean number of members a commit covers. A worker whose commits
  cost more than training its members claims larger batches
  (`poptune.execution.worker.batch_size`): with steps this cheap, up to half the free
  members, so commits get fewer, longer and cheaper per ready event;
* **double claims**: two checks that must both give 0, over the whole run. *Overlaps*: each
  step records when it ran and in which process (a side file per process); a step of a member
  that starts before another process's step of that member has ended is a double claim.
  *Repeats*: a member-step committed twice in the history.

Run it:  python benchmarks/scale.py [--members 100,300,1000] [--workers 2,4,16] [--seconds 30]
         [--postgres URL] [--profile]

``--profile`` runs one worker of the most members with the fewest workers under cProfile and
prints where its time goes. Needs a PostgreSQL server where the user may create databases (default
``$POPTUNE_TEST_POSTGRES_URL``, else ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
It prints a table and writes ``benchmarks/results/scale.json``. On a machine with fewer cores
than workers the processes share the cores; the JSON records the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import poptune as pt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Cheap(pt.Trainable):
    """x grows by lr each step; the score is x. Each step is logged to ``BENCH_AUDIT/PID``."""

    _audit: Any = None

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.x = 0.0

    def step(self) -> dict[str, float]:
        began = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process here
        self.x += self.hparams["lr"]
        log = Cheap._log()
        if log is not None:
            log.write(f"{self.context.member} {self.context.step} {began} {time.monotonic()}\n")
        return {"score": self.x}

    @staticmethod
    def _log() -> Any:
        folder = os.environ.get("BENCH_AUDIT")
        if not folder:
            return None
        if Cheap._audit is None:
            Cheap._audit = open(os.path.join(folder, str(os.getpid())), "a", buffering=1)  # noqa: SIM115
        return Cheap._audit

    def state_dict(self) -> object:
        return {"x": self.x}

    def load_state_dict(self, state: Any) -> None:
        self.x = float(state["x"])


def bench() -> pt.Experiment:
    """The benchmark's experiment, sized by ``BENCH_MEMBERS`` and ``BENCH_STEPS``."""
    return pt.Experiment(
        trainable=Cheap,
        space={"lr": pt.Float(0.01, 1.0, log=True)},
        population_size=int(os.environ.get("BENCH_MEMBERS", "100")),
        steps=int(os.environ.get("BENCH_STEPS", "10")),
        interval=1,
        exploit=pt.Truncation(0.25),
        explore=pt.Perturb(),
        seed=0,
    )


SOURCE = f"{Path(__file__).resolve()}:bench"
OPTIONS = pt.RunOptions(heartbeat_timeout=30.0, poll_interval=0.05)


def _worker(url: str, root: str, out: str, profile: bool, stop: Any) -> None:
    from poptune.execution.worker import work

    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    report = work(url, "scale", root, OPTIONS, source=SOURCE, threads=1, stop=stop)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(out + ".prof")
    with open(out, "w") as f:
        json.dump(
            {
                "commits": [s.commit_seconds for s in report.stretches],
                "times": [s.committed_at for s in report.stretches],
                "dropped": report.dropped,
            },
            f,
        )


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    base = sa.make_url(server)
    name = f"poptune_scale_{secrets.token_hex(4)}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def audit(folder: Path) -> tuple[int, int]:
    """(member-steps trained, overlaps): steps of one member run at overlapping times by two
    processes."""
    spans: dict[int, list[tuple[float, float, str]]] = {}
    steps = 0
    for path in folder.iterdir():
        for line in path.read_text().splitlines():
            member, _step, t0, t1 = line.split()
            spans.setdefault(int(member), []).append((float(t0), float(t1), path.name))
            steps += 1
    overlaps = 0
    for runs in spans.values():
        runs.sort()
        latest: dict[str, float] = {}  # process -> end of its latest step of this member
        for start, end, pid in runs:
            overlaps += any(p != pid and e > start for p, e in latest.items())
            latest[pid] = max(end, latest.get(pid, end))
    return steps, overlaps


def measure(
    server: str, members: int, workers: int, seconds: float, profile: bool
) -> dict[str, Any]:
    """One configuration: ``workers`` processes train a run of ``members`` members for
    ``seconds`` after the last of them has started, then are told to stop."""
    from poptune.execution.session import prepare_run
    from poptune.execution.source import load_experiment
    from poptune.execution.worker import join_run
    from poptune.storage import open_storage
    from poptune.storage.folders import claim_checkpoint_folder

    os.environ.update({"BENCH_MEMBERS": str(members), "BENCH_STEPS": "100000"})
    with fresh_database(server) as url, tempfile.TemporaryDirectory() as tmp:
        root, folder = Path(tmp) / "ckpts", Path(tmp) / "audit"
        folder.mkdir()
        os.environ["BENCH_AUDIT"] = str(folder)
        exp = load_experiment(SOURCE)[0]
        with open_storage(url) as store:
            info = prepare_run(exp, store, "scale", source=SOURCE, checkpoint_root=str(root))
            join_run(store, "scale", OPTIONS.heartbeat_timeout)
        claim_checkpoint_folder(str(root), "scale", url, info.created)
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        outs = [str(Path(tmp) / f"w{i}.json") for i in range(workers)]
        load = os.getloadavg()
        procs = [
            ctx.Process(target=_worker, args=(url, str(root), out, profile and i == 0, stop))
            for i, out in enumerate(outs)
        ]
        for p in procs:
            p.start()
        # Every worker has trained (its audit file exists): the window starts.
        while len(list(folder.iterdir())) < workers:
            time.sleep(0.05)
            if any(p.exitcode not in (None, 0) for p in procs):
                break
        began = time.time()
        time.sleep(seconds)
        stop.set()
        ended = time.time()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
        reports = [json.loads(Path(o).read_text()) for o in outs]
        pairs = [(t, c) for r in reports for t, c in zip(r["times"], r["commits"], strict=True)]
        window = [(t, c) for t, c in pairs if began <= t <= ended]  # one per member committed
        inside = [c for _, c in window]
        # The stretches of one commit share its end time and its duration.
        commits = sorted(c for _, c in set(window))
        with open_storage(url) as store:
            history = store.results("scale")
        repeats = sum(n - 1 for n in Counter((h.member, h.step) for h in history).values())
        trained, overlaps = audit(folder)
        profile_text = _profile_text(outs[0] + ".prof") if profile else None
    q = statistics.quantiles(commits, n=100, method="inclusive")
    return {
        "members": members,
        "workers": workers,
        "window_s": ended - began,
        "ready_events_in_window": len(inside),
        "ready_events": len(history),
        "trained_steps": trained,
        "dropped": sum(r["dropped"] for r in reports),
        "events_per_s": len(inside) / (ended - began),
        "commits_in_window": len(commits),
        "members_per_commit": len(inside) / max(1, len(commits)),
        "commit_p50_ms": 1000 * q[49],
        "commit_p99_ms": 1000 * q[98],
        "double_claims_overlaps": overlaps,
        "double_claims_repeats": repeats,
        "load_before": load,
        "load_after": os.getloadavg(),
        "profile": profile_text,
    }


def _profile_text(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("cumulative").print_stats(28)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="100,300,1000")
    parser.add_argument("--workers", default="2,4,16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--postgres", default=os.environ.get("POPTUNE_TEST_POSTGRES_URL") or DEFAULT_URL
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    sizes = [int(x) for x in args.members.split(",")]
    counts = [int(x) for x in args.workers.split(",")]
    rows = []
    print(
        f"Cheap member, interval 1, PostgreSQL, {args.seconds:g} s measured per row once every "
        f"worker has started; {os.cpu_count()} cores"
    )
    head = (
        f"{'members':>7} {'workers':>7} {'events/s':>9} {'commit p50 ms':>14} "
        f"{'p99 ms':>8} {'members/commit':>14} {'double claims':>13} {'dropped':>7} "
        f"{'load 1 min':>10}"
    )
    print(head)
    for members in sizes:
        for workers in counts:
            profile = args.profile and members == max(sizes) and workers == min(counts)
            row = measure(args.postgres, members, workers, args.seconds, profile)
            rows.append(row)
            doubles = row["double_claims_overlaps"] + row["double_claims_repeats"]
            print(
                f"{members:>7} {workers:>7} {row['events_per_s']:>9.1f} "
                f"{row['commit_p50_ms']:>14.1f} {row['commit_p99_ms']:>8.1f} "
                f"{row['members_per_commit']:>14.1f} {doubles:>13} "
                f"{row['dropped']:>7} {row['load_after'][0]:>10.2f}",
                flush=True,
            )
    for row in rows:
        if row["profile"]:
            print(f"\nProfile of one worker, {row['members']} members x {row['workers']} workers:")
            print(row["profile"])
    figures = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "seconds_per_row": args.seconds,
        "rows": rows,
        "load_after": os.getloadavg(),
    }
    out = Path(args.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
