"""`RunOptions`: every field checked when built; the failure budget and thread count it implies."""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import poptune as pt
from poptune import RunOptions
from poptune.storage import open_storage

FIELDS = (
    "max_retries",
    "max_failures",
    "keep_checkpoints",
    "heartbeat_timeout",
    "poll_interval",
    "max_lag",
    "cache_size",
    "claim_batch",
    "threads",
)


def test_the_fields_and_their_defaults() -> None:
    """The documented fields, in order, with their documented defaults."""
    options = RunOptions()
    assert tuple(f for f in RunOptions.__dataclass_fields__) == FIELDS
    assert [getattr(options, f) for f in FIELDS] == [2, None, 2, 30.0, 0.05, None, 3, None, None]
    with pytest.raises(AttributeError):
        options.max_retries = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("max_retries", -1, "`max_retries >= 0`"),
        ("max_retries", True, "`max_retries >= 0`"),
        ("max_retries", 1.0, "`max_retries >= 0`"),
        ("max_retries", "2", "`max_retries >= 0`"),
        ("max_failures", -1, "`max_failures >= 0`"),
        ("max_failures", False, "`max_failures >= 0`"),
        ("keep_checkpoints", 0, "`keep_checkpoints >= 1`"),
        ("keep_checkpoints", True, "`keep_checkpoints >= 1`"),
        ("heartbeat_timeout", 0, "`heartbeat_timeout > 0`"),
        ("heartbeat_timeout", -5.0, "`heartbeat_timeout > 0`"),
        ("heartbeat_timeout", math.nan, "`heartbeat_timeout > 0`"),
        ("heartbeat_timeout", math.inf, "`heartbeat_timeout > 0`"),
        ("heartbeat_timeout", True, "`heartbeat_timeout > 0`"),
        ("heartbeat_timeout", "30", "`heartbeat_timeout > 0`"),
        ("poll_interval", 0.0, "`poll_interval > 0`"),
        ("poll_interval", -math.inf, "`poll_interval > 0`"),
        ("poll_interval", math.nan, "`poll_interval > 0`"),
        ("max_lag", 0, "`max_lag >= 1`"),
        ("max_lag", True, "`max_lag >= 1`"),
        ("cache_size", 0, "`cache_size >= 1`"),
        ("cache_size", 2.5, "`cache_size >= 1`"),
        ("claim_batch", 0, "`claim_batch >= 1`"),
        ("claim_batch", True, "`claim_batch >= 1`"),
        ("threads", 0, "`threads >= 1`"),
        ("threads", True, "`threads >= 1`"),
    ],
)
def test_invalid_values_are_refused_saying_what_must_hold(
    field: str, value: object, rule: str
) -> None:
    """Each bad value raises ValueError naming the rule and quoting the value given."""
    with pytest.raises(ValueError) as caught:
        RunOptions(**{field: value})
    message = str(caught.value)
    assert rule in message and "must hold" in message
    assert f"{field}={value!r}" in message
    if isinstance(value, bool):
        assert "a bool is not" in message


def test_claim_batch_may_exceed_the_cache_size() -> None:
    """A batch larger than the cache of live trainables is allowed: the members beyond it
    are restored from their checkpoints (test_worker checks such a run exactly)."""
    assert RunOptions(claim_batch=3).claim_batch == 3
    assert RunOptions(claim_batch=8, cache_size=2).claim_batch == 8


@pytest.mark.parametrize("field", ["max_failures", "max_lag", "claim_batch", "threads"])
def test_optional_fields_accept_none(field: str) -> None:
    assert getattr(RunOptions(**{field: None}), field) is None


def test_numpy_scalars_are_accepted_and_stored_as_plain_numbers() -> None:
    """numpy integers and floats pass and are kept as int and float (options are pickled)."""
    options = RunOptions(
        max_retries=np.int64(1), heartbeat_timeout=np.float32(2.5), threads=np.int32(2)
    )
    assert (options.max_retries, options.heartbeat_timeout, options.threads) == (1, 2.5, 2)
    assert type(options.max_retries) is int and type(options.heartbeat_timeout) is float
    assert pickle.loads(pickle.dumps(options)) == options


def test_failure_budget() -> None:
    """None means the population size; 0 means none may fail for good (it used to mean 2n)."""
    assert RunOptions().failure_budget(8) == 8
    assert RunOptions(max_failures=0).failure_budget(8) == 0
    assert RunOptions(max_failures=3).failure_budget(8) == 3
    assert RunOptions(max_failures=20).failure_budget(8) == 20
    with pytest.raises(ValueError, match="`population_size >= 1` must hold"):
        RunOptions().failure_budget(0)


