"""PyTorch members whose hyperparameters stick (``pip install 'poptune[torch]'``).

`TorchTrainable` does the plumbing a PyTorch member needs under PBT:

* ``state_dict`` / ``load_state_dict`` gather every ``nn.Module``, optimizer and LR scheduler
  held in an attribute, and the member's random number generators (torch CPU and CUDA, numpy's
  global generator, Python's ``random``), so a member that copies another continues exactly
  where the donor was. Extend them with `TorchTrainable.extra_state` and
  `TorchTrainable.load_extra_state`.
* Each member has its *own* random streams, even when several share a process (the serial
  executor, a worker's cache): the global generators are swapped in for `setup` and every
  ``step`` and swapped out after, so a member's draws never depend on who trained before it.
* Hyperparameters reach the live objects through ``hparam_targets``, after every load (a
  restored optimizer state brings back the donor's old lr; ray#36660): ``"optimizer.lr"`` sets a
  field of every param group of ``self.optimizer`` (lr, weight_decay, momentum, betas, eps,
  ...; ``"optimizer.betas.0"`` sets one element), ``"model.drop.p"`` an attribute path on
  ``self``, ``"scheduler.base_lrs"`` every base lr of an LR scheduler (its param groups'
  current lr moves with it, keeping the schedule's factor), and a callable ``f(self, value)``
  anything else. A target that does not exist is an error when the member is built, naming it.
* ``self.device`` is the member's device: the executor's (``devices=`` of `Experiment.run`),
  else CUDA when available, else the CPU. Checkpoints are written with ``torch.save`` and read
  with ``weights_only=True`` when the state allows; one saved on CUDA loads on a CPU machine.
* `close` frees the member's modules and optimizers (and cached GPU memory) when it leaves a
  worker.

Example:
    >>> import torch
    >>> from poptune.torch import TorchTrainable
    >>> class Member(TorchTrainable):
    ...     hparam_targets = {"lr": "optimizer.lr"}
    ...     def setup(self):
    ...         self.model = torch.nn.Linear(2, 1).to(self.device)
    ...         self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.hparams["lr"])
    ...     def step(self):
    ...         loss = self.model(torch.randn(8, 2, device=self.device)).pow(2).mean()
    ...         self.optimizer.zero_grad(); loss.backward(); self.optimizer.step()
    ...         return {"loss": loss.item()}
    >>> m = Member({"lr": 0.1}, seed=0, device="cpu")
    >>> m.set_hparams({"lr": 0.05}); m.optimizer.param_groups[0]["lr"]
    0.05
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from poptune.trainable import Trainable, worker_device

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "poptune.torch needs PyTorch: pip install 'poptune[torch]' (or install torch first)."
    ) from e

__all__ = ["TorchTrainable", "default_device"]

Target = str | Callable[[Any, Any], None]


def default_device() -> str:
    """The executor's device for this worker, else ``"cuda"`` when available, else ``"cpu"``."""
    given = worker_device()
    if given is not None:
        return given
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Streams:
    """A member's own copies of the global random generators."""

    def __init__(self, seed: int) -> None:
        self.state: dict[str, Any] | None = None
        self.seed = seed

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outside = _capture()
        if self.state is None:
            _seed_all(self.seed)
        else:
            _restore(self.state)
        try:
            yield
        finally:
            self.state = _capture()
            _restore(outside)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _capture() -> dict[str, Any]:
    mt: Any = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # Plain lists, so that a checkpoint loads with torch.load(weights_only=True).
        "numpy": [str(mt[0]), [int(x) for x in mt[1]], int(mt[2]), int(mt[3]), float(mt[4])],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda][:count])


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


_SCHEDULER = torch.optim.lr_scheduler.LRScheduler


def _kind(value: object) -> str | None:
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(value, _SCHEDULER):
        return "scheduler"
    return None


