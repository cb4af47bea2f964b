"""Search spaces: the hyperparameters a population may take, their priors and how they move.

Each parameter kind knows three things: how to draw a value from its prior (``sample``), how
to move a value by a perturbation factor (``perturb``), and whether a value belongs to it
(``validate``). All randomness comes from a ``numpy.random.Generator`` passed in.

Perturbation rules (the "explore" step of PBT), chosen so that a value always stays legal:

* ``Float(log=True)`` and ``Int(log=True)``: multiply by the factor, then clip to the bounds.
* ``Float`` / ``Int`` on a linear range with ``low > 0``: multiply, then clip (as in the paper).
* ``Float`` / ``Int`` on a linear range with ``low <= 0`` (say dropout in ``[0, 0.5]``):
  multiplication would never move 0 and never flip a sign, so the value is *shifted* by
  ``(factor - 1) * (high - low)`` instead, then clipped. ``perturb="multiply"`` or
  ``perturb="shift"`` overrides the rule per parameter.
* ``Int``: after the move, the value is rounded *away* from where it was, so a perturbation up
  moves an integer up by at least one unit and a perturbation down by at least one unit
  (``int(2 * 1.2)`` would leave 2 where it was); then it is clipped.
* ``Choice`` of numbers (ordered): moves to the neighbouring value, up for a factor above 1 and
  down for a factor below 1, staying put at the ends. Other choices (strings, booleans, mixed)
  are unordered and are resampled. ``ordered=`` overrides the guess.
* ``mutable=False`` on any kind: drawn once for each initial member, then copied along its
  lineage and never perturbed or resampled. Use it for architecture hyperparameters (layer
  sizes) whose weights cannot be copied into another shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

PerturbRule = Literal["auto", "multiply", "shift"]

__all__ = ["Choice", "Float", "Int", "Parameter", "Space"]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


class Parameter:
    """Base class of a hyperparameter's declaration. Subclasses are frozen dataclasses."""

    mutable: bool

    def sample(self, rng: np.random.Generator) -> Any:
        """Draws a value from the prior."""
        raise NotImplementedError

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> tuple[Any, str]:
        """Moves ``value`` by ``factor``; returns the new value and a label of the move."""
        raise NotImplementedError

    def validate(self, name: str, value: Any) -> Any:
        """Returns ``value`` in canonical form, or raises ValueError naming the parameter."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, used to store and compare configurations."""
        raise NotImplementedError

    def _check(self, name: str) -> None:
        """Raises ValueError if the declaration itself is invalid."""


def _check_rule(name: str, rule: str) -> None:
    if rule not in ("auto", "multiply", "shift"):
        raise ValueError(
            f"Parameter {name!r}: `perturb` must be 'auto', 'multiply' or 'shift', "
            f"but got {rule!r}."
        )


def _numeric_rule(low: float, log: bool, rule: PerturbRule) -> str:
    if rule != "auto":
        return rule
    return "multiply" if (log or low > 0) else "shift"


@dataclass(frozen=True, init=False)
class _Numeric(Parameter):
    """What `Float` and `Int` share: bounds, scale, the perturbation rule, the checks."""

    low: Any
    high: Any
    log: bool = False
    mutable: bool = True
    perturb_rule: PerturbRule = field(default="auto", kw_only=True)

    def __init__(
        self,
        low: Any,
        high: Any,
        log: bool = False,
        *,
        mutable: bool = True,
        perturb: PerturbRule = "auto",
    ) -> None:
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "log", log)
        object.__setattr__(self, "mutable", mutable)
        object.__setattr__(self, "perturb_rule", perturb)

    def _check_range(self, name: str) -> None:
        low, high = self.low, self.high
        if not low < high:
            raise ValueError(
                f"Parameter {name!r}: `low < high` must hold, but got ({low=}, {high=})."
            )
        if self.log and low <= 0:
            raise ValueError(
                f"Parameter {name!r}: a log-scale range needs `low > 0`, but got ({low=}, {high=})."
            )
        _check_rule(name, self.perturb_rule)

    def _move(self, value: float, factor: float) -> tuple[float, str]:
        """The value moved by ``factor`` under this parameter's rule (before rounding/clipping)."""
        if _numeric_rule(self.low, self.log, self.perturb_rule) == "multiply":
            return value * factor, f"*{factor:g}"
        moved = value + (factor - 1.0) * (self.high - self.low)
        return moved, f"{'+' if factor >= 1 else '-'}{abs(factor - 1.0):g}*range"

    def _clip(self, value: Any) -> Any:
        return min(max(value, self.low), self.high)

    def _out_of_range(self, name: str, value: Any) -> ValueError:
        return ValueError(
            f"Parameter {name!r}: value must lie in [{self.low}, {self.high}], but got {value!r}."
        )

    def _describe(self, kind: str, low: Any, high: Any) -> dict[str, Any]:
        return {
            "kind": kind,
            "low": low,
            "high": high,
            "log": self.log,
            "mutable": self.mutable,
            "perturb": self.perturb_rule,
        }


