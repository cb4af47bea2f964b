"""Search spaces: declarations are checked, values are sampled and perturbed within bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import poptune as pt


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- declarations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "needle"),
    [
        (pt.Float(1.0, 1.0), "`low < high` must hold"),
        (pt.Float(2.0, 1.0), "`low < high` must hold"),
        (pt.Int(3, 3), "`low < high` must hold"),
        (pt.Int(5, 1), "`low < high` must hold"),
        (pt.Float(0.0, 1.0, log=True), "log-scale range needs `low > 0`"),
        (pt.Float(-1.0, 1.0, log=True), "log-scale range needs `low > 0`"),
        (pt.Int(0, 8, log=True), "log-scale range needs `low > 0`"),
        (pt.Float(0.0, math.inf), "bounds must be finite"),
        (pt.Float(math.nan, 1.0), "bounds must be finite"),
        (pt.Int(0.0, 3), "bounds must be integers"),  # type: ignore[arg-type]
        (pt.Int(True, 3), "bounds must be integers"),
        (pt.Float("0", 1.0), "bounds must be numbers"),  # type: ignore[arg-type]
        (pt.Choice([]), "at least one value"),
        (pt.Choice([1, 2, 1]), "must be distinct; 1 repeats"),
        (pt.Choice([1, 1.0]), "must be distinct"),
        (pt.Choice(["a", "b", "a"]), "must be distinct; 'a' repeats"),
        (pt.Choice([1.0, math.nan]), "Choice values must not be NaN, but got [1.0, nan]"),
        (pt.Choice(["a", np.float32("nan")]), "must not be NaN"),
        (pt.Float(0.0, 1.0, perturb="add"), "`perturb` must be 'auto', 'multiply' or 'shift'"),  # type: ignore[arg-type]
    ],
)
def test_bad_declaration_names_parameter_and_rule(param: pt.Parameter, needle: str) -> None:
    """A bad declaration raises ValueError naming the parameter and what must hold."""
    with pytest.raises(ValueError, match="'rate'") as info:
        pt.Space({"rate": param})
    assert needle in str(info.value)


def test_bool_and_int_choice_values_are_distinct() -> None:
    """True and 1 are different choices (a boolean is not the integer 1)."""
    space = pt.Space({"c": pt.Choice([True, 1, False, 0])})
    assert space["c"].validate("c", 1) == 1
    assert space["c"].validate("c", True) is True


def test_empty_or_invalid_space_is_refused() -> None:
    """A space must declare at least one poptune parameter under a non-empty string name."""
    with pytest.raises(ValueError, match="at least one hyperparameter"):
        pt.Space({})
    with pytest.raises(ValueError, match=r"'lr'.*pt.Float"):
        pt.Space({"lr": (0.1, 1.0)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty strings"):
        pt.Space({"": pt.Float(0, 1)})
    with pytest.raises(ValueError, match="mapping"):
        pt.Space([("lr", pt.Float(0, 1))])  # type: ignore[arg-type]


def test_validate_reports_unknown_and_missing_names() -> None:
    """Validating hyperparameters names the unknown and the missing ones."""
    space = pt.Space({"lr": pt.Float(0.1, 1.0), "layers": pt.Int(1, 4)})
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        space.validate({"lr": 0.5, "layers": 2, "momentum": 0.9})
    with pytest.raises(ValueError, match=r"missing hyperparameter\(s\) \['layers'\]"):
        space.validate({"lr": 0.5})


def test_validate_checks_values_and_canonicalises() -> None:
    """Out-of-range, wrong-kind and unlisted values are refused; integral floats become ints."""
    space = pt.Space(
        {"lr": pt.Float(0.1, 1.0), "layers": pt.Int(1, 4), "act": pt.Choice(["relu", "tanh"])}
    )
    ok = space.validate({"lr": 1, "layers": 3.0, "act": "tanh"})
    assert ok == {"lr": 1.0, "layers": 3, "act": "tanh"}
    assert type(ok["layers"]) is int and type(ok["lr"]) is float
    with pytest.raises(ValueError, match=r"'lr'.*\[0.1, 1.0\].*2.0"):
        space.validate({"lr": 2.0, "layers": 1, "act": "relu"})
    with pytest.raises(ValueError, match=r"'lr'.*finite number"):
        space.validate({"lr": math.nan, "layers": 1, "act": "relu"})
    with pytest.raises(ValueError, match=r"'layers'.*integer"):
        space.validate({"lr": 0.5, "layers": 2.5, "act": "relu"})
    with pytest.raises(ValueError, match=r"'layers'.*integer"):
        space.validate({"lr": 0.5, "layers": True, "act": "relu"})
    with pytest.raises(ValueError, match=r"'act'.*one of"):
        space.validate({"lr": 0.5, "layers": 1, "act": "gelu"})


# -- sampling -------------------------------------------------------------------------------


def test_samples_stay_within_bounds_and_cover_the_range() -> None:
    """Prior draws stay inside the bounds, and log-uniform draws spread over the decades."""
    space = pt.Space(
        {
            "lr": pt.Float(1e-5, 1e-1, log=True),
            "drop": pt.Float(0.0, 0.5),
            "width": pt.Int(16, 1024, log=True),
            "layers": pt.Int(1, 3),
            "act": pt.Choice(["relu", "tanh"]),
        }
    )
    draws = [space.sample(rng(s)) for s in range(2000)]
    lrs = np.array([d["lr"] for d in draws])
    assert lrs.min() >= 1e-5 and lrs.max() <= 1e-1
    # Log-uniform: about a quarter of the draws in each decade.
    assert 0.2 < np.mean(lrs < 1e-4) < 0.3
    assert all(0.0 <= d["drop"] <= 0.5 for d in draws)
    assert all(16 <= d["width"] <= 1024 and type(d["width"]) is int for d in draws)
    assert {d["layers"] for d in draws} == {1, 2, 3}
    assert {d["act"] for d in draws} == {"relu", "tanh"}


def test_same_generator_state_gives_same_sample() -> None:
    """Sampling draws only from the generator passed in."""
    space = pt.Space({"lr": pt.Float(1e-4, 1e-1, log=True), "n": pt.Int(1, 100)})
    assert space.sample(rng(7)) == space.sample(rng(7))
    assert space.sample(rng(7)) != space.sample(rng(8))


# -- perturbation ---------------------------------------------------------------------------

factors = st.floats(min_value=0.01, max_value=10.0, allow_nan=False)


@st.composite
def float_param_and_value(draw: st.DrawFn) -> tuple[pt.Float, float]:
    log = draw(st.booleans())
    low = draw(st.floats(min_value=1e-6 if log else -1e3, max_value=1e3))
    high = draw(st.floats(min_value=low, max_value=2e3).filter(lambda h: h > low))
    rule = draw(st.sampled_from(["auto", "multiply", "shift"]))
    param = pt.Float(low, high, log=log, perturb=rule)
    value = draw(st.floats(min_value=low, max_value=high))
    return param, value


@st.composite
def int_param_and_value(draw: st.DrawFn) -> tuple[pt.Int, int]:
    log = draw(st.booleans())
    low = draw(st.integers(min_value=1 if log else -50, max_value=50))
    high = draw(st.integers(min_value=low + 1, max_value=200))
    rule = draw(st.sampled_from(["auto", "multiply", "shift"]))
    param = pt.Int(low, high, log=log, perturb=rule)
    return param, draw(st.integers(min_value=low, max_value=high))


@settings(max_examples=300, deadline=None)
@given(float_param_and_value(), factors)
def test_float_perturbation_stays_in_bounds(pv: tuple[pt.Float, float], factor: float) -> None:
    """A perturbed float never leaves [low, high], whatever the rule and factor."""
    param, value = pv
    new, label = param.perturb(value, factor, rng())
    assert param.low <= new <= param.high
    assert isinstance(new, float) and label


@settings(max_examples=300, deadline=None)
@given(int_param_and_value(), factors)
def test_int_perturbation_moves_at_least_one_unit_then_clips(
    pv: tuple[pt.Int, int], factor: float
) -> None:
    """A perturbed int stays in bounds and moves at least one unit in the factor's direction."""
    param, value = pv
    new, _ = param.perturb(value, factor, rng())
    assert type(new) is int
    assert param.low <= new <= param.high
    if factor > 1:
        assert new >= min(value + 1, param.high)
    elif factor < 1:
        assert new <= max(value - 1, param.low)
    else:
        assert new == value


