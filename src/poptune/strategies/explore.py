"""Explore strategies: move the hyperparameters a member carries on with.

An explore strategy is called as ``explore(hparams, space, rng) -> (new_hparams, operations)``,
always with the *donor's* hyperparameters after an exploit. ``operations`` names what happened
to each hyperparameter that was touched (``"*1.2"``, ``"resample"``, ``"up"``...): it is stored
in the lineage. Parameters declared ``mutable=False`` are never touched.

Any plain callable ``fn(hparams, rng) -> dict`` may be passed where an explore strategy is
expected. What every strategy returns is checked against the space (`explore_checked`, which
the `poptune.PBT` controller calls): a value out of its range, not finite, or a change to a
``mutable=False`` parameter raises `ExploreError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from poptune.space import Space

__all__ = [
    "Explore",
    "ExploreError",
    "FunctionExplore",
    "Perturb",
    "Resample",
    "as_explore",
    "explore_checked",
]

Operations = dict[str, str]


class Explore:
    """Base class of explore strategies."""

    def __call__(
        self, hparams: Mapping[str, Any], space: Space, rng: np.random.Generator
    ) -> tuple[dict[str, Any], Operations]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, used to store and compare configurations."""
        return {"kind": type(self).__name__}


class ExploreError(ValueError):
    """An explore strategy raised, or returned hyperparameters outside the space.

    A configuration error: the decision that called it draws from a seeded stream, so the
    same decision would fail the same way again.
    """


def strategy_name(explore: Explore) -> str:
    """How messages name a strategy: ``explore function 'fn'`` or ``explore strategy Kind``."""
    if isinstance(explore, FunctionExplore):
        return f"explore function {getattr(explore.fn, '__name__', repr(explore.fn))!r}"
    return f"explore strategy {type(explore).__name__}"


def check_explored(
    explore: Explore, old: Mapping[str, Any], new: object, space: Space
) -> dict[str, Any]:
    """``new``, the hyperparameters ``explore`` returned from ``old``, in canonical form.

    Raises:
        ExploreError: ``new`` is not a full set of legal values of ``space``, or it changes a
            ``mutable=False`` parameter; the message names the strategy, the hyperparameter
            and the value.
    """
    who = strategy_name(explore)
    try:
        checked = space.validate(new, where=f"{who} returned")  # type: ignore[arg-type]
    except ValueError as e:
        # Space.validate names the parameter and the value; `where` is only in the messages
        # about the whole dict.
        per_parameter = str(e).startswith("Parameter ")
        raise ExploreError(
            f"{who} returned a value outside the space: {e}" if per_parameter else str(e)
        ) from None
    for key, param in space.items():
        if not param.mutable and checked[key] != old[key]:
            raise ExploreError(
                f"{who} changed {key!r} from {old[key]!r} to {checked[key]!r}, but it is "
                "declared mutable=False."
            )
    return checked


def explore_checked(
    explore: Explore, hparams: Mapping[str, Any], space: Space, rng: np.random.Generator
) -> tuple[dict[str, Any], Operations]:
    """Calls ``explore`` and checks what it returns (`check_explored`).

    Raises:
        ExploreError: The strategy raised, or returned hyperparameters outside the space.
    """
    try:
        new, ops = explore(hparams, space, rng)
    except ExploreError:
        raise
    except Exception as e:
        raise ExploreError(f"{strategy_name(explore)} raised {type(e).__name__}: {e}") from e
    return check_explored(explore, hparams, new, space), ops


