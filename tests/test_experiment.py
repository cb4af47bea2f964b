"""Experiment.run() end to end in this process: state copies, hparams, Result and schedules."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import pytest

import poptune as pt
from poptune.controller import member_seed

# -- a trainable that records everything that happens to it ---------------------------------


class Tracked(pt.Trainable):
    """Noisy momentum ascent on ``w``, with its RNG and an 'optimizer' dict in its state.

    Like a framework optimizer, ``load_state_dict`` restores the lr stored in the state; only
    `set_hparams` puts the member's own lr into the optimizer. Every step, load and
    hyperparameter change is recorded in ``trace`` with a global sequence number.
    """

    def __init__(self, hparams: Mapping[str, Any], seed: int, clock: Callable[[], int]) -> None:
        super().__init__(hparams, seed)
        self.clock = clock
        self.rng = np.random.default_rng(seed)
        self.w, self.t = 0.0, 0
        self.optimizer = {"lr": float(hparams["lr"]), "buffer": 0.0}
        self.trace: list[dict[str, Any]] = []

    def _record(self, kind: str, **extra: Any) -> None:
        self.trace.append(
            {"kind": kind, "seq": self.clock(), "state": copy.deepcopy(self.state_dict()), **extra}
        )

    def step(self) -> dict[str, float]:
        noise = float(self.rng.normal())
        self.optimizer["buffer"] = 0.9 * self.optimizer["buffer"] + 1.0 + noise
        lr = self.optimizer["lr"]
        self.w += lr * self.optimizer["buffer"]
        self.t += 1
        self._record("step", t=self.t, lr=lr, noise=noise)
        return {"score": self.w, "lr_used": lr}

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": self.w,
            "t": self.t,
            "rng": self.rng.bit_generator.state,
            "optimizer": dict(self.optimizer),
        }

    def load_state_dict(self, state: Any) -> None:
        self.w, self.t = state["w"], state["t"]
        self.rng.bit_generator.state = state["rng"]
        self.optimizer = dict(state["optimizer"])  # brings back the lr stored with the state
        self._record("load", loaded=copy.deepcopy(state))

    def set_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().set_hparams(hparams)
        self.optimizer["lr"] = float(hparams["lr"])
        self._record("set", lr=float(hparams["lr"]))


class Factory:
    """Builds `Tracked` members and remembers them, by member id, in build order."""

    def __init__(self, experiment_seed: int, population_size: int) -> None:
        counter = itertools.count()
        self.clock = lambda: next(counter)
        self.member_of = {member_seed(experiment_seed, m): m for m in range(population_size)}
        self.built: dict[int, list[Tracked]] = defaultdict(list)
        self.__qualname__ = "Factory"

    def __call__(self, hparams: Mapping[str, Any], seed: int) -> Tracked:
        t = Tracked(hparams, seed, self.clock)
        self.built[self.member_of[seed]].append(t)
        return t

    def records(self, member: int) -> list[dict[str, Any]]:
        # Members that trained: the check before the run (`poptune.execution.preflight`)
        # builds one, loads its own state into it and never steps it.
        trained = [t for t in self.built[member] if any(r["kind"] == "step" for r in t.trace)]
        return sorted((r for t in trained for r in t.trace), key=lambda r: r["seq"])


LR_SPACE = {"lr": pt.Float(1e-3, 1.0, log=True)}


def tracked_run(seed: int = 0, **kwargs: Any) -> tuple[pt.Result, Factory]:
    pop = kwargs.pop("population_size", 6)
    factory = Factory(seed, pop)
    exp = pt.Experiment(
        factory,
        LR_SPACE,
        population_size=pop,
        steps=kwargs.pop("steps", 40),
        interval=kwargs.pop("interval", 4),
        exploit=kwargs.pop("exploit", pt.Truncation(0.25)),
        explore=kwargs.pop("explore", pt.Perturb()),
        seed=seed,
        **kwargs,
    )
    return exp.run(), factory


def same_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return repr(a) == repr(b)  # nested dicts of floats and ints: exact comparison


# -- state after exploit --------------------------------------------------------------------


@pytest.mark.parametrize("synchronous", [False, True])
def test_exploit_loads_the_donors_state_at_that_step(synchronous: bool) -> None:
    """After an exploit the member's state (weights, optimizer, RNG) is the donor's, exactly.

    The state loaded must equal the donor's state as the donor held it when the copy was
    made, at the donor step; and the member's next step must continue like the donor's would:
    it draws the same noise from the copied RNG.
    """
    result, factory = tracked_run(seed=3, synchronous=synchronous)
    exploits = [e for e in result.events if e.kind == "exploit"]
    assert len(exploits) >= 10
    loads = {m: [r for r in factory.records(m) if r["kind"] == "load"] for m in range(6)}
    seen = defaultdict(int)
    continued = 0
    for e in exploits:
        # Whose state it is: the donor's at donor_step; asynchronously, a donor that itself
        # copied another earlier in the same step holds that one's state.
        source = e
        while not synchronous:
            earlier = [
                x
                for x in exploits
                if x.member == source.donor and x.step == e.step and x.index < source.index
            ]
            if not earlier:
                break
            source = earlier[-1]
        if source.donor == e.member:
            continue  # it copied a copy of itself: it holds that state already, nothing to load
        load = loads[e.member][seen[e.member]]
        seen[e.member] += 1
        donor_records = factory.records(source.donor)
        trained = [r for r in donor_records if r["kind"] == "step" and r["t"] == e.donor_step]
        donor_state = trained[-1]["state"]
        assert load["loaded"]["t"] == e.donor_step == e.step
        assert same_state(load["loaded"], donor_state)
        # Right after the exploit: the donor's state, with only the optimizer's lr replaced.
        after = next(r for r in factory.records(e.member) if r["seq"] > load["seq"])
        expected = copy.deepcopy(donor_state)
        expected["optimizer"]["lr"] = e.new_hparams["lr"]
        assert after["kind"] == "set" and same_state(after["state"], expected)
        # The member's next step draws what the donor's next step drew, if the donor's state
        # was not changed in between.
        mine = next(
            r for r in factory.records(e.member) if r["seq"] > load["seq"] and r["kind"] == "step"
        )
        theirs = next(r for r in donor_records if r["seq"] > trained[-1]["seq"])
        if theirs["kind"] == "step" and mine["t"] == theirs["t"]:
            assert mine["noise"] == theirs["noise"]
            assert mine["state"]["rng"] == theirs["state"]["rng"]
            continued += 1
    assert continued >= 5


def test_new_hparams_are_applied_after_loading_state() -> None:
    """A loaded optimizer state never brings back the donor's old lr: the new hparam wins."""
    result, factory = tracked_run(seed=5)
    differs = 0
    seen: dict[int, int] = defaultdict(int)
    for e in (e for e in result.events if e.kind == "exploit"):
        records = factory.records(e.member)
        loads = [r for r in records if r["kind"] == "load"]
        load = loads[seen[e.member]]
        seen[e.member] += 1
        nxt = next(r for r in records if r["seq"] > load["seq"] and r["kind"] == "step")
        assert nxt["lr"] == pytest.approx(e.new_hparams["lr"], rel=0, abs=0)
        differs += load["loaded"]["optimizer"]["lr"] != e.new_hparams["lr"]
    assert differs >= 5  # the donor's stored lr differed from the new one: the order mattered


