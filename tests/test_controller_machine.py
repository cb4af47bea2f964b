"""`poptune.PBT` driven the way executors drive it, by a hypothesis state machine.

The machine plays the executor. Each member's state is one float ``x``; a training step adds
``a * m`` (two of its hyperparameters in force) and reports a score that is a deterministic
function of ``x`` (plain, saturating, wiggly, or NaN and -inf past some bounds). The
executor keeps what a real one keeps: each member's live state, checkpoints ``{(member, step):
x}`` written wherever a member is judged, copied or finished, and a timeline of every step
trained, state copied and hyperparameter change. Four drivers move the population:

* ``lockstep``, like the serial executor: every running member trains one step, then each
  ready one is judged, in id order;
* ``workers``, like worker processes: the least advanced member (ties: best latest score
  first, then lowest id) trains up to `PBT.next_ready` and is judged there; a donor's state
  can only come from a checkpoint;
* ``uneven``: workers of unequal speed: any running member chosen by hypothesis trains up
  to its next ready point, so members drift several intervals apart;
* ``free``: any running member chosen by hypothesis trains one step, judged when ready.

Other rules fail a member (fail -> collect -> replace -> collect), stop a member early
(finish -> collect), and snapshot the controller through JSON into a copy that from then on
receives every call too and must answer identically. Every decision is applied as an executor
would: the donor states a batch of decisions needs are read before any of them is applied.

After every rule the machine checks that the controller agrees with the executor's view (steps,
hyperparameters, scores, ready clocks, statuses), that no decision is pending or lost and the
synchronous barrier never deadlocks, and that every member's timeline is consistent: each
trained step continues its previous state with the hyperparameters in force, each copy loads
exactly the donor's state at ``donor_step``. At the end of each example the run is trained to
completion, which must terminate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import poptune as pt
from poptune.controller import READY_RECORD

SPACE = {
    "a": pt.Float(-0.5, 2.0),  # a linear range through 0: perturbed by shifting
    "m": pt.Choice([0.5, 1.0, 2.0]),  # ordered: moves to a neighbour
    "opt": pt.Choice(["sgd", "adam"]),  # unordered: resampled
    "depth": pt.Int(1, 4, mutable=False),  # fixed along a lineage
}
PERTURB_FACTORS = (0.8, 1.2)
EXPLOITS: dict[str, Any] = {
    "none": None,
    "truncation": pt.Truncation(0.2),
    "truncation-half": pt.Truncation(0.5),
    "ttest": pt.TTest(window=3, alpha=0.2),
    "tournament": pt.Tournament(),
}
EXPLORES: dict[str, Any] = {
    "none": None,
    "perturb": pt.Perturb(factors=PERTURB_FACTORS),
    "perturb-only": pt.Perturb(factors=PERTURB_FACTORS, resample_probability=0.0),
    "resample": pt.Resample(0.5),
}
ALIVE = ("running", "waiting")
# The t-test on nearly constant windows: scipy warns, the decision is still well defined.
pytestmark = pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")
MAX_FAILURES = 3
MAX_STOPS = 2


def train_step(x: float, hparams: dict[str, Any]) -> float:
    """One step of the simulated trainable."""
    return x + hparams["a"] * hparams["m"]


def score_of_state(kind: str, x: float) -> float:
    """The score a state reports: a deterministic function of the state."""
    if kind == "saturating":  # many exact ties, and behind-donors look as good (trap 13)
        return min(x, 2.0)
    if kind == "wiggle":
        return x + 0.5 * math.sin(5.0 * x)
    if kind == "diverging":  # a member that gets far enough either way has diverged
        if x > 4.0:
            return math.nan
        return -math.inf if x < -1.0 else x
    return x


def same(a: float | None, b: float | None) -> bool:
    """Equal scores, NaN equal to NaN."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclass(frozen=True)
