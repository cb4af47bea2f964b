"""What persistence and worker processes cost, and what they buy.

1. **SQLite overhead.** The paper's toy quadratic (``examples/toy_quadratic.py``) with 32
   members whose h is drawn from the space, 200 steps, ready every 4 steps, run by the serial
   executor on a SQLite file: every ready point writes each member's checkpoint (temporary file,
   fsync, rename, directory fsync) and commits the tick's results, decisions, lineage events
   and checkpoint references in one transaction (``PRAGMA synchronous=FULL``). A toy step costs
   microseconds, so the wall time minus the time inside ``step()`` is poptune's overhead. It is
   reported per member-step and per ready event (``members * steps / interval`` of them), and
   beside it the same run in memory.
2. **Processes speed-up.** 8 members whose ``step()`` burns about 20 ms of CPU (``WL_SPIN``
   in ``tests/execution/workloads.py``), 60 steps, ready every 5, with ``executor="processes"``
   and 1, then 2 workers on one SQLite file. The speed-up is the ratio of wall times.

Run it:  python benchmarks/persistence.py [--repeats 3]

It prints the figures and writes them to ``benchmarks/results/persistence.json``. Timings depend
on the machine and its load; the JSON records both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from modules import load  # benchmarks/modules.py: run these as python benchmarks/NAME.py

import poptune as pt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "persistence.json"
WORKLOADS = ROOT / "tests" / "execution" / "workloads.py"
MEMBERS, STEPS, INTERVAL = 32, 200, 4


toy = load("poptune_bench_toy", ROOT / "examples" / "toy_quadratic.py")
inside = {"s": 0.0}


class TimedToy(toy.ToyQuadratic):  # type: ignore[misc,name-defined]
    """The toy, adding the time spent in its own step() to a counter."""

    def step(self) -> dict[str, float]:
        t = time.perf_counter()
        out: dict[str, float] = super().step()
        inside["s"] += time.perf_counter() - t
        return out


def toy_experiment(seed: int) -> pt.Experiment:
    return pt.Experiment(
        trainable=TimedToy,
        space=toy.SPACE,
        population_size=MEMBERS,
        steps=STEPS,
        interval=INTERVAL,
        metric="Q",
        exploit=pt.Truncation(0.2),
        explore=toy.gaussian_noise,
        seed=seed,
    )


def overhead(storage: str | None, seed: int) -> dict[str, float]:
    exp = toy_experiment(seed)
    inside["s"] = 0.0
    t = time.perf_counter()
    result = exp.run(storage, f"bench-{seed}") if storage else exp.run()
    wall = time.perf_counter() - t
    member_steps = MEMBERS * STEPS
    ready_events = MEMBERS * (STEPS // INTERVAL)
    over = wall - inside["s"]
    return {
        "wall_s": wall,
        "overhead_us_per_member_step": over / member_steps * 1e6,
        "overhead_ms_per_ready_event": over / ready_events * 1e3,
        "exploits": float(len(result.events)),
    }


def speedup_run(url: str, name: str, workers: int) -> float:
    os.environ.update(
        {
            "WL_DELAY": "0.02",
            "WL_SPIN": "1",
            "WL_POP": "8",
            "WL_STEPS": "60",
            "WL_INTERVAL": "5",
            "WL_NOISE": "0.01",
        }
    )
    from poptune.execution.source import load_experiment

    exp, source = load_experiment(f"{WORKLOADS}:counter")
    t = time.perf_counter()
    exp.run(url, name, workers=workers, executor="processes", source=source)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        rows = {
            "memory": [overhead(None, s) for s in range(args.repeats)],
            "sqlite": [overhead(url, s) for s in range(args.repeats)],
        }
        print(
            f"Toy quadratic, {MEMBERS} members x {STEPS} steps, ready every {INTERVAL} "
            f"(median of {args.repeats})"
        )
        print(f"{'storage':<8}{'wall s':>9}{'µs/member-step':>17}{'ms/ready event':>16}")
        for kind, runs in rows.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            figures[kind] = med
            print(
                f"{kind:<8}{med['wall_s']:>9.3f}{med['overhead_us_per_member_step']:>17.1f}"
                f"{med['overhead_ms_per_ready_event']:>16.3f}"
            )
        target = figures["sqlite"]["overhead_us_per_member_step"] <= 500
        print(f"SQLite overhead target <= 500 µs per member-step: {'met' if target else 'NOT met'}")

        times = {
            w: [speedup_run(url, f"cpu-{w}-{r}", w) for r in range(args.repeats)] for w in (1, 2)
        }
        one, two = statistics.median(times[1]), statistics.median(times[2])
        figures["processes"] = {"one_worker_s": one, "two_workers_s": two, "speedup": one / two}
        print("\nCPU-bound member (~20 ms/step), 8 members x 60 steps, processes executor:")
        print(
            f"1 worker {one:.2f} s, 2 workers {two:.2f} s: speed-up {one / two:.2f}x "
            f"(target >= 1.8x: {'met' if one / two >= 1.8 else 'NOT met'})"
        )
    figures["load_after"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
