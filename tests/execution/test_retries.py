"""Retries that can help: a retried member draws other random numbers than the attempt that
failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from poptune.storage import open_storage

EXECUTORS = [pytest.param(1, id="serial"), pytest.param(2, id="processes", marks=pytest.mark.slow)]


DRAWN_FAULT = '''
import os
import torch
import poptune as pt
from poptune.controller import member_seed
from poptune.torch import TorchTrainable

MARKS = os.environ["FAULT_MARKS"]


class Member(TorchTrainable):
    """Fails at step 3 of member 1 when it draws what its first attempt drew: a fault drawn
    from the member's own random stream, replayed exactly by a retry that does not re-seed."""

    hparam_targets = {}

    def setup(self):
        self.model = torch.nn.Linear(2, 1)
        self.steps = 0

    def step(self):
        self.steps += 1
        x = float(torch.rand(()))
        if self.steps == 3 and self.seed == member_seed(0, 1):
            mark = os.path.join(MARKS, "first-draw")
            if not os.path.exists(mark):
                with open(mark, "w") as f:
                    f.write(repr(x))
            with open(mark) as f:
                if float(f.read()) == x:
                    raise RuntimeError(f"drew {x} again")
        return {"score": self.steps + x}

    def extra_state(self):
        return {"steps": self.steps}

    def load_extra_state(self, state):
        self.steps = state["steps"]


EXPERIMENT = pt.Experiment(
    Member, {"lr": pt.Float(0.1, 1.0)}, population_size=3, steps=10, interval=5, seed=0
)
'''


@pytest.mark.parametrize("workers", EXECUTORS)
def test_a_retry_draws_other_numbers_than_the_attempt_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A failure drawn from the member's own stream: the retry re-seeds the member's streams
    (deterministically), so it does not replay the fault, and the member finishes. Before,
    each retry restored the same streams and failed alike, and the member failed for good."""
    pytest.importorskip("torch", reason="torch is not installed")
    (tmp_path / "marks").mkdir()
    monkeypatch.setenv("FAULT_MARKS", str(tmp_path / "marks"))
    (tmp_path / "drawn.py").write_text(DRAWN_FAULT)
    source = f"{tmp_path / 'drawn.py'}:EXPERIMENT"
    from poptune.execution.source import load_experiment

    exp = load_experiment(source)[0]
    url = f"sqlite:///{tmp_path}/runs.db"
    result = exp.run(url, "r", workers=workers, source=source)

    assert all(m.status == "finished" for m in result.members)
    with open_storage(url) as store:
        failures = store.failures("r")
    assert len(failures) == 1 and "drew" in failures[0].traceback


REPLACED = '''
import torch
import poptune as pt
from poptune.controller import member_seed
from poptune.torch import TorchTrainable


class Member(TorchTrainable):
    """Reports a draw of its own stream each step; member 1 fails for good at step 6."""

    hparam_targets = {}

    def setup(self):
        self.model = torch.nn.Linear(2, 1)
        self.steps = 0

    def step(self):
        self.steps += 1
        if self.seed == member_seed(0, 1) and self.steps == 6:
            raise RuntimeError("member 1 always fails at step 6")
        score = float(self.model.weight.detach().sum()) + self.steps
        return {"score": score, "draw": float(torch.rand(()))}

    def extra_state(self):
        return {"steps": self.steps}

    def load_extra_state(self, state):
        self.steps = state["steps"]


EXPERIMENT = pt.Experiment(
    Member, {"lr": pt.Float(0.1, 1.0)}, population_size=3, steps=10, interval=5, seed=0
)
'''


def test_a_replacement_draws_from_streams_of_its_own_not_its_donor_s(tmp_path: Path) -> None:
    """A member that failed for good is replaced by a copy of a top member: weights and
    hyperparameters are the donor's, but its random streams are its own, so it does not draw
    the donor's next numbers (a fault drawn from them would be copied too)."""
    pytest.importorskip("torch", reason="torch is not installed")
    (tmp_path / "replaced.py").write_text(REPLACED)
    source = f"{tmp_path / 'replaced.py'}:EXPERIMENT"
    from poptune.execution.source import load_experiment

    exp = load_experiment(source)[0]
    result = exp.run(f"sqlite:///{tmp_path}/runs.db", "r", source=source, options=_no_retries())

    (replace,) = [e for e in result.events if e.kind == "replace"]
    assert replace.donor is not None and replace.donor_step is not None
    after = replace.donor_step + 1
    draws = {
        (h.member, h.step, h.segment): h.metrics["draw"] for h in result.history if h.step == after
    }
    mine = [d for (m, _, seg), d in draws.items() if m == replace.member and seg == replace.index]
    donors = [d for (m, _, _), d in draws.items() if m == replace.donor]
    assert mine and donors and mine[0] not in donors


def _no_retries() -> object:
    import poptune as pt

    return pt.RunOptions(max_retries=0)
