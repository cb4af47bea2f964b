"""PyTorch's MNIST example on scikit-learn's digits, written again as a poptune member: PBT
tunes Adadelta's lr, StepLR's gamma and both dropout rates while the convnets train.

This is ``mnist/main.py`` of pytorch/examples turned into a `TorchTrainable`, with its names
(``Net``, ``conv1``, ``dropout1``, ``test_batch_size``, ...) and its recipe: the same ``Net``
(conv 3x3 32, conv 3x3 64, max-pool, dropout, fc 9216-128, dropout, fc 128-10, log-softmax),
negative log-likelihood, Adadelta (upstream: lr 1.0) and a ``StepLR`` that multiplies the lr by
``gamma`` (upstream: 0.7) after every epoch, for about as many epochs as upstream (14). What
changes:

* **The data** is scikit-learn's bundled 8x8 handwritten digits (1797 images, no download, in
  place of MNIST's 70,000 28x28 ones), upsampled to 28x28 so that ``Net`` is unchanged, and
  normalised with their own mean and standard deviation. A fixed split (the same in every
  member and process) keeps 1437 images to train on and 360 to validate on.
* **One poptune step** is a slice of an epoch: ``batches_per_step`` batches of 64, in the
  member's own shuffled order. The StepLR steps at every epoch's end, whichever step it falls
  in. The data loader's position (the epoch's order and the next batch) is plain data kept in
  ``extra_state``, so a member a worker rebuilds from its checkpoint (``docs/members.md``) goes
  on where it stopped instead of starting the epoch again; a member that copies another takes
  the donor's position with its weights.
* **Hyperparameters**: ``lr`` (log-uniform), ``gamma``, ``dropout1`` and ``dropout2`` (on
  ``[0, 0.75]``: a perturbation shifts them, since multiplying never moves 0). They reach the
  live objects after every load through ``hparam_targets``: ``lr`` through the scheduler's base
  lr, which keeps the decay so far (a member with base lr 1.0 after 5 epochs at gamma 0.7 trains
  at 1.0 * 0.7**5, and a copy perturbed to 1.2 at 1.2 * 0.7**5), ``gamma`` on the scheduler,
  the dropout rates on the modules' ``p``.
* **Score** (metric ``"accuracy"``): the accuracy on the 360 validation images after every
  step. Every member is ready every ``interval`` steps; `pt.Truncation` lets the bottom quarter
  copy the top quarter (weights, Adadelta's accumulators, the scheduler, random streams, data
  position) and `pt.Perturb` moves the copied hyperparameters (x0.8 or x1.2, or a redraw with
  probability 0.25).

Run it:
    python examples/mnist_digits.py [--smoke] [--baseline random] [--seed N]
                                    [--workers N --storage sqlite:///digits.db]
    poptune run examples/mnist_digits.py --baseline random --workers 2 --storage sqlite:///d.db

``poptune run`` takes ``EXPERIMENT``: its seed is ``$POPTUNE_EXAMPLE_SEED`` (default 0) and its
size ``$POPTUNE_EXAMPLE_SIZE`` (``default`` or ``smoke``), read when the file is imported; give
each seed its own run name (``--name``), and the same variables to ``poptune resume``.

Budget (default): 8 members x 28 steps x 12 batches of 64 = 336 batches (about 14.6 epochs of
the 1437 training images) per member, ready every 4 steps (48 batches, about 2 epochs).
What to expect (``docs/examples.md``, 3 seeds, against random search at equal compute): the
best member gets the same 354 or 355 of the 360 validation digits right either way; PBT's worst
member ends at 0.978, random search's at 0.086-0.922 (members drawn with an lr too small or too
large, which PBT replaces by copies of good ones).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR

import poptune as pt
from poptune.torch import TorchTrainable


@dataclass(frozen=True)
class Args:
    """The settings PBT does not tune, and the population's size and clock."""

    batch_size: int = 64
    """Input batch size for training."""
    test_batch_size: int = 1000
    """Input batch size for validation (the 360 images fit in one)."""
    batches_per_step: int = 12
    """Training batches in one poptune step (an epoch is 23 batches: 22 of 64, one of 29)."""
    image_size: int = 28
    """Side the 8x8 digits are upsampled to: 28, MNIST's, keeps ``Net`` as upstream wrote it."""
    population_size: int = 8
    """Members trained side by side."""
    steps: int = 28
    """Poptune steps each member trains for."""
    interval: int = 4
    """Steps between a member's ready points (where it may exploit and explore)."""


