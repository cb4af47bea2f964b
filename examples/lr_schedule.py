"""The learning-rate schedule task: a learning rate that must rise, then fall, to make progress.

A synthetic task (the one of Ray Tune's ``pbt_function`` example) whose best learning rate
changes during training, so no fixed learning rate does well and a *schedule* is needed. A
member's state is an accuracy ``acc`` that starts at 0. The optimal learning rate is a
triangle in ``acc``: it rises from 0.001 to 0.01 as ``acc`` goes from 0 to 100, then falls back
to 0.001 at ``acc`` 200 (clipped to ``[0.001, 0.01]``). Each step, with ``q`` the ratio of the
larger to the smaller of ``lr`` and the optimal learning rate:

* if ``q < 3``, ``acc`` grows by ``U(0, 1) / q``;
* else, if ``lr`` is too high, ``acc`` falls by ``(q - 3) * U(0, 1)``;
* then ``acc`` gets Gaussian noise ``2 * N(0, 1)`` and is clipped at 0.

A member is done when ``acc > 200``. Each experiment here runs a fixed number of steps; a run
reaches the target at the first step at which *any* member's ``acc`` exceeds 200.

The noise is the *environment's* (as in Ray's example, where it is drawn outside the
checkpoint): each member keeps its own noise stream, as a worker keeps its own data loader.
`OwnNoise`, the task used for the claims, therefore copies a donor's accuracy but not the
donor's future noise, while a member's own checkpoint still restores its generator exactly, so
runs replay and resume identically. `LRSchedule` puts the generator in the copied state as
well: a recipient then draws the same noise as its donor at every later step, and with
truncation copying a quarter of the population at every ready point the population soon shares
a handful of noise streams and loses the benefit of many independent ones. Both are shown.

Run it:  python examples/lr_schedule.py [--seeds 30] [--random-populations 8 32]

It prints, for PBT (8 members, ready every 5 steps, truncation 25%, perturb x0.8/x1.2,
resample 0.25) and for random search (each member with a fixed learning rate drawn from the
same prior): how many seeds reached ``acc > 200`` within 1000 steps, the median number of steps
it took, and the slowest.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

import poptune as pt

STEPS, INTERVAL, TARGET = 1000, 5, 200.0
MIDPOINT = 100.0  # the optimal lr peaks at this accuracy
Q_TOLERANCE = 3.0  # an lr within this factor of the optimum makes progress
NOISE = 2.0  # standard deviation of the noise added to acc at every step


def optimal_lr(acc: float) -> float:
    """The triangle: 0.001 at acc 0, 0.01 at acc 100, 0.001 again at acc 200."""
    rising = 0.01 * acc / MIDPOINT
    falling = 0.01 - 0.01 * (acc - MIDPOINT) / MIDPOINT
    return min(0.01, max(0.001, rising if acc < MIDPOINT else falling))


class LRSchedule(pt.Trainable):
    """One member: an accuracy that grows only while ``lr`` is close to the optimal lr."""

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.rng = np.random.default_rng(seed)
        self.acc = 0.0
        self.t = 0  # steps trained along this state's lineage
        self.reached: int | None = None  # the step at which acc first exceeded TARGET

    def step(self) -> dict[str, float]:
        lr = float(self.hparams["lr"])
        opt = optimal_lr(self.acc)
        q = max(lr, opt) / min(lr, opt)
        if q < Q_TOLERANCE:
            self.acc += self.rng.random() / q
        elif lr > opt:
            self.acc -= (q - Q_TOLERANCE) * self.rng.random()
        self.acc = max(0.0, self.acc + NOISE * self.rng.normal())
        self.t += 1
        if self.reached is None and self.acc > TARGET:
            self.reached = self.t
        return {
            "acc": self.acc,
            "lr": lr,
            "optimal_lr": opt,
            "done": float(self.reached is not None),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "acc": self.acc,
            "t": self.t,
            "reached": self.reached,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Any) -> None:
        self.acc = float(state["acc"])
        self.t = int(state["t"])
        self.reached = state["reached"]
        self.rng.bit_generator.state = state["rng"]


class OwnNoise(LRSchedule):
    """The same task; a state copied from another member leaves this member's noise stream."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "owner": self.seed}

    def load_state_dict(self, state: Any) -> None:
        own = self.rng.bit_generator.state
        super().load_state_dict(state)
        if state.get("owner") != self.seed:  # another member's state: keep drawing our own noise
            self.rng.bit_generator.state = own


SPACE = {"lr": pt.Float(1e-4, 0.02)}  # uniform prior; low > 0, so Perturb multiplies
VARIANTS: dict[str, dict[str, Any]] = {
    "PBT": {
        "exploit": pt.Truncation(0.25),
        "explore": pt.Perturb(factors=(0.8, 1.2), resample_probability=0.25),
    },
    "random search": {"exploit": None, "explore": None},
}


def experiment(
    variant: str,
    seed: int,
    population_size: int = 8,
    steps: int = STEPS,
    trainable: type[LRSchedule] | None = None,
) -> pt.Experiment:
    """One variant of the task: ``population_size`` members, ready every 5 steps."""
    return pt.Experiment(
        trainable=trainable or OwnNoise,
        space=SPACE,
        population_size=population_size,
        steps=steps,
        interval=INTERVAL,
        metric="acc",
        mode="max",
        seed=seed,
        **VARIANTS[variant],
    )


# `poptune run examples/lr_schedule.py` picks this one up.
EXPERIMENT = experiment("PBT", seed=0)


def steps_to_target(result: pt.Result) -> int | None:
    """The first step at which any member's acc exceeded TARGET, or None if none did."""
    hits = [r.step for r in result.history if r.score > TARGET]
    return min(hits) if hits else None


def compare(
    seeds: range, random_populations: tuple[int, ...] = (8,)
) -> dict[str, list[int | None]]:
    """Steps to reach the target, per seed: PBT with 8 members (each keeping its own noise, or
    copying the donor's with its state), and random search with each population size."""
    out = {
        "PBT (8)": [steps_to_target(experiment("PBT", s).run()) for s in seeds],
        "PBT (8), noise copied": [
            steps_to_target(experiment("PBT", s, trainable=LRSchedule).run()) for s in seeds
        ],
    }
    for n in random_populations:
        out[f"random search ({n})"] = [
            steps_to_target(experiment("random search", s, population_size=n).run()) for s in seeds
        ]
    return out


def table(outcomes: dict[str, list[int | None]]) -> str:
    lines = [f"{'variant':<20}{f'acc>{TARGET:g} by {STEPS}':>17}{'median step':>13}{'max':>7}"]
    for variant, steps in outcomes.items():
        hits = [s for s in steps if s is not None]
        rate = f"{len(hits)}/{len(steps)}"
        med = f"{np.median(hits):g}" if hits else "-"
        top = f"{max(hits)}" if hits else "-"
        lines.append(f"{variant:<20}{rate:>17}{med:>13}{top:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument(
        "--random-populations",
        type=int,
        nargs="+",
        default=[8],
        metavar="N",
        help="population sizes for random search (default: 8)",
    )
    args = parser.parse_args()
    print(f"Learning-rate schedule task: {STEPS} steps, ready every {INTERVAL}, {args.seeds} seeds")
    print(table(compare(range(args.seeds), tuple(args.random_populations))))


if __name__ == "__main__":
    main()
