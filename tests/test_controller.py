"""The PBT controller as a pure ask/tell object, driven with plain numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest

import poptune as pt
from poptune.strategies import ExploreError

LR = {"lr": pt.Float(1e-3, 1e3, log=True)}
NO_RESAMPLE = pt.Perturb(factors=(0.8, 1.2), resample_probability=0.0)


def make(population_size: int = 2, interval: int = 4, **kwargs: Any) -> pt.PBT:
    kwargs.setdefault("exploit", pt.Truncation(0.5))
    kwargs.setdefault("explore", NO_RESAMPLE)
    kwargs.setdefault("seed", 0)
    return pt.PBT(kwargs.pop("space", LR), population_size, interval, **kwargs)


def lrs(*values: float) -> list[dict[str, float]]:
    return [{"lr": v} for v in values]


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"population_size": 1}, "`population_size >= 2` must hold for an integer"),
        ({"population_size": 0}, "`population_size >= 2` must hold"),
        ({"population_size": 4.0}, "`population_size >= 2` must hold"),
        ({"population_size": True}, "`population_size >= 2` must hold"),
        ({"interval": 0}, "`interval >= 1` must hold for an integer, but got interval=0"),
        ({"burn_in": -1}, "`burn_in >= 0` must hold"),
        ({"steps": 0}, "`steps >= 1` must hold"),
        ({"mode": "median"}, "`mode` must be 'max' or 'min', but got 'median'"),
        ({"mode": "MAX"}, "`mode` must be 'max' or 'min'"),
        ({"exploit": "truncation"}, "`exploit` must be pt.Truncation"),
        ({"explore": 0.2}, "`explore` must be pt.Perturb"),
        ({"seed": "1"}, "`seed` must be an integer"),
        ({"initial_hparams": lrs(1.0)}, "one dict per member (2), but got 1"),
        ({"initial_hparams": lrs(1.0, 2.0, 3.0)}, "one dict per member (2), but got 3"),
        ({"initial_hparams": {"lr": 1.0}}, "must be a list of dicts"),
        (
            {"initial_hparams": [{"lr": 1.0}, {"lr": 1.0, "wd": 0.1}]},
            "initial_hparams[1]: unknown hyperparameter(s) ['wd']",
        ),
        (
            {"initial_hparams": [{"lr": 1.0}, {}]},
            "initial_hparams[1]: missing hyperparameter(s) ['lr']",
        ),
        ({"initial_hparams": lrs(1.0, 1e4)}, "'lr': value must lie in"),
    ],
)
def test_bad_configuration_raises_with_what_must_hold(kwargs: dict, needle: str) -> None:
    """Each invalid argument raises ValueError that names it and the rule."""
    args = {"population_size": 2, "interval": 4, **kwargs}
    with pytest.raises(ValueError) as info:
        pt.PBT(LR, args.pop("population_size"), args.pop("interval"), **args)
    assert needle in str(info.value)


def test_initial_hparams_are_used_and_sampled_otherwise() -> None:
    """Given initial hyperparameters are used as is; else each member draws from the prior."""
    assert [m.hparams for m in make(initial_hparams=lrs(0.5, 2)).members.values()] == lrs(0.5, 2.0)
    sampled = [m.hparams["lr"] for m in make(population_size=8).members.values()]
    assert len(set(sampled)) == 8 and all(1e-3 <= v <= 1e3 for v in sampled)


def test_unknown_member_raises_key_error() -> None:
    """Telling about a member that does not exist is an error, not a silent no-op."""
    with pytest.raises(KeyError, match="No member 7"):
        make().tell(7, 1, 0.0)


# -- ready points ---------------------------------------------------------------------------


def judged_steps(pbt: pt.PBT, member: int, last: int) -> list[int]:
    """Steps at which the member was judged (its decision count went up)."""
    out = []
    for step in range(1, last + 1):
        before = pbt.members[member].decisions
        pbt.tell(member, step, 1.0)
        if pbt.members[member].decisions > before:
            out.append(step)
    return out


def test_member_is_ready_every_interval_steps() -> None:
    """With interval 4 a member is judged at steps 4, 8, 12 and at no other step."""
    pbt = make(interval=4, exploit=None)
    assert judged_steps(pbt, 0, 13) == [4, 8, 12]


def test_burn_in_delays_the_first_ready_point() -> None:
    """burn_in=10 with interval 4: first judged at 10, then every 4 steps from there."""
    pbt = make(interval=4, burn_in=10, exploit=None)
    assert judged_steps(pbt, 0, 19) == [10, 14, 18]


def test_member_at_steps_finishes_and_is_never_ready() -> None:
    """A member reaching `steps` is marked finished instead of being judged."""
    pbt = make(interval=4, steps=8, exploit=None)
    assert judged_steps(pbt, 0, 8) == [4]
    assert pbt.members[0].status == "finished"
    assert not pbt.is_ready(0)


def test_explore_only_keeps_own_state_and_moves_hparams() -> None:
    """Without exploit, a ready member explores its own hyperparameters and keeps its step."""
    pbt = make(exploit=None, initial_hparams=lrs(10.0, 1.0))
    pbt.report(1, 4, 100.0)
    d = pbt.tell(0, 4, 0.0)
    assert (d.action, d.donor, d.donor_step, d.copies_state) == ("explore", 0, 4, False)
    assert d.hparams["lr"] in (pytest.approx(8.0), pytest.approx(12.0))
    assert pbt.members[0].hparams == d.hparams and pbt.members[0].last_ready == 4


def test_no_exploit_no_explore_always_continues() -> None:
    """Grid search: ready members carry on unchanged."""
    pbt = make(exploit=None, explore=None, initial_hparams=lrs(10.0, 1.0))
    pbt.report(1, 4, 100.0)
    assert pbt.tell(0, 4, 0.0).action == "continue"
    assert pbt.members[0].hparams == {"lr": 10.0}


class _Broken(pt.Explore):
    """An explore strategy that returns ``lr`` as given (NaN, or out of the space)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __call__(self, hparams: Any, space: Any, rng: Any) -> tuple[dict[str, Any], dict]:
        return {**hparams, "lr": self.lr}, {"lr": "broken"}


