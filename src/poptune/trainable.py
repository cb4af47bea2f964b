"""What users implement: one member's training, as a class or as two functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "FunctionTrainable",
    "MemberContext",
    "Metrics",
    "Trainable",
    "set_worker_device",
    "trainable",
    "worker_device",
]

_worker_device: str | None = None


def worker_device() -> str | None:
    """The device the executor gave this worker process (``"cuda:1"``, ``"cpu"``), or None."""
    return _worker_device


def set_worker_device(device: str | None) -> None:
    """Sets the device members built in this process train on (executors call it)."""
    global _worker_device
    _worker_device = device


Metrics = float | Mapping[str, float]
S = TypeVar("S")


@dataclass(frozen=True)
class MemberContext:
    """Who a trainable is, for logging: set by the executor before each stretch of training.

    Attributes:
        run: The run's name (``"run"`` for an in-memory run without one).
        member: The member's id.
        worker: The id of the worker training it (``host:pid:...``).
        step: The member's step when this stretch of training began.
        device: The worker's device (``devices=`` of `Experiment.run`), or None.
    """

    run: str
    member: int
    worker: str
    step: int
    device: str | None = None


class Trainable:
    """One member of the population: its model, optimizer and data stream.

    Subclasses implement `step`, `state_dict` and `load_state_dict`; `set_hparams` stores the
    new hyperparameters in ``self.hparams`` and may be overridden to apply them in place (say,
    to an optimizer's param groups). poptune always calls `set_hparams` *after*
    `load_state_dict`, so a loaded optimizer state never brings back the donor's old learning
    rate. `close` is called when the member leaves a worker (to free GPU memory, files...).

    When a trainable is built (its constructor runs; for a `poptune.torch.TorchTrainable`,
    its ``setup``): not once per member, but whenever a process needs the member live and holds
    no live trainable of it. That is when a worker first trains the member; every time a
    worker takes back a member it evicted from its cache of live trainables
    (`poptune.RunOptions.cache_size`, 3 by default: with 8 members on 2 workers it happens all
    the time) or that another worker trained last; when a retried member is restored; when a
    run resumes; when a member copies a donor whose ``mutable=False`` hyperparameters differ;
    in `poptune.Result.load_member`; and once in a replay (which trains from scratch). Each
    of these builds but a member's very first, a fresh replacement's and a replay's is
    followed by `load_state_dict` of the member's checkpoint, then `set_hparams`. So
    whatever the constructor creates and `state_dict` does not hold (an environment and its
    episodes in progress, a data loader's position, a counter) starts again from its seed on
    every rebuild. Put such state in `state_dict` (here, you write it), or in
    `poptune.torch.TorchTrainable.extra_state`, as plain data (numbers, strings, lists,
    dicts, numpy arrays: checkpoints are loaded safely unless the experiment sets
    ``allow_pickle=True``); it is then saved with every checkpoint and restored after every
    rebuild, and, like the weights, copied from the donor at an exploit. See
    ``docs/members.md``.

    Attributes:
        hparams: The hyperparameters in force.
        seed: This member's seed.
        context: A `MemberContext` (run, member, worker, step) once an executor trains it;
            None before.

    Args:
        hparams: This member's hyperparameters.
        seed: A seed distinct for each member, fixed by the experiment's seed.
    """

    context: MemberContext | None = None

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        self.hparams = dict(hparams)
        self.seed = seed

    def step(self) -> Metrics:
        """Trains for one unit (an epoch, some batches...) and returns its metrics."""
        raise NotImplementedError

    def state_dict(self) -> object:
        """Everything needed to continue training: weights, optimizer state, RNG state."""
        raise NotImplementedError

    def load_state_dict(self, state: Any) -> None:
        """Restores what `state_dict` returned (possibly another member's)."""
        raise NotImplementedError

    def set_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Applies new hyperparameters; called after any `load_state_dict`."""
        self.hparams = dict(hparams)

    def reseed(self, seed: int) -> bool:
        """Draws the member's randomness from ``seed`` from now on, instead of from the streams
        its checkpoint restored; returns whether it did.

        poptune calls it when it retries a failed member from its checkpoint, with a seed
        derived from the experiment's seed, the member, its step and the attempt (the same on
        every run, so a resumed run retries alike): a failure drawn from the member's own
        randomness (a bad batch from its shuffle, a diverging sample) is then not replayed
        exactly. The default cannot and returns False: a retry then replays the very same
        draws, and helps only against faults outside the member (a lost device, a full
        disk). `poptune.torch.TorchTrainable` re-seeds its own torch, numpy and random
        streams. Override it where your member keeps its own generator.
        """
        return False

    def close(self) -> None:
        """Releases what the member holds (GPU memory, open files) when it leaves a worker.

        A worker keeps a few members live (`poptune.RunOptions.cache_size`) and closes the
        others; a closed trainable is never used again. Does nothing by default.
        """


class FunctionTrainable(Trainable, Generic[S]):
    """A `Trainable` built from two plain functions (see `trainable`)."""

    def __init__(
        self,
        hparams: Mapping[str, Any],
        seed: int,
        *,
        init: Callable[[dict[str, Any], int], S],
        step: Callable[[S, dict[str, Any]], tuple[S, Metrics]],
    ) -> None:
        super().__init__(hparams, seed)
        self._step = step
        self.state: S = init(dict(hparams), seed)

    def step(self) -> Metrics:
        self.state, metrics = self._step(self.state, self.hparams)
        return metrics

    def state_dict(self) -> object:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


class _FunctionFactory:
    """Picklable factory ``(hparams, seed) -> FunctionTrainable`` (module-level functions)."""

    def __init__(self, init: Callable[..., Any], step: Callable[..., Any]) -> None:
        self.init, self.step = init, step
        self.__name__ = getattr(step, "__name__", "trainable")

    def __call__(self, hparams: Mapping[str, Any], seed: int) -> FunctionTrainable[Any]:
        return FunctionTrainable(hparams, seed, init=self.init, step=self.step)

    def __repr__(self) -> str:
        return f"pt.trainable(init={self.init!r}, step={self.step!r})"


def trainable(
    init: Callable[[dict[str, Any], int], S],
    step: Callable[[S, dict[str, Any]], tuple[S, Metrics]],
) -> Callable[[Mapping[str, Any], int], Trainable]:
    """Builds a trainable from functions, for small problems.

    Args:
        init: ``init(hparams, seed) -> state`` builds a member's state (any picklable value).
        step: ``step(state, hparams) -> (new_state, metrics)`` trains one unit. It should not
            modify ``state`` in place if other code may hold it; returning a new value is safest.

    Example:
        >>> import poptune as pt
        >>> counter = pt.trainable(init=lambda hp, seed: 0.0,
        ...                        step=lambda s, hp: (s + hp["lr"], s + hp["lr"]))
        >>> member = counter({"lr": 0.5}, seed=0)
        >>> member.step(), member.step()
        (0.5, 1.0)
    """
    if not callable(init) or not callable(step):
        raise ValueError(f"trainable: `init` and `step` must be callables, got {init!r}, {step!r}.")
    return _FunctionFactory(init, step)