def test_threads_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """threads wins; then the user's OMP_NUM_THREADS; None shares the cores among the
    workers, at least one thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert RunOptions(threads=3).threads_per_worker(8) == 3
    assert RunOptions().threads_per_worker(2) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = RunOptions().threads_per_worker(1)
    assert cores >= 1
    assert RunOptions().threads_per_worker(2) == max(1, cores // 2)
    assert RunOptions().threads_per_worker(10_000) == 1
    with pytest.raises(ValueError, match="`workers >= 1` must hold"):
        RunOptions().threads_per_worker(0)


# -- the failure budget in a run ----------------------------------------------------------------


class Fragile(pt.Trainable):
    """Counts up by lr; a member with ``fragile`` raises at step 3, every time or only once."""

    raised: ClassVar[set[int]] = set()
    always: ClassVar[bool] = True

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.x, self.t, self.seed = 0.0, 0, seed

    def step(self) -> float:
        if (
            self.hparams["fragile"]
            and self.t == 2
            and (self.always or self.seed not in self.raised)
        ):
            self.raised.add(self.seed)
            raise RuntimeError("fragile member fails at step 3")
        self.x += self.hparams["lr"]
        self.t += 1
        return self.x

    def state_dict(self) -> object:
        return (self.x, self.t)

    def load_state_dict(self, state: Any) -> None:
        self.x, self.t = state


def fragile_experiment() -> pt.Experiment:
    return pt.Experiment(
        Fragile,
        {"lr": pt.Float(0.1, 1.0), "fragile": pt.Choice([False, True], mutable=False)},
        population_size=4,
        steps=8,
        interval=2,
        # The fragile member leads, so it is never exploited away before it fails.
        initial_hparams=[{"lr": 0.9 if i == 0 else 0.2, "fragile": i == 0} for i in range(4)],
        seed=0,
    )


def test_max_failures_zero_stops_at_the_first_member_that_fails_for_good() -> None:
    """max_failures=0: one member failing for good (no retries left) stops the run."""
    Fragile.raised, Fragile.always = set(), True
    with pytest.raises(pt.RunFailed):
        fragile_experiment().run(options=RunOptions(max_retries=0, max_failures=0))


def test_a_retried_error_does_not_use_up_the_failure_budget() -> None:
    """A step that fails once and succeeds on retry is no member failing for good."""
    Fragile.raised, Fragile.always = set(), False
    result = fragile_experiment().run(options=RunOptions(max_retries=1, max_failures=0))
    assert Fragile.raised  # it did fail once
    assert all(m.status == "finished" and m.step == 8 for m in result.members)


def test_only_a_given_heartbeat_timeout_counts_as_chosen() -> None:
    """The default timeout is 30 but not chosen; 30 passed explicitly is; so it stays after
    `replace` of another field and a pickle round trip (options travel to workers)."""
    assert RunOptions().heartbeat_timeout == 30.0
    assert not RunOptions().heartbeat_timeout_given
    assert RunOptions(heartbeat_timeout=30).heartbeat_timeout_given
    assert not replace(RunOptions(), max_retries=5).heartbeat_timeout_given
    assert not pickle.loads(pickle.dumps(RunOptions())).heartbeat_timeout_given


def test_resume_keeps_the_recorded_heartbeat_timeout_unless_one_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with heartbeat_timeout=120 is resumed with 120, recorded and used, when
    the options given do not set one (they used to put the default 30 back); a timeout given
    explicitly, even the default's value, replaces it."""
    from poptune.execution import serial

    used: list[float] = []
    real = serial.run_serial

    def spy(*args: Any, **kwargs: Any) -> None:
        used.append(args[4].heartbeat_timeout)  # (experiment, storage, name, ckpts, options)
        real(*args, **kwargs)

    monkeypatch.setattr(serial, "run_serial", spy)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    exp = fragile_experiment()
    Fragile.raised, Fragile.always = set(), False
    exp.run(url, "r", options=RunOptions(heartbeat_timeout=120.0, max_retries=1))
    for steps, options, expected in [
        (10, RunOptions(max_retries=1), 120.0),
        (12, None, 120.0),
        (14, RunOptions(max_retries=1, heartbeat_timeout=30.0), 30.0),
    ]:
        exp.replace(steps=steps).run(url, "r", resume=True, options=options)
        assert pt.load(url, "r").members[0].step == steps
        with open_storage(url) as store:
            run = store.get_run("r")
            assert run is not None and run.execution["heartbeat_timeout"] == expected
        assert used[-1] == expected
    assert used == [120.0, 120.0, 120.0, 30.0]