@pytest.mark.parametrize(
    ("lr", "needle"), [(math.nan, "finite number, but got nan"), (1e6, "but got 1000000.0")]
)
def test_an_explore_strategy_outside_the_space_raises_naming_it(lr: float, needle: str) -> None:
    """What any strategy returns is checked against the space: a NaN or out-of-range value
    raises ExploreError naming the strategy, the hyperparameter and the value (only explore
    functions were checked; a strategy's NaN became a member's learning rate), and a
    replacement that cannot explore leaves no half-made member behind."""
    pbt = make(explore=_Broken(lr), initial_hparams=lrs(0.01, 100.0))
    pbt.report(1, 4, 5.0)
    with pytest.raises(ExploreError, match=rf"explore strategy _Broken.*'lr'.*{needle}"):
        pbt.tell(0, 4, 1.0)
    pbt = make(population_size=3, explore=_Broken(lr), initial_hparams=lrs(0.01, 100.0, 1.0))
    pbt.report(1, 4, 5.0)
    with pytest.raises(ExploreError, match="_Broken"):
        pbt.replace(0)
    assert sorted(pbt.members) == [0, 1, 2]


# -- exploit bookkeeping --------------------------------------------------------------------


def test_explore_starts_from_the_donors_hparams() -> None:
    """After an exploit the new lr is the donor's 100 times 0.8 or 1.2, never the loser's 0.01."""
    seen = set()
    for seed in range(60):
        pbt = make(seed=seed, initial_hparams=lrs(0.01, 100.0))
        pbt.report(1, 4, 5.0)
        d = pbt.tell(0, 4, 1.0)
        assert (d.action, d.donor, d.copies_state) == ("exploit", 1, True)
        assert d.old_hparams == {"lr": 0.01}
        assert round(d.hparams["lr"], 9) in (80.0, 120.0)
        assert pbt.members[0].hparams == d.hparams
        seen.add(round(d.hparams["lr"], 9))
    assert seen == {80.0, 120.0}


