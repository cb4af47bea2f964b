"""A PyTorch member for the poptune.torch tests, importable by worker processes.

`Classifier` fits an MLP with dropout to a fixed synthetic classification task (AdamW; lr,
weight_decay and dropout are hyperparameters). Each step it reports, besides its validation
accuracy, the values its live objects hold (``live_lr``, ``live_wd``, ``live_p``), so a test
can check at every recorded step that they are the member's hyperparameters.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

import poptune as pt
from poptune.torch import TorchTrainable

_gen = torch.Generator().manual_seed(1234)
_X = torch.randn(256, 10, generator=_gen)
_Y = (_X[:, :3].sum(dim=1) > 0).long()
X_TRAIN, Y_TRAIN, X_VAL, Y_VAL = _X[:192], _Y[:192], _X[192:], _Y[192:]


class Net(torch.nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 32)
        self.drop = torch.nn.Dropout(dropout)
        self.fc2 = torch.nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class Classifier(TorchTrainable):
    hparam_targets: ClassVar[dict[str, Any]] = {
        "lr": "optimizer.lr",
        "weight_decay": "optimizer.weight_decay",
        "dropout": "model.drop.p",
    }

    def setup(self) -> None:
        self.model = Net(self.hparams["dropout"]).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.hparams["lr"],
            weight_decay=self.hparams["weight_decay"],
        )

    def accuracy(self) -> float:
        self.model.eval()
        with torch.no_grad():
            pred = self.model(X_VAL.to(self.device)).argmax(dim=1).cpu()
        self.model.train()
        return float((pred == Y_VAL).float().mean())

    def step(self) -> dict[str, float]:
        idx = torch.randint(0, len(X_TRAIN), (32,))
        x, y = X_TRAIN[idx].to(self.device), Y_TRAIN[idx].to(self.device)
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        groups = self.optimizer.param_groups
        return {
            "acc": self.accuracy(),
            "loss": loss.item(),
            "live_lr": groups[0]["lr"] if len({g["lr"] for g in groups}) == 1 else -1.0,
            "live_wd": groups[0]["weight_decay"],
            "live_p": float(self.model.drop.p),
            "on_device": float(next(self.model.parameters()).device.type == self.device.type),
        }


def classifier() -> pt.Experiment:
    return pt.Experiment(
        trainable=Classifier,
        space={
            "lr": pt.Float(1e-3, 0.3, log=True),
            "weight_decay": pt.Float(1e-5, 1e-1, log=True),
            "dropout": pt.Float(0.0, 0.5),
        },
        population_size=int(os.environ.get("TW_POP", "4")),
        steps=int(os.environ.get("TW_STEPS", "24")),
        interval=4,
        metric="acc",
        exploit=pt.Truncation(0.25),
        explore=pt.Perturb(),
        seed=0,
    )


class Stream(TorchTrainable):
    """A member reading a data stream whose position lives outside the tensors, as a data
    loader's or an environment's does: `setup` starts it from the beginning, and
    `extra_state` carries it across evictions. Each step reports the position it read
    (``position``), whether `setup` ran since the last step (``rebuilt``), and its process's
    math-library threads (``omp``: ``OMP_NUM_THREADS``, ``torch_threads``)."""

    hparam_targets: ClassVar[dict[str, Any]] = {"lr": "optimizer.lr"}

    def setup(self) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.hparams["lr"])
        self.position = 0  # a fresh loader starts at its first batch
        self.fresh = True

    def extra_state(self) -> Any:
        return {"position": self.position}

    def load_extra_state(self, state: Any) -> None:
        self.position = int(state["position"])

    def step(self) -> dict[str, float]:
        self.position += 1
        x = torch.full((4, 1), float(self.position % 7))
        loss = (self.model(x) - 2 * x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        rebuilt, self.fresh = self.fresh, False
        return {
            "score": -loss.item(),
            "position": float(self.position),
            "rebuilt": float(rebuilt),
            "omp": float(os.environ.get("OMP_NUM_THREADS", "0")),
            "torch_threads": float(torch.get_num_threads()),
        }


def stream() -> pt.Experiment:
    return pt.Experiment(
        trainable=Stream,
        space={"lr": pt.Float(1e-3, 0.1, log=True)},
        population_size=int(os.environ.get("TW_POP", "4")),
        steps=int(os.environ.get("TW_STEPS", "12")),
        interval=2,
        exploit=pt.Truncation(0.25),
        explore=pt.Perturb(),
        seed=0,
    )
