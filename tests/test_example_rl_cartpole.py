"""examples/rl_cartpole.py: PPO members on CartPole-v1 learn, exploit, and keep the
hyperparameters PBT gives them."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import poptune as pt

torch = pytest.importorskip("torch", reason="the [torch] extra is not installed")
pytest.importorskip("gymnasium", reason="the [examples] extra is not installed")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rl_cartpole.py"
RANDOM_POLICY_RETURN = 22.0  # CartPole-v1's mean return under uniformly random actions


@pytest.fixture(scope="module")
def rl() -> ModuleType:
    """The example, imported by path (examples are scripts, not a package)."""
    name = "poptune_example_rl_cartpole"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses need the module registered
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def smoke(rl: ModuleType) -> pt.Result:
    """The smoke-size PBT run, in memory (8 members; about 15 s of CPU), with truncation
    exploit in place of the example's t-test: over 5 steps, a t-test between windows of at
    most 5 noisy returns reaches significance only by luck (the same seed copied in one run
    and in none on a machine whose floating-point results differed), and the tests below
    need copies. Truncation copies into the bottom quarter at every ready point."""
    return rl.experiment(seed=0, size="smoke").replace(exploit=pt.Truncation(0.25)).run()


def member(rl: ModuleType, hparams: Any, seed: int = 0) -> Any:
    return rl.CartPoleMember(dict(hparams), seed=seed, device="cpu")


def test_module_exposes_the_pbt_experiment(rl: ModuleType) -> None:
    """`poptune run` finds EXPERIMENT: PBT with the t-test exploit and perturb explore over the
    UNREAL set, maximising the return."""
    exp = rl.EXPERIMENT
    assert isinstance(exp, pt.Experiment)
    assert (exp.population_size, exp.metric, exp.mode) == (8, "return", "max")
    assert exp.exploit == pt.TTest(window=10)
    assert exp.explore == pt.Perturb()
    assert set(exp.space) == {"lr", "entropy_cost", "unroll_length"}


def test_random_search_baseline_has_the_same_budget(rl: ModuleType) -> None:
    """baseline="random" neither exploits nor explores, with the same population and steps."""
    for size in ("smoke", "default"):
        pbt, random = rl.experiment(3, size), rl.experiment(3, size, baseline="random")
        assert random.exploit is None and random.explore is None
        assert (random.population_size, random.steps, random.interval, random.seed) == (
            pbt.population_size,
            pbt.steps,
            pbt.interval,
            pbt.seed,
        )
    with pytest.raises(ValueError, match="size"):
        rl.experiment(size="huge")


def test_unroll_length_sets_the_rollout_size(rl: ModuleType) -> None:
    """A rollout is unroll_length steps of every environment; the transitions after an
    episode's end (autoreset steps) are left out of the batch."""
    m = member(rl, {"lr": 1e-3, "entropy_cost": 1e-2, "unroll_length": 8})
    m.set_hparams({"lr": 1e-3, "entropy_cost": 1e-2, "unroll_length": 40})
    finished: list[float] = []
    batch = m.collect(finished)
    n = rl.CONFIG.num_envs
    assert m.frames == 40 * n
    assert 40 * n - len(finished) <= len(batch["actions"]) <= 40 * n
    assert all(1 <= r <= 500 for r in finished)


@pytest.mark.slow
def test_smoke_run_learns(rl: ModuleType, smoke: pt.Result) -> None:
    """Every member reports a finite return in every step, within CartPole's range, and the
    best member ends well above a random policy."""
    assert len(smoke.members) == 8
    assert len(smoke.history) == 8 * rl.SIZES["smoke"].steps
    assert all(math.isfinite(r.score) and 8 <= r.score <= 500 for r in smoke.history)
    assert smoke.best.score is not None and smoke.best.score > 3 * RANDOM_POLICY_RETURN


@pytest.mark.slow
def test_smoke_run_exploits_and_its_hparams_are_live(smoke: pt.Result) -> None:
    """At least one member copied another, and at every step the values the member read back
    from its optimizer and attributes are the hyperparameters in force."""
    assert any(ev.donor is not None and ev.donor != ev.member for ev in smoke.events)
    for record in smoke.history:
        hp = smoke.hparams_at(record)
        assert record.metrics["lr"] == pytest.approx(hp["lr"])
        assert record.metrics["entropy_cost"] == pytest.approx(hp["entropy_cost"])
        assert record.metrics["unroll_length"] == hp["unroll_length"]


@pytest.mark.slow
def test_hparams_stick_after_loading_a_donor(rl: ModuleType, smoke: pt.Result) -> None:
    """Replaying one of the run's exploits by hand: loading the donor's state brings back the
    donor's lr in the optimizer; the new hyperparameters, set after the load, are what the
    member trains with. The network is the donor's; the environments stay the member's own."""
    ev = next(e for e in smoke.events if e.donor is not None and e.donor != e.member)
    donor_record = next(
        r for r in smoke.history if r.member == ev.donor and r.step == ev.donor_step
    )
    donor = member(rl, smoke.hparams_at(donor_record), seed=1)
    recipient = member(rl, ev.old_hparams, seed=2)
    own_obs = recipient.obs.copy()
    donor.frames = 12_345
    recipient.load_state_dict(donor.state_dict())
    assert recipient.optimizer.param_groups[0]["lr"] == donor.optimizer.param_groups[0]["lr"]
    recipient.set_hparams(ev.new_hparams)
    assert all(g["lr"] == ev.new_hparams["lr"] for g in recipient.optimizer.param_groups)
    assert recipient.entropy_cost == ev.new_hparams["entropy_cost"]
    assert recipient.unroll_length == ev.new_hparams["unroll_length"]
    for a, b in zip(recipient.agent.parameters(), donor.agent.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (recipient.obs == own_obs).all() and recipient.frames == 12_345
    metrics = recipient.step()
    assert metrics["lr"] == ev.new_hparams["lr"]
    unroll = ev.new_hparams["unroll_length"]
    rollouts = math.ceil(rl.CONFIG.env_steps_per_step / unroll)
    assert recipient.frames == 12_345 + rollouts * unroll * rl.CONFIG.num_envs


@pytest.mark.slow
def test_summary_gives_the_best_return_and_a_compact_schedule(
    rl: ModuleType, smoke: pt.Result
) -> None:
    """summary() is what benchmarks/domains.py reads: the best member's latest return and, for
    each hyperparameter, [step, value] from step 1 at every change along its ancestry."""
    out = rl.summary(smoke)
    assert out["best"] == smoke.best.score
    assert set(out["schedule"]) == {"lr", "entropy_cost", "unroll_length"}
    full = smoke.schedule()
    for name, marks in out["schedule"].items():
        steps = [s for s, _ in marks]
        assert steps[0] == 1 and steps == sorted(set(steps))
        for s, value in marks:
            assert value == pytest.approx(float(full[s - 1].hparams[name]))