def test_exploit_without_explore_copies_the_donors_hparams_exactly() -> None:
    """explore=None: the member takes the donor's hyperparameters unchanged."""
    pbt = make(explore=None, initial_hparams=lrs(0.01, 100.0))
    pbt.report(1, 4, 5.0)
    d = pbt.tell(0, 4, 1.0)
    assert d.hparams == {"lr": 100.0} and d.operations == {}


def test_after_exploit_member_inherits_donor_step_score_and_window() -> None:
    """The member's step, ready clock, score and window become the donor's."""
    pbt = make(interval=4, exploit=pt.TTest(window=3, alpha=0.05))
    for step, score in ((10, 10.0), (11, 10.2), (12, 10.1)):
        pbt.report(1, step, score)
    for step, score in ((2, 0.1), (3, 0.0)):
        pbt.report(0, step, score)
    d = pbt.tell(0, 4, 0.2)
    assert (d.action, d.donor, d.step, d.donor_step) == ("exploit", 1, 4, 12)
    m = pbt.members[0]
    assert (m.step, m.last_ready, m.score, m.score_step) == (12, 12, 10.1, 12)
    assert m.window == [10.0, 10.2, 10.1]
    # The next ready point is counted from the donor's step: 16, not 8.
    assert judged_steps_from(pbt, 0, 13, 16) == [16]


def judged_steps_from(pbt: pt.PBT, member: int, first: int, last: int) -> list[int]:
    out = []
    for step in range(first, last + 1):
        before = pbt.members[member].decisions
        pbt.tell(member, step, 20.0)
        if pbt.members[member].decisions > before:
            out.append(step)
    return out


def test_window_keeps_only_the_last_scores() -> None:
    """The score window holds the t-test's window of most recent scores, oldest first."""
    pbt = make(exploit=pt.TTest(window=3))
    for step in range(1, 6):
        pbt.report(0, step, float(step))
    assert pbt.members[0].window == [3.0, 4.0, 5.0]
    assert make().window_size == 1


def test_finished_members_are_never_copied() -> None:
    """A finished member, however good, is excluded from the candidates."""
    for seed in range(50):
        pbt = make(population_size=3, seed=seed)
        pbt.report(2, 4, 100.0)
        pbt.finish(2)
        pbt.report(1, 4, 1.0)
        d = pbt.tell(0, 4, 0.0)
        assert (d.action, d.donor) == ("exploit", 1)
        assert pbt.decide(2).action == "continue"


def test_failed_members_are_never_copied() -> None:
    """A failed member is excluded the same way."""
    for seed in range(50):
        pbt = make(population_size=3, seed=seed)
        pbt.report(2, 4, 100.0)
        pbt.fail(2)
        pbt.report(1, 4, 1.0)
        assert pbt.tell(0, 4, 0.0).donor == 1


def test_fewer_than_two_scored_members_means_no_exploit() -> None:
    """Alone with a score, a member carries on even if it is the worst possible."""
    pbt = make(population_size=3)
    d = pbt.tell(0, 4, -1e9)
    assert d.action == "continue"


