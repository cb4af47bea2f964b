"""The examples' claims, over fixed seeds: what each example's table says must stay true."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.slow


def load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>.py`` by path (examples are scripts, not a package)."""
    module_name = f"poptune_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


# -- toy quadratic (paper Fig. 2) -----------------------------------------------------------

TOY_SEEDS = range(100)


@pytest.fixture(scope="module")
def toy() -> ModuleType:
    return load_example("toy_quadratic")


@pytest.fixture(scope="module")
def toy_runs(toy: ModuleType) -> dict[str, list]:
    variants = ("PBT", "exploit only", "grid search")
    return {v: [toy.experiment(v, s).run() for s in TOY_SEEDS] for v in variants}


def test_toy_pbt_reaches_near_optimum_in_most_seeds(toy: ModuleType, toy_runs: dict) -> None:
    """PBT reaches Q > 1.18 by step 200 in at least 90 of 100 seeds (the paper's claim)."""
    hits = [toy.outcome(r).first_hit for r in toy_runs["PBT"]]
    assert sum(h is not None and h <= 200 for h in hits) >= 90


def test_toy_grid_search_ends_at_the_known_answer(toy_runs: dict) -> None:
    """Without exploit or explore, the best final Q is exactly 0.38975 for every seed."""
    for result in toy_runs["grid search"]:
        assert result.best.score == pytest.approx(0.38975, abs=1e-5)


@pytest.mark.parametrize("variant", ["exploit only", "grid search"])
def test_toy_without_explore_never_gets_past_grid_level(toy_runs: dict, variant: str) -> None:
    """Copying alone cannot change h: no member's Q ever exceeds 0.39 in any seed."""
    assert max(h.score for r in toy_runs[variant] for h in r.history) <= 0.39


def test_toy_exploit_only_does_copy(toy_runs: dict) -> None:
    """The exploit-only runs do exploit (ties at equal Q are broken at random)."""
    assert all(len(r.events) > 0 for r in toy_runs["exploit only"])


# -- learning-rate schedule task ------------------------------------------------------------

LR_SEEDS = range(30)


@pytest.fixture(scope="module")
def lr() -> ModuleType:
    return load_example("lr_schedule")


@pytest.fixture(scope="module")
def lr_pbt(lr: ModuleType) -> list[int | None]:
    return [lr.steps_to_target(lr.experiment("PBT", s).run()) for s in LR_SEEDS]


def test_lr_pbt_reaches_target_in_every_seed(lr_pbt: list[int | None]) -> None:
    """PBT with 8 members reaches acc > 200 within 1000 steps in 30 of 30 seeds."""
    assert all(s is not None for s in lr_pbt)


def test_lr_pbt_median_at_most_260(lr_pbt: list[int | None]) -> None:
    """PBT with 8 members reaches acc > 200 in a median of at most 260 steps (PBT_NOTES.md)."""
    assert float(np.median([s for s in lr_pbt if s is not None])) <= 260


def test_lr_random_search_mostly_fails(lr: ModuleType) -> None:
    """Random search with 8 fixed learning rates reaches acc > 200 within 1000 steps in fewer
    than half of the seeds."""
    steps = [lr.steps_to_target(lr.experiment("random search", s).run()) for s in LR_SEEDS]
    assert sum(s is not None for s in steps) < len(LR_SEEDS) / 2


def test_lr_example_exposes_an_experiment(lr: ModuleType) -> None:
    """The module-level EXPERIMENT is the PBT configuration the CLI picks up."""
    exp = lr.EXPERIMENT
    assert (exp.population_size, exp.interval, exp.metric, exp.mode) == (8, 5, "acc", "max")
    assert exp.exploit == lr.VARIANTS["PBT"]["exploit"]