ARGS = {
    "default": Args(),
    # Real training on a tiny budget: 4 members, 3 steps of 3 batches, ready at every step.
    "smoke": Args(batches_per_step=3, population_size=4, steps=3, interval=1),
}

SPACE = {
    "lr": pt.Float(1e-2, 10.0, log=True),  # upstream: 1.0
    "gamma": pt.Float(0.5, 0.99),  # upstream: 0.7
    "dropout1": pt.Float(0.0, 0.75),  # upstream: 0.25
    "dropout2": pt.Float(0.0, 0.75),  # upstream: 0.5
}
N_VALIDATION = 360  # images held out of training to score the members
SPLIT_SEED = 0  # the split, the same in every member and every process


# -- data -------------------------------------------------------------------------------------


@functools.cache
def digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled digits as ``(train_x, train_y, val_x, val_y)``: images of shape
    ``(1, image_size, image_size)``, normalised with the training images' mean and standard
    deviation (upstream's ``Normalize((0.1307,), (0.3081,))`` are MNIST's)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels 0..16
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, val = order[N_VALIDATION:], order[:N_VALIDATION]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[val], y[val]


# -- the model: upstream's, unchanged ---------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


# -- the member -------------------------------------------------------------------------------


class DigitsMember(TorchTrainable):
    """One convnet with its optimizer, its scheduler and its place in the data."""

    args: ClassVar[Args] = ARGS["default"]
    hparam_targets: ClassVar[dict[str, Any]] = {
        "lr": "scheduler.base_lrs",  # the optimizer's lr moves with it, keeping the decay so far
        "gamma": lambda member, gamma: setattr(member.scheduler, "gamma", float(gamma)),
        "dropout1": "model.dropout1.p",
        "dropout2": "model.dropout2.p",
    }

    def setup(self) -> None:
        # The batches are small: one thread is as fast, and does not fight the other worker.
        torch.set_num_threads(1)
        data = digits(self.args.image_size)
        self.train_x, self.train_y, self.val_x, self.val_y = (t.to(self.device) for t in data)
        self.model = Net().to(self.device)
        self.optimizer = torch.optim.Adadelta(self.model.parameters(), lr=self.hparams["lr"])
        self.scheduler = StepLR(self.optimizer, step_size=1, gamma=self.hparams["gamma"])
        # The data loader's position, checkpointed in extra_state().
        self.epoch = 0
        self.batch = 0  # the next batch of this epoch
        self.order = torch.randperm(len(self.train_x))  # this epoch's, from the member's stream

    def extra_state(self) -> Any:
        return {"epoch": self.epoch, "batch": self.batch, "order": self.order}

    def load_extra_state(self, state: Any) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        self.order = state["order"]

    def step(self) -> dict[str, float]:
        args = self.args
        self.model.train()
        losses = []
        for _ in range(args.batches_per_step):
            idx = self.order[self.batch * args.batch_size : (self.batch + 1) * args.batch_size]
            idx = idx.to(self.device)
            data, target = self.train_x[idx], self.train_y[idx]
            self.optimizer.zero_grad()
            loss = F.nll_loss(self.model(data), target)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            self.batch += 1
            if self.batch * args.batch_size >= len(self.train_x):  # the epoch is over
                self.scheduler.step()
                self.epoch += 1
                self.batch = 0
                self.order = torch.randperm(len(self.train_x))
        val_loss, accuracy = self.test()
        return {
            "accuracy": accuracy,
            "val_loss": val_loss,
            "train_loss": sum(losses) / len(losses),
            "epoch": self.epoch + self.batch * args.batch_size / len(self.train_x),
            # The values in force, read back from the live objects.
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "gamma": float(self.scheduler.gamma),
            "dropout1": float(self.model.dropout1.p),
            "dropout2": float(self.model.dropout2.p),
        }

    @torch.no_grad()
    def test(self) -> tuple[float, float]:
        """The mean loss and the accuracy on the validation images."""
        self.model.eval()
        test_loss, correct = 0.0, 0
        for start in range(0, len(self.val_x), self.args.test_batch_size):
            data = self.val_x[start : start + self.args.test_batch_size]
            target = self.val_y[start : start + self.args.test_batch_size]
            output = self.model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += int((output.argmax(dim=1) == target).sum())
        return test_loss / len(self.val_x), correct / len(self.val_x)