@dataclass(frozen=True, init=False)
class Float(_Numeric):
    """A real hyperparameter in ``[low, high]``, uniform or log-uniform.

    Example:
        >>> import numpy as np
        >>> lr = Float(1e-4, 1e-1, log=True)
        >>> 1e-4 <= lr.sample(np.random.default_rng(0)) <= 1e-1
        True
    """

    low: float
    high: float

    def _check(self, name: str) -> None:
        low, high = self.low, self.high
        if not (_is_number(low) and _is_number(high)):
            raise ValueError(
                f"Parameter {name!r}: bounds must be numbers, but got ({low=}, {high=})."
            )
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                f"Parameter {name!r}: bounds must be finite, but got ({low=}, {high=})."
            )
        self._check_range(name)

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(np.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> tuple[float, str]:
        moved, label = self._move(float(value), factor)
        return float(self._clip(moved)), label

    def validate(self, name: str, value: Any) -> float:
        if not _is_number(value) or not math.isfinite(float(value)):
            raise ValueError(f"Parameter {name!r}: expected a finite number, but got {value!r}.")
        if not self.low <= float(value) <= self.high:
            raise self._out_of_range(name, value)
        return float(value)

    def describe(self) -> dict[str, Any]:
        return self._describe("float", self.low, self.high)


@dataclass(frozen=True, init=False)
class Int(_Numeric):
    """An integer hyperparameter in ``[low, high]`` (both included), uniform or log-uniform."""

    low: int
    high: int

    def _check(self, name: str) -> None:
        low, high = self.low, self.high
        ints = all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (low, high)
        )
        if not ints:
            raise ValueError(
                f"Parameter {name!r}: bounds must be integers, but got ({low=}, {high=})."
            )
        self._check_range(name)

    def sample(self, rng: np.random.Generator) -> int:
        if self.log:
            # Log-uniform over the integers: draw in [low, high + 1) on a log scale, then floor.
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
            return int(min(max(math.floor(x), self.low), self.high))
        return int(rng.integers(self.low, self.high + 1))

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> tuple[int, str]:
        current = int(value)
        moved, label = self._move(current, factor)
        # Round away from where it was: int(2 * 1.2) would leave 2 where it is.
        if factor > 1:
            new = max(math.ceil(moved), current + 1)
        elif factor < 1:
            new = min(math.floor(moved), current - 1)
        else:
            new = current
        return int(self._clip(new)), label

    def validate(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not (
            isinstance(value, (int, np.integer))
            or (isinstance(value, (float, np.floating)) and float(value).is_integer())
        ):
            raise ValueError(f"Parameter {name!r}: expected an integer, but got {value!r}.")
        if not self.low <= int(value) <= self.high:
            raise self._out_of_range(name, value)
        return int(value)

    def describe(self) -> dict[str, Any]:
        return self._describe("int", int(self.low), int(self.high))


@dataclass(frozen=True)
class Choice(Parameter):
    """One of a list of values.

    A choice among numbers is *ordered*: perturbation moves it to a neighbouring value. Any other
    choice (strings, booleans, a mix) is unordered: perturbation resamples it. ``ordered=True`` or
    ``ordered=False`` overrides that guess (ordered values are kept in the order given).
    """

    values: tuple[Any, ...]
    ordered: bool
    mutable: bool = True

    def __init__(
        self, values: Sequence[Any], *, ordered: bool | None = None, mutable: bool = True
    ) -> None:
        vals = tuple(values) if not isinstance(values, (str, bytes)) else (values,)
        if ordered is None:
            ordered = len(vals) > 0 and all(_is_number(v) for v in vals)
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "ordered", bool(ordered))
        object.__setattr__(self, "mutable", mutable)

    def _check(self, name: str) -> None:
        if len(self.values) == 0:
            raise ValueError(
                f"Parameter {name!r}: a Choice needs at least one value, but got none."
            )
        if any(_is_number(v) and math.isnan(float(v)) for v in self.values):
            # NaN equals nothing, itself included: no member given it could be validated,
            # restored or compared again.
            raise ValueError(
                f"Parameter {name!r}: Choice values must not be NaN, but got {list(self.values)!r}."
            )
        seen: list[Any] = []
        for v in self.values:
            if any(_same(v, s) for s in seen):
                raise ValueError(
                    f"Parameter {name!r}: Choice values must be distinct; {v!r} repeats."
                )
            seen.append(v)

    def _index(self, value: Any) -> int:
        for i, v in enumerate(self.values):
            if _same(v, value):
                return i
        return -1

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> tuple[Any, str]:
        if not self.ordered:
            return self.sample(rng), "resample"
        i = self._index(value)
        if factor > 1:
            j = min(i + 1, len(self.values) - 1)
        elif factor < 1:
            j = max(i - 1, 0)
        else:
            j = i
        return self.values[j], "up" if factor > 1 else ("down" if factor < 1 else "stay")

    def validate(self, name: str, value: Any) -> Any:
        i = self._index(value)
        if i < 0:
            raise ValueError(
                f"Parameter {name!r}: value must be one of {list(self.values)!r}, "
                f"but got {value!r}."
            )
        return self.values[i]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "choice",
            "values": [_jsonable(v) for v in self.values],
            "ordered": self.ordered,
            "mutable": self.mutable,
        }


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python, but a boolean choice is not the integer 1.
    if isinstance(a, (bool, np.bool_)) != isinstance(b, (bool, np.bool_)):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return repr(value)


