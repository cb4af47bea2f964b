"""The two ported clients (CleanRL's PPO, PyTorch's MNIST example) against random search, run
as a new user runs them: with the CLI.

For each example and seed it runs, in a subprocess, exactly what ``docs/examples.md`` shows::

    POPTUNE_EXAMPLE_SEED=S poptune run examples/X.py --baseline random --workers 2 \\
        --storage sqlite:///benchmarks/results/examples_vs_random.db --name X-sS
    poptune compare X-sS X-sS-random --storage sqlite:///benchmarks/results/examples_vs_random.db

(the PBT run, then random search at equal compute as run ``X-sS-random``, then both side by
side), then reads both runs back from the storage: each run's wall time as recorded, and the
final score of its best, median and worst member. It prints a table and writes
``benchmarks/results/examples_vs_random.json``, with the machine's load averages before and
after each pair (the machine is shared: other processes slow the runs down).

A completed pair is read back, not trained again (``--baseline`` leaves a completed run as it
is), so an interrupted measurement resumes where it stopped; delete the database (and its
``-checkpoints`` folder) to measure again.

Run it:  python benchmarks/examples_vs_random.py [--seeds 0 1 2]
         [--examples cleanrl_ppo mnist_digits] [--size default|smoke] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ("cleanrl_ppo", "mnist_digits")


def poptune_command() -> list[str]:
    """The ``poptune`` script beside this Python (what a user types), else ``python -m``."""
    script = Path(sys.executable).with_name("poptune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "poptune"]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def side(cmp_side: Any) -> dict[str, Any]:
    """One run of a comparison as plain numbers."""
    summary = cmp_side.report.summary
    best_member = [m for m in cmp_side.report.members if m.id == summary.best_member]
    return {
        "run": cmp_side.name,
        "status": summary.status,
        "wall_s": round(summary.wall_time, 1),
        "best": cmp_side.best,
        "median": cmp_side.median,
        "worst": cmp_side.worst,
        "finals": list(cmp_side.final_scores),
        "exploits": summary.exploits,
        "best_hparams": dict(best_member[0].hparams) if best_member else None,
    }


def measure(example: str, seed: int, size: str, workers: int, storage: str) -> dict[str, Any]:
    """Runs one pair with the CLI (unless stored already) and reads it back."""
    from poptune.report.compare import read_comparison
    from poptune.storage import open_storage

    name = f"{example}-s{seed}" + ("" if size == "default" else f"-{size}")
    variables = {"POPTUNE_EXAMPLE_SEED": str(seed)}
    if size != "default":
        variables["POPTUNE_EXAMPLE_SIZE"] = size
    env = {**os.environ, **variables}
    run_args = ["run", f"examples/{example}.py", "--baseline", "random"]
    run_args += ["--workers", str(workers), "--storage", storage, "--name", name]
    compare_args = ["compare", name, f"{name}-random", "--storage", storage]
    run = [*poptune_command(), *run_args, "--no-progress"]
    compare = [*poptune_command(), *compare_args]
    before = loadavg()
    start = time.perf_counter()
    done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
    cli_wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(run)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    shown = subprocess.run(compare, cwd=ROOT, env=env, capture_output=True, text=True)
    print(shown.stdout, flush=True)
    after = loadavg()
    store = open_storage(storage)
    try:
        cmp = read_comparison(store, name, f"{name}-random")
    finally:
        store.close()
    pbt, random = (side(s) for s in cmp.runs)
    return {
        "example": example,
        "seed": seed,
        "pbt": pbt,
        "random": random,
        "cli_wall_s": round(cli_wall, 1),
        "loadavg_before": before,
        "loadavg_after": after,
        "commands": [
            " ".join([*(f"{k}={v}" for k, v in variables.items()), "poptune", *run_args]),
            " ".join(["poptune", *compare_args]),
        ],
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    def score(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    lines = [
        "| example | seed | PBT wall | random wall | PBT best | random best | PBT worst "
        "| random worst | load before -> after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p, q = r["pbt"], r["random"]
        lines.append(
            f"| {r['example']} | {r['seed']} | {p['wall_s']:.0f} s | {q['wall_s']:.0f} s "
            f"| {score(p['best'])} | {score(q['best'])} | {score(p['worst'])} "
            f"| {score(q['worst'])} | {r['loadavg_before'][0]:.2f} -> "
            f"{r['loadavg_after'][0]:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", nargs="+", choices=EXAMPLES, default=list(EXAMPLES))
    parser.add_argument("--size", choices=["default", "smoke"], default="default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--storage",
        default="sqlite:///benchmarks/results/examples_vs_random.db",
        help="relative to the repository root (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/examples_vs_random")
    args = parser.parse_args()
    os.chdir(ROOT)  # the storage URL is relative to the root, as in the docs' commands
    start, before = time.perf_counter(), loadavg()
    rows = []
    for example in args.examples:
        for seed in args.seeds:
            print(f"== {example}, seed {seed} (load {loadavg()})", flush=True)
            rows.append(measure(example, seed, args.size, args.workers, args.storage))
    lines = table(rows)
    print("\n".join(lines))
    suffix = "" if args.size == "default" else f"-{args.size}"
    out = args.out or RESULTS / f"examples_vs_random{suffix}.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "size": args.size,
                "workers": args.workers,
                "seeds": args.seeds,
                "storage": args.storage,
                "wall_s": round(time.perf_counter() - start, 1),
                "loadavg_before": before,
                "loadavg_after": loadavg(),
                "runs": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