class SmokeDigitsMember(DigitsMember):
    """The same member on the smoke budget."""

    args: ClassVar[Args] = ARGS["smoke"]


# -- the experiment ---------------------------------------------------------------------------


def experiment(seed: int = 0, size: str = "default", baseline: str | None = None) -> pt.Experiment:
    """PBT (truncation exploit, perturb explore) over ``ARGS[size]``; with
    ``baseline="random"``, random search at the same compute: the same population drawn from
    the same prior, trained for the same steps, never exploiting or exploring."""
    if size not in ARGS:
        raise ValueError(f"`size` must be one of {sorted(ARGS)}, but got {size!r}.")
    if baseline not in (None, "random"):
        raise ValueError(f"`baseline` must be None or 'random', but got {baseline!r}.")
    args = ARGS[size]
    pbt = baseline is None
    return pt.Experiment(
        trainable=DigitsMember if size == "default" else SmokeDigitsMember,
        space=SPACE,
        population_size=args.population_size,
        steps=args.steps,
        interval=args.interval,
        metric="accuracy",
        mode="max",
        exploit=pt.Truncation(0.25) if pbt else None,
        explore=pt.Perturb() if pbt else None,
        seed=seed,
    )


def from_environment(build: Callable[..., pt.Experiment]) -> pt.Experiment:
    """``build(seed, size)`` with ``$POPTUNE_EXAMPLE_SEED`` and ``$POPTUNE_EXAMPLE_SIZE``."""
    return build(
        seed=int(os.environ.get("POPTUNE_EXAMPLE_SEED", "0")),
        size=os.environ.get("POPTUNE_EXAMPLE_SIZE", "default"),
    )


# `poptune run examples/mnist_digits.py` picks this one up.
EXPERIMENT = from_environment(experiment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (seconds)")
    parser.add_argument("--baseline", choices=["random"], help="random search instead of PBT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--storage", metavar="URL", help="e.g. sqlite:///d.db (default: memory)")
    args = parser.parse_args()
    if args.workers > 1 and not args.storage:
        parser.error("--workers > 1 needs --storage (worker processes share it)")
    size = "smoke" if args.smoke else "default"
    exp = experiment(args.seed, size, args.baseline)
    name = f"mnist_digits-{size}-{args.baseline or 'pbt'}-seed{args.seed}"
    result = exp.run(args.storage, name, workers=args.workers) if args.storage else exp.run()
    finals = sorted((m.score for m in result.members if m.score is not None), reverse=True)
    exploits = sum(e.kind == "exploit" for e in result.events)
    print(
        f"{'random search' if args.baseline else 'PBT'} ({size}, seed {args.seed}): final "
        f"validation accuracy of the members {', '.join(f'{s:.3f}' for s in finals)}; "
        f"{exploits} exploits"
    )
    print("hyperparameters along the best member's ancestry, at each ready point:")
    for s in result.schedule()[:: ARGS[size].interval]:
        values = ", ".join(f"{k} {v:.3g}" for k, v in s.hparams.items())
        print(f"  step {s.step:>3} (member {s.member}): {values}")


if __name__ == "__main__":
    main()