def test_every_step_uses_the_hparams_in_force() -> None:
    """Each step's lr is the member's hyperparameter at that step (history and events agree)."""
    result, _ = tracked_run(seed=6)
    current = {m: dict(h) for m, h in result.initial_hparams.items()}
    events = defaultdict(list)
    for e in result.events:
        events[e.step].append(e)
    for rec in sorted(result.history, key=lambda r: (r.step, r.member)):
        assert rec.metrics["lr_used"] == current[rec.member]["lr"]
        if rec.member == max(current):  # the tick is complete: apply its events
            for e in events.get(rec.step, []):
                assert e.old_hparams == current[e.member]
                current[e.member] = dict(e.new_hparams)
    assert {m.id: dict(m.hparams) for m in result.members} == current


class Shaped(pt.Trainable):
    """A member whose state has a shape fixed by a mutable=False hyperparameter."""

    built: ClassVar[list[int]] = []

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.width = int(hparams["width"])
        self.weights = [0.0] * self.width
        Shaped.built.append(self.width)

    def step(self) -> float:
        self.weights = [w + self.hparams["lr"] * self.width for w in self.weights]
        return sum(self.weights)

    def state_dict(self) -> object:
        return {"weights": list(self.weights)}

    def load_state_dict(self, state: Any) -> None:
        if len(state["weights"]) != self.width:
            raise ValueError(f"shape mismatch: {len(state['weights'])} into {self.width}")
        self.weights = list(state["weights"])