class Config:
    population: int
    interval: int
    burn_in: int
    steps: int
    synchronous: bool
    exploit: str
    explore: str
    seed: int
    mode: str
    score: str
    driver: str
    finish_by: str  # at `steps`: "decide" (which finishes) or "finish"
    pickup: str  # synchronous decisions picked up by "collect" or by "poll" per waiting member
    restore_before_collect: bool  # also snapshot the controller while decisions are pending

    def build(self, snapshot: dict[str, Any] | None = None) -> pt.PBT:
        return pt.PBT(
            SPACE,
            self.population,
            self.interval,
            burn_in=self.burn_in,
            steps=self.steps,
            mode=self.mode,
            exploit=EXPLOITS[self.exploit],
            explore=EXPLORES[self.explore],
            synchronous=self.synchronous,
            seed=self.seed,
            snapshot=snapshot,
        )


configs = st.builds(
    Config,
    population=st.integers(2, 6),
    interval=st.integers(1, 4),
    burn_in=st.integers(0, 5),
    steps=st.integers(5, 40),
    synchronous=st.booleans(),
    exploit=st.sampled_from(sorted(EXPLOITS)),
    explore=st.sampled_from(sorted(EXPLORES)),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["max", "min"]),
    score=st.sampled_from(["plain", "saturating", "wiggle", "diverging"]),
    driver=st.sampled_from(["lockstep", "workers", "uneven", "free"]),
    finish_by=st.sampled_from(["decide", "finish"]),
    pickup=st.sampled_from(["collect", "poll"]),
    restore_before_collect=st.booleans(),
)


@dataclass
class Member:
    """What the executor holds for one member."""

    x: float
    step: int
    hparams: dict[str, Any]
    last_ready: int = 0  # the step its ready clock counts from
    scored: bool = False  # whether its state has a score (reported, or copied with one)
    status: str = "running"
    record: list[tuple[int, float]] = field(default_factory=list)  # (step, score) judged
    segment: int | None = None
    decisions: int = 0  # how many times it was judged (keys its random stream)


@dataclass(frozen=True)
class DonorView:
    """A donor as it stood when a batch of decisions was made."""

    id: int
    x: float
    step: int
    hparams: dict[str, Any]
    last_ready: int
    score: float | None
    record: list[tuple[int, float]]
    status: str


@dataclass(frozen=True)
class Point:
    """One entry of a member's timeline: the state after something happened to it."""

    seq: int
    kind: str  # start, train, copy, explore
    step: int
    x: float
    hparams: dict[str, Any]
    source: tuple[int, int, int] | None = None  # copy: (donor, donor_step, as of seq)


class Twin:
    """The controller under test and, once a snapshot was taken, a copy restored from it
    through JSON that receives every call too and must answer identically."""

    def __init__(self, pbt: pt.PBT) -> None:
        self.main = pbt
        self.copy: pt.PBT | None = None

    def call(self, name: str, *args: Any) -> Any:
        out = getattr(self.main, name)(*args)
        if self.copy is not None:
            again = getattr(self.copy, name)(*args)
            assert again == out, (
                f"the controller restored from a snapshot answered {name}{args} with {again}, "
                f"the original with {out}"
            )
        return out

    def set_segment(self, member: int, segment: int) -> None:
        for pbt in (self.main, self.copy):
            if pbt is not None:
                pbt.members[member].segment = segment


def dump(pbt: pt.PBT) -> str:
    return json.dumps(pbt.snapshot(), sort_keys=True)