@pytest.mark.parametrize(
    ("param", "value", "factor", "expected"),
    [
        (pt.Int(1, 10), 2, 1.2, 3),  # int(2 * 1.2) would stay at 2
        (pt.Int(1, 10), 4, 1.2, 5),  # int(4 * 1.2) would stay at 4
        (pt.Int(1, 10), 1, 0.8, 1),  # would go to 0, but low is 1: stays at low
        (pt.Int(0, 10, perturb="multiply"), 1, 0.8, 0),  # low allows 0
        (pt.Int(1, 10), 10, 1.2, 10),  # clipped at high
        (pt.Int(1, 100), 50, 1.2, 60),  # large values simply multiply
        (pt.Int(1, 100), 50, 0.8, 40),
        (pt.Int(0, 10), 0, 1.2, 2),  # a linear range from 0 shifts by 0.2 * (10 - 0)
    ],
)
def test_int_perturbation_examples(param: pt.Int, value: int, factor: float, expected: int) -> None:
    """Integers move by at least one unit in the chosen direction, then clip to the bounds."""
    assert param.perturb(value, factor, rng())[0] == expected


def test_bool_choice_is_unordered_and_resampled() -> None:
    """A boolean Choice is never treated as an int: it is resampled, giving only bools."""
    param = pt.Choice([True, False])
    assert param.ordered is False
    seen = set()
    for s in range(200):
        for factor in (0.8, 1.2):
            value, label = param.perturb(True, factor, rng(s))
            assert type(value) is bool and label == "resample"
            seen.add(value)
    assert seen == {True, False}  # resampled, not moved up/down an index


