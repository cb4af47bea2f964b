"""What a logger receives: the `Logger` hooks and the records handed to them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poptune.result import Event, Result

__all__ = ["LoggedRun", "LoggedStep", "Logger"]


@dataclass(frozen=True)
class LoggedRun:
    """The run a logger is about to receive.

    Attributes:
        name: The run's name.
        metric: The metric that is the score; ``mode``: ``"max"`` or ``"min"``.
        population_size: Members at the start.
        steps: Steps each member trains for.
        hparams: The hyperparameters' names.
    """

    name: str
    metric: str
    mode: str
    population_size: int
    steps: int
    hparams: tuple[str, ...]


@dataclass(frozen=True)
class LoggedStep:
    """One step one member trained, with the hyperparameters it trained with.

    Attributes:
        member: The member.
        step: Its step after this one.
        metrics: What its ``step()`` returned.
        score: The metric that is the score.
        hparams: The hyperparameters in force for this step.
        segment: The index of the lineage event that began this stretch of the member's
            life (None: its initial stretch); see `poptune.HistoryRecord`.
        device: The device it was trained on, if the run said.
    """

    member: int
    step: int
    metrics: Mapping[str, float]
    score: float
    hparams: Mapping[str, Any]
    segment: int | None = None
    device: str | None = None


class Logger:
    """Receives a run's results and lineage events, in the order they were committed.

    Subclass it and override what you need; every hook does nothing by default. Loggers are
    fed by `poptune.loggers.LogFeed`, which follows the run's storage from a thread of the
    process that called `poptune.Experiment.run`: never from the workers, never inside a
    training step. A logger that raises is dropped for the rest of the run (with a warning on
    the ``poptune`` logger); the run goes on.

    The order is the storage's: a member's results come in step order; an event comes after
    every result committed before it or with it (the member's own steps up to ``event.step``
    and the donor's up to ``event.donor_step``), and before the first result of the stretch
    it began.
    """

    def start(self, run: LoggedRun) -> None:
        """Called once, before anything else."""

    def on_result(self, step: LoggedStep) -> None:
        """One step one member trained."""

    def on_event(self, event: Event, bridge: Sequence[LoggedStep]) -> None:
        """An exploit, explore or replacement (`poptune.Event`).

        ``bridge``: when the member took a donor's state, the donor's recorded steps from the
        member's step (``event.step``) to the step of the state it took (``event.donor_step``),
        oldest first: the stretch of the donor's curve the member's own continues from. Empty
        for an explore of the member's own state and for a fresh replacement.
        """

    def flush(self) -> None:
        """Called after each batch of records: write out what is buffered."""

    def close(self, result: Result | None) -> None:
        """Called once, after the last record, with the run's `poptune.Result` as it ended
        (None if it could not be read)."""