def test_lr_copy_carries_the_rng(lr: ModuleType) -> None:
    """LRSchedule's state holds its generator: a member loaded with another's state draws the
    same numbers next; OwnNoise keeps drawing its own."""
    hp = {"lr": 0.002}
    a, b = lr.LRSchedule(hp, seed=1), lr.LRSchedule(hp, seed=2)
    for _ in range(5):
        a.step()
    b.load_state_dict(a.state_dict())
    assert a.step() == b.step() and a.acc > 0
    c, d = lr.OwnNoise(hp, seed=1), lr.OwnNoise(hp, seed=2)
    for _ in range(5):
        c.step()
    d.load_state_dict(c.state_dict())
    assert d.acc == c.acc and c.step() != d.step()
    e = lr.OwnNoise(hp, seed=2)  # its own checkpoint restores its stream exactly
    e.load_state_dict(d.state_dict())
    assert e.step() == d.step()


def through_checkpoint(state: Any) -> Any:
    """``state`` written and read back as poptune does (``torch.save``, then a safe load): a
    copy, as a rebuilt member gets it. Loading a live member's ``state_dict()`` directly would
    share its optimizer's tensors (torch does not copy them), and each would step the other's."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- CleanRL's PPO on CartPole (examples/cleanrl_ppo.py) -----------------------------------

RANDOM_POLICY_RETURN = 22.0  # CartPole-v1's mean return under uniformly random actions


@pytest.fixture(scope="module")
def ppo() -> ModuleType:
    pytest.importorskip("torch", reason="the [torch] extra is not installed")
    pytest.importorskip("gymnasium", reason="the [examples] extra is not installed")
    return load_example("cleanrl_ppo")


@pytest.fixture(scope="module")
def ppo_smoke(ppo: ModuleType) -> Any:
    """The smoke-size PBT run, in memory: 4 members, 3 steps, ready at every step (seconds)."""
    return ppo.experiment(seed=0, size="smoke").run()


def test_ppo_smoke_run_completes_with_sensible_returns(ppo: ModuleType, ppo_smoke: Any) -> None:
    """Every member trains every step and reports a return in CartPole's range; the best ends
    above a random policy's, and the bottom member copied a better one."""
    args = ppo.ARGS["smoke"]
    assert len(ppo_smoke.history) == args.population_size * args.steps
    assert all(1 <= r.score <= 500 for r in ppo_smoke.history)
    assert ppo_smoke.best.score > 2 * RANDOM_POLICY_RETURN
    assert any(e.donor is not None and e.donor != e.member for e in ppo_smoke.events)


def test_ppo_anneals_from_the_members_current_lr(ppo: ModuleType, ppo_smoke: Any) -> None:
    """At every step the lr in force is CleanRL's ``frac * lr`` with ``lr`` the member's
    current hyperparameter (perturbed ones included), never its initial one."""
    args = ppo.ARGS["smoke"]
    for record in ppo_smoke.history:
        hp = ppo_smoke.hparams_at(record)
        last_update = record.step * args.updates_per_step - 1  # annealed before it ran
        frac = 1.0 - last_update / args.num_updates
        assert record.metrics["lr"] == pytest.approx(frac * hp["lr"])
        for name in ("ent_coef", "clip_coef", "gae_lambda"):
            assert record.metrics[name] == pytest.approx(hp[name])


def test_ppo_counters_and_lr_survive_a_rebuild(ppo: ModuleType) -> None:
    """A member rebuilt from a checkpoint (as a worker does after an eviction) keeps its
    lineage's counters, so the anneal goes on where it was, with the lr set after the load."""
    hp = {"lr": 1e-3, "ent_coef": 0.01, "clip_coef": 0.2, "gae_lambda": 0.95}
    member = ppo.SmokePPOMember(hp, seed=0, device="cpu")
    member.step()
    rebuilt = ppo.SmokePPOMember(hp, seed=0, device="cpu")
    rebuilt.load_state_dict(through_checkpoint(member.state_dict()))
    new = {**hp, "lr": 2e-3}
    rebuilt.set_hparams(new)
    assert (rebuilt.update, rebuilt.global_step) == (member.update, member.global_step)
    frac = 1.0 - member.update / ppo.ARGS["smoke"].num_updates
    assert rebuilt.optimizer.param_groups[0]["lr"] == pytest.approx(frac * 2e-3)
    assert math.isfinite(rebuilt.step()["return"])


