"""Exploit and explore strategies, driven with plain numbers and seeded generators."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

import poptune as pt
from poptune.strategies import as_explore

Cand = pt.Candidate


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def population(scores: Sequence[float]) -> list[pt.Candidate]:
    return [Cand(i, s, (s,)) for i, s in enumerate(scores)]


def donors(strategy: pt.Exploit, member: int, pop: list[pt.Candidate], seeds: int = 300) -> Counter:
    """How often each donor (None: no exploit) is chosen for ``member`` over many seeds."""
    me = next(c for c in pop if c.id == member)
    return Counter(strategy.select(me, pop, rng(s)) for s in range(seeds))


# -- declarations ---------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 0.51, 1.0, math.nan, True, "0.2"])
def test_truncation_fraction_must_lie_in_half_open_interval(fraction: object) -> None:
    """Truncation refuses a fraction outside (0, 0.5] and says what must hold."""
    with pytest.raises(ValueError, match=r"Truncation: `0 < fraction <= 0.5` must hold"):
        pt.Truncation(fraction)  # type: ignore[arg-type]


def test_truncation_accepts_the_ends_of_the_interval() -> None:
    """0.5 (half the population at each end) and small fractions are valid."""
    assert pt.Truncation(0.5).fraction == 0.5
    assert pt.Truncation(0.01).fraction == 0.01


@pytest.mark.parametrize(
    ("factors", "needle"),
    [
        ((), "at least one factor"),
        ((0.8, 0.0), "every factor must be `> 0`"),
        ((-1.2,), "every factor must be `> 0`"),
        ((math.inf,), "every factor must be `> 0` and finite"),
        ((True,), "every factor must be `> 0`"),
        (1.2, "`factors` must be a sequence"),
    ],
)
def test_perturb_factors_must_be_positive(factors: object, needle: str) -> None:
    """Perturb refuses empty, non-positive or non-finite factors."""
    with pytest.raises(ValueError, match="Perturb") as info:
        pt.Perturb(factors=factors)  # type: ignore[arg-type]
    assert needle in str(info.value)


@pytest.mark.parametrize("p", [-0.01, 1.01, math.nan, True, "0.5"])
def test_probabilities_must_lie_in_unit_interval(p: object) -> None:
    """Resample probabilities outside [0, 1] are refused, naming the argument."""
    with pytest.raises(ValueError, match=r"Perturb: `0 <= resample_probability <= 1` must hold"):
        pt.Perturb(resample_probability=p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Resample: `0 <= probability <= 1` must hold"):
        pt.Resample(probability=p)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [1, 0, -3, 2.0, True])
def test_ttest_window_must_be_at_least_two(window: object) -> None:
    """A t-test needs at least two scores per member."""
    with pytest.raises(ValueError, match=r"TTest: `window >= 2` must hold"):
        pt.TTest(window=window)  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1])
def test_ttest_alpha_must_lie_in_open_unit_interval(alpha: float) -> None:
    """The significance level must lie in (0, 1)."""
    with pytest.raises(ValueError, match=r"TTest: `0 < alpha < 1` must hold"):
        pt.TTest(alpha=alpha)


def test_explore_argument_must_be_a_strategy_or_callable() -> None:
    """Anything but an Explore, a callable or None is refused as explore=."""
    assert as_explore(None) is None
    assert isinstance(as_explore(lambda hp, r: hp), pt.FunctionExplore)
    with pytest.raises(ValueError, match=r"`explore` must be pt.Perturb"):
        as_explore(0.25)


# -- truncation -----------------------------------------------------------------------------


def test_truncation_bottom_copies_from_top() -> None:
    """With 10 members and 20%, the two worst copy one of the two best, each chosen sometimes."""
    pop = population([float(s) for s in range(10)])  # member i scores i
    for member in (0, 1):
        counts = donors(pt.Truncation(0.2), member, pop)
        assert set(counts) == {8, 9}
        assert min(counts.values()) > 100  # uniform over the top


def test_truncation_top_and_middle_never_copy() -> None:
    """Members outside the bottom fraction carry on, for every seed."""
    pop = population([float(s) for s in range(10)])
    for member in range(2, 10):
        assert donors(pt.Truncation(0.2), member, pop) == Counter({None: 300})


def test_truncation_breaks_ties_at_random() -> None:
    """Two members with exactly equal scores: the tie is broken by a coin, not by id."""
    pop = population([0.38975, 0.38975])
    for member in (0, 1):
        counts = donors(pt.Truncation(0.5), member, pop, seeds=400)
        assert set(counts) == {None, 1 - member}  # sometimes copies, sometimes not
        assert 0.35 < counts[1 - member] / 400 < 0.65


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_truncation_ranks_non_finite_worst_and_never_copies_it(bad: float) -> None:
    """A member whose score is NaN or infinite ranks worst and is never a donor.

    Scores reach a strategy oriented, with non-finite ones mapped to -inf; the strategy must
    still treat a raw NaN or +inf as unusable should one slip through.
    """
    pop = [Cand(0, bad), Cand(1, 1.0), Cand(2, 2.0), Cand(3, 3.0)]
    if bad == -math.inf:
        counts = donors(pt.Truncation(0.25), 0, pop)
        assert set(counts) == {3}
    for member in (1, 2, 3):
        assert 0 not in donors(pt.Truncation(0.5), member, pop)


def test_truncation_never_copies_a_non_finite_donor_even_from_the_top() -> None:
    """When the top holds -inf scores, only finite members are copied; none finite: no copy."""
    pop = [Cand(0, -math.inf), Cand(1, -math.inf), Cand(2, -math.inf), Cand(3, 1.0)]
    counts = donors(pt.Truncation(0.5), 0, pop)
    assert set(counts) == {3, None}  # None: member 0 drew a place in the top among the ties
    all_bad = [Cand(0, -math.inf), Cand(1, -math.inf)]
    assert donors(pt.Truncation(0.5), 0, all_bad) == Counter({None: 300})


def test_truncation_needs_two_members() -> None:
    """A population of one (or none scored but the member) never exploits."""
    me = Cand(0, 1.0)
    assert pt.Truncation(0.5).select(me, [me], rng()) is None
    assert pt.Truncation(0.5).select(me, [], rng()) is None


def test_truncation_ends_hold_ceil_fraction_but_at_most_half() -> None:
    """With 3 members and 50%, one member is at each end: the middle one carries on."""
    pop = population([1.0, 2.0, 3.0])
    assert set(donors(pt.Truncation(0.5), 0, pop)) == {2}
    assert donors(pt.Truncation(0.5), 1, pop) == Counter({None: 300})


# -- t-test ---------------------------------------------------------------------------------


def noisy(mean: float, n: int = 10, seed: int = 0) -> tuple[float, ...]:
    return tuple(float(x) for x in np.random.default_rng(seed).normal(mean, 1.0, n))


def test_ttest_copies_when_the_difference_is_significant() -> None:
    """A clearly better window (means 10 apart, sd 1) is copied whichever seed draws it."""
    me = Cand(0, 0.0, noisy(0.0, seed=1))
    other = Cand(1, 10.0, noisy(10.0, seed=2))
    assert donors(pt.TTest(), 0, [me, other]) == Counter({1: 300})


def test_ttest_does_not_copy_an_insignificant_difference() -> None:
    """Overlapping windows with a slightly higher mean are not copied."""
    me = Cand(0, 0.0, (0.0, 2.0, -1.0, 1.0, 0.5, -0.5, 1.5, -1.5, 0.2, -0.2))
    other = Cand(1, 0.3, tuple(x + 0.1 for x in me.window))
    assert float(np.mean(other.window)) > float(np.mean(me.window))
    assert donors(pt.TTest(), 0, [me, other]) == Counter({None: 300})


def test_ttest_never_copies_a_worse_member() -> None:
    """A significantly worse member is not copied."""
    me = Cand(0, 10.0, noisy(10.0, seed=1))
    other = Cand(1, 0.0, noisy(0.0, seed=2))
    assert donors(pt.TTest(), 0, [me, other]) == Counter({None: 300})


def test_ttest_needs_two_scores_in_each_window() -> None:
    """Windows shorter than 2 cannot be tested: no exploit."""
    assert (
        pt.TTest().select(
            Cand(0, 0.0, (0.0,)), [Cand(0, 0.0, (0.0,)), Cand(1, 9.0, (9.0, 9.5))], rng()
        )
        is None
    )
    assert (
        pt.TTest().select(
            Cand(0, 0.0, (0.0, 0.5)), [Cand(0, 0.0, (0.0, 0.5)), Cand(1, 9.0, (9.0,))], rng()
        )
        is None
    )


def test_ttest_uses_only_the_last_window_scores() -> None:
    """Older scores outside the window are ignored."""
    me = Cand(0, 0.0, (100.0,) * 10 + noisy(0.0, seed=1))
    other = Cand(1, 10.0, noisy(10.0, seed=2))
    assert pt.TTest(window=10).select(me, [me, other], rng()) == 1


def test_ttest_non_finite_member_copies_and_non_finite_other_is_not_copied() -> None:
    """A member with a NaN score copies any finite member; a NaN member is never a donor."""
    bad, good = Cand(0, -math.inf, (-math.inf,)), Cand(1, 1.0, (1.0, 1.1))
    assert pt.TTest().select(bad, [bad, good], rng()) == 1
    assert pt.TTest().select(good, [bad, good], rng()) is None


# -- tournament -----------------------------------------------------------------------------


def test_tournament_copies_better_and_not_worse() -> None:
    """Against one other member: a better one is always copied, a worse one never."""
    pop = population([1.0, 2.0])
    assert donors(pt.Tournament(), 0, pop) == Counter({1: 300})
    assert donors(pt.Tournament(), 1, pop) == Counter({None: 300})


def test_tournament_settles_ties_by_a_fair_coin() -> None:
    """Equal scores: the other member is copied about half the time."""
    counts = donors(pt.Tournament(), 0, population([0.5, 0.5]), seeds=1000)
    assert 0.43 < counts[1] / 1000 < 0.57


def test_tournament_never_copies_non_finite_and_needs_another_member() -> None:
    """A non-finite opponent is never copied; alone, a member carries on."""
    pop = [Cand(0, 1.0), Cand(1, -math.inf)]
    assert donors(pt.Tournament(), 0, pop) == Counter({None: 300})
    assert pt.Tournament().select(pop[0], [pop[0]], rng()) is None


def test_tournament_opponent_is_drawn_uniformly() -> None:
    """The worst of four meets each other member about a third of the time."""
    counts = donors(pt.Tournament(), 0, population([0.0, 1.0, 2.0, 3.0]), seeds=900)
    assert set(counts) == {1, 2, 3}
    assert all(230 < n < 370 for n in counts.values())


# -- explore --------------------------------------------------------------------------------

MIXED = pt.Space(
    {
        "lr": pt.Float(1e-5, 1e-1, log=True),
        "drop": pt.Float(0.0, 0.5),
        "momentum": pt.Float(0.5, 0.99),
        "batch": pt.Int(1, 8),
        "width": pt.Choice([64, 128, 256]),
        "opt": pt.Choice(["sgd", "adam"]),
        "flag": pt.Choice([True, False]),
    }
)


@pytest.mark.parametrize(
    "explore",
    [
        pt.Perturb(),
        pt.Perturb(factors=(0.5, 2.0), resample_probability=0.0),
        pt.Perturb(factors=(0.01, 100.0)),
        pt.Resample(0.5),
    ],
)
def test_explore_keeps_every_value_legal(explore: pt.Explore) -> None:
    """Repeated explore steps from any start keep every value inside the space."""
    for seed in range(50):
        r = rng(seed)
        hp = MIXED.sample(r)
        for _ in range(20):
            hp, ops = explore(hp, MIXED, r)
            assert MIXED.validate(hp) == hp
            assert set(ops) <= set(MIXED)
            assert type(hp["flag"]) is bool and type(hp["batch"]) is int


def test_perturb_applies_one_of_the_factors() -> None:
    """Without resampling, a positive linear value is multiplied by one of the factors."""
    space = pt.Space({"m": pt.Float(0.1, 1.0)})
    seen = set()
    for seed in range(100):
        hp, ops = pt.Perturb(resample_probability=0.0)({"m": 0.5}, space, rng(seed))
        seen.add(round(hp["m"], 12))
        assert ops["m"] in ("*0.8", "*1.2")
    assert seen == {0.4, 0.6}


def test_perturb_resamples_with_the_given_probability() -> None:
    """resample_probability=1 always redraws; 0 never does."""
    space = pt.Space({"m": pt.Float(0.1, 1.0)})
    for seed in range(50):
        assert pt.Perturb(resample_probability=1.0)({"m": 0.5}, space, rng(seed))[1] == {
            "m": "resample"
        }
        assert pt.Perturb(resample_probability=0.0)({"m": 0.5}, space, rng(seed))[1] != {
            "m": "resample"
        }
    ops = [
        pt.Perturb(resample_probability=0.25)({"m": 0.5}, space, rng(s))[1]["m"]
        for s in range(2000)
    ]
    assert 0.21 < ops.count("resample") / 2000 < 0.29


def test_resample_probability_zero_changes_nothing() -> None:
    """Resample(0) leaves the hyperparameters as they were."""
    hp = MIXED.sample(rng(3))
    assert pt.Resample(0.0)(hp, MIXED, rng()) == (hp, {})


def test_explore_does_not_modify_its_input() -> None:
    """Explore returns a new dict; the donor's hyperparameters are left as they were."""
    hp = MIXED.sample(rng(1))
    before = dict(hp)
    pt.Perturb(resample_probability=0.5)(hp, MIXED, rng())
    pt.Resample(1.0)(hp, MIXED, rng())
    pt.FunctionExplore(lambda h, r: {**h, "lr": 1e-3})(hp, MIXED, rng())
    assert hp == before