class ControllerMachine(RuleBasedStateMachine):
    """Drives a PBT controller as an executor would and checks its documented contract."""

    # -- set-up ---------------------------------------------------------------------------------

    @initialize(cfg=configs)
    def setup(self, cfg: Config) -> None:
        self.cfg = cfg
        self.space = pt.Space(SPACE)
        self.pbt = Twin(cfg.build())
        self.members: dict[int, Member] = {
            mid: Member(x=0.0, step=0, hparams=dict(m.hparams))
            for mid, m in self.pbt.main.members.items()
        }
        self.checkpoints: dict[tuple[int, int], float] = {}
        self.timeline: dict[int, list[Point]] = {}
        self.seq = 0
        self.events = 0
        self.awaiting: set[int] = set()  # synchronous: judged, decision not yet delivered
        self.failures = 0
        self.stops = 0
        self.clean = True  # every rule so far completed: the run may be trained to the end
        for mid, m in self.members.items():
            self.log(mid, "start", m)

    # -- the executor's view --------------------------------------------------------------------

    def score(self, m: Member | DonorView) -> float | None:
        if isinstance(m, DonorView):
            return m.score
        return score_of_state(self.cfg.score, m.x) if m.scored else None

    def oriented(self, score: float | None) -> float:
        if score is None or not math.isfinite(score):
            return -math.inf
        return score if self.cfg.mode == "max" else -score

    def alive(self) -> list[int]:
        return sorted(mid for mid, m in self.members.items() if m.status in ALIVE)

    def trainable(self) -> list[int]:
        return sorted(mid for mid, m in self.members.items() if m.status == "running")

    def expected_ready(self, m: Member) -> bool:
        cfg = self.cfg
        return (
            m.status == "running"
            and m.step < cfg.steps
            and m.step >= cfg.burn_in
            and m.step - m.last_ready >= cfg.interval
        )

    def log(
        self, mid: int, kind: str, m: Member, source: tuple[int, int, int] | None = None
    ) -> None:
        self.seq += 1
        point = Point(self.seq, kind, m.step, m.x, dict(m.hparams), source)
        self.timeline.setdefault(mid, []).append(point)

    def note_ready(self, m: Member) -> None:
        """The member is judged at its step: its ready-point record gains that step's score."""
        score = self.score(m)
        entry = (m.step, math.nan if score is None else float(score))
        if m.record and m.record[-1][0] == m.step:
            m.record[-1] = entry
        else:
            m.record.append(entry)

    def score_at(self, donor: DonorView, step: int) -> float | None:
        """The donor's score at ``step`` as the contract defines it: its latest if it is not
        ahead of ``step``, else that of its latest recorded ready point at or before it."""
        if donor.score is None or donor.step <= step:
            return donor.score
        for s, score in reversed(donor.record[-READY_RECORD:]):
            if s <= step:
                return score
        return donor.score

    # -- training -------------------------------------------------------------------------------

    def train(self, mid: int) -> None:
        m = self.members[mid]
        assert m.status == "running", f"member {mid} trained while {m.status}"
        m.x = train_step(m.x, m.hparams)
        m.step += 1
        m.scored = True
        self.pbt.call("report", mid, m.step, score_of_state(self.cfg.score, m.x))
        self.log(mid, "train", m)

    def judge(self, mid: int) -> None:
        """The member is at a ready point or at its last step: ask the controller."""
        m, cfg = self.members[mid], self.cfg
        self.checkpoints[(mid, m.step)] = m.x
        if m.step >= cfg.steps:
            if cfg.finish_by == "finish":
                self.pbt.call("finish", mid)
            else:
                d = self.pbt.call("decide", mid)
                assert d == pt.Decision("continue", mid, m.step), d
            m.status = "finished"
            self.deliver(self.pick_up())
            return
        assert self.pbt.call("is_ready", mid), f"member {mid} not ready at {m.step}"
        assert self.expected_ready(m)
        self.note_ready(m)
        if cfg.synchronous:
            m.status = "waiting"
            self.awaiting.add(mid)
        d = self.pbt.call("decide", mid)
        if d.action == "wait":
            assert cfg.synchronous, d
            batch = self.pick_up()
            assert mid not in {x.member for x in batch}, (
                f"member {mid} was told to wait, but its generation was decided by that call"
            )
            self.deliver(batch)
        else:
            self.deliver([d, *self.pick_up(besides=mid)])

    def pick_up(self, besides: int | None = None) -> list[pt.Decision]:
        """What an executor does after every decide, fail, finish or replace (``besides``: the
        member whose decision that call returned)."""
        if self.cfg.restore_before_collect and self.cfg.synchronous:
            self.restore_copy(fresh=True)  # a generation's decisions may be pending now
        if self.cfg.pickup == "collect" or not self.cfg.synchronous:
            batch: list[pt.Decision] = self.pbt.call("collect")
            assert self.cfg.synchronous or batch == [], batch
            return batch
        polled = [self.pbt.call("poll", mid) for mid in sorted(self.awaiting - {besides})]
        return [d for d in polled if d.action != "wait"]

    # -- applying decisions ---------------------------------------------------------------------

    def view(self, d: pt.Decision) -> DonorView:
        """The donor's state that ``d`` copies, checked to be one the executor has."""
        assert d.donor is not None and d.donor_step is not None, d
        donor = self.members.get(d.donor)
        assert donor is not None, f"{d}: no member {d.donor}"
        assert donor.status in ALIVE, f"{d}: member {d.donor} is {donor.status}"
        assert d.donor_step == donor.step, (
            f"{d}: the donor's latest state is at step {donor.step}, not {d.donor_step}"
        )
        key = (d.donor, d.donor_step)
        if self.cfg.driver in ("workers", "uneven"):  # no live state to copy from
            assert key in self.checkpoints, (
                f"{d}: member {d.donor} has no checkpoint at step {d.donor_step} "
                f"(it has {sorted(s for m, s in self.checkpoints if m == d.donor)})"
            )
        if key in self.checkpoints:
            assert self.checkpoints[key] == donor.x
        return DonorView(
            d.donor,
            donor.x,
            donor.step,
            dict(donor.hparams),
            donor.last_ready,
            self.score(donor),
            list(donor.record),
            donor.status,
        )

    def check_derived(self, base: dict[str, Any], d: pt.Decision) -> None:
        """``d.hparams`` come from ``base`` by the explore strategy, within the space."""
        new = dict(d.hparams or {})
        assert self.space.validate(new) == new, f"{d}: hyperparameters out of the space"
        explore = EXPLORES[self.cfg.explore]
        for name, param in self.space.items():
            op = d.operations.get(name)
            if op is None:
                assert new[name] == base[name], f"{d}: {name} not derived from {base}"
                continue
            assert param.mutable, f"{d}: immutable {name} was explored"
            assert explore is not None, f"{d}: explored without an explore strategy"
            if op == "resample":
                continue
            assert isinstance(explore, pt.Perturb), d
            rng = np.random.default_rng(0)
            moves = {param.perturb(base[name], f, rng)[0] for f in PERTURB_FACTORS}
            assert new[name] in moves, f"{d}: {name}={new[name]} is no move of {base[name]}"

    def check_better(self, d: pt.Decision, m: Member, donor: DonorView) -> None:
        """The donor is a member the strategy could pick: a finite score that, for truncation
        and tournament, is at least the member's, both taken at the member's step."""
        # A generation ranks everyone's score at the barrier; asynchronously, at the step.
        theirs = donor.score if self.cfg.synchronous else self.score_at(donor, d.step)
        assert theirs is not None and math.isfinite(theirs), (
            f"{d}: donor's score {theirs} at step {d.step} is not finite"
        )
        assert donor.score is not None and math.isfinite(donor.score), (
            f"{d}: the state copied (step {donor.step}) scored {donor.score}; a donor with "
            f"a non-finite score is never copied"
        )
        if self.cfg.exploit in ("truncation", "truncation-half", "tournament"):
            mine = self.score(m)
            assert self.oriented(theirs) >= self.oriented(mine), (
                f"{d}: copied a donor scoring {theirs} at step {d.step}, the member {mine}"
            )

    def deliver(self, batch: list[pt.Decision]) -> None:
        """Applies decisions in order, after reading every donor state they need (as it stood
        when they were made: a generation's decisions all see the barrier)."""
        if not batch:
            return
        as_of = self.seq
        views = {d.member: self.view(d) for d in batch if d.action == "exploit"}
        for d in batch:
            self.apply(d, views.get(d.member), as_of)
        for d in batch:
            m = self.members[d.member]
            self.checkpoints[(d.member, m.step)] = m.x

    def apply(self, d: pt.Decision, donor: DonorView | None, as_of: int) -> None:
        cfg = self.cfg
        m = self.members.get(d.member)
        assert m is not None and m.status in ALIVE, f"{d}: delivered to a dead member"
        assert d.action != "wait", d
        if cfg.synchronous:
            assert d.member in self.awaiting, f"{d}: a decision nobody was waiting for"
            self.awaiting.discard(d.member)
            m.status = "running"
        assert d.step == m.step, f"{d}: judged at {d.step}, member at {m.step}"
        m.decisions += 1
        if d.action == "continue":
            assert d.hparams is None and d.donor is None, d
            m.last_ready = m.step
            return
        assert d.old_hparams == m.hparams, f"{d}: old hparams are not the member's {m.hparams}"
        if d.action == "exploit":
            assert donor is not None and cfg.exploit != "none", d
            assert d.copies_state and d.donor != d.member, d
            assert d.donor_step is not None and d.donor_step >= d.step, (
                f"{d}: copies a donor behind the member (never copy back)"
            )
            self.check_derived(donor.hparams, d)
            self.check_better(d, m, donor)
            m.x, m.step, m.last_ready = donor.x, donor.step, donor.step
            m.scored, m.record = donor.score is not None, list(donor.record)
            m.hparams = dict(d.hparams or {})
            self.log(d.member, "copy", m, (donor.id, donor.step, as_of))
        else:
            assert d.action == "explore", d
            assert cfg.exploit == "none" and cfg.explore != "none", d
            assert (d.donor, d.donor_step) == (d.member, d.step), d
            self.check_derived(m.hparams, d)
            m.hparams = dict(d.hparams or {})
            m.last_ready = m.step
            self.log(d.member, "explore", m)
        m.segment = self.events
        self.pbt.set_segment(d.member, self.events)
        self.events += 1

    def replace(self, failed: int) -> None:
        """Replaces a failed member and applies its decision, as an executor does."""
        as_of = self.seq
        d = self.pbt.call("replace", failed)
        new_id = max(self.members) + 1
        assert d.member == new_id, d
        assert self.pbt.main.members[new_id].replaces == failed
        finite = sorted(
            (self.oriented(self.score(self.members[i])) for i in self.alive()), reverse=True
        )
        finite = [s for s in finite if math.isfinite(s)]
        if d.action == "explore":
            assert not finite, f"{d}: started afresh though members have scores {finite}"
            assert (d.donor, d.donor_step, d.step) == (None, 0, 0), d
            assert self.space.validate(dict(d.hparams or {})) == d.hparams, d
            new = Member(x=0.0, step=0, hparams=dict(d.hparams or {}))
            source = None
        else:
            assert d.action == "exploit" and finite, d
            donor = self.view(d)
            top = finite[max(1, math.ceil(0.2 * len(finite))) - 1]
            assert self.oriented(donor.score) >= top, f"{d}: donor not among the top members"
            assert d.step == donor.step, d
            self.check_derived(donor.hparams, d)
            new = Member(
                x=donor.x,
                step=donor.step,
                hparams=dict(d.hparams or {}),
                last_ready=min(donor.last_ready, donor.step),
                scored=True,
                record=list(donor.record),
            )
            source = (donor.id, donor.step, as_of)
            if self.cfg.synchronous and donor.status == "waiting":
                # copied from a member at the barrier: it joins that generation
                new.status = "waiting"
                self.awaiting.add(new_id)
                self.note_ready(new)
        self.members[new_id] = new
        self.checkpoints[(new_id, new.step)] = new.x
        new.segment = self.events
        self.pbt.set_segment(new_id, self.events)
        self.events += 1
        self.log(new_id, "start", new, source)

    def restore_copy(self, fresh: bool) -> None:
        snap = json.loads(json.dumps(self.pbt.main.snapshot()))
        if fresh or self.pbt.copy is None:
            copy = self.cfg.build(snapshot=snap)
        else:  # restoring into a controller that has a past of its own
            copy = self.pbt.copy
            copy.restore(snap)
        assert dump(copy) == json.dumps(snap, sort_keys=True)
        assert copy.describe() == self.pbt.main.describe()
        self.pbt.copy = copy

    # -- drivers --------------------------------------------------------------------------------

    def least_advanced(self) -> int:
        main = self.pbt.main.members
        return min(
            self.trainable(),
            key=lambda mid: (self.members[mid].step, -self.oriented(main[mid].score), mid),
        )

    def tick(self) -> None:
        """Lockstep: every running member trains one step, then each ready one is judged."""
        active = self.trainable()
        for mid in active:
            self.train(mid)
        for mid in active:
            m = self.members[mid]
            if m.status == "running" and (self.expected_ready(m) or m.step >= self.cfg.steps):
                self.judge(mid)

    def work(self, mid: int) -> None:
        """A worker: trains the member up to its next ready point (or its end), judges it."""
        m = self.members[mid]
        target = self.pbt.call("next_ready", mid)
        expected = max(m.last_ready + self.cfg.interval, self.cfg.burn_in, m.step)
        assert target == min(expected, self.cfg.steps), (mid, target, expected)
        assert target > m.step, f"member {mid} is ready at {m.step} but was not judged"
        while m.step < target:
            self.train(mid)
        self.judge(mid)

    def step_one(self, mid: int) -> None:
        """One step of one member, judged if that makes it ready."""
        self.train(mid)
        m = self.members[mid]
        if self.expected_ready(m) or m.step >= self.cfg.steps:
            self.judge(mid)

    def advance(self, pick: int) -> None:
        if self.cfg.driver == "lockstep":
            self.tick()
        elif self.cfg.driver == "workers":
            self.work(self.least_advanced())
        else:
            running = self.trainable()
            mid = running[pick % len(running)]
            if self.cfg.driver == "uneven":
                self.work(mid)
            else:
                self.step_one(mid)

    # -- rules ----------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.trainable()))
    @rule(pick=st.integers(0, 5), repeat=st.integers(1, 3))
    def train_and_judge(self, pick: int, repeat: int) -> None:
        """The driver's next move, ``repeat`` times (with the same member where it picks)."""
        self.clean = False
        for _ in range(repeat):
            if self.trainable():
                self.advance(pick)
        self.clean = True

    @precondition(lambda self: self.failures < MAX_FAILURES and bool(self.alive()))
    @rule(pick=st.integers(0, 5))
    def fail_and_replace(self, pick: int) -> None:
        self.clean = False
        alive = self.alive()
        mid = alive[pick % len(alive)]
        self.failures += 1
        self.pbt.call("fail", mid)
        self.members[mid].status = "failed"
        self.awaiting.discard(mid)  # a member failing while waiting gets no decision
        self.deliver(self.pick_up())
        self.replace(mid)
        self.deliver(self.pick_up())
        self.clean = True

    @precondition(lambda self: self.stops < MAX_STOPS and bool(self.alive()))
    @rule(pick=st.integers(0, 5))
    def stop_early(self, pick: int) -> None:
        self.clean = False
        alive = self.alive()
        mid = alive[pick % len(alive)]
        self.stops += 1
        self.pbt.call("finish", mid)
        m = self.members[mid]
        m.status = "finished"
        self.awaiting.discard(mid)
        self.checkpoints[(mid, m.step)] = m.x
        self.deliver(self.pick_up())
        self.clean = True

    @rule(fresh=st.booleans())
    def snapshot_and_restore(self, fresh: bool) -> None:
        self.clean = False
        self.restore_copy(fresh)
        self.clean = True

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def controller_agrees_with_the_executor(self) -> None:
        self.clean, clean = False, self.clean
        main = self.pbt.main
        assert set(main.members) == set(self.members)
        for mid, m in self.members.items():
            c = main.members[mid]
            where = f"member {mid}: controller {c}, executor {m}"
            assert c.status == m.status, where
            assert c.step == m.step, where
            assert c.hparams == m.hparams, where
            assert same(c.score, self.score(m)), where
            assert c.score_step == (m.step if m.scored else None), where
            assert c.segment == m.segment, where
            assert c.decisions == m.decisions, where
            if m.status not in ALIVE:
                continue
            assert c.last_ready == m.last_ready, where
            record = m.record[-READY_RECORD:]
            assert len(c.ready) == len(record), where
            for (step, score), (step_, score_) in zip(c.ready, record, strict=True):
                assert step == step_ and same(score, score_), where
            if c.window:
                assert same(c.window[-1], math.nan if c.score is None else c.score), where
            assert main.is_ready(mid) == self.expected_ready(m), where
            assert self.space.validate(c.hparams) == c.hparams, where
        assert main.snapshot()["pending"] == {}, "decisions left undelivered"
        assert main.collect() == []
        waiting = {mid for mid, m in self.members.items() if m.status == "waiting"}
        assert self.awaiting == waiting
        if self.alive():
            assert self.trainable(), f"deadlock: every alive member waits ({sorted(waiting)})"
        if self.pbt.copy is not None:
            assert dump(self.pbt.copy) == dump(main), "restored controller drifted"
        self.clean = clean

    @invariant()
    def timelines_are_consistent(self) -> None:
        """Each trained step continues the previous state with the hyperparameters in force;
        each copy loads exactly the donor's state at donor_step as it stood then."""
        self.clean, clean = False, self.clean
        for mid, points in self.timeline.items():
            prev: Point | None = None
            for p in points:
                if p.kind == "train":
                    assert prev is not None and p.step == prev.step + 1, (mid, prev, p)
                    assert p.hparams == prev.hparams, (mid, prev, p)
                    assert p.x == train_step(prev.x, prev.hparams), (mid, prev, p)
                elif p.kind == "explore":
                    assert prev is not None and (p.step, p.x) == (prev.step, prev.x), (mid, p)
                else:
                    assert (p.kind == "start") == (prev is None), (mid, prev, p)
                if p.source is not None:
                    donor, donor_step, as_of = p.source
                    then = [q for q in self.timeline[donor] if q.seq <= as_of][-1]
                    assert (then.step, then.x) == (donor_step, p.x), (
                        f"member {mid} loaded {p.x} as member {donor}'s state at step "
                        f"{donor_step}; it was {then.x} at step {then.step}"
                    )
                    assert p.step == donor_step
                prev = p
        self.clean = clean

    # -- the end of an example ------------------------------------------------------------------

    def teardown(self) -> None:
        """Trains the run to its end: every member finishes or fails, in bounded work."""
        if not getattr(self, "clean", False):
            return  # a rule failed: leave its error alone
        budget = (len(self.members) + 1) * (self.cfg.steps + 1)
        while self.alive():
            budget -= 1
            assert budget > 0, "the run does not end (members re-train steps?)"
            assert self.trainable(), "deadlock: every alive member waits"
            if self.cfg.driver == "lockstep":
                self.tick()
            else:
                self.work(self.least_advanced())
            self.controller_agrees_with_the_executor()
        self.timelines_are_consistent()
        assert all(m.status in ("finished", "failed") for m in self.members.values())


