"""examples/gan_digits.py: the smoke run trains and exploits, the baseline is random search at
the same compute, learning rates stick after a copy, and the Inception score means something."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

import poptune as pt

torch = pytest.importorskip("torch", reason="the [torch] extra is not installed")
pytest.importorskip("sklearn", reason="the digits need scikit-learn")

PATH = Path(__file__).resolve().parent.parent / "examples" / "gan_digits.py"


def load() -> ModuleType:
    """Imports the example by path (examples are scripts, not a package)."""
    name = "poptune_example_gan_digits"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gan() -> ModuleType:
    return load()


@pytest.fixture(scope="module")
def smoke(gan: ModuleType) -> pt.Result:
    return gan.experiment(seed=0, size="smoke").run()


def test_module_defines_the_pbt_experiment(gan: ModuleType) -> None:
    """`poptune run examples/gan_digits.py` finds PBT with the paper's GAN choices."""
    exp = gan.EXPERIMENT
    assert isinstance(exp, pt.Experiment)
    assert isinstance(exp.exploit, pt.Tournament)
    assert isinstance(exp.explore, pt.Perturb)
    assert exp.metric == "inception" and exp.mode == "max"
    assert set(exp.space) == {"lr_g", "lr_d"}
    assert exp.population_size == 8


@pytest.mark.parametrize("size", ["default", "smoke"])
def test_random_baseline_is_the_same_compute_without_exploit_or_explore(
    gan: ModuleType, size: str
) -> None:
    pbt = gan.experiment(seed=3, size=size)
    random = gan.experiment(seed=3, size=size, baseline="random")
    assert random.exploit is None and random.explore is None
    assert (random.population_size, random.steps, random.interval) == (
        pbt.population_size,
        pbt.steps,
        pbt.interval,
    )
    assert random.trainable is pbt.trainable
    assert random.describe()["initial_population"] == pbt.describe()["initial_population"]


def test_bad_size_or_baseline_is_refused(gan: ModuleType) -> None:
    with pytest.raises(ValueError, match="size"):
        gan.experiment(size="huge")
    with pytest.raises(ValueError, match="baseline"):
        gan.experiment(baseline="grid")


def test_smoke_run_trains_every_member_with_finite_scores(
    smoke: pt.Result, gan: ModuleType
) -> None:
    cfg = gan.SIZES["smoke"]
    assert len(smoke.history) == cfg.population_size * cfg.steps
    scores = [r.score for r in smoke.history]
    assert all(math.isfinite(s) and 1.0 <= s <= 10.0 for s in scores)
    assert all(m.step == cfg.steps for m in smoke.members)


def test_smoke_pbt_run_exploits(smoke: pt.Result) -> None:
    exploits = [e for e in smoke.events if e.kind == "exploit"]
    assert exploits, "the smoke PBT run made no exploit"
    assert all(e.donor is not None and e.donor != e.member for e in exploits)


def test_summary_gives_the_best_score_and_one_value_per_ready_point(
    smoke: pt.Result, gan: ModuleType
) -> None:
    out = gan.summary(smoke)
    assert out["best"] == pytest.approx(smoke.best.score)
    cfg = gan.SIZES["smoke"]
    ready = list(range(0, cfg.steps, gan.INTERVAL))
    for name in ("lr_g", "lr_d"):
        points = out["schedule"][name]
        assert [p[0] for p in points] == ready
        assert all(cfg.lr_low <= v <= cfg.lr_high for _, v in points)
    # The last value is the one the best member trained its final steps with.
    assert out["schedule"]["lr_g"][-1][1] == smoke.best.hparams["lr_g"]


def test_learning_rates_stick_after_loading_another_members_state(gan: ModuleType) -> None:
    """After a copy, both optimizers run with the new lrs, not the donor's restored ones."""
    donor = gan.SmokeGANMember({"lr_g": 1e-3, "lr_d": 2e-3}, seed=1, device="cpu")
    member = gan.SmokeGANMember({"lr_g": 1e-5, "lr_d": 1e-5}, seed=2, device="cpu")
    donor.step()
    member.step()
    member.load_state_dict(donor.state_dict())
    new = {"lr_g": 3e-4, "lr_d": 5e-4}
    member.set_hparams(new)
    assert [g["lr"] for g in member.opt_g.param_groups] == [new["lr_g"]]
    assert [g["lr"] for g in member.opt_d.param_groups] == [new["lr_d"]]
    for a, b in zip(member.gen.parameters(), donor.gen.parameters(), strict=True):
        assert torch.equal(a, b)
    # The Adam moments came with the weights: the copy continues the donor's training.
    ours, theirs = member.opt_d.state_dict()["state"], donor.opt_d.state_dict()["state"]
    assert torch.equal(ours[0]["exp_avg"], theirs[0]["exp_avg"])
    assert math.isfinite(member.step()["inception"])
    assert [g["lr"] for g in member.opt_g.param_groups] == [new["lr_g"]]


def test_inception_score_is_high_for_real_digits_and_low_for_one_repeated_sample(
    gan: ModuleType,
) -> None:
    real = gan.digits()[0]
    assert gan.inception_score(real) > 9.0
    assert gan.inception_score(real[:1].repeat(500, 1)) == pytest.approx(1.0, abs=1e-4)
    assert gan.inception_score(torch.zeros(500, 64)) == pytest.approx(1.0, abs=1e-4)


def test_classifier_cache_is_written_whole_and_read_back(
    gan: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gan.classifier.cache_clear()
    try:
        built = gan.classifier()
        files = sorted(p.name for p in (tmp_path / "poptune").iterdir())
        assert files == [f"digits-classifier-v{gan.CACHE_VERSION}.pt"]  # no temporary left
        gan.classifier.cache_clear()
        loaded = gan.classifier()
        x = gan.digits()[0][:50]
        with torch.no_grad():
            assert torch.equal(built(x), loaded(x))
    finally:
        gan.classifier.cache_clear()  # later tests use the user's cache again