def test_immutable_hparam_rebuilds_the_member_with_the_donors_value() -> None:
    """An architecture hparam is copied from the donor and the member is rebuilt to fit it."""
    Shaped.built = []
    start = [{"lr": 0.1, "width": w} for w in (1, 2, 3, 4)]
    exp = pt.Experiment(
        Shaped,
        {"lr": pt.Float(0.01, 1.0), "width": pt.Int(1, 4, mutable=False)},
        population_size=4,
        steps=24,
        interval=4,
        exploit=pt.Truncation(0.25),
        initial_hparams=start,
        seed=1,
    )
    result = exp.run()
    width = {m: h["width"] for m, h in result.initial_hparams.items()}
    changed = 0
    for e in result.events:
        assert e.new_hparams["width"] == width[e.donor]
        changed += e.old_hparams["width"] != e.new_hparams["width"]
        width[e.member] = e.new_hparams["width"]
    assert changed >= 1
    assert len(Shaped.built) >= 4 + changed  # one rebuild per change of width
    assert {m.id: m.hparams["width"] for m in result.members} == width


# -- determinism and Result ------------------------------------------------------------------


def toy_like(seed: int, **kwargs: Any) -> pt.Result:
    def init(hp: dict, s: int) -> dict:
        return {"x": 0.0, "rng": np.random.default_rng(s).bit_generator.state}

    def step(state: dict, hp: dict) -> tuple[dict, dict]:
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        x = state["x"] + hp["lr"] * (1.0 + rng.normal())
        return {"x": x, "rng": rng.bit_generator.state}, {"score": x}

    return pt.Experiment(
        pt.trainable(init, step),
        LR_SPACE,
        population_size=5,
        steps=30,
        interval=3,
        seed=seed,
        **kwargs,
    ).run()


@pytest.mark.parametrize("synchronous", [False, True])
def test_same_seed_gives_identical_history_and_events(synchronous: bool) -> None:
    """Two runs with one seed agree event for event and record for record; another seed not."""
    a, b = toy_like(7, synchronous=synchronous), toy_like(7, synchronous=synchronous)
    assert list(a.history) == list(b.history)
    assert list(a.events) == list(b.events) and len(a.events) > 5
    assert a.members == b.members
    c = toy_like(8, synchronous=synchronous)
    assert [h.score for h in c.history] != [h.score for h in a.history]


def test_result_fields() -> None:
    """best, members, history and events describe the run."""
    result, _ = tracked_run(seed=2, population_size=6, steps=40)
    assert [m.id for m in result.members] == list(range(6))
    assert all(m.step == 40 and m.status == "finished" for m in result.members)
    best = max(result.members, key=lambda m: m.score)
    assert result.best == best and result.member(best.id) == best
    assert len(result.history) == 6 * 40
    assert {(h.member, h.step) for h in result.history} == {
        (m, s) for m in range(6) for s in range(1, 41)
    }
    assert result.metric == "score" and result.mode == "max"
    assert [e.index for e in result.events] == list(range(len(result.events)))
    for e in result.events:
        assert e.kind == "exploit" and e.donor != e.member
        assert e.step % 4 == 0 and e.donor_step == e.step  # lockstep: the donor's current state
        assert set(e.operations) <= {"lr"} and set(e.old_hparams) == set(e.new_hparams) == {"lr"}
    with pytest.raises(KeyError):
        result.member(99)


def test_best_in_min_mode_is_the_lowest_score() -> None:
    """mode='min': the best member has the lowest latest score."""
    result = pt.Experiment(
        pt.trainable(lambda hp, s: 10.0, lambda x, hp: (x - hp["lr"], x - hp["lr"])),
        LR_SPACE,
        population_size=4,
        steps=12,
        interval=4,
        mode="min",
        seed=0,
    ).run()
    assert result.mode == "min"
    assert result.best.score == min(m.score for m in result.members)


# -- schedules ------------------------------------------------------------------------------


def add_a_tenth(hp: dict, rng: np.random.Generator) -> dict:
    return {"lr": round(hp["lr"] + 0.1, 6)}


def counter_run(**kwargs: Any) -> pt.Result:
    """x grows by lr each step; member 1 starts ahead, explore adds 0.1 to lr."""
    return pt.Experiment(
        pt.trainable(lambda hp, seed: 0.0, lambda x, hp: (x + hp["lr"], {"score": x + hp["lr"]})),
        {"lr": pt.Float(0.05, 1.0)},
        population_size=2,
        steps=12,
        interval=4,
        exploit=pt.Truncation(0.5),
        explore=add_a_tenth,
        synchronous=True,
        initial_hparams=[{"lr": 0.1}, {"lr": 0.2}],
        seed=0,
        **kwargs,
    ).run()


