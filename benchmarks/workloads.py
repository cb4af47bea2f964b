"""Workloads whose score saturates, for `benchmarks/convergence.py`.

Both are accuracy-like: the score climbs towards 1 and then sits on a plateau where members
differ only by noise. That is where an asynchronous executor is at risk (PBT_NOTES trap 13): a
member judged against a donor whose latest score is from an earlier ready point may copy it and
go back in steps, train the same steps again, and be first in line again.

* `Saturating`: no model at all. A member accumulates *progress* at a rate set by how far its
  learning rate is from 0.01 (in decades), ``acc = 1 - exp(-progress / 50)`` plus a little
  seeded measurement noise, and each step burns about 3 ms of real CPU (a fixed loop of small
  numpy matmuls; not a sleep) so that worker processes have real work to share.
* `DigitsMLP`: a real PyTorch MLP (64-128-10, dropout 0.2, AdamW) on scikit-learn's bundled
  8x8 digits (no download); a step is a few minibatches, the score is the accuracy on a fixed
  held-out split. Hyperparameters: lr and weight_decay, both log-scale. torch and scikit-learn
  are imported only when a member is built, so importing this file is cheap.

The experiments are built by module-level functions, so both ways of reaching worker processes
work: ``poptune run benchmarks/workloads.py:saturating`` (the ``FILE.py:NAME`` source form,
re-imported by every worker) and pickling (import this file as a module). Called without
arguments (as the source form does), they read ``BENCH_SEED`` and ``BENCH_STEPS`` from the
environment, which worker processes inherit.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

import poptune as pt

__all__ = [
    "DIGITS_SPACE",
    "SATURATING_SPACE",
    "DigitsMLP",
    "Saturating",
    "digits",
    "saturating",
]

POPULATION, STEPS, INTERVAL = 8, 300, 10


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# -- Saturating --------------------------------------------------------------------------------

SATURATING_SPACE = {"lr": pt.Float(1e-4, 1e-1, log=True)}
OPTIMAL_LR = 0.01
SCALE = 50.0  # progress at which acc is 1 - 1/e; an ideal member gains 1 per step
NOISE = 0.003  # standard deviation of the measurement noise on acc
_WORK_SIZE, _WORK_ITERS = 48, 300  # about 3 ms of CPU on this project's 2-core machines
_WORK_MATRIX = np.random.default_rng(12345).standard_normal((_WORK_SIZE, _WORK_SIZE)) / np.sqrt(
    _WORK_SIZE
)


def burn_cpu(iterations: int = _WORK_ITERS) -> float:
    """A fixed amount of CPU work (small matmuls, single-threaded in BLAS); the same every call."""
    x = np.eye(_WORK_SIZE)
    for _ in range(iterations):
        x = np.tanh(_WORK_MATRIX @ x)
    return float(x[0, 0])


def progress_rate(lr: float) -> float:
    """Progress per step: 1 at lr = 0.01, falling linearly to 0 two decades away."""
    return max(0.0, 1.0 - abs(math.log10(lr) - math.log10(OPTIMAL_LR)) / 2.0)


class Saturating(pt.Trainable):
    """An accuracy-like member: ``acc -> 1`` as progress accumulates, plus seeded noise.

    Its state is its progress and its own generator's state (copied with it on an exploit).
    """

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.rng = np.random.default_rng(seed)
        self.progress = 0.0

    def step(self) -> dict[str, float]:
        burn_cpu()
        self.progress += progress_rate(float(self.hparams["lr"]))
        acc = 1.0 - math.exp(-self.progress / SCALE) + NOISE * float(self.rng.standard_normal())
        return {"acc": min(1.0, max(0.0, acc)), "progress": self.progress}

    def state_dict(self) -> object:
        return {"progress": self.progress, "rng": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state_dict(self, state: Any) -> None:
        self.progress = float(state["progress"])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])


def saturating(seed: int | None = None, steps: int | None = None) -> pt.Experiment:
    """8 `Saturating` members, 300 steps, ready every 10, truncation 25%, perturb."""
    return pt.Experiment(
        trainable=Saturating,
        space=SATURATING_SPACE,
        population_size=POPULATION,
        steps=steps if steps is not None else _env_int("BENCH_STEPS", STEPS),
        interval=INTERVAL,
        metric="acc",
        mode="max",
        exploit=pt.Truncation(0.25),
        explore=pt.Perturb(),
        seed=seed if seed is not None else _env_int("BENCH_SEED", 0),
    )


# -- DigitsMLP ---------------------------------------------------------------------------------

DIGITS_SPACE = {
    "lr": pt.Float(1e-4, 1e-1, log=True),
    "weight_decay": pt.Float(1e-5, 1e-1, log=True),
}
HIDDEN, DROPOUT = 128, 0.2
BATCH, BATCHES_PER_STEP = 64, 4
VALIDATION = 500  # of the 1,797 digits; the split is fixed (seed 0), the same for every member


@functools.lru_cache(maxsize=1)
def digits_data() -> tuple[Any, Any, Any, Any]:
    """``(x_train, y_train, x_val, y_val)`` as torch tensors: pixels scaled to [0, 1]."""
    import torch

    x, y = _bundled_digits()
    order = np.random.default_rng(0).permutation(len(y))
    x = torch.as_tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y[order], dtype=torch.long)
    return x[VALIDATION:], y[VALIDATION:], x[:VALIDATION], y[:VALIDATION]


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, ``load_digits(return_X_y=True)``, read from the file it
    ships without importing scikit-learn: that import (about 1 s here) is paid by every worker
    process and would count as the executor's cost in the speed-up of a second worker."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    where = (spec.submodule_search_locations or [None])[0] if spec else None
    path = os.path.join(where, "datasets", "data", "digits.csv.gz") if where else ""
    if not os.path.exists(path):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return x, y
    with gzip.open(path, "rt") as f:
        text = f.read()
    data = np.array(text.replace("\n", ",").strip(",").split(","), dtype=float).reshape(-1, 65)
    return data[:, :-1], data[:, -1].astype(int)


class DigitsMLP(pt.Trainable):
    """A 64-128-10 MLP with dropout, trained by AdamW on minibatches of the digits.

    All randomness (initial weights, minibatches, dropout masks) comes from the member's own
    ``torch.Generator``, whose state is part of `state_dict`: a member is exactly reproducible
    whichever process trains it and whatever else that process trains in between.
    """

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        import torch

        super().__init__(hparams, seed)
        self.gen = torch.Generator().manual_seed(seed % 2**63)
        self.model = torch.nn.ModuleList([torch.nn.Linear(64, HIDDEN), torch.nn.Linear(HIDDEN, 10)])
        with torch.no_grad():  # the default init draws from torch's global generator
            for layer in self.model:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=self.gen)
                layer.bias.uniform_(-bound, bound, generator=self.gen)
        self.opt = torch.optim.AdamW(self.model.parameters())
        self.set_hparams(hparams)

    def _forward(self, x: Any, train: bool) -> Any:
        import torch

        hidden = torch.relu(self.model[0](x))
        if train:  # dropout with the member's generator, not the global one
            keep = torch.rand(hidden.shape, generator=self.gen) >= DROPOUT
            hidden = hidden * keep / (1.0 - DROPOUT)
        return self.model[1](hidden)

    def step(self) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        x_train, y_train, x_val, y_val = digits_data()
        picks = torch.randint(
            len(y_train), (BATCHES_PER_STEP, BATCH), generator=self.gen, dtype=torch.long
        )
        total = 0.0
        for idx in picks:
            self.opt.zero_grad()
            loss = F.cross_entropy(self._forward(x_train[idx], train=True), y_train[idx])
            loss.backward()
            self.opt.step()
            total += float(loss.detach())
        with torch.no_grad():
            correct = (self._forward(x_val, train=False).argmax(1) == y_val).sum()
        return {"val_acc": float(correct) / len(y_val), "loss": total / BATCHES_PER_STEP}

    def state_dict(self) -> object:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "opt": copy.deepcopy(self.opt.state_dict()),
            "rng": self.gen.get_state(),
        }

    def load_state_dict(self, state: Any) -> None:
        self.model.load_state_dict(state["model"])
        # The optimizer may keep the loaded tensors themselves: give it its own copy.
        self.opt.load_state_dict(copy.deepcopy(state["opt"]))
        self.gen.set_state(state["rng"].clone())

    def set_hparams(self, hparams: Mapping[str, Any]) -> None:
        # Called after every load_state_dict, which brings back the donor's lr (trap 7).
        super().set_hparams(hparams)
        for group in self.opt.param_groups:
            group["lr"] = float(hparams["lr"])
            group["weight_decay"] = float(hparams["weight_decay"])


def digits(seed: int | None = None, steps: int | None = None) -> pt.Experiment:
    """8 `DigitsMLP` members, 300 steps (2,400 member-steps), ready every 10, truncation 25%."""
    return pt.Experiment(
        trainable=DigitsMLP,
        space=DIGITS_SPACE,
        population_size=POPULATION,
        steps=steps if steps is not None else _env_int("BENCH_STEPS", STEPS),
        interval=INTERVAL,
        metric="val_acc",
        mode="max",
        exploit=pt.Truncation(0.25),
        explore=pt.Perturb(),
        seed=seed if seed is not None else _env_int("BENCH_SEED", 0),
    )
