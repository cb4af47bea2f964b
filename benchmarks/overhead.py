"""Framework overhead of poptune: time per member-step, peak memory, and import time.

The workload is the paper's toy quadratic (``examples/toy_quadratic.py``) with populations of
8, 32 and 128 members whose h is drawn from the space, truncation 20%, the paper's Gaussian-noise
explore, 200 steps, ready every 4 steps, run in this process by ``Experiment.run()`` (no
storage given: the serial executor with in-memory storage). A toy step costs a few
microseconds, so nearly all of the wall time is the framework's.

How each figure is measured:

* **Overhead per member-step**: the wall time of ``experiment.run()`` minus the time spent
  inside the members' ``step()`` calls, divided by ``population * steps``. The time inside
  ``step()`` is measured in situ by a subclass of the toy trainable whose ``step()`` adds its
  own duration (two ``perf_counter`` calls) to a counter. As a cross-check, the same number of
  ``step()`` calls is also timed in a bare loop over freshly built members; the overhead
  computed that way is printed beside it. Each size is run ``--repeats`` times with different
  seeds; the median is reported.
* **Peak memory**: each size runs once in a fresh subprocess, which reports ``ru_maxrss``
  (peak resident set) before and after ``run()``, and then the ``tracemalloc`` peak of a second
  run (Python allocations only; numpy's buffers included, the interpreter itself not).
* **Import time**: ``python -c "import poptune"`` and ``python -c "pass"`` are each run
  ``--import-repeats`` times in fresh processes; the medians and their difference (the cost of
  the import itself) are reported, with ``-X importtime``'s cumulative figures for poptune and
  for numpy within it.

Run it:  python benchmarks/overhead.py [--repeats 5] [--sizes 8 32 128]

It prints a table and writes the figures to ``benchmarks/results/overhead.json``. Timings depend
on the machine and on its load; the JSON records the machine and its load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
STEPS, INTERVAL = 200, 4
TARGET_US, TARGET_IMPORT_S = 50.0, 0.3


def load_toy() -> ModuleType:
    name = "poptune_example_toy_quadratic"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "toy_quadratic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def timed_trainable(toy: ModuleType) -> Any:
    """The toy trainable, with the time spent inside ``step()`` added to ``Timed.inside``."""

    class Timed(toy.ToyQuadratic):  # type: ignore[misc, name-defined]
        inside = 0.0
        calls = 0

        def step(self) -> dict[str, float]:
            t0 = time.perf_counter()
            out: dict[str, float] = super().step()
            Timed.inside += time.perf_counter() - t0
            Timed.calls += 1
            return out

    return Timed


def experiment(toy: ModuleType, trainable: Any, size: int, seed: int) -> Any:
    import poptune as pt

    return pt.Experiment(
        trainable=trainable,
        space=toy.SPACE,  # h drawn from the prior for every member
        population_size=size,
        steps=STEPS,
        interval=INTERVAL,
        metric="Q",
        mode="max",
        exploit=pt.Truncation(0.2),
        explore=toy.gaussian_noise,
        seed=seed,
    )


def measure_time(size: int, seed: int) -> dict[str, float]:
    """One run of one size: wall time, time inside step(), and a bare-loop step time."""
    toy = load_toy()
    timed = timed_trainable(toy)
    exp = experiment(toy, timed, size, seed)
    timed.inside, timed.calls = 0.0, 0
    t0 = time.perf_counter()
    result = exp.run()
    wall = time.perf_counter() - t0
    member_steps = size * STEPS
    assert timed.calls == member_steps == len(result.history)
    members = [toy.ToyQuadratic(h, 0) for h in result.initial_hparams.values()]
    t0 = time.perf_counter()
    for _ in range(STEPS):
        for m in members:
            m.step()
    bare = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "inside_step_s": timed.inside,
        "bare_loop_s": bare,
        "overhead_us": (wall - timed.inside) / member_steps * 1e6,
        "overhead_bare_us": (wall - bare) / member_steps * 1e6,
        "step_us": timed.inside / member_steps * 1e6,
        "events": len(result.events),
    }


def child_memory(size: int) -> None:
    """Runs in a subprocess: prints peak RSS before/after a run and a tracemalloc peak."""
    toy = load_toy()
    exp = experiment(toy, toy.ToyQuadratic, size, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exp.run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exp = experiment(toy, toy.ToyQuadratic, size, seed=1)
    tracemalloc.start()
    exp.run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kib = 1 if sys.platform != "darwin" else 1 / 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    print(
        json.dumps(
            {
                "rss_before_run_mib": before * kib / 1024,
                "rss_peak_mib": after * kib / 1024,
                "tracemalloc_peak_mib": peak / 2**20,
            }
        )
    )


def measure_memory(size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(size)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def median_process_time(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def importtime_breakdown(repeats: int) -> dict[str, float]:
    """Median cumulative import time (-X importtime) of poptune and of numpy within it."""
    poptune_us, numpy_us = [], []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import poptune"],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        for line in out.stderr.splitlines():
            parts = line.split("|")
            if len(parts) != 3 or not parts[1].strip().isdigit():
                continue
            name = parts[2].rstrip()
            if name.strip() == "poptune" and name.startswith(" poptune"):
                poptune_us.append(int(parts[1]))
            elif name.strip() == "numpy":
                numpy_us.append(int(parts[1]))
    return {
        "importtime_poptune_s": statistics.median(poptune_us) / 1e6,
        "importtime_numpy_s": statistics.median(numpy_us) / 1e6 if numpy_us else 0.0,
    }


def measure_import(repeats: int) -> dict[str, float]:
    with_import = median_process_time("import poptune", repeats)
    bare = median_process_time("pass", repeats)
    return {
        "python_import_poptune_s": with_import,
        "python_pass_s": bare,
        "import_s": with_import - bare,
        **importtime_breakdown(repeats),
    }


def table(sizes: dict[int, dict[str, Any]], imp: dict[str, float]) -> str:
    head = (
        f"{'members':>8}{'wall s':>9}{'step µs':>9}{'overhead µs':>13}{'(bare loop)':>12}"
        f"{'exploits':>10}{'peak RSS MiB':>14}{'tracemalloc MiB':>17}"
    )
    lines = [head]
    for size, fig in sizes.items():
        lines.append(
            f"{size:>8}{fig['wall_s']:>9.3f}{fig['step_us']:>9.2f}{fig['overhead_us']:>13.1f}"
            f"{fig['overhead_bare_us']:>12.1f}{fig['events']:>10.0f}{fig['rss_peak_mib']:>14.1f}"
            f"{fig['tracemalloc_peak_mib']:>17.2f}"
        )
    worst = max(fig["overhead_us"] for fig in sizes.values())
    lines.append(
        f"overhead target <= {TARGET_US:g} µs per member-step: "
        f"{'met' if worst <= TARGET_US else 'NOT met'} (worst {worst:.1f} µs)"
    )
    lines.append(
        f"import poptune: {imp['import_s']:.3f} s (python -c 'import poptune' "
        f"{imp['python_import_poptune_s']:.3f} s minus python -c 'pass' "
        f"{imp['python_pass_s']:.3f} s; -X importtime: poptune "
        f"{imp['importtime_poptune_s']:.3f} s, of which numpy {imp['importtime_numpy_s']:.3f} s);"
        f" target < {TARGET_IMPORT_S:g} s: "
        f"{'met' if imp['import_s'] < TARGET_IMPORT_S else 'NOT met'}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--import-repeats", type=int, default=9)
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child_memory is not None:
        child_memory(args.child_memory)
        return

    load_toy()
    measure_time(8, seed=10_000)  # warm-up: first-call costs are not overhead per step
    sizes: dict[int, dict[str, Any]] = {}
    for size in args.sizes:
        runs = [measure_time(size, seed) for seed in range(args.repeats)]
        fig: dict[str, Any] = {
            key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "events"
        }
        fig["events"] = statistics.median(r["events"] for r in runs)
        fig["runs"] = runs
        fig.update(measure_memory(size))
        sizes[size] = fig
    imp = measure_import(args.import_repeats)
    print(
        f"poptune overhead: toy quadratic, {STEPS} steps, ready every {INTERVAL}, truncation 20%, "
        f"median of {args.repeats} runs per size"
    )
    print(table(sizes, imp))
    report = {
        "workload": {
            "problem": "toy quadratic",
            "steps": STEPS,
            "interval": INTERVAL,
            "exploit": "Truncation(0.2)",
            "explore": "gaussian_noise",
            "executor": "Experiment.run() (serial, in-memory storage)",
            "repeats": args.repeats,
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "targets": {"overhead_us": TARGET_US, "import_s": TARGET_IMPORT_S},
        "sizes": {str(k): v for k, v in sizes.items()},
        "import": imp,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    print(f"wrote {shown}")


if __name__ == "__main__":
    main()