def test_schedule_follows_the_ancestry_worked_by_hand() -> None:
    """A case computed by hand: the schedule walks back through two exploits.

    Steps 1-4: member 0 (lr 0.1) reaches 0.4, member 1 (lr 0.2) 0.8; member 0 copies member 1
    (x = 0.8) with lr 0.3. Steps 5-8: member 0 reaches 2.0, member 1 1.6; member 1 copies
    member 0 (x = 2.0) with lr 0.4. Steps 9-12: member 0 ends at 3.2, member 1 at 3.6.
    """
    result = counter_run()
    assert [(e.member, e.donor, e.step, e.donor_step) for e in result.events] == [
        (0, 1, 4, 4),
        (1, 0, 8, 8),
    ]
    scores = {(h.member, h.step): h.score for h in result.history}
    assert scores[0, 5] == pytest.approx(0.8 + 0.3)  # the function state was copied
    assert scores[1, 9] == pytest.approx(2.0 + 0.4)
    assert result.best.id == 1 and result.best.score == pytest.approx(3.6)

    def flat(member: int | None) -> list[tuple[int, int, float]]:
        return [(s.step, s.member, s.hparams["lr"]) for s in result.schedule(member)]

    expected_1 = (
        [(s, 1, 0.2) for s in range(1, 5)]
        + [(s, 0, 0.3) for s in range(5, 9)]
        + [(s, 1, 0.4) for s in range(9, 13)]
    )
    assert flat(1) == expected_1
    assert flat(None) == expected_1  # the best member by default
    assert flat(0) == [(s, 1, 0.2) for s in range(1, 5)] + [(s, 0, 0.3) for s in range(5, 13)]
    assert [e.index for e in result.lineage(1)] == [0, 1]


def test_schedule_has_one_entry_per_step_matching_what_trained_it() -> None:
    """For every member of a random run, each schedule step names an ancestor that trained
    that step with exactly those hyperparameters."""
    result, _ = tracked_run(seed=9, population_size=6, steps=40)
    used = {(h.member, h.step): h.metrics["lr_used"] for h in result.history}
    assert result.events
    for m in result.members:
        schedule = result.schedule(m.id)
        assert [s.step for s in schedule] == list(range(1, m.step + 1))
        assert all(used[s.member, s.step] == s.hparams["lr"] for s in schedule)
        assert schedule[-1].member == m.id and schedule[-1].hparams == m.hparams


def test_grid_search_schedule_is_the_initial_hparams() -> None:
    """Without exploit or explore each member's schedule is its initial hparams throughout."""
    result, _ = tracked_run(seed=4, exploit=None, explore=None, steps=20)
    assert list(result.events) == []
    for m in result.members:
        assert result.schedule(m.id) == [
            pt.ScheduleStep(s, m.id, result.initial_hparams[m.id]) for s in range(1, 21)
        ]


# -- user code that misbehaves ----------------------------------------------------------------


class SometimesSilent(pt.Trainable):
    """Member built with ``silent=True`` returns metrics without the score."""

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)
        self.x = 0.0

    def step(self) -> dict[str, float]:
        self.x += self.hparams["lr"]
        if self.hparams["silent"]:
            return {"other": self.x}
        return {"missing_metric_test": self.x}

    def state_dict(self) -> object:
        return self.x

    def load_state_dict(self, state: Any) -> None:
        self.x = float(state)


def test_missing_metric_stops_the_run_at_the_first_step_naming_the_keys() -> None:
    """A step() without the metric is a configuration error, not a NaN score: ranking on it
    would silently turn PBT into random search. The run stops at once and says which keys
    step() returned."""
    space = {"lr": pt.Float(0.1, 1.0), "silent": pt.Choice([False, True], mutable=False)}
    start = [{"lr": 0.1 * i, "silent": False} for i in (1, 2, 3)] + [{"lr": 1.0, "silent": True}]
    exp = pt.Experiment(
        SometimesSilent,
        space,
        population_size=4,
        steps=12,
        interval=4,
        metric="missing_metric_test",
        exploit=pt.Truncation(0.25),
        initial_hparams=start,
    )
    with pytest.raises(pt.RunFailed, match=r"'missing_metric_test'.*\['other'\]") as info:
        exp.run(options=pt.RunOptions(max_retries=5))
    assert "Traceback" in str(info.value)


