"""PyTorch members end to end: checkpoints with tensors, exploits copying optimizer state.

Runs on the CPU everywhere, and on CUDA where a GPU is present (skipped otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import poptune as pt
from poptune.storage import CheckpointStore, open_storage

torch = pytest.importorskip("torch", reason="the [torch] extra is not installed")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


class Regressor(pt.Trainable):
    """A small MLP fitting a fixed linear target with Adam; lr is a hyperparameter."""

    device = "cpu"

    def __init__(self, hparams: Any, seed: int) -> None:
        super().__init__(hparams, seed)
        gen = torch.Generator().manual_seed(seed % 2**31)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        ).to(self.device)
        for p in self.model.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=hparams["lr"])
        data = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 8, generator=data).to(self.device)
        self.y = (self.x @ torch.linspace(-1, 1, 8, device=self.device)).unsqueeze(1)

    def step(self) -> dict[str, float]:
        self.opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach().cpu())}

    def state_dict(self) -> object:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Any) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])  # brings back the donor's lr...

    def set_hparams(self, hparams: Any) -> None:
        super().set_hparams(hparams)
        for group in self.opt.param_groups:  # ...which the new hyperparameters then replace
            group["lr"] = hparams["lr"]


def regressor_on(device: str) -> type[Regressor]:
    return type(f"Regressor_{device}", (Regressor,), {"device": device})


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_round_trip_keeps_tensors_and_device(device: str, tmp_path: Path) -> None:
    """A model and optimizer state saved with torch.save loads back equal, on its device."""
    member = regressor_on(device)({"lr": 0.01}, seed=1)
    for _ in range(3):
        member.step()
    store = CheckpointStore(tmp_path)
    info = store.save("run", 0, 3, member.state_dict())
    assert info.format == "torch"
    loaded: Any = store.load(info.location)
    for name, tensor in member.model.state_dict().items():
        assert loaded["model"][name].device.type == device
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["opt"]["param_groups"][0]["lr"] == 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_exploit_copies_weights_and_applies_new_lr_after_optimizer_state(
    device: str, tmp_path: Path
) -> None:
    """After every exploit the stored state of each member has the optimizer lr of its own
    hyperparameters, never the donor's old one, and the run trains real models."""
    url = f"sqlite:///{tmp_path}/runs.db"
    exp = pt.Experiment(
        trainable=regressor_on(device),
        space={"lr": pt.Float(1e-4, 1e-1, log=True)},
        population_size=4,
        steps=30,
        interval=5,
        metric="loss",
        mode="min",
        exploit=pt.Truncation(0.25),
        seed=3,
    )
    result = exp.run(url, "torch")
    assert [e for e in result.events if e.kind == "exploit"]
    first = {h.member: h.score for h in result.history if h.step == 1}
    assert result.best.score is not None and result.best.score < min(first.values())
    storage = open_storage(url)
    store = CheckpointStore(storage.get_run("torch").checkpoint_root)
    for row in storage.members("torch"):
        state: Any = store.load(row.checkpoint)
        assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(row.state["hparams"]["lr"])
        assert next(iter(state["model"].values())).device.type == device