IMMUTABLE = pt.Space(
    {
        "lr": pt.Float(1e-4, 1e-1, log=True),
        "width": pt.Int(16, 512, mutable=False),
        "act": pt.Choice(["relu", "tanh", "gelu"], mutable=False),
    }
)


@pytest.mark.parametrize(
    "explore",
    [pt.Perturb(), pt.Perturb(resample_probability=1.0), pt.Resample(1.0)],
)
def test_immutable_parameters_are_never_touched(explore: pt.Explore) -> None:
    """mutable=False parameters keep their value under Perturb and Resample, always."""
    hp = {"lr": 1e-2, "width": 100, "act": "tanh"}
    for seed in range(200):
        new, ops = explore(hp, IMMUTABLE, rng(seed))
        assert new["width"] == 100 and new["act"] == "tanh"
        assert set(ops) == {"lr"}


def test_explore_function_changing_an_immutable_parameter_raises() -> None:
    """A callable that changes a mutable=False parameter raises ValueError naming it."""

    def widen(hp: dict, r: np.random.Generator) -> dict:
        return {**hp, "width": hp["width"] * 2}

    with pytest.raises(ValueError, match=r"'width'.*mutable=False"):
        pt.FunctionExplore(widen)({"lr": 1e-2, "width": 100, "act": "tanh"}, IMMUTABLE, rng())


