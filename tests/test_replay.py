"""Replay: one fresh member trained from scratch along a run's discovered schedule."""

from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import poptune as pt
from poptune.result import Result

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOY = EXAMPLES / "toy_quadratic.py"


def _toy_module() -> Any:
    name = "poptune_example_toy_quadratic"  # as tests/test_examples.py names it
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


toy = _toy_module()
NOISE = 0.005  # the noisy toy's score noise (standard deviation)


class NoisyScore(toy.ToyQuadratic):  # type: ignore[misc,name-defined]
    """The toy, scored with measurement noise (a random validation batch): the dynamics stay
    deterministic, the reported Q gets N(0, NOISE) from a stream the member keeps for itself
    (not part of its state, so a copy does not take the donor's)."""

    def __init__(self, hparams: Any, seed: int) -> None:
        super().__init__(hparams, seed)
        self.noise = np.random.default_rng(seed)

    def step(self) -> dict[str, float]:
        out = super().step()
        return {"Q": out["Q"] + float(self.noise.normal(0.0, NOISE)), "true_Q": out["Q"]}


def _ancestry_metrics(result: Result, member: int) -> list[dict[str, float]]:
    """The metrics recorded at each step along a member's ancestry, in step order."""
    by_key = {(h.member, h.step): h for h in result.history}
    return [dict(by_key[(s.member, s.step)].metrics) for s in result.schedule(member)]


@pytest.mark.parametrize("seed", [0, 3])
def test_replay_of_the_toy_matches_the_original_exactly(seed: int) -> None:
    """The toy is deterministic: trained from scratch along the best member's schedule with
    its root ancestor's seed, a fresh member retraces every step of the ancestry exactly."""
    result = toy.experiment("PBT", seed).run()
    assert any(e.kind == "exploit" for e in result.events)  # the schedule has real switches
    replay = result.replay()
    best = result.best
    assert replay.member == best.id and replay.run == result.name
    assert replay.name == f"{result.name}-replay-m{best.id}"
    assert replay.original == best.score
    assert replay.score == best.score and replay.difference == 0.0
    assert replay.steps == best.step == toy.STEPS
    # Step by step, the same metrics as the ancestor that trained each step.
    replayed = replay.result
    assert [dict(h.metrics) for h in replayed.history] == _ancestry_metrics(result, best.id)
    # Its own schedule is the one it followed, switching where the original's changes.
    original = [dict(s.hparams) for s in result.schedule()]
    assert [dict(s.hparams) for s in replayed.schedule()] == original
    switches = sum(1 for a, b in itertools.pairwise(original) if a != b)
    assert replay.changes == switches == len(replayed.events)
    assert {e.kind for e in replayed.events} == {"schedule"}
    assert replay.seed == pt.controller.member_seed(seed, result.schedule()[0].member)


def test_replay_of_a_noisy_score_matches_within_the_noise() -> None:
    """With a noisy score the schedule PBT found still replays the same training; the replayed
    score differs from the original's by the measurement noise alone."""
    differences = []
    for seed in range(4):
        exp = toy.experiment("PBT", seed).replace(trainable=NoisyScore)
        result = exp.run()
        replay = result.replay()
        assert replay.result.history[-1].metrics["true_Q"] == pytest.approx(
            _ancestry_metrics(result, replay.member)[-1]["true_Q"], abs=1e-12
        )
        differences.append(replay.difference)
    # Two independent draws of N(0, NOISE): |difference| beyond 5 standard deviations of
    # their difference would be a one-in-a-million event.
    assert all(abs(d) < 5 * NOISE * math.sqrt(2) for d in differences), differences
    assert any(d != 0.0 for d in differences)  # the noise was really there


def test_replay_with_a_fresh_seed_and_of_another_member() -> None:
    """``seed=`` builds the member with that seed; any member's schedule can be replayed."""
    result = toy.experiment("PBT", 1).run()
    other = next(m.id for m in result.members if m.id != result.best.id)
    replay = result.replay(other, seed=12345, name="fresh")
    assert (replay.member, replay.seed, replay.name) == (other, 12345, "fresh")
    assert replay.score == result.member(other).score  # the toy ignores its seed
    assert replay.result.members[0].id == other


