"""Does a run end, and on budget, when the score saturates? Serial against worker processes.

PBT_NOTES trap 13: with asynchronous workers a member can be judged against a donor whose
latest score is from an earlier ready point. Where the score saturates (accuracy), such a donor
often ranks best, the member copies it and goes *back* in steps, retrains steps it had already
trained, and (being the least advanced) is claimed first again. The run then trains far more
member-steps than ``population_size * steps``, or never ends.

Workloads (``benchmarks/workloads.py``), each 8 members, 300 steps, ready every 10
(a budget of 2,400 member-steps), truncation 25%, perturb:

* ``saturating``: an accuracy-like member, ``acc -> 1`` with lr's distance from 0.01, ~3 ms of
  CPU per step;
* ``digits``: a PyTorch MLP (64-128-10) on scikit-learn's digits, score = validation accuracy.

Each workload runs on a fresh SQLite file with the serial executor, then the processes executor
with 1 and with 2 workers, for ``--seeds`` experiment seeds. Every run is a subprocess in its
own process group, stopped (SIGINT, then SIGKILL) at ``--cap`` seconds of wall time and then
reported as *no end*, with the progress it had committed. Figures per run, read back from the
storage afterwards:

* **wall s**: the time of ``Experiment.run`` in the subprocess (for worker processes it
  includes starting them and their imports: torch, about 2-3 s, for ``digits``);
* **member-steps**: committed result rows, ``len(storage.results(name))``; a member that goes
  back in steps commits the steps it retrains again; **ratio**: member-steps / budget (target
  <= 1.10 with 2 workers); **max step** reached by any member and **min step** of the members
  at the end (below ``steps`` only for a run with no end);
* **exploits** (lineage events of kind exploit) and **behind**: those whose donor's state was
  from an earlier step than the member's own when judged (``donor_step < step``);
* **best** (``result.best.score``) and **median** final score of the members;
* the wall-clock **speed-up** of 2 workers over 1 (both processes executor): target >= 1.6x on
  ``digits``.

Medians over seeds are printed with their range ``[min-max]``; the JSON keeps every run.

Run it:  python benchmarks/convergence.py [--seeds 3] [--cap 240] [--workload all] [--quick]
         [--threads N]

``--threads N`` sets ``OMP_NUM_THREADS`` for every run. By default it is inherited, and torch
then runs one thread per core in each process: on a 2-core machine loaded by other work that
made a ``digits`` step about 15 times slower (200 ms) than with one thread (12 ms). The
``ms/step`` column (wall, or the cap, per member-step trained) tells such a slow machine from
a run that trains too many steps.

``--quick`` trains 100 steps (budget 800) with a 60 s cap and 1 seed unless told otherwise, and
writes ``convergence-quick.json``; otherwise the figures go to
``benchmarks/results/convergence.json``. Timings depend on the machine and its load (2 cores
here, shared); the JSON records the load, the code's git commit, and the arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = Path(__file__).resolve().parent / "workloads.py"
NAMES = ("saturating", "digits")
POPULATION = 8
# label -> (executor, workers)
CONFIGS = {"serial": ("serial", 1), "procs x1": ("processes", 1), "procs x2": ("processes", 2)}
TARGET_RATIO, TARGET_SPEEDUP = 1.10, 1.6
GRACE_S = 20.0  # after SIGINT at the cap, time to flush and stop before SIGKILL


def child(workload: str, executor: str, workers: int, url: str, name: str) -> None:
    """In the subprocess: one run, its wall time printed as JSON (seed and steps: env)."""
    from poptune.execution.source import load_experiment

    exp, source = load_experiment(f"{WORKLOADS}:{workload}")
    t = time.perf_counter()
    exp.run(url, name, workers=workers, executor=executor, source=source)
    print(json.dumps({"wall_s": time.perf_counter() - t}), flush=True)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def launch(
    workload: str,
    executor: str,
    workers: int,
    seed: int,
    steps: int,
    url: str,
    cap: float,
    threads: int | None = None,
) -> tuple[str, float | None, float, str]:
    """Runs one configuration in a subprocess (its own process group, so its worker processes
    are stopped with it); returns (status, wall seconds of the run or None, seconds from start
    to end of the subprocess, stderr tail)."""
    env = dict(os.environ, BENCH_SEED=str(seed), BENCH_STEPS=str(steps))
    if threads is not None:  # torch's (and BLAS's) threads per process, read at their import
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    command += [workload, executor, str(workers), url, "bench"]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=cap)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
        # The group id is the child's pid, reserved until it is reaped (and while any process
        # of the group lives): these signals reach only what this benchmark started. A Ctrl-C
        # of the benchmark does not reach its own session, so it is passed on here too.
        _signal_group(proc.pid, signal.SIGINT)  # Ctrl-C: the run flushes, marks interrupted
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=GRACE_S)
        _signal_group(proc.pid, signal.SIGKILL)  # anything left, worker processes included
        proc.communicate()
        if isinstance(e, KeyboardInterrupt):
            raise
        return "no end", None, time.perf_counter() - start, ""
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return "failed", None, elapsed, err[-2000:]
    wall = float(json.loads(out.strip().splitlines()[-1])["wall_s"])
    return "completed", wall, elapsed, ""


def measure(url: str, name: str, steps: int) -> dict[str, Any]:
    """What a run committed, read back from its storage (complete or not)."""
    import poptune as pt
    from poptune.storage import open_storage

    store = open_storage(url)
    try:
        results = store.results(name)
        rows = store.members(name)
        events = store.events(name)
    finally:
        store.close()
    exploits = [e for e in events if e["kind"] == "exploit"]
    behind = [e for e in exploits if e["donor_step"] is not None and e["donor_step"] < e["step"]]
    member_steps = len(results)
    scores = [float(r.state["score"]) for r in rows if r.state.get("score") is not None]
    try:
        best: float | None = pt.load(url, name).best.score
    except Exception:  # a run cut off before anything could be read back as a Result
        best = max(scores) if scores else None
    return {
        "member_steps": member_steps,
        "ratio": member_steps / (POPULATION * steps),
        "max_step": max((r.step for r in results), default=0),
        "min_step": min((int(r.state["step"]) for r in rows), default=0),
        "exploits": len(exploits),
        "behind": len(behind),
        "best": best,
        "median": statistics.median(scores) if scores else None,
    }


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "completed"]
    out: dict[str, Any] = {
        "runs": len(runs),
        "completed": len(done),
        "no_end": sum(r["status"] == "no end" for r in runs),
        "failed": sum(r["status"] == "failed" for r in runs),
        "wall_s": spread([r["wall_s"] for r in done]),
    }
    keys = ("member_steps", "ratio", "max_step", "min_step", "exploits", "behind")
    for key in (*keys, "ms_per_member_step"):
        out[key] = spread([float(r[key]) for r in runs if key in r])
    for key in ("best", "median"):
        out[key] = spread([float(r[key]) for r in runs if r[key] is not None])
    return out


def fmt(s: dict[str, float] | None, spec: str, ranged: bool = True) -> str:
    if s is None:
        return "-"
    text = format(s["median"], spec)
    if ranged and s["min"] != s["max"]:
        text += f" [{format(s['min'], spec)}-{format(s['max'], spec)}]"
    return text


def wall_text(s: dict[str, Any], cap: float) -> str:
    if not s["completed"]:
        return f"no end (> {cap:.0f} s)"
    text = fmt(s["wall_s"], ".1f")
    if s["no_end"]:
        text += f" +{s['no_end']} no end"
    if s["failed"]:
        text += f" +{s['failed']} failed"
    return text


def speedup(one: dict[str, Any], two: dict[str, Any], cap: float) -> tuple[float | None, str]:
    """Median wall of 1 worker over that of 2; with a 2-worker run cut off, at most w1/cap."""
    if not one["completed"]:
        return None, "- (1 worker did not end)"
    w1 = one["wall_s"]["median"]
    if two["no_end"] or two["failed"] or not two["completed"]:
        return None, f"< {w1 / cap:.2f}x (2 workers: no end)"
    value = w1 / two["wall_s"]["median"]
    return value, f"{value:.2f}x"


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return head + (" (src modified)" if dirty else "") if head else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (3)")
    parser.add_argument("--cap", type=float, default=None, help="wall seconds per run (240)")
    parser.add_argument("--workload", choices=(*NAMES, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="100 steps, 60 s cap, 1 seed")
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="results file (JSON)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every run (default: inherited; torch then uses one per core)",
    )
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, executor, workers, url, name = args.child
        child(workload, executor, int(workers), url, name)
        return

    import poptune

    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    cap = args.cap if args.cap is not None else (60.0 if args.quick else 240.0)
    steps = args.steps or (100 if args.quick else 300)
    out = args.out or RESULTS / ("convergence-quick.json" if args.quick else "convergence.json")
    names = NAMES if args.workload == "all" else (args.workload,)
    budget = POPULATION * steps
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "code": git_commit(),
        # The runs import poptune as this process does (PYTHONPATH=src, or an installed copy).
        "poptune_from": str(Path(poptune.__file__).resolve().parent),
        "settings": {
            "seeds": seeds,
            "cap_s": cap,
            "steps": steps,
            "budget": budget,
            "threads": args.threads or os.environ.get("OMP_NUM_THREADS"),
        },
        "load_before": os.getloadavg(),
        "workloads": {},
    }
    print(
        f"{POPULATION} members x {steps} steps, ready every 10 (budget {budget} member-steps), "
        f"seeds 0..{seeds - 1}, cap {cap:.0f} s per run"
    )
    with tempfile.TemporaryDirectory(prefix="poptune-convergence-") as tmp:
        for workload in names:
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in CONFIGS}
            for seed in range(seeds):
                for label, (executor, workers) in CONFIGS.items():
                    url = f"sqlite:///{tmp}/{workload}-{executor}-{workers}-{seed}.db"
                    status, wall, elapsed, err = launch(
                        workload, executor, workers, seed, steps, url, cap, args.threads
                    )
                    run: dict[str, Any] = {
                        "seed": seed,
                        "status": status,
                        "wall_s": wall,
                        "elapsed_s": elapsed,
                    }
                    try:
                        run.update(measure(url, "bench", steps))
                        # Per member-step trained, retrained ones included: tells a slow
                        # machine (or slow steps) from a run that trains too many steps.
                        spent = wall if wall is not None else min(elapsed, cap)
                        if run["member_steps"]:
                            run["ms_per_member_step"] = 1e3 * spent / run["member_steps"]
                    except Exception as e:  # nothing committed (a failure at start-up)
                        run["error"] = f"{type(e).__name__}: {e}"
                    if err:
                        run["stderr"] = err
                    runs[label].append(run)
                    when = f"{wall:.1f} s" if wall is not None else status
                    print(
                        f"  {workload} {label} seed {seed}: {when}, "
                        f"{run.get('member_steps', '?')} member-steps "
                        f"({run.get('ratio', float('nan')):.2f}x), "
                        f"min step {run.get('min_step', '?')}",
                        flush=True,
                    )
                    if status == "failed":
                        print(err, file=sys.stderr)
            figures["workloads"][workload] = {
                label: {"summary": summarise(r), "runs": r} for label, r in runs.items()
            }
    figures["load_after"] = os.getloadavg()
    report(figures, names, cap)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")


def report(figures: dict[str, Any], names: tuple[str, ...], cap: float) -> None:
    """The table (medians over seeds, [range]) and the target lines; adds them to figures."""
    print(
        f"\n{'workload':<11}{'executor':<10}{'wall s':>22}{'member-steps':>20}{'ratio':>18}"
        f"{'max':>5}{'min':>5}{'exploits':>9}{'behind':>7}{'best':>7}{'median':>8}"
        f"{'ms/step':>8}"
    )
    ratios: list[float] = []
    no_end = 0
    targets: dict[str, Any] = {}
    for workload in names:
        table = figures["workloads"][workload]
        for label in CONFIGS:
            s = table[label]["summary"]
            print(
                f"{workload:<11}{label:<10}{wall_text(s, cap):>22}"
                f"{fmt(s['member_steps'], '.0f'):>20}"
                f"{fmt(s['ratio'], '.2f'):>18}{fmt(s['max_step'], '.0f', False):>5}"
                f"{fmt(s['min_step'], '.0f', False):>5}{fmt(s['exploits'], '.0f', False):>9}"
                f"{fmt(s['behind'], '.0f', False):>7}{fmt(s['best'], '.3f', False):>7}"
                f"{fmt(s['median'], '.3f', False):>8}"
                f"{fmt(s['ms_per_member_step'], '.1f', False):>8}"
            )
        two = table["procs x2"]["summary"]
        ratios += [r["ratio"] for r in table["procs x2"]["runs"] if "ratio" in r]
        no_end += two["no_end"] + two["failed"]
        value, text = speedup(table["procs x1"]["summary"], two, cap)
        table["speedup_2_over_1"] = value
        targets[f"speedup_{workload}"] = text
    print()
    worst = max(ratios, default=float("nan"))
    met = not no_end and bool(ratios) and worst <= TARGET_RATIO
    line = f"member-steps/budget <= {TARGET_RATIO:.2f} with 2 workers: "
    line += f"{'met' if met else 'NOT met'} (worst {worst:.2f}x"
    line += f"; {no_end} run(s) with no end)" if no_end else ")"
    print(line)
    targets["ratio"] = {"met": met, "worst": worst, "no_end": no_end}
    for workload in names:
        value = figures["workloads"][workload]["speedup_2_over_1"]
        text = targets[f"speedup_{workload}"]
        if workload == "digits":
            ok = value is not None and value >= TARGET_SPEEDUP
            targets["speedup"] = {"met": ok, "value": value}
            print(
                f"speed-up of 2 workers over 1 on digits >= {TARGET_SPEEDUP:.1f}x: "
                f"{'met' if ok else 'NOT met'} ({text})"
            )
        else:
            print(f"speed-up of 2 workers over 1 on {workload} (no target): {text}")
    figures["targets"] = targets


if __name__ == "__main__":
    main()