def test_explore_function_result_is_validated() -> None:
    """What a callable returns must name every parameter with a legal value."""
    hp = {"lr": 1e-2, "width": 100, "act": "tanh"}
    with pytest.raises(ValueError, match=r"missing hyperparameter\(s\) \['act'\]"):
        pt.FunctionExplore(lambda h, r: {"lr": 1e-2, "width": 100})(hp, IMMUTABLE, rng())
    with pytest.raises(ValueError, match=r"'lr'.*must lie in"):
        pt.FunctionExplore(lambda h, r: {**h, "lr": 5.0})(hp, IMMUTABLE, rng())
    new, ops = pt.FunctionExplore(lambda h, r: {**h, "lr": 2e-2})(hp, IMMUTABLE, rng())
    assert new == {"lr": 2e-2, "width": 100, "act": "tanh"} and ops == {"lr": "custom"}
    with pytest.raises(ValueError, match="expected a callable"):
        pt.FunctionExplore(3)  # type: ignore[arg-type]


def test_ttest_on_saturated_windows_warns_nothing() -> None:
    """Windows of a saturated score (all 500.0, or nearly) give no scipy precision warning."""
    import warnings

    member = pt.Candidate(0, 500.0, tuple([500.0] * 9 + [499.99999999]))
    other = pt.Candidate(1, 500.0, tuple([500.0] * 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pt.TTest().select(member, [member, other], np.random.default_rng(0))
