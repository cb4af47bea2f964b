"""How closely a replay of the best schedule matches the original, on the paper's toy problem.

Three versions of ``examples/toy_quadratic.py`` (PBT, 2 members, 200 steps), seeds 0-9; for
each run, the best member's schedule is replayed from scratch (`poptune.Result.replay`) with
its root ancestor's seed and with a fresh seed, and the replayed Q is compared with the
original's:

* **deterministic**: the toy as it is;
* **noisy score**: Q reported with N(0, 0.005) measurement noise from a stream the member
  keeps for itself (the training is deterministic);
* **noisy steps**: N(0, 0.01) added to θ at every step from such a stream: PBT then also
  selects the lucky noise, which a replay of the schedule does not get.

Run it:  python benchmarks/replay.py [--seeds 10]

It prints the differences (replayed - original) and writes them to
``benchmarks/results/replay.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from modules import load  # benchmarks/modules.py: run these as python benchmarks/NAME.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "replay.json"


toy = load("poptune_bench_toy", ROOT / "examples" / "toy_quadratic.py")


class NoisyScore(toy.ToyQuadratic):  # type: ignore[misc,name-defined]
    def __init__(self, hparams: Any, seed: int) -> None:
        super().__init__(hparams, seed)
        self.noise = np.random.default_rng(seed)

    def step(self) -> dict[str, float]:
        out: dict[str, float] = super().step()
        return {"Q": out["Q"] + float(self.noise.normal(0.0, 0.005))}


class NoisySteps(toy.ToyQuadratic):  # type: ignore[misc,name-defined]
    def __init__(self, hparams: Any, seed: int) -> None:
        super().__init__(hparams, seed)
        self.noise = np.random.default_rng(seed)

    def step(self) -> dict[str, float]:
        super().step()
        self.theta = self.theta + self.noise.normal(0.0, 0.01, 2)
        return {"Q": 1.2 - float(np.sum(self.theta**2))}


VARIANTS = {
    "deterministic": toy.ToyQuadratic,
    "noisy score": NoisyScore,
    "noisy steps": NoisySteps,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    print(f"Toy quadratic, best schedule replayed; replayed - original Q over {args.seeds} seeds")
    print(f"{'variant':<15}{'seed':<7}{'median':>10}{'min':>10}{'max':>10}{'exact':>8}")
    for variant, trainable in VARIANTS.items():
        out: dict[str, list[float]] = {"root": [], "fresh": []}
        for seed in range(args.seeds):
            result = toy.experiment("PBT", seed).replace(trainable=trainable).run()
            out["root"].append(result.replay().difference)
            out["fresh"].append(result.replay(seed=10_000 + seed, name="fresh").difference)
        figures[variant] = out
        for which, diffs in out.items():
            exact = sum(1 for d in diffs if d == 0.0)
            print(
                f"{variant:<15}{which:<7}{statistics.median(diffs):>10.4f}{min(diffs):>10.4f}"
                f"{max(diffs):>10.4f}{exact:>5}/{len(diffs)}"
            )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
