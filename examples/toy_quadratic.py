"""The toy problem of the PBT paper (Jaderberg et al. 2017, Figure 2), four ways.

Two members maximise Q(θ) = 1.2 − (θ0² + θ1²) from θ = [0.9, 0.9], but each can only climb a
surrogate Q̂(θ|h) = 1.2 − (h0·θ0² + h1·θ1²): one gradient-ascent step (lr 0.01) per step. They
start with h = [1, 0] and h = [0, 1], so each on its own only ever fixes one coordinate and
stalls at Q = 0.38975 (the grid search answer). Every 4 steps a member is ready: with PBT it
copies the better member (exploit) and adds N(0, 0.1) noise to h, clipped to [0, 1] (explore).

Run it:  python examples/toy_quadratic.py [--seeds 100] [--plot toy.png]

It prints, for PBT, explore-only, exploit-only and grid search over many seeds: how often Q
exceeded 1.18 by step 200, the median first step it did, and the final Q.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import poptune as pt

STEPS, INTERVAL, LR, TARGET = 200, 4, 0.01, 1.18


class ToyQuadratic(pt.Trainable):
    """One member: θ ∈ R², climbing the surrogate objective defined by its h."""

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.theta = np.array([0.9, 0.9])

    def step(self) -> dict[str, float]:
        h = np.array([self.hparams["h0"], self.hparams["h1"]])
        self.theta = self.theta + LR * (-2.0 * h * self.theta)  # gradient of Q̂(θ|h)
        q = 1.2 - float(np.sum(self.theta**2))
        return {"Q": q, "theta0": float(self.theta[0]), "theta1": float(self.theta[1])}

    def state_dict(self) -> object:
        return {"theta": self.theta.copy()}

    def load_state_dict(self, state: Any) -> None:
        self.theta = np.array(state["theta"], dtype=float)


def gaussian_noise(hparams: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The paper's explore for this problem: h + N(0, 0.1), clipped to [0, 1]."""
    return {k: float(np.clip(v + rng.normal(0.0, 0.1), 0.0, 1.0)) for k, v in hparams.items()}


SPACE = {"h0": pt.Float(0.0, 1.0), "h1": pt.Float(0.0, 1.0)}
START = [{"h0": 1.0, "h1": 0.0}, {"h0": 0.0, "h1": 1.0}]
VARIANTS: dict[str, dict[str, Any]] = {
    "PBT": {"exploit": pt.Truncation(0.5), "explore": gaussian_noise},
    "explore only": {"exploit": None, "explore": gaussian_noise},
    "exploit only": {"exploit": pt.Truncation(0.5), "explore": None},
    "grid search": {"exploit": None, "explore": None},
}


def experiment(variant: str, seed: int, synchronous: bool = False) -> pt.Experiment:
    """The paper's set-up for one variant: 2 members, asynchronous, ready every 4 steps."""
    return pt.Experiment(
        trainable=ToyQuadratic,
        space=SPACE,
        population_size=2,
        steps=STEPS,
        interval=INTERVAL,
        metric="Q",
        mode="max",
        initial_hparams=START,
        synchronous=synchronous,
        seed=seed,
        **VARIANTS[variant],
    )


# `poptune run examples/toy_quadratic.py` picks this one up.
EXPERIMENT = experiment("PBT", seed=0)


@dataclass
class Outcome:
    final_q: float  # best member's Q at step 200
    first_hit: int | None  # first step at which any member's Q exceeded 1.18


def outcome(result: pt.Result) -> Outcome:
    hits = [r.step for r in result.history if r.score > TARGET]
    return Outcome(float(result.best.score or math.nan), min(hits) if hits else None)


def compare(seeds: range) -> dict[str, list[Outcome]]:
    return {v: [outcome(experiment(v, s).run()) for s in seeds] for v in VARIANTS}


def table(outcomes: dict[str, list[Outcome]]) -> str:
    lines = [
        f"{'variant':<14}{'Q>1.18 by 200':>15}{'median step':>13}{'final Q median':>16}{'max':>10}"
    ]
    for variant, outs in outcomes.items():
        hits = [o.first_hit for o in outs if o.first_hit is not None]
        rate = f"{len(hits)}/{len(outs)}"
        med = f"{int(np.median(hits))}" if hits else "-"
        finals = [o.final_q for o in outs]
        lines.append(
            f"{variant:<14}{rate:>15}{med:>13}{np.median(finals):>16.5f}{max(finals):>10.5f}"
        )
    return "\n".join(lines)


def plot(path: str, seed: int = 0) -> None:
    """θ trajectories and Q over steps for each variant, one seed (needs the [plot] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'poptune[plot]'") from e
    fig, axes = plt.subplots(2, len(VARIANTS), figsize=(4 * len(VARIANTS), 7))
    grid = np.linspace(0, 1, 60)
    xx, yy = np.meshgrid(grid, grid)
    for col, variant in enumerate(VARIANTS):
        result = experiment(variant, seed).run()
        top, bottom = axes[0, col], axes[1, col]
        top.contour(xx, yy, 1.2 - xx**2 - yy**2, levels=12, cmap="Greys", linewidths=0.5)
        for member, color in ((0, "tab:blue"), (1, "tab:orange")):
            rows = [r for r in result.history if r.member == member]
            top.plot(
                [0.9] + [r.metrics["theta0"] for r in rows],
                [0.9] + [r.metrics["theta1"] for r in rows],
                ".",
                ms=2,
                color=color,
            )
            bottom.plot(
                [r.step for r in rows],
                [r.score for r in rows],
                color=color,
                label=f"member {member}",
            )
        top.set_title(variant)
        top.set_xlabel("θ0")
        top.set_ylabel("θ1")
        bottom.set_xlabel("step")
        bottom.set_ylabel("Q")
        bottom.set_ylim(-0.45, 1.25)
        bottom.axhline(TARGET, ls=":", color="grey")
    axes[1, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--plot", metavar="PNG", help="write θ trajectories and Q to this PNG")
    args = parser.parse_args()
    print(
        f"Toy quadratic (paper Fig. 2): 2 members, {STEPS} steps, ready every {INTERVAL}, "
        f"{args.seeds} seeds"
    )
    print(table(compare(range(args.seeds))))
    if args.plot:
        plot(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