def test_replay_is_recorded_as_a_run_of_its_own(tmp_path: Path) -> None:
    """A stored run's replay is a completed run in the same storage, with its history, the
    source it replays, and its final state as a checkpoint."""
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    toy.experiment("PBT", 2).run(db, "quad")
    loaded = pt.load(db, "quad")
    replay = loaded.replay(experiment=toy.experiment("PBT", 2))
    again = pt.load(db, replay.name)
    assert again == replay.result
    assert len(again.history) == toy.STEPS and again.best.score == loaded.best.score
    assert np.allclose(again.load_state()["theta"], loaded.load_state()["theta"])
    with pt.storage.open_storage(db) as store:
        info = store.get_run(replay.name)
        assert info is not None and info.status == "completed"
        assert info.config["replay"] == {
            "run": "quad",
            "member": loaded.best.id,
            "root": replay.root,
            "seed": replay.seed,
        }
        assert info.config["population_size"] == 1
    assert (tmp_path / "runs-checkpoints" / replay.name).is_dir()
    # The report's views read it like any run (its schedule is the one it followed).
    from poptune.export import result_to_json
    from poptune.report.data import read_report

    with pt.storage.open_storage(db) as store:
        assert read_report(store, replay.name).members
    assert len(result_to_json(again)["schedule"]) == toy.STEPS


def test_replay_errors_say_what_is_wrong() -> None:
    result = toy.experiment("PBT", 0).run()
    with pytest.raises(ValueError, match=r"no member 9; its members are 0, 1"):
        result.replay(9)
    result.replay(name="once")
    with pytest.raises(ValueError, match="'once' already exists"):
        result.replay(name="once")
    with pytest.raises(ValueError, match="`seed` must be None or an integer"):
        result.replay(seed=-1)
    other = toy.experiment("PBT", 0).replace(metric="theta0")
    with pytest.raises(ValueError, match="not the experiment that ran"):
        result.replay(experiment=other)
    bare = Result("r", "max", "Q", result.initial_hparams, result.members, result.history, ())
    with pytest.raises(ValueError, match="pass experiment="):
        bare.replay()
    unborn = Result(
        "r",
        "max",
        "Q",
        {0: {"h0": 1.0, "h1": 0.0}},
        [pt.MemberRecord(0, {"h0": 1.0, "h1": 0.0}, 0, None, "running")],
        (),
        (),
    )
    with pytest.raises(ValueError, match="no history to replay"):
        unborn.replay(experiment=toy.experiment("PBT", 0))


def test_cli_replay_prints_both_scores_and_records_the_run(tmp_path: Path) -> None:
    def poptune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "poptune", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ran = poptune("run", str(TOY), "--no-progress", "--storage", "runs.db")
    assert ran.returncode == 0, ran.stderr
    done = poptune("replay", "toy_quadratic", "--storage", "runs.db")
    assert done.returncode == 0, done.stderr
    best = pt.load(f"sqlite:///{tmp_path / 'runs.db'}", "toy_quadratic").best
    score = f"{best.score:.6g}"
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"Replayed member {best.id} of run toy_quadratic from scratch")
    assert f"Q (max) = {score} at step 200" in lines[1] and "original" in lines[1]
    assert f"Q (max) = {score} at step 200" in lines[2] and "replayed" in lines[2]
    assert "(difference +0)" in lines[2]
    status = poptune("status", f"toy_quadratic-replay-m{best.id}", "--storage", "runs.db")
    assert status.returncode == 0, status.stderr
    assert f"replay of    run toy_quadratic, member {best.id}" in status.stdout
    unknown = poptune("replay", "toy_quadratic", "--member", "7", "--storage", "runs.db")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "poptune: error: Run 'toy_quadratic' has no member 7; its members are 0, 1."
    )
    taken = poptune("replay", "toy_quadratic", "--storage", "runs.db")
    assert taken.returncode == 1 and "already exists" in taken.stderr