@pytest.mark.parametrize("mode", ["max", "min"])
def test_mode_orients_the_ranking(mode: str) -> None:
    """In max mode the lower score copies; in min mode the higher score copies."""
    for seed in range(30):
        pbt = make(mode=mode, seed=seed)
        pbt.report(1, 4, 1.0)
        d0 = pbt.tell(0, 4, 5.0)
        expected = ("continue", None) if mode == "max" else ("exploit", 1)
        assert (d0.action, d0.donor) == expected


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_non_finite_and_missing_scores_rank_worst(bad: float | None, mode: str) -> None:
    """A NaN, infinite or missing score ranks worst: its member copies, and is never copied."""
    for seed in range(30):
        pbt = make(population_size=3, mode=mode, seed=seed)
        pbt.report(1, 4, 1.0)
        pbt.report(2, 4, 2.0)
        d = pbt.tell(0, 4, bad)
        assert d.action == "exploit" and d.donor in (1, 2)
        # The other members never take the broken one as a donor.
        pbt2 = make(population_size=3, mode=mode, seed=seed)
        pbt2.report(0, 4, bad)
        pbt2.report(2, 4, 2.0)
        assert pbt2.tell(1, 4, 1.0).donor in (None, 2)


def test_ties_are_broken_at_random() -> None:
    """Two members with exactly equal scores: over seeds, a member copies sometimes, not always."""
    actions = []
    for seed in range(200):
        pbt = make(seed=seed)
        pbt.report(1, 4, 0.38975)
        actions.append(pbt.tell(0, 4, 0.38975).action)
    assert 0.3 < actions.count("exploit") / 200 < 0.7


# -- synchronous mode -----------------------------------------------------------------------


def test_synchronous_members_wait_for_the_generation() -> None:
    """Members wait until every alive member is in; then each decision is available by poll."""
    pbt = make(population_size=3, interval=2, synchronous=True, explore=None)
    for mid in range(3):
        pbt.report(mid, 1, 0.0)
    assert pbt.tell(0, 2, 0.0).action == "wait"
    assert pbt.tell(1, 2, 1.0).action == "wait"
    assert pbt.poll(0).action == "wait"
    assert pbt.members[0].status == "waiting"
    last = pbt.tell(2, 2, 2.0)
    assert last.action == "continue" and last.step == 2
    d0, d1 = pbt.poll(0), pbt.poll(1)
    assert (d0.action, d0.donor, d0.donor_step) == ("exploit", 2, 2)
    assert d1.action == "continue"
    assert pbt.poll(0).action == "continue"  # a decision is handed out once
    assert {m.status for m in pbt.members.values()} == {"running"}
    assert pbt.generation == 1


def test_synchronous_decisions_see_the_barrier_state() -> None:
    """At a barrier, a member is ranked on everyone's barrier scores, not on earlier copies.

    Member 0 (worst) copies member 3; asynchronously member 1 would then be the worst and
    copy too, but in a generation it is judged on the scores as they stood at the barrier.
    """

    def decisions(synchronous: bool, seed: int) -> list[pt.Decision]:
        pbt = make(
            population_size=4, exploit=pt.Truncation(0.25), synchronous=synchronous, seed=seed
        )
        for mid in range(4):
            pbt.report(mid, 4, float(mid))
        out = [pbt.decide(mid) for mid in range(4)]
        return [pbt.poll(mid) if d.action == "wait" else d for mid, d in enumerate(out)]

    for seed in range(30):
        sync = decisions(True, seed)
        assert (sync[0].action, sync[0].donor) == ("exploit", 3)
        assert [d.action for d in sync[1:]] == ["continue"] * 3
    async_copies = [decisions(False, s)[1].action for s in range(30)]
    assert "exploit" in async_copies  # the contrast that makes the barrier matter


def test_synchronous_donor_state_is_taken_at_the_barrier() -> None:
    """A donor that is itself exploited in the same generation gives its barrier hparams."""
    chains = 0
    for seed in range(300):
        pbt = make(
            population_size=3,
            exploit=pt.Tournament(),
            explore=None,
            synchronous=True,
            seed=seed,
            initial_hparams=lrs(1.0, 10.0, 100.0),
        )
        for mid in range(3):
            pbt.tell(mid, 4, float(mid))
        d0, d1 = pbt.poll(0), pbt.poll(1)
        if d0.donor == 1:
            assert d0.hparams == {"lr": 10.0} and d0.donor_step == 4
            chains += d1.donor == 2
    assert chains > 0  # the case where member 1 changed in the same generation occurred


