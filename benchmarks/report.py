"""How long a report takes for a large run, and how big it is.

A run of 64 members (a function trainable whose score is a noisy curve; truncation and perturb,
ready every 10 steps) is stored in a fresh SQLite file by the serial executor. Then, each
``--repeats`` times (the median is reported):

* **read**: `poptune.report.data.read_report` (the run, its history, events and failures read
  from SQLite and turned into the report's data);
* **html**: `poptune.report.html.report_html` (the four figures as inline SVG, the tables);
* **version**: `poptune.report.data.run_version`, what the dashboard asks every refresh;
* **png**: `poptune.report.png.write_pngs` (matplotlib; once).

Run it:  python benchmarks/report.py [--members 64] [--steps 1000] [--repeats 3]

It prints a table and writes the figures to ``benchmarks/results/report.json``, with the
machine's load average (timings depend on it).
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

import numpy as np

import poptune as pt
from poptune.report.data import read_report, run_version
from poptune.report.html import report_html
from poptune.storage import open_storage

RESULTS = Path(__file__).resolve().parent / "results" / "report.json"


def init(hp: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"x": 0.0, "rng": np.random.default_rng(seed)}


def step(state: dict[str, Any], hp: dict[str, Any]) -> tuple[dict[str, Any], float]:
    # Progress is fastest near lr = 0.01; noise keeps members apart.
    q = max(hp["lr"], 0.01) / min(hp["lr"], 0.01)
    state["x"] += 1.0 / q + 0.1 * float(state["rng"].normal())
    return state, 1.0 - 1.0 / (1.0 + 0.01 * max(0.0, state["x"]))


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    exp = pt.Experiment(
        pt.trainable(init, step),
        {"lr": pt.Float(1e-4, 1e-1, log=True), "momentum": pt.Float(0.5, 0.99)},
        population_size=args.members,
        steps=args.steps,
        interval=10,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/big.db"
        t = time.perf_counter()
        exp.run(url, "big")
        train = time.perf_counter() - t
        with open_storage(url) as store:
            read, report = timed(lambda: read_report(store, "big"), args.repeats)
            html_s, html = timed(lambda: report_html(report), args.repeats)
            version, _ = timed(lambda: run_version(store, "big"), args.repeats)
        png, _ = timed(lambda: pt_pngs(report, Path(tmp) / "png"), 1)
    figures = {
        "members": args.members,
        "steps": args.steps,
        "history_rows": report.summary.member_steps,
        "events": len(report.events),
        "stretches": len(report.stretches),
        "train_s": round(train, 2),
        "read_s": round(read, 3),
        "html_s": round(html_s, 3),
        "html_mib": round(len(html.encode()) / 2**20, 2),
        "version_ms": round(version * 1000, 2),
        "png_s": round(png, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(
        f"{args.members} members x {args.steps} steps: {figures['history_rows']} history rows, "
        f"{figures['events']} events, {figures['stretches']} stretches (trained in {train:.1f} s)"
    )
    print(
        f"read {read:.3f} s, html {html_s:.3f} s ({figures['html_mib']} MiB), "
        f"dashboard version check {version * 1000:.2f} ms, 4 PNGs {png:.2f} s "
        f"(median of {args.repeats}; load average {figures['load_average']})"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1) + "\n")


def pt_pngs(report: Any, folder: Path) -> list[str]:
    from poptune.report.png import write_pngs

    return write_pngs(report, folder)


if __name__ == "__main__":
    main()