def test_string_choice_is_resampled_unless_declared_ordered() -> None:
    """Non-numeric choices are resampled; ordered=True makes them move to a neighbour."""
    assert pt.Choice(["sgd", "adam"]).ordered is False
    assert pt.Choice([1, "a"]).ordered is False
    ordered = pt.Choice(["small", "medium", "large"], ordered=True)
    assert ordered.perturb("small", 1.2, rng())[0] == "medium"
    assert ordered.perturb("medium", 0.8, rng())[0] == "small"
    numbers = pt.Choice([1, 2, 3], ordered=False)
    assert {numbers.perturb(2, 1.2, rng(s))[0] for s in range(100)} == {1, 2, 3}


@pytest.mark.parametrize(
    ("value", "factor", "expected"),
    [(32, 1.2, 64), (32, 0.8, 16), (128, 1.2, 128), (16, 0.8, 16), (64, 1.0, 64)],
)
def test_ordered_numeric_choice_moves_to_neighbour(
    value: int, factor: float, expected: int
) -> None:
    """Numbers in a Choice move one place up or down and stay put at the ends."""
    param = pt.Choice([16, 32, 64, 128])
    assert param.ordered is True
    assert param.perturb(value, factor, rng())[0] == expected


def test_linear_range_containing_zero_is_shifted_so_zero_can_move() -> None:
    """Dropout in [0, 0.5]: multiplying would pin 0 forever, so the value is shifted instead.

    The documented rule for a linear range with ``low <= 0``: new = value + (factor - 1) *
    (high - low), clipped. A factor of 1.2 moves 0 up by 0.2 * 0.5 = 0.1.
    """
    drop = pt.Float(0.0, 0.5)
    assert drop.perturb(0.0, 1.2, rng())[0] == pytest.approx(0.1)
    assert drop.perturb(0.0, 0.8, rng())[0] == 0.0  # clipped at low
    assert drop.perturb(0.25, 1.2, rng())[0] == pytest.approx(0.35)
    assert drop.perturb(0.45, 1.2, rng())[0] == 0.5  # clipped at high
    signed = pt.Float(-1.0, 1.0)
    assert signed.perturb(-0.1, 1.2, rng())[0] == pytest.approx(0.3)  # can cross zero


def test_log_and_positive_linear_ranges_multiply() -> None:
    """Log ranges and linear ranges with low > 0 move by multiplying the value."""
    lr = pt.Float(1e-5, 1e-1, log=True)
    assert lr.perturb(1e-3, 1.2, rng())[0] == pytest.approx(1.2e-3)
    assert lr.perturb(1e-3, 0.8, rng())[0] == pytest.approx(0.8e-3)
    assert lr.perturb(0.09, 1.2, rng())[0] == 0.1  # clipped at high
    linear = pt.Float(1e-4, 0.02)
    assert linear.perturb(0.01, 0.8, rng())[0] == pytest.approx(0.008)
    assert pt.Int(1, 4096, log=True).perturb(100, 1.2, rng())[0] == 120


def test_perturb_rule_override() -> None:
    """perturb='multiply' or 'shift' overrides the rule chosen from the range."""
    assert pt.Float(0.0, 1.0, perturb="multiply").perturb(0.0, 1.2, rng())[0] == 0.0
    assert pt.Float(0.0, 1.0, perturb="multiply").perturb(0.5, 1.2, rng())[0] == pytest.approx(0.6)
    shifted = pt.Float(0.1, 1.0, perturb="shift")
    assert shifted.perturb(0.5, 1.2, rng())[0] == pytest.approx(0.5 + 0.2 * 0.9)
    assert pt.Int(10, 20, perturb="shift").perturb(10, 1.2, rng())[0] == 12


def test_describe_is_json_ready() -> None:
    """A space describes every parameter with plain values (stored with a run)."""
    space = pt.Space(
        {
            "lr": pt.Float(1e-4, 1e-1, log=True),
            "n": pt.Int(1, 4, mutable=False),
            "c": pt.Choice([np.int64(1), True]),
        }
    )
    d = space.describe()
    assert d["lr"] == {
        "kind": "float",
        "low": 1e-4,
        "high": 1e-1,
        "log": True,
        "mutable": True,
        "perturb": "auto",
    }
    assert d["n"]["mutable"] is False
    assert d["c"]["values"] == [1, True] and type(d["c"]["values"][0]) is int