class TorchTrainable(Trainable):
    """A PBT member built on PyTorch (see the module docstring).

    Subclasses implement `setup` (build the model, optimizer, scheduler, data) and ``step``
    (train one unit and return metrics), and say in ``hparam_targets`` where each
    hyperparameter lives.

    Args:
        hparams: The member's hyperparameters.
        seed: The member's seed: its random streams start from it.
        device: The device to build on; by default `default_device`.
    """

    #: Where each hyperparameter lives: an attribute path on ``self`` (``"optimizer.lr"``,
    #: ``"model.drop.p"``, ``"scheduler.base_lrs"``) or a callable ``f(self, value)``.
    hparam_targets: ClassVar[Mapping[str, Target]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_poptune_streams", False):
            cls.step = _with_streams(step)  # type: ignore[method-assign]

    def __init__(self, hparams: Mapping[str, Any], seed: int, device: str | None = None) -> None:
        super().__init__(hparams, seed)
        self.device = torch.device(device if device is not None else default_device())
        self._streams = _Streams(seed)
        with self._streams.active():
            self.setup()
        self._check_targets()
        self._apply(self.hparams)

    # -- what subclasses write ---------------------------------------------------------------

    def setup(self) -> None:
        """Builds the member: model, optimizer, scheduler, data. ``self.hparams``,
        ``self.seed`` and ``self.device`` are set, and the member's random streams are on."""
        raise NotImplementedError

    def extra_state(self) -> Any:
        """The member's state outside its modules, optimizers and schedulers: saved with every
        checkpoint (returned by `state_dict`), so that it survives a rebuild.

        A worker builds a member again (``setup`` runs again) whenever it takes back a member
        it evicted from its cache of live trainables, or one another worker trained last (see
        `poptune.Trainable`): what ``setup`` creates starts again from its seed. Return here
        what must go on instead, such as a data loader's position, an episode counter or the
        offset of the next environment seed, as plain data (numbers, strings, lists, dicts,
        numpy arrays; tensors too): checkpoints are loaded safely unless the experiment sets
        ``allow_pickle=True``. None by default.

        Example:
            >>> def extra_state(self):  # doctest: +SKIP
            ...     return {"batch": self.batch, "episodes": self.episodes}
        """
        return None

    def load_extra_state(self, state: Any) -> None:
        """Restores what `extra_state` returned, after every load: the member's own checkpoint
        after a rebuild, or a donor's at an exploit (the extra state follows the weights). It
        runs after ``setup`` on a rebuilt member, and before `set_hparams`. ``state`` is None
        for a checkpoint whose `extra_state` returned None."""

    # -- state -------------------------------------------------------------------------------

    def _parts(self) -> dict[str, tuple[str, Any]]:
        return {
            name: (kind, value)
            for name, value in vars(self).items()
            if not name.startswith("_") and (kind := _kind(value)) is not None
        }

    def state_dict(self) -> dict[str, Any]:
        """Every module, optimizer and scheduler attribute, the random streams, extra state."""
        parts = {name: value.state_dict() for name, (_, value) in self._parts().items()}
        if self._streams.state is None:  # never stepped: its streams are still the seed's
            with self._streams.active():
                pass
        return {"parts": parts, "rng": self._streams.state, "extra": self.extra_state()}

    def load_state_dict(self, state: Any) -> None:
        """Loads a state `state_dict` returned (possibly another member's, possibly saved on
        another device); call `set_hparams` after it (poptune does)."""
        parts = self._parts()
        missing = sorted(set(state["parts"]) - set(parts))
        if missing:
            raise ValueError(
                f"The checkpoint holds {missing}, which this member does not have: its setup() "
                "must build the same attributes."
            )
        # Modules first: an optimizer's state is cast to the device of its parameters.
        for name, (_, value) in sorted(parts.items(), key=lambda p: p[1][0] != "module"):
            if name in state["parts"]:
                value.load_state_dict(state["parts"][name])
        self._streams.state = state["rng"]
        self.load_extra_state(state.get("extra"))

    def reseed(self, seed: int) -> bool:
        """Re-seeds the member's own torch, numpy and random streams (see
        `poptune.Trainable.reseed`): its next step draws from ``seed``."""
        self._streams = _Streams(seed)
        return True

    # -- hyperparameters ---------------------------------------------------------------------

    def set_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Stores the hyperparameters and sets every target (called after every load)."""
        super().set_hparams(hparams)
        self._apply(self.hparams)

    def _apply(self, hparams: Mapping[str, Any]) -> None:
        for name, target in self.hparam_targets.items():
            if name in hparams:
                _set(self, name, target, hparams[name])

    def _check_targets(self) -> None:
        unknown = sorted(set(self.hparam_targets) - set(self.hparams))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.hparam_targets names {unknown}, which are not "
                f"hyperparameters of this member (it has {sorted(self.hparams)})."
            )
        for name, target in self.hparam_targets.items():
            if not callable(target):
                _resolve(self, name, target)  # raises, naming it, when it does not exist

    def close(self) -> None:
        """Drops the member's modules, optimizers and schedulers and frees cached GPU memory."""
        for name in list(self._parts()):
            delattr(self, name)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _with_streams(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def wrapped(self: TorchTrainable) -> Any:
        with self._streams.active():
            return step(self)

    wrapped._poptune_streams = True  # type: ignore[attr-defined]
    return wrapped


def _resolve(owner: Any, name: str, path: str) -> tuple[Any, list[str]]:
    """The object a target path starts from (an optimizer or scheduler, or the parent of the
    last attribute) and the rest of the path."""
    parts = path.split(".")
    obj = owner
    for i, attr in enumerate(parts):
        kind = _kind(obj)
        if kind in ("optimizer", "scheduler") and i > 0:
            rest = parts[i:]
            _check_field(obj, kind, rest, name, path)
            return obj, rest
        if i == len(parts) - 1:
            if not hasattr(obj, attr):
                break
            return obj, [attr]
        if not hasattr(obj, attr):
            break
        obj = getattr(obj, attr)
    raise ValueError(
        f"hparam_targets[{name!r}] = {path!r} does not exist on this member: no attribute "
        f"{'.'.join(parts[: i + 1])!r} after setup()."
    )


def _check_field(obj: Any, kind: str, rest: list[str], name: str, path: str) -> None:
    if kind == "optimizer":
        group = obj.param_groups[0]
        if rest[0] not in group:
            raise ValueError(
                f"hparam_targets[{name!r}] = {path!r}: the optimizer's param groups have no "
                f"{rest[0]!r} (they have {sorted(k for k in group if k != 'params')})."
            )
    elif rest[0] not in ("base_lrs", "base_lr"):
        raise ValueError(
            f"hparam_targets[{name!r}] = {path!r}: an LR scheduler target must be "
            f"'base_lrs', but got {rest[0]!r}."
        )


def _set(owner: Any, name: str, target: Target, value: Any) -> None:
    if callable(target):
        target(owner, value)
        return
    obj, rest = _resolve(owner, name, target)
    kind = _kind(obj)
    if kind == "optimizer":
        for group in obj.param_groups:
            _set_field(group, rest, value)
    elif kind == "scheduler":
        # The schedule's current factor is kept: each group's lr moves with its base lr.
        for i, group in enumerate(obj.optimizer.param_groups):
            old = obj.base_lrs[i]
            if old:
                group["lr"] = group["lr"] * float(value) / old
            group["initial_lr"] = float(value)
        obj.base_lrs = [float(value)] * len(obj.base_lrs)
    else:
        setattr(obj, rest[0], value)


def _set_field(group: dict[str, Any], rest: list[str], value: Any) -> None:
    if len(rest) == 1:
        group[rest[0]] = value
        return
    current = list(group[rest[0]])
    current[int(rest[1])] = value
    group[rest[0]] = type(group[rest[0]])(current)