def _check_probability(owner: str, name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{owner}: `0 <= {name} <= 1` must hold, but got {name}={p!r}.")
    return float(p)


@dataclass(frozen=True)
class Perturb(Explore):
    """Perturbs each mutable hyperparameter by a factor drawn from ``factors``.

    With probability ``resample_probability`` a hyperparameter is redrawn from its prior
    instead. How a factor moves each kind of parameter is described in :mod:`poptune.space`.

    Args:
        factors: The factors to draw from, uniformly; each must be a positive number.
        resample_probability: Chance, per hyperparameter, of a redraw from the prior.
    """

    factors: tuple[float, ...] = (0.8, 1.2)
    resample_probability: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.factors, (int, float)) or not isinstance(self.factors, Sequence):
            raise ValueError(f"Perturb: `factors` must be a sequence, but got {self.factors!r}.")
        factors = tuple(self.factors)
        if not factors:
            raise ValueError("Perturb: `factors` must hold at least one factor, but got none.")
        for f in factors:
            bad = isinstance(f, bool) or not isinstance(f, (int, float))
            if bad or not math.isfinite(f) or f <= 0:
                raise ValueError(f"Perturb: every factor must be `> 0` and finite, but got {f!r}.")
        object.__setattr__(self, "factors", tuple(float(f) for f in factors))
        _check_probability("Perturb", "resample_probability", self.resample_probability)

    def __call__(
        self, hparams: Mapping[str, Any], space: Space, rng: np.random.Generator
    ) -> tuple[dict[str, Any], Operations]:
        new = dict(hparams)
        ops: Operations = {}
        for name, param in space.items():
            if not param.mutable:
                continue
            if rng.random() < self.resample_probability:
                new[name], ops[name] = param.sample(rng), "resample"
            else:
                factor = self.factors[int(rng.integers(len(self.factors)))]
                new[name], ops[name] = param.perturb(new[name], factor, rng)
        return new, ops

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "Perturb",
            "factors": list(self.factors),
            "resample_probability": self.resample_probability,
        }


@dataclass(frozen=True)
class Resample(Explore):
    """Redraws each mutable hyperparameter from its prior with probability ``probability``."""

    probability: float = 0.25

    def __post_init__(self) -> None:
        _check_probability("Resample", "probability", self.probability)

    def __call__(
        self, hparams: Mapping[str, Any], space: Space, rng: np.random.Generator
    ) -> tuple[dict[str, Any], Operations]:
        new = dict(hparams)
        ops: Operations = {}
        for name, param in space.items():
            if param.mutable and rng.random() < self.probability:
                new[name], ops[name] = param.sample(rng), "resample"
        return new, ops

    def describe(self) -> dict[str, Any]:
        return {"kind": "Resample", "probability": self.probability}


class FunctionExplore(Explore):
    """Wraps a user function ``fn(hparams, rng) -> new_hparams`` as an explore strategy.

    The function receives a copy of the hyperparameters; what it returns is checked against the
    space (every name present, every value legal, immutable parameters unchanged): else
    `ExploreError`.
    """

    def __init__(self, fn: Callable[[dict[str, Any], np.random.Generator], Mapping[str, Any]]):
        if not callable(fn):
            raise ValueError(f"explore: expected a callable, but got {fn!r}.")
        self.fn = fn

    def __call__(
        self, hparams: Mapping[str, Any], space: Space, rng: np.random.Generator
    ) -> tuple[dict[str, Any], Operations]:
        new = check_explored(self, hparams, self.fn(dict(hparams), rng), space)
        ops = {k: "custom" for k in space if new[k] != hparams[k]}
        return new, ops

    def describe(self) -> dict[str, Any]:
        fn = self.fn
        return {"kind": "function", "name": str(getattr(fn, "__qualname__", repr(fn)))}

    def __repr__(self) -> str:
        return f"FunctionExplore({self.fn!r})"


def as_explore(explore: object) -> Explore | None:
    """Turns what a user passed as ``explore=`` into an `Explore` (or None for no explore)."""
    if explore is None or isinstance(explore, Explore):
        return explore
    if callable(explore):
        return FunctionExplore(explore)
    raise ValueError(
        f"`explore` must be pt.Perturb, pt.Resample, a callable (hparams, rng) -> dict or None, "
        f"but got {explore!r}."
    )
