"""What a TensorBoard logger costs a run: the same runs with and without it.

Loggers are fed by a thread of the process that started the run (`poptune.loggers.LogFeed`),
which reads what the executor committed from the storage once a second and writes the event
files; workers never see them. With the serial executor that thread shares the interpreter
with the training, so this measures the worst case:

1. **toy, memory**: the paper's toy quadratic, 32 members x 200 steps, ready every 4, in
   memory (a step costs microseconds; the run is over before the first read, so the whole
   history is written at the end, inside ``run()``);
2. **toy, sqlite**: the same on a SQLite file (the ``poptune run`` case);
3. **busy, sqlite**: 16 members x 250 steps whose step spins the CPU for about 0.5 ms in
   Python (so the feed's reads and writes compete with training for the interpreter while
   it trains), ready every 5, on SQLite.

For each, ``run()`` without and with `poptune.loggers.TensorBoardLogger`, runs alternated
(A B A B...), medians of ``--repeats``, the differences per member-step: its wall time; the
wall time until the executor returned (``training``: with a logger, the feed's last read and
the close come after it, inside ``run()``); the CPU time of the process, every thread (the
cost that does not depend on what else the machine runs); and ``hooks``, the wall time the
logger's own hooks took (inside the feed's thread, waits for the interpreter included).

Run it:  python benchmarks/loggers.py [--repeats 5]

It prints the figures and writes them to ``benchmarks/results/loggers.json``, with the load
average (``os.getloadavg``, as ``uptime`` shows it) before and after. Needs tensorboardX.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modules import load  # benchmarks/modules.py: run these as python benchmarks/NAME.py

import poptune as pt
from poptune.loggers import LogFeed, LoggedStep, TensorBoardLogger
from poptune.result import Event, Result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "loggers.json"


toy = load("poptune_bench_toy", ROOT / "examples" / "toy_quadratic.py")


class TimedTensorBoard(TensorBoardLogger):
    """The TensorBoard logger, adding the time spent in its hooks to ``spent``."""

    spent = 0.0

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        t = time.perf_counter()
        try:
            fn(*args)
        finally:
            TimedTensorBoard.spent += time.perf_counter() - t

    def on_result(self, step: LoggedStep) -> None:
        self._timed(super().on_result, step)

    def on_event(self, event: Event, bridge: Sequence[LoggedStep]) -> None:
        self._timed(super().on_event, event, bridge)

    def flush(self) -> None:
        self._timed(super().flush)

    def close(self, result: Result | None) -> None:
        self._timed(super().close, result)


class Busy(pt.Trainable):
    """A member whose step spins the CPU in Python for about 0.5 ms."""

    def __init__(self, hparams: Any, seed: int) -> None:
        super().__init__(hparams, seed)
        self.x = 0.0

    def step(self) -> float:
        end = time.perf_counter() + 0.0005
        while time.perf_counter() < end:
            pass
        self.x += self.hparams["lr"]
        return self.x

    def state_dict(self) -> object:
        return {"x": self.x}

    def load_state_dict(self, state: Any) -> None:
        self.x = float(state["x"])


def toy_experiment(seed: int) -> pt.Experiment:
    return pt.Experiment(
        trainable=toy.ToyQuadratic,
        space=toy.SPACE,
        population_size=32,
        steps=200,
        interval=4,
        metric="Q",
        explore=toy.gaussian_noise,
        seed=seed,
    )


def busy_experiment(seed: int) -> pt.Experiment:
    return pt.Experiment(
        Busy, {"lr": pt.Float(0.1, 1.0)}, population_size=16, steps=250, interval=5, seed=seed
    )


CASES: dict[str, tuple[Callable[[int], pt.Experiment], bool]] = {
    "toy, memory": (toy_experiment, False),
    "toy, sqlite": (toy_experiment, True),
    "busy, sqlite": (busy_experiment, True),
}


trained_at = {"t": 0.0}
_stop = LogFeed.stop


def _timed_stop(self: LogFeed) -> None:
    trained_at["t"] = time.perf_counter()  # the executor has returned: training is over
    _stop(self)


LogFeed.stop = _timed_stop  # type: ignore[method-assign]


def timed_run(
    make: Callable[[int], pt.Experiment], stored: bool, tmp: str, name: str, logged: bool
) -> dict[str, float]:
    """Wall and CPU seconds of run() (CPU: this process, every thread), wall seconds until
    the executor returned (with a logger: before the feed's last read and close), member-steps
    trained, seconds inside the logger's hooks."""
    exp = make(0)
    loggers = [TimedTensorBoard(os.path.join(tmp, "tb"))] if logged else None
    TimedTensorBoard.spent = 0.0
    url = f"sqlite:///{tmp}/{name}.db" if stored else None
    t, cpu = time.perf_counter(), time.process_time()
    result = exp.run(url, name, loggers=loggers) if url else exp.run(loggers=loggers)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    training = trained_at["t"] - t if logged else wall
    shutil.rmtree(os.path.join(tmp, "tb"), ignore_errors=True)
    return {
        "wall": wall,
        "cpu": cpu,
        "training": training,
        "steps": float(len(result.history)),
        "hooks": TimedTensorBoard.spent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "repeats": args.repeats,
        "cases": {},
    }
    print(
        f"TensorBoard logger overhead (median of {args.repeats}, runs alternated; "
        f"load {figures['load_before'][0]:.2f})"
    )
    print(
        f"{'case':<14}{'member-steps':>13}{'wall s':>16}{'training s':>16}{'CPU s':>16}"
        f"{'overhead µs/member-step':>40}"
    )
    print(
        f"{'':<27}{'without / with':>16}{'without / with':>16}{'without / with':>16}"
        f"{'wall':>10}{'training':>10}{'CPU':>10}{'hooks':>10}"
    )
    for case, (make, stored) in CASES.items():
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for logged in (False, True):
                    name = f"{'logged' if logged else 'plain'}{r}"
                    runs[logged].append(timed_run(make, stored, tmp, name, logged))
        med = {
            logged: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            for logged, rs in runs.items()
        }
        a, b = med[False], med[True]
        steps = a["steps"]
        per = {k: (b[k] - a[k]) / steps * 1e6 for k in ("wall", "training", "cpu")}
        per["hooks"] = b["hooks"] / steps * 1e6
        figures["cases"][case] = {
            "member_steps": steps,
            "median_without": a,
            "median_with": b,
            "overhead_us_per_member_step": per,
            "runs_without": runs[False],
            "runs_with": runs[True],
        }
        print(
            f"{case:<14}{int(steps):>13}"
            + "".join(f"{a[k]:>8.2f}/{b[k]:<7.2f}" for k in ("wall", "training", "cpu"))
            + "".join(f"{per[k]:>10.1f}" for k in ("wall", "training", "cpu", "hooks"))
        )
    figures["load_after"] = os.getloadavg()
    print(f"load average after: {figures['load_after'][0]:.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
