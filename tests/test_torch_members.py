"""poptune.torch: members whose hyperparameters stick, the best model back out, devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch", reason="the [torch] extra is not installed")

import poptune as pt  # noqa: E402
from poptune.execution.devices import assign_devices, check_devices  # noqa: E402
from poptune.execution.source import load_experiment  # noqa: E402
from poptune.storage import CheckpointStore  # noqa: E402
from poptune.torch import TorchTrainable  # noqa: E402

WORKLOAD = str(Path(__file__).with_name("torch_workload.py"))
SOURCE = f"{WORKLOAD}:classifier"
HP = {"lr": 0.01, "weight_decay": 0.001, "dropout": 0.1}


def experiment() -> pt.Experiment:
    return load_experiment(SOURCE)[0]


def member(hparams: dict[str, float], seed: int) -> Any:
    return experiment().trainable(hparams, seed)


def test_a_copied_member_holds_the_donors_state_exactly_and_its_own_hparams(
    tmp_path: Path,
) -> None:
    """After an exploit (the donor's checkpoint loaded, then new hyperparameters), the
    member's weights, optimizer state and RNG streams are the donor's exactly, its param
    groups and dropout carry the new values, and it continues exactly as the donor would
    with those values."""
    donor, other = member(HP, 1), member({"lr": 0.2, "weight_decay": 0.05, "dropout": 0.4}, 2)
    for _ in range(5):
        donor.step()
        other.step()
    store = CheckpointStore(tmp_path)
    saved = store.save("r", 0, 5, donor.state_dict())
    new = {"lr": 0.02, "weight_decay": 0.002, "dropout": 0.25}
    other.load_state_dict(store.load(saved.location))  # weights_only where it can
    other.set_hparams(new)
    for (name, a), (_, b) in zip(
        donor.model.state_dict().items(), other.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    mine, theirs = other.optimizer.state_dict(), donor.optimizer.state_dict()
    for key, state in theirs["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(mine["state"][key][field]), torch.as_tensor(value))
    assert all(g["lr"] == 0.02 and g["weight_decay"] == 0.002 for g in other.optimizer.param_groups)
    assert other.model.drop.p == 0.25
    donor.set_hparams(new)  # the same values: both must now draw and train identically
    assert donor.step() == other.step()


def test_targets_that_do_not_exist_are_named_at_set_up() -> None:
    """A hyperparameter target missing on the member is an error when it is built."""

    class Typo(torch_workload().Classifier):  # type: ignore[misc, name-defined]
        hparam_targets: ClassVar[dict[str, Any]] = {"lr": "optimizer.lrr"}

    with pytest.raises(ValueError, match=r"hparam_targets\['lr'\] = 'optimizer.lrr'.*no 'lrr'"):
        Typo(HP, 0, device="cpu")

    class Missing(torch_workload().Classifier):  # type: ignore[misc, name-defined]
        hparam_targets: ClassVar[dict[str, Any]] = {"dropout": "model.dropout.p"}

    with pytest.raises(ValueError, match=r"no attribute 'model.dropout'"):
        Missing(HP, 0, device="cpu")

    class Unknown(torch_workload().Classifier):  # type: ignore[misc, name-defined]
        hparam_targets: ClassVar[dict[str, Any]] = {"momentum": "optimizer.momentum"}

    with pytest.raises(ValueError, match=r"names \['momentum'\], which are not hyperparameters"):
        Unknown(HP, 0, device="cpu")


def torch_workload() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_workload", WORKLOAD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_workload"] = module
    spec.loader.exec_module(module)
    return module


def test_members_in_one_process_have_their_own_random_streams() -> None:
    """Two members stepping in turn draw exactly what each draws alone: the global RNGs are
    swapped per member, so the serial executor gives the same runs as worker processes."""
    alone = member(HP, 7)
    solo = [alone.step()["loss"] for _ in range(4)]
    a, b = member(HP, 7), member(HP, 8)
    interleaved = []
    for _ in range(4):
        interleaved.append(a.step()["loss"])
        b.step()
    assert interleaved == solo


def _check_live_values(result: pt.Result) -> None:
    """At every recorded step the live optimizer values and dropout p were the member's."""
    assert result.history
    for h in result.history:
        hp = result.hparams_at(h)
        assert h.metrics["live_lr"] == pytest.approx(hp["lr"], rel=1e-12), h
        assert h.metrics["live_wd"] == pytest.approx(hp["weight_decay"], rel=1e-12), h
        assert h.metrics["live_p"] == pytest.approx(hp["dropout"], rel=1e-12), h
    assert sum(e.kind == "exploit" for e in result.events) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_live_hyperparameters_equal_the_members_at_every_step_even_after_resume(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serial and worker processes, and a resumed run: the optimizer's lr and weight decay
    and the dropout p in force at each recorded step equal the member's hyperparameters."""
    url = f"sqlite:///{tmp_path}/runs.db"
    monkeypatch.setenv("TW_STEPS", "12")
    experiment().run(url, "r", workers=workers, source=SOURCE)
    monkeypatch.setenv("TW_STEPS", "24")
    result = experiment().run(url, "r", resume=True, source=SOURCE)
    assert {m.step for m in result.members} == {24}
    _check_live_values(result)


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_the_best_members_weights_come_back_out(tmp_path: Path, storage: str) -> None:
    """load_state gives the best member's state; load_member a ready trainable whose model
    scores what the best member scored at its last step (an in-memory run's too)."""
    url = None if storage == "memory" else f"sqlite:///{tmp_path}/runs.db"
    # On the CPU, where load_member builds it too: the same device gives the same arithmetic.
    result = experiment().run(url, "r", devices=["cpu"])
    _check_live_values(result)
    results = [result] if url is None else [result, pt.load(url, "r")]
    for res in results:
        best = res.best
        state = res.load_state()
        assert set(state["parts"]) == {"model", "optimizer"}
        trained = res.load_member(device="cpu", experiment=experiment())
        assert trained.accuracy() == best.score
        for name, value in trained.model.state_dict().items():
            assert torch.equal(value, state["parts"]["model"][name])
        assert trained.optimizer.param_groups[0]["lr"] == best.hparams["lr"]
        other = next(m for m in res.members if m.id != best.id)
        assert res.load_member(other.id, experiment=experiment()).accuracy() == other.score


def test_export_checkpoint_writes_the_best_members_state(tmp_path: Path) -> None:
    """`poptune export RUN --checkpoint PATH` writes the best member's state, for torch.load."""
    url = f"sqlite:///{tmp_path}/runs.db"
    env = {**os.environ, "TW_STEPS": "8"}
    run = subprocess.run(
        [
            *(sys.executable, "-m", "poptune", "run", WORKLOAD + ":classifier"),
            *("--name", "r", "--storage", url, "--no-progress"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    done = subprocess.run(
        [
            *(sys.executable, "-m", "poptune", "export", "r"),
            *("--storage", url, "--checkpoint", "best.pt"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    expected = pt.load(url, "r").load_state()
    for name, value in expected["parts"]["model"].items():
        assert torch.equal(state["parts"]["model"][name], value)
    assert "torch.save" in done.stdout


def test_device_assignment_is_round_robin_and_checked() -> None:
    """Worker i gets device i modulo their number; device strings are checked."""
    assert assign_devices(3, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0"]
    assert assign_devices(2, ["cuda:0", "cuda:1", "cuda:2"]) == ["cuda:0", "cuda:1"]
    assert assign_devices(2, None) == [None, None]
    assert check_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    for bad in ([], ["gpu0"], "cuda:x", [0]):
        with pytest.raises(ValueError, match="devices"):
            check_devices(bad)


def test_devices_without_workers_means_one_worker_each_and_is_remembered() -> None:
    """Choosing how to run: devices given -> one worker per device; on resume, as before."""
    from poptune.execution import _how

    assert _how({}, None, None, ["cpu", "cpu"]) == (2, "processes", ["cpu", "cpu"])
    assert _how({}, 1, None, ["cuda:0", "cuda:1"]) == (1, "serial", ["cuda:0", "cuda:1"])
    stored = {"workers": 3, "executor": "processes", "devices": ["cuda:0"]}
    assert _how(stored, None, None, None) == (3, "processes", ["cuda:0"])
    assert _how({}, None, None, None)[:2] in (
        (1, "serial"),
        (torch.cuda.device_count(), "processes"),
    )


@pytest.mark.slow
def test_each_worker_trains_on_its_device_and_the_device_is_recorded(tmp_path: Path) -> None:
    """devices=["cpu", "cpu"]: two workers, each member built on its worker's device, which
    is recorded with every step and told to the member."""
    url = f"sqlite:///{tmp_path}/runs.db"
    result = experiment().run(url, "r", devices=["cpu", "cpu"], source=SOURCE)
    assert {h.device for h in result.history} == {"cpu"}
    assert all(h.metrics["on_device"] == 1.0 for h in result.history)
    info = pt.load(url, "r")
    assert {h.device for h in info.history} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_checkpoint_saved_on_cuda_loads_on_a_cpu_only_machine(tmp_path: Path) -> None:
    """A member trained on CUDA is checkpointed; a process that sees no GPU loads it (on the
    CPU) into a CPU member."""
    cls = torch_workload().Classifier
    on_gpu = cls(HP, 3, device="cuda")
    on_gpu.step()
    saved = CheckpointStore(tmp_path).save("r", 0, 1, on_gpu.state_dict())
    folder = str(Path(WORKLOAD).parent)
    code = (
        f"import sys, torch; sys.path.insert(0, {folder!r});"
        "from poptune.storage import CheckpointStore; import torch_workload as w;"
        f"s = CheckpointStore({str(tmp_path)!r}).load({saved.location!r});"
        f"m = w.Classifier({HP!r}, 3, device='cpu'); m.load_state_dict(s);"
        "print(next(m.model.parameters()).device, torch.cuda.is_available())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_members_close_and_free_their_gpu_memory() -> None:
    """close() drops the member's modules and optimizers and returns cached GPU memory."""
    cls = torch_workload().Classifier
    before = torch.cuda.memory_allocated()
    m = cls(HP, 3, device="cuda")
    m.step()
    assert torch.cuda.memory_allocated() > before
    m.close()
    assert not hasattr(m, "model") and not hasattr(m, "optimizer")
    assert torch.cuda.memory_allocated() == before


def test_a_plain_subclass_is_a_trainable() -> None:
    """TorchTrainable is a pt.Trainable: any executor runs it."""
    assert issubclass(TorchTrainable, pt.Trainable)


@pytest.mark.slow
def test_state_outside_the_tensors_survives_evictions_through_extra_state(tmp_path: Path) -> None:
    """Two workers keeping one live member each (cache_size=1) rebuild members from their
    checkpoints all the time, running setup() again, which restarts the data stream; the
    position kept by extra_state() goes on exactly: the batch read at step s is the s-th."""
    source = f"{WORKLOAD}:stream"
    url = f"sqlite:///{tmp_path}/runs.db"
    options = pt.RunOptions(cache_size=1, threads=1)
    result = load_experiment(source)[0].run(url, "r", workers=2, options=options, source=source)
    assert sorted(m.step for m in result.members) == [12] * 4
    assert any(h.metrics["rebuilt"] == 1.0 and h.step > 1 for h in result.history), (
        "no member was rebuilt mid-training: the test did not evict"
    )
    assert all(h.metrics["position"] == h.step for h in result.history), [
        (h.member, h.step, h.metrics["position"]) for h in result.history
    ]