class TestControllerMachine(ControllerMachine.TestCase):  # type: ignore[name-defined]
    """Driven like an executor through any sequence of moves, failures, early stops and
    snapshots, the controller keeps its contract: no decision lost or repeated, no barrier
    deadlock, no copy of a dead, behind or diverged donor, states and scores as the executor
    holds them, and a restored controller deciding exactly as the original."""

    settings = settings(
        max_examples=150,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def test_exploit_never_copies_a_state_that_scored_nan() -> None:
    """A donor ranked better at the member's step but diverged since is not copied.

    The machine's smallest find: member 1 scores 5 at its ready point 2, then NaN at 4; member
    0, judged at step 2 with 1.0, ranks below member 1's 5 at step 2, but the state it would
    copy is member 1's latest, which scored NaN. It carries on instead.
    """
    pbt = pt.PBT({"lr": pt.Float(0.1, 1.0)}, 2, 2, exploit=pt.Truncation(0.5), explore=None, seed=0)
    pbt.report(1, 1, 4.0)
    assert pbt.tell(1, 2, 5.0).action == "continue"  # alone with a score
    pbt.report(1, 3, 6.0)
    assert pbt.tell(1, 4, math.nan).action == "continue"
    pbt.report(0, 1, 0.0)
    d = pbt.tell(0, 2, 1.0)
    assert (d.action, d.step) == ("continue", 2)
    assert (pbt.members[0].step, pbt.members[0].score) == (2, 1.0)
    # Had member 1 not diverged, member 0 would copy its latest state (step 4).
    pbt = pt.PBT({"lr": pt.Float(0.1, 1.0)}, 2, 2, exploit=pt.Truncation(0.5), explore=None, seed=0)
    pbt.report(1, 1, 4.0)
    pbt.tell(1, 2, 5.0)
    pbt.report(1, 3, 6.0)
    pbt.tell(1, 4, 7.0)
    pbt.report(0, 1, 0.0)
    d = pbt.tell(0, 2, 1.0)
    assert (d.action, d.donor, d.donor_step) == ("exploit", 1, 4)