def test_configuration_errors_name_the_argument() -> None:
    """Experiment refuses bad arguments with ValueError saying what must hold."""
    trainable = pt.trainable(lambda hp, s: 0.0, lambda x, hp: (x, x))
    with pytest.raises(ValueError, match="`metric` must be a non-empty string"):
        pt.Experiment(trainable, LR_SPACE, metric="")
    with pytest.raises(ValueError, match=r"`trainable` must be a pt.Trainable subclass"):
        pt.Experiment(42, LR_SPACE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`population_size >= 2` must hold"):
        pt.Experiment(trainable, LR_SPACE, population_size=1)
    with pytest.raises(ValueError, match="`interval >= 1` must hold"):
        pt.Experiment(trainable, LR_SPACE, interval=0)
    with pytest.raises(ValueError, match="`mode` must be 'max' or 'min'"):
        pt.Experiment(trainable, LR_SPACE, mode="maximise")
    with pytest.raises(ValueError, match="`steps"):
        pt.Experiment(trainable, LR_SPACE, steps=0)


def test_trainable_factory_must_build_a_trainable() -> None:
    """A factory returning something else stops the run (no retry can help) and says so."""
    exp = pt.Experiment(lambda hp, seed: object(), LR_SPACE, population_size=2, steps=4)
    with (
        pytest.raises(pt.RunFailed, match=r"must build a pt.Trainable"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        exp.run()


# -- an Experiment is an immutable value ------------------------------------------------------


def count_up(x: float, hp: Mapping[str, Any]) -> tuple[float, float]:
    return x + hp["lr"], x + hp["lr"]


def start_at_zero(hp: Mapping[str, Any], seed: int) -> float:
    return 0.0


def counting_experiment(**kwargs: Any) -> pt.Experiment:
    """Module-level functions, so the experiment pickles."""
    return pt.Experiment(
        pt.trainable(start_at_zero, count_up),
        {"lr": pt.Float(0.1, 1.0)},
        **{"population_size": 2, "steps": 20, "interval": 5, **kwargs},
    )


def test_setting_an_attribute_is_refused_and_changes_nothing() -> None:
    """`exp.steps = 40` raises, pointing to replace(); the experiment still trains 20 steps.

    It used to half-apply: training went to 40 steps while describe() said 20.
    """
    exp = counting_experiment()
    with pytest.raises(AttributeError, match=r"Experiment is immutable.*exp.replace\(steps="):
        exp.steps = 40  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        exp.anything_new = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="immutable"):
        del exp.seed
    assert exp.steps == 20 and exp.describe()["steps"] == 20
    assert {m.step for m in exp.run().members} == {20}


def test_replace_builds_a_new_validated_experiment() -> None:
    """replace() changes what it is given, keeps the rest, and validates like the constructor."""
    exp = counting_experiment(seed=3, initial_hparams=[{"lr": 0.2}, {"lr": 0.4}])
    longer = exp.replace(steps=40)
    assert longer is not exp and exp.steps == 20
    assert longer.steps == 40 and longer.describe()["steps"] == 40
    assert {k: v for k, v in longer.describe().items() if k != "steps"} == {
        k: v for k, v in exp.describe().items() if k != "steps"
    }
    assert {m.step for m in longer.run().members} == {40}
    with pytest.raises(ValueError, match="`population_size >= 2` must hold"):
        exp.replace(population_size=1, initial_hparams=None)
    with pytest.raises(TypeError, match="stepz"):
        exp.replace(stepz=40)


def test_initial_hparams_are_copied() -> None:
    """Editing the list passed as initial_hparams afterwards changes neither run nor config."""
    start = [{"lr": 0.2}, {"lr": 0.4}]
    exp = counting_experiment(initial_hparams=start)
    start[0]["lr"] = 0.9
    assert exp.describe()["initial_population"]["0"] == {"lr": 0.2}
    assert exp.run().initial_hparams[0] == {"lr": 0.2}


def test_experiment_pickles_and_stays_immutable() -> None:
    """Worker processes get the experiment pickled: it must come back equal and still frozen."""
    import pickle

    exp = counting_experiment(seed=5, explore=pt.Perturb(factors=(0.5, 2.0)))
    back = pickle.loads(pickle.dumps(exp))
    assert back.describe() == exp.describe()
    assert back.replace(steps=30).steps == 30
    with pytest.raises(AttributeError, match="immutable"):
        back.steps = 40  # type: ignore[misc]
    assert list(back.run().history) == list(exp.run().history)