@pytest.mark.parametrize("how", ["fail", "finish", "reach steps"])
def test_dead_member_completes_the_generation(how: str) -> None:
    """A member that fails or finishes while others wait closes the generation: no hang."""
    pbt = make(population_size=3, interval=2, steps=6, synchronous=True, explore=None)
    pbt.report(2, 1, 100.0)
    assert pbt.tell(0, 2, 0.0).action == "wait"
    assert pbt.tell(1, 2, 1.0).action == "wait"
    if how == "fail":
        pbt.fail(2)
    elif how == "finish":
        pbt.finish(2)
    else:
        pbt.report(2, 6, 100.0)
        assert pbt.decide(2).action == "continue"
        assert pbt.members[2].status == "finished"
    d0, d1 = pbt.poll(0), pbt.poll(1)
    assert (d0.action, d0.donor) == ("exploit", 1)  # never the dead member
    assert d1.action == "continue"


def test_waiting_member_that_fails_is_dropped_from_its_generation() -> None:
    """A member failing while waiting gets no decision, and the others still get theirs."""
    pbt = make(population_size=3, interval=2, synchronous=True)
    pbt.tell(0, 2, 0.0)
    pbt.tell(1, 2, 1.0)
    pbt.fail(0)
    assert pbt.members[0].status == "failed"
    assert pbt.tell(2, 2, 2.0).action in ("continue", "exploit")
    assert pbt.poll(1).action in ("continue", "exploit")
    assert pbt.poll(0).action == "continue"


# -- determinism and snapshots --------------------------------------------------------------


def score_of(member: int, step: int, hparams: dict[str, Any]) -> float:
    """A deterministic score: members with lr near 1 do best, plus a fixed wiggle."""
    return -abs(math.log(hparams["lr"])) + 0.3 * math.sin(13 * member + 7 * step)


def tick(pbt: pt.PBT, members: list[int] | None = None) -> list[pt.Decision]:
    """Every running member trains one step and reports its score; then each is judged, as the
    serial executor does (in lockstep, so a member never finds its donor a step behind)."""
    chosen = [
        mid
        for mid in (members if members is not None else sorted(pbt.members))
        if pbt.members[mid].status == "running"
    ]
    for mid in chosen:
        m = pbt.members[mid]
        pbt.report(mid, m.step + 1, score_of(mid, m.step + 1, m.hparams))
    return [pbt.decide(mid) for mid in chosen]


def poll_all(pbt: pt.PBT) -> list[pt.Decision]:
    return [pbt.poll(mid) for mid in sorted(pbt.members)]


def drive(pbt: pt.PBT, ticks: int) -> list[pt.Decision]:
    out: list[pt.Decision] = []
    for _ in range(ticks):
        out += tick(pbt) + poll_all(pbt)
    return out


def config(**kwargs: Any) -> Callable[[], pt.PBT]:
    def build() -> pt.PBT:
        return make(
            population_size=5,
            interval=3,
            exploit=pt.Truncation(0.25),
            explore=pt.Perturb(),
            **kwargs,
        )

    return build


@pytest.mark.parametrize("synchronous", [False, True])
def test_same_seed_same_decisions_different_seed_different(synchronous: bool) -> None:
    """Two controllers with the same seed make the same decisions; another seed differs."""
    a = drive(config(seed=4, synchronous=synchronous)(), 40)
    b = drive(config(seed=4, synchronous=synchronous)(), 40)
    assert a == b
    assert any(d.action == "exploit" for d in a)
    start = lrs(0.5, 1.5, 3.0, 0.2, 8.0)
    c = drive(config(seed=4, synchronous=synchronous, initial_hparams=start)(), 40)
    d = drive(config(seed=5, synchronous=synchronous, initial_hparams=start)(), 40)
    assert c != d