class Space(Mapping[str, Parameter]):
    """A validated, ordered mapping of hyperparameter names to their declarations.

    Example:
        >>> import numpy as np
        >>> space = Space({"lr": Float(1e-4, 1e-1, log=True), "batch": Choice([32, 64])})
        >>> sorted(space.sample(np.random.default_rng(0)))
        ['batch', 'lr']
    """

    def __init__(self, parameters: Mapping[str, Parameter]) -> None:
        if isinstance(parameters, Space):
            parameters = dict(parameters.items())
        if not isinstance(parameters, Mapping):
            raise ValueError(
                f"`space` must be a mapping of names to poptune parameters, but got {parameters!r}."
            )
        if len(parameters) == 0:
            raise ValueError("`space` must declare at least one hyperparameter, but got none.")
        checked: dict[str, Parameter] = {}
        for name, param in parameters.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"Hyperparameter names must be non-empty strings, but got {name!r}."
                )
            if not isinstance(param, Parameter):
                raise ValueError(
                    f"Parameter {name!r}: expected pt.Float, pt.Int or pt.Choice, "
                    f"but got {param!r}."
                )
            param._check(name)
            checked[name] = param
        self._params = checked

    def __getitem__(self, name: str) -> Parameter:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return f"Space({self._params!r})"

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """Draws one full set of hyperparameters from the priors."""
        return {name: param.sample(rng) for name, param in self._params.items()}

    def validate(
        self, hparams: Mapping[str, Any], *, where: str = "hyperparameters"
    ) -> dict[str, Any]:
        """Checks that ``hparams`` names exactly this space's parameters with legal values."""
        if not isinstance(hparams, Mapping):
            raise ValueError(f"{where}: expected a dict of hyperparameters, but got {hparams!r}.")
        unknown = [k for k in hparams if k not in self._params]
        if unknown:
            raise ValueError(
                f"{where}: unknown hyperparameter(s) {unknown!r}; the space declares "
                f"{list(self._params)!r}."
            )
        missing = [k for k in self._params if k not in hparams]
        if missing:
            raise ValueError(f"{where}: missing hyperparameter(s) {missing!r}.")
        return {name: param.validate(name, hparams[name]) for name, param in self._params.items()}

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description of every parameter."""
        return {name: param.describe() for name, param in self._params.items()}
