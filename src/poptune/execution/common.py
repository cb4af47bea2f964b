"""Pieces shared by every runner: building members, reading scores, applying decisions."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from poptune.controller import Decision, member_seed
from poptune.result import Event
from poptune.trainable import Trainable

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = ["apply_decision", "build_member", "event_from_decision", "read_metrics"]


def build_member(experiment: Experiment, member: int, hparams: Mapping[str, Any]) -> Trainable:
    """Constructs a member's trainable from its hyperparameters and its own seed."""
    trainable = experiment.trainable(dict(hparams), member_seed(experiment.seed, member))
    if not isinstance(trainable, Trainable):
        raise TypeError(
            f"`trainable` must build a pt.Trainable, but {experiment.trainable!r} returned "
            f"{type(trainable).__name__}."
        )
    return trainable


_warned_missing: set[tuple[str, str]] = set()


def read_metrics(raw: object, metric: str) -> tuple[dict[str, float], float]:
    """Turns what ``step()`` returned into a metrics dict and the score (NaN when missing)."""
    if isinstance(raw, Mapping):
        metrics = {str(k): float(v) for k, v in raw.items()}
        score = metrics.get(metric)
        if score is None:
            key = (metric, ",".join(sorted(metrics)))
            if key not in _warned_missing:
                _warned_missing.add(key)
                warnings.warn(
                    f"step() returned no {metric!r} (it returned {sorted(metrics)}); the score is "
                    "NaN, which ranks worst.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return metrics, math.nan
        return metrics, score
    try:
        score = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(
            f"step() must return a number or a dict of numbers, but returned {raw!r}."
        ) from None
    return {metric: score}, score


def apply_decision(
    experiment: Experiment,
    trainable: Trainable,
    decision: Decision,
    donor_state: Any,
) -> Trainable:
    """Makes a member's trainable follow a decision; returns the (possibly rebuilt) trainable.

    The donor's state is loaded first and the new hyperparameters applied after, so framework
    state (an optimizer's lr) never overrides them. When a ``mutable=False`` hyperparameter
    (an architecture choice) differs, the member is rebuilt with the donor's before loading.
    """
    assert decision.hparams is not None
    hparams = dict(decision.hparams)
    if decision.copies_state or decision.donor is None:
        rebuild = decision.donor is None or any(
            not p.mutable and trainable.hparams.get(k) != hparams[k]
            for k, p in experiment.space.items()
        )
        if rebuild:
            trainable = build_member(experiment, decision.member, hparams)
        if donor_state is not None:
            trainable.load_state_dict(donor_state)
    trainable.set_hparams(hparams)
    return trainable


def event_from_decision(index: int, d: Decision, kind: str | None = None) -> Event:
    """The lineage record of a decision that changed a member."""
    return Event(
        index=index,
        member=d.member,
        step=d.step,
        donor=d.donor,
        donor_step=d.donor_step,
        old_hparams=dict(d.old_hparams or {}),
        new_hparams=dict(d.hparams or {}),
        operations=dict(d.operations),
        kind=kind or d.action,
    )