def test_snapshot_restore_continues_identically_async() -> None:
    """A controller restored from a JSON snapshot decides exactly as the uninterrupted one."""
    build = config(seed=11)
    original = build()
    drive(original, 20)
    snap = json.loads(json.dumps(original.snapshot()))
    restored = build()
    restored.restore(snap)
    later = drive(original, 25)
    assert drive(restored, 25) == later
    assert any(d.action == "exploit" for d in later)
    assert restored.snapshot() == json.loads(json.dumps(original.snapshot()))


def test_snapshot_restore_mid_generation_continues_identically() -> None:
    """A synchronous controller snapshotted while members wait resumes the same generation."""
    build = config(seed=12, synchronous=True)
    original = build()
    drive(original, 8)  # the next tick (step 9) is a ready point
    first = tick(original, [0, 1, 2])
    assert [d.action for d in first] == ["wait"] * 3
    snap = json.loads(json.dumps(original.snapshot()))
    restored = build()
    restored.restore(snap)
    assert [restored.members[m].status for m in range(5)] == ["waiting"] * 3 + ["running"] * 2

    def finish_and_go_on(pbt: pt.PBT) -> list[pt.Decision]:
        return tick(pbt, [3, 4]) + poll_all(pbt) + drive(pbt, 20)

    later = finish_and_go_on(original)
    assert finish_and_go_on(restored) == later
    assert any(d.action == "exploit" for d in later)


def test_snapshot_restore_keeps_pending_decisions() -> None:
    """Decisions made but not yet polled survive a snapshot."""
    pbt = make(population_size=2, interval=1, synchronous=True, explore=None)
    pbt.tell(0, 1, 0.0)
    pbt.tell(1, 1, 1.0)
    restored = make(population_size=2, interval=1, synchronous=True, explore=None)
    restored.restore(json.loads(json.dumps(pbt.snapshot())))
    assert restored.poll(0) == pbt.poll(0)
    assert restored.poll(0).action == "continue"


# -- replacing failed members ---------------------------------------------------------------


def test_replace_copies_a_top_member_under_a_new_id() -> None:
    """A failed member is replaced by a new member that copies the best and explores."""
    pbt = make(population_size=4, initial_hparams=lrs(1.0, 2.0, 4.0, 8.0))
    for mid in range(4):
        pbt.report(mid, 5, float(mid))
    d = pbt.replace(1)
    assert pbt.members[1].status == "failed"
    assert (d.action, d.member, d.donor, d.donor_step, d.step) == ("exploit", 4, 3, 5, 5)
    assert round(d.hparams["lr"], 9) in (6.4, 9.6)  # 8.0 * 0.8 or * 1.2
    new = pbt.members[4]
    # It keeps the donor's ready clock (the donor was last judged at step 0).
    assert (new.replaces, new.step, new.last_ready, new.score) == (1, 5, 0, 3.0)
    assert new.hparams == d.hparams and new.status == "running"
    assert d.copies_state


def test_replace_without_scores_starts_afresh() -> None:
    """With no scored member to copy, the replacement draws from the priors at step 0."""
    pbt = make(population_size=3)
    d = pbt.replace(0)
    assert (d.action, d.member, d.donor, d.donor_step) == ("explore", 3, None, 0)
    assert pbt.space.validate(d.hparams) == d.hparams
    assert pbt.members[3].step == 0 and pbt.members[3].replaces == 0


def test_failed_member_is_ignored_by_later_decisions() -> None:
    """After replace, the failed member is neither waited for nor copied."""
    pbt = make(population_size=3, synchronous=True, explore=None)
    pbt.report(2, 4, 100.0)
    pbt.replace(2)
    pbt.tell(0, 4, 0.0)
    pbt.tell(1, 4, 1.0)
    last = pbt.tell(3, 8, 50.0)  # the replacement, at its ready point
    assert last.action != "wait"
    assert all(pbt.poll(m).donor != 2 for m in (0, 1))