# -- PyTorch's MNIST example on the digits (examples/mnist_digits.py) ----------------------


@pytest.fixture(scope="module")
def mnist() -> ModuleType:
    pytest.importorskip("torch", reason="the [torch] extra is not installed")
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    return load_example("mnist_digits")


@pytest.fixture(scope="module")
def mnist_smoke(mnist: ModuleType) -> Any:
    """The smoke-size PBT run, in memory: 4 members, 3 steps of 3 batches (seconds)."""
    return mnist.experiment(seed=0, size="smoke").run()


def test_mnist_smoke_run_completes_with_sensible_accuracy(
    mnist: ModuleType, mnist_smoke: Any
) -> None:
    """Every member trains every step; after 9 batches the best member is well above chance
    (0.1) on the validation digits, and the bottom member copied a better one."""
    args = mnist.ARGS["smoke"]
    assert len(mnist_smoke.history) == args.population_size * args.steps
    assert all(0.0 <= r.score <= 1.0 for r in mnist_smoke.history)
    assert mnist_smoke.best.score > 0.3
    assert any(e.donor is not None and e.donor != e.member for e in mnist_smoke.events)


def test_mnist_hparams_are_live_at_every_step(mnist_smoke: Any) -> None:
    """The dropout rates and gamma read back from the modules and the scheduler are the
    member's hyperparameters in force at every step (after every copy and perturbation)."""
    for record in mnist_smoke.history:
        hp = mnist_smoke.hparams_at(record)
        for name in ("gamma", "dropout1", "dropout2"):
            assert record.metrics[name] == pytest.approx(hp[name])
        assert record.metrics["lr"] == pytest.approx(hp["lr"])  # no epoch ended yet


def test_mnist_rebuilt_member_goes_on_where_it_stopped(mnist: ModuleType) -> None:
    """The data position is in the checkpoint: a member rebuilt from it trains the next step
    exactly as the live one does, epoch boundary and StepLR included; a new lr keeps the decay
    so far."""
    hp = {"lr": 1.0, "gamma": 0.7, "dropout1": 0.25, "dropout2": 0.5}
    live = mnist.SmokeDigitsMember(hp, seed=0, device="cpu")
    for _ in range(8):  # 24 batches: past the first epoch's end (23 batches)
        live.step()
    rebuilt = mnist.SmokeDigitsMember(hp, seed=0, device="cpu")
    rebuilt.load_state_dict(through_checkpoint(live.state_dict()))
    rebuilt.set_hparams(hp)
    assert (rebuilt.epoch, rebuilt.batch) == (live.epoch, live.batch) == (1, 1)
    assert rebuilt.step() == live.step()
    rebuilt.set_hparams({**hp, "lr": 2.0})
    assert rebuilt.optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * 0.7)


# -- both, through the CLI as a user runs them ---------------------------------------------


@pytest.mark.parametrize("name", ["cleanrl_ppo", "mnist_digits"])
def test_example_runs_through_the_cli_with_two_workers(name: str, tmp_path: Path) -> None:
    """``poptune run`` on the smoke size (chosen, with the seed, by environment variables)
    with two worker processes, which rebuild members from checkpoints: the run completes."""
    pytest.importorskip("torch", reason="the [torch] extra is not installed")
    env = {**os.environ, "POPTUNE_EXAMPLE_SIZE": "smoke", "POPTUNE_EXAMPLE_SEED": "3"}
    src = str(EXAMPLES.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    cmd = [sys.executable, "-m", "poptune", "run", str(EXAMPLES / f"{name}.py")]
    cmd += ["--workers", "2", "--storage", url, "--name", "smoke", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    import poptune as pt

    result = pt.load(url, "smoke")
    assert result.best.score is not None and math.isfinite(result.best.score)
    assert all(m.step == 3 for m in result.members)
