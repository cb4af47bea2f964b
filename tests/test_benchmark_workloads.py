"""The workloads of ``benchmarks/convergence.py`` train, score in [0, 1], and checkpoint exactly.

The benchmark's figures are never asserted here; only that its members are sound: a member
rebuilt from another's checkpoint must continue exactly as the original would have, or the
benchmark would measure the workload instead of the executor.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from poptune.execution.source import load_experiment
from poptune.storage import CheckpointStore

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "workloads.py"


def _load() -> ModuleType:
    name = "poptune_bench_workloads"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that its classes pickle
        spec.loader.exec_module(module)
    return sys.modules[name]


wl = _load()


def _continues_identically(make: Any, hparams: dict[str, Any], metric: str, tmp: Path) -> None:
    """Trains a member, checkpoints it through the real store, loads that into a member with
    another seed and other hparams, applies the hparams, and compares the next steps."""
    original = make(hparams, 1)
    for _ in range(2):
        score = original.step()[metric]
        assert 0.0 <= score <= 1.0
    store = CheckpointStore(tmp)
    saved = store.save("run", 0, 2, original.state_dict())
    copy = make({k: v * 3 for k, v in hparams.items()}, 2)
    copy.step()  # its own optimizer state and RNG draws, all to be replaced
    copy.load_state_dict(store.load(saved.location))
    copy.set_hparams(hparams)
    for _ in range(3):
        assert copy.step() == original.step()


def test_saturating_member_scores_and_round_trips_exactly(tmp_path: Path) -> None:
    _continues_identically(wl.Saturating, {"lr": 0.02}, "acc", tmp_path)


def test_saturating_accuracy_grows_fastest_at_the_optimal_lr() -> None:
    good, bad = wl.Saturating({"lr": 0.01}, 0), wl.Saturating({"lr": 1e-4}, 0)
    for _ in range(40):
        g, b = good.step(), bad.step()
    assert g["progress"] == 40.0 and b["progress"] == 0.0
    assert g["acc"] > 0.4 > b["acc"]


def test_experiments_build_from_arguments_environment_and_pickle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exp = wl.saturating(seed=3, steps=20)
    assert (exp.population_size, exp.steps, exp.interval, exp.metric) == (8, 20, 10, "acc")
    again = pickle.loads(pickle.dumps(exp))  # how executor="processes" ships it without source
    assert again.describe() == exp.describe()
    monkeypatch.setenv("BENCH_STEPS", "30")
    monkeypatch.setenv("BENCH_SEED", "5")
    for name in ("saturating", "digits"):  # the FILE.py:NAME form `poptune run` uses
        loaded, source = load_experiment(f"{PATH}:{name}")
        assert (loaded.steps, loaded.seed, loaded.population_size) == (30, 5, 8)
        assert source.endswith(f"workloads.py:{name}")


def test_saturating_experiment_runs_in_memory() -> None:
    result = wl.saturating(seed=0, steps=20).run()
    assert len(result.history) == 8 * 20
    assert all(0.0 <= h.score <= 1.0 for h in result.history)


@pytest.fixture
def torch_and_sklearn() -> Any:
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    return pytest.importorskip("torch", reason="the [torch] extra is not installed")


def test_digits_member_scores_and_round_trips_exactly(
    torch_and_sklearn: Any, tmp_path: Path
) -> None:
    _continues_identically(wl.DigitsMLP, {"lr": 3e-3, "weight_decay": 1e-4}, "val_acc", tmp_path)


def test_digits_hparams_reach_every_param_group_after_a_load(torch_and_sklearn: Any) -> None:
    donor = wl.DigitsMLP({"lr": 1e-2, "weight_decay": 1e-2}, 1)
    donor.step()
    member = wl.DigitsMLP({"lr": 1e-3, "weight_decay": 1e-3}, 2)
    member.load_state_dict(donor.state_dict())  # brings back the donor's lr and weight_decay
    member.set_hparams({"lr": 2e-4, "weight_decay": 3e-5})
    groups = member.opt.param_groups
    assert groups and all(g["lr"] == 2e-4 and g["weight_decay"] == 3e-5 for g in groups)
    assert member.hparams == {"lr": 2e-4, "weight_decay": 3e-5}


def test_digits_are_scikit_learns_bundled_digits(torch_and_sklearn: Any) -> None:
    from sklearn.datasets import load_digits

    x, y = wl._bundled_digits()
    want_x, want_y = load_digits(return_X_y=True)
    assert np.array_equal(x, want_x)
    assert np.array_equal(y, want_y)
