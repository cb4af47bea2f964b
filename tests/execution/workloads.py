"""Experiments for executor tests, configured by environment variables so that worker
processes (which import this file again) build exactly the same one.

``Counter``: x grows by ``lr`` (+ optional seeded noise) each step; the score is x. Its state
holds x, its RNG and how many steps it has taken. It can:

* detect two processes training the same member at once (``WL_LOCKS``: a folder; each step
  holds an exclusive lock file named after the member's seed, and a step that finds the lock
  held by another live process, not a zombie, writes a ``VIOLATION`` file there);
* sleep or spin for ``WL_DELAY`` seconds per step (``WL_SPIN=1``: burn CPU instead of sleeping);
* fail (``WL_FAIL=seed:step:mode``, several separated by ``,``): ``always``; ``once`` (the first
  time only); ``again`` (every time but the first: a step that fails when it is replayed).
  ``once`` and ``again`` count in ``WL_MARKS``. ``WL_FAIL_IN=seed:method:mode`` fails in
  ``load_state_dict``, ``set_hparams`` or ``state_dict`` instead (``always`` or ``once``);
* saturate like a validation accuracy (``WL_SATURATE=k``): the score is ``1 - exp(-x / k)``
  rounded to 0.01 (ties everywhere near the top) instead of x;
* report the live instances in its process (metric ``live``; `close` ends one) and its
  math-library thread setting (metric ``omp``, from ``OMP_NUM_THREADS``).

``WL_EXPLORE=nan`` makes the experiment explore with `NaNExplore`, a strategy that returns a
NaN learning rate: a configuration error.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

import poptune as pt


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie. A killed worker stays a zombie until
    its parent reaps it, and its member may be claimed meanwhile: that is no violation."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc: existence is all that can be told
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Counter(pt.Trainable):
    live = 0  # instances not closed, in this process

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.rng = np.random.default_rng(seed)
        self.x = 0.0
        self.steps = 0
        self.closed = False
        Counter.live += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            Counter.live -= 1

    def _maybe_fail_in(self, method: str) -> None:
        for spec in filter(None, os.environ.get("WL_FAIL_IN", "").split(",")):
            seed, where, mode = spec.split(":")
            if int(seed) != self.seed or where != method:
                continue
            if mode == "once":
                mark = os.path.join(os.environ["WL_MARKS"], f"{seed}-{method}")
                if os.path.exists(mark):
                    continue
                open(mark, "a").close()
            # Each member's message its own: the same restore failure in two members is
            # the code's fault, which stops the run (`Lifecycle.record_failure`).
            raise RuntimeError(f"injected failure in {method} (seed {seed})")

    def _lock(self) -> str | None:
        folder = os.environ.get("WL_LOCKS")
        if not folder:
            return None
        path = os.path.join(folder, f"{self.seed}.lock")
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(path) as f:
                        holder = int(f.read() or "0")
                except (FileNotFoundError, ValueError):
                    continue
                if _running(holder) and holder != os.getpid():
                    with open(os.path.join(folder, "VIOLATION"), "a") as f:
                        f.write(f"member seed {self.seed}: pid {os.getpid()} while {holder}\n")
                    return None
                os.unlink(path)  # left by a killed process
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return path

    def _maybe_fail(self) -> None:
        for spec in filter(None, os.environ.get("WL_FAIL", "").split(",")):
            seed, step, mode = spec.split(":")
            if int(seed) != self.seed or int(step) != self.steps:
                continue
            if mode in ("once", "again"):
                mark = os.path.join(os.environ["WL_MARKS"], f"{seed}-{step}")
                seen = os.path.exists(mark)
                open(mark, "a").close()
                if (mode == "once") == seen:
                    continue
            raise RuntimeError(f"injected failure at step {self.steps}")

    def step(self) -> dict[str, float]:
        lock = self._lock()
        try:
            delay = float(_env("WL_DELAY", "0"))
            if delay and _env("WL_SPIN", "0") == "1":
                end = time.perf_counter() + delay
                while time.perf_counter() < end:
                    pass
            elif delay:
                time.sleep(delay)
            self.steps += 1
            self._maybe_fail()
            assert not self.closed, "a closed trainable was used again"
            noise = float(_env("WL_NOISE", "0.01"))
            self.x = self.x + self.hparams["lr"] + noise * float(self.rng.standard_normal())
            score = self.x
            saturate = float(_env("WL_SATURATE", "0"))
            if saturate:
                score = round(1.0 - math.exp(-self.x / saturate), 2)
            return {
                "score": score,
                "x": self.x,
                "taken": float(self.steps),
                "live": float(Counter.live),
                "omp": float(os.environ.get("OMP_NUM_THREADS", "0")),
                "pid": float(os.getpid()),
            }
        finally:
            if lock is not None:
                os.unlink(lock)

    def state_dict(self) -> object:
        self._maybe_fail_in("state_dict")
        return {"x": self.x, "rng": self.rng.bit_generator.state, "steps": self.steps}

    def set_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._maybe_fail_in("set_hparams")
        super().set_hparams(hparams)

    def load_state_dict(self, state: Any) -> None:
        self._maybe_fail_in("load_state_dict")
        self.x = float(state["x"])
        self.rng.bit_generator.state = state["rng"]
        self.steps = int(state["steps"])


class NaNExplore(pt.Explore):
    """A broken explore strategy: it sets ``lr`` to NaN."""

    def __call__(
        self, hparams: Mapping[str, Any], space: Any, rng: np.random.Generator
    ) -> tuple[dict[str, Any], dict[str, str]]:
        return {**hparams, "lr": float("nan")}, {"lr": "broken"}


def counter() -> pt.Experiment:
    """The experiment the environment describes."""
    return pt.Experiment(
        trainable=Counter,
        space={"lr": pt.Float(0.01, 1.0, log=True)},
        population_size=int(_env("WL_POP", "4")),
        steps=int(_env("WL_STEPS", "40")),
        interval=int(_env("WL_INTERVAL", "5")),
        exploit=pt.Truncation(0.25),
        explore=NaNExplore() if _env("WL_EXPLORE", "") == "nan" else pt.Perturb(),
        synchronous=_env("WL_SYNC", "0") == "1",
        seed=int(_env("WL_SEED", "0")),
    )
