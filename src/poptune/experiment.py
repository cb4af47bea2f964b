"""`Experiment`: a PBT run's whole configuration, and `run()` to execute it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from poptune.controller import PBT
from poptune.result import Result
from poptune.space import Parameter, Space
from poptune.strategies.exploit import Exploit, Truncation
from poptune.strategies.explore import Perturb
from poptune.trainable import Trainable

if TYPE_CHECKING:
    from rich.console import Console

    from poptune.execution.session import RunOptions
    from poptune.loggers import Logger
    from poptune.storage.base import Storage

__all__ = ["Experiment"]

TrainableFactory = Callable[[Mapping[str, Any], int], Trainable]


class Experiment:
    """A Population Based Training experiment.

    An experiment is immutable: its attributes are read-only (setting one raises
    `AttributeError`); `replace` builds a changed copy. It pickles, for worker processes.

    Args:
        trainable: A `Trainable` subclass, or any callable ``(hparams, seed) -> Trainable``
            (see `poptune.trainable` for the two-function form).
        space: The hyperparameters: a dict of names to `Float`, `Int` and `Choice`.
        population_size: Number of members trained side by side (at least 2).
        steps: Steps each member trains for.
        interval: Steps between a member's ready points.
        burn_in: No member is judged before this step.
        metric: The key of the metrics dict that is the score (a float returned by ``step`` is
            taken as this metric).
        mode: ``"max"`` if a higher score is better, ``"min"`` if lower is.
        exploit: `Truncation`, `TTest`, `Tournament`, your own `Exploit`, or None for no
            exploit (with an explore strategy: each ready member explores its own hparams).
        explore: `Perturb`, `Resample`, a callable ``(hparams, rng) -> dict``, or None.
        synchronous: Judge whole generations at a barrier instead of each member on arrival.
        seed: Seeds everything: initial hyperparameters, members' seeds, every decision.
        initial_hparams: Optional explicit hyperparameters, one dict per member.
        allow_pickle: Let checkpoints hold arbitrary Python objects (instances of your own
            classes), loaded with the full unpickler. By default a member's ``state_dict()``
            may hold only tensors and plain data (numbers, strings, containers, numpy arrays,
            random-generator states), because loading anything else can run code that a
            planted file names (see `poptune.storage.checkpoints`). Recorded with the run, so
            ``poptune export``, ``Result.load_state`` and replay load its files the same way.

    Example:
        >>> import poptune as pt
        >>> def init(hp, seed): return 0.0
        >>> def step(x, hp): return x + hp["lr"], {"score": x + hp["lr"]}
        >>> exp = pt.Experiment(pt.trainable(init, step), {"lr": pt.Float(0.1, 1.0)},
        ...                     population_size=4, steps=20, interval=5, seed=1)
        >>> result = exp.run()
        >>> len(result.history)
        80
    """

    def __init__(
        self,
        trainable: type[Trainable] | TrainableFactory,
        space: Mapping[str, Parameter] | Space,
        population_size: int = 8,
        steps: int = 100,
        interval: int = 4,
        burn_in: int = 0,
        metric: str = "score",
        mode: str = "max",
        exploit: Exploit | None = Truncation(0.2),  # noqa: B008 (frozen, immutable)
        explore: object = Perturb(),
        synchronous: bool = False,
        seed: int = 0,
        initial_hparams: Sequence[Mapping[str, Any]] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        if not callable(trainable):
            raise ValueError(
                f"`trainable` must be a pt.Trainable subclass or a callable (hparams, seed) -> "
                f"Trainable, but got {trainable!r}."
            )
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"`metric` must be a non-empty string, but got {metric!r}.")
        if not isinstance(allow_pickle, bool):
            raise ValueError(f"`allow_pickle` must be True or False, but got {allow_pickle!r}.")
        # As given, for replace() and controller(); the space validated once.
        arguments: dict[str, Any] = {
            "trainable": trainable,
            "space": space,
            "population_size": population_size,
            "steps": steps,
            "interval": interval,
            "burn_in": burn_in,
            "metric": metric,
            "mode": mode,
            "exploit": exploit,
            "explore": explore,
            "synchronous": synchronous,
            "seed": seed,
            "initial_hparams": initial_hparams,
            "allow_pickle": allow_pickle,
        }
        # Building a controller validates every other argument, with messages that name them.
        probe = PBT(**_controller_arguments(arguments))
        if probe.steps is None:
            raise ValueError("`steps` must be an integer >= 1, but got None.")
        arguments["space"] = probe.space
        if initial_hparams is not None:  # copied: a caller's later edits change nothing here
            arguments["initial_hparams"] = tuple(dict(h) for h in initial_hparams)
        fields: dict[str, Any] = {
            "trainable": trainable,
            "space": probe.space,
            "population_size": probe.population_size,
            "steps": probe.steps,
            "interval": probe.interval,
            "burn_in": probe.burn_in,
            "metric": metric,
            "mode": probe.mode,
            "exploit": probe.exploit,
            "explore": probe.explore,
            "synchronous": probe.synchronous,
            "seed": probe.seed,
            "initial_hparams": arguments["initial_hparams"],
            "allow_pickle": allow_pickle,
            "_arguments": arguments,
        }
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    # Set once, in __init__: an Experiment is immutable (see __setattr__).
    trainable: type[Trainable] | TrainableFactory
    space: Space
    population_size: int
    steps: int
    interval: int
    burn_in: int
    metric: str
    mode: str
    exploit: Exploit | None
    explore: Any
    synchronous: bool
    seed: int
    initial_hparams: Sequence[Mapping[str, Any]] | None
    allow_pickle: bool
    _arguments: dict[str, Any]

    def __setattr__(self, name: str, value: object) -> None:
        # Changing one field after construction would half-apply: the controller is built from
        # the arguments, so `exp.steps = 40` trained to 40 while describe() still said 20.
        example = f"{name}=..." if name in self._arguments else "steps=40"
        raise AttributeError(
            f"Experiment is immutable: cannot set {name!r}. Build a new one instead, e.g. "
            f"exp = exp.replace({example})."
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(
            f"Experiment is immutable: cannot delete {name!r}. Build a new one with "
            "exp.replace(...)."
        )

    def replace(self, **changes: Any) -> Experiment:
        """A new, validated experiment: this one with ``changes`` to its arguments.

        Example:
            >>> import poptune as pt
            >>> exp = pt.Experiment(pt.trainable(lambda hp, s: 0.0, lambda x, hp: (x, x)),
            ...                     {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=20)
            >>> exp.replace(steps=40).steps, exp.steps
            (40, 20)

        Raises:
            TypeError: A change names no argument of `Experiment`.
            ValueError: The changed configuration is invalid (as `Experiment` raises).
        """
        unknown = sorted(set(changes) - set(self._arguments))
        if unknown:
            raise TypeError(
                f"Experiment.replace() takes the arguments of Experiment "
                f"({', '.join(self._arguments)}), but got {', '.join(unknown)}."
            )
        return Experiment(**{**self._arguments, **changes})

    def baseline(self, kind: str = "random") -> Experiment:
        """The random-search baseline of this experiment, at equal compute: the same
        population (the same initial hyperparameters, drawn from the same seed), steps,
        interval and seed, with no exploit and no explore, so every member keeps its initial
        hyperparameters. Run it beside the PBT run and compare the two (``poptune compare``);
        ``poptune run FILE --baseline random`` does both.

        Example:
            >>> import poptune as pt
            >>> exp = pt.Experiment(pt.trainable(lambda hp, s: 0.0, lambda x, hp: (x, x)),
            ...                     {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=20)
            >>> base = exp.baseline()
            >>> base.exploit, base.explore, base.steps
            (None, None, 20)

        Raises:
            ValueError: ``kind`` is not ``"random"`` (the only baseline there is).
        """
        if kind != "random":
            raise ValueError(f"`kind` must be 'random' (random search), but got {kind!r}.")
        return self.replace(exploit=None, explore=None)

    def controller(self, snapshot: Mapping[str, Any] | None = None) -> PBT:
        """A `PBT` controller for this configuration: a new population, or ``snapshot``'s."""
        return PBT(**_controller_arguments(self._arguments), snapshot=snapshot)

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON-ready data (stored with a run, compared on resume)."""
        pbt = self.controller()
        out = pbt.describe()
        out["metric"] = self.metric
        t = self.trainable
        # Qualified name without the module: the same file loaded by `poptune run` or imported
        # by a script must give the same configuration.
        out["trainable"] = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
        out["initial_population"] = {str(mid): dict(m.hparams) for mid, m in pbt.members.items()}
        if self.allow_pickle:  # only when set: runs recorded before it keep their fingerprint
            out["allow_pickle"] = True
        return out

    def run(
        self,
        storage: str | Storage | None = None,
        name: str | None = None,
        *,
        workers: int | None = None,
        executor: str | None = None,
        resume: bool = False,
        checkpoints: str | None = None,
        options: RunOptions | None = None,
        source: str | None = None,
        devices: Sequence[str] | None = None,
        loggers: Sequence[Logger] | None = None,
        resources: Mapping[str, float] | None = None,
        ray_address: str | None = None,
        progress: bool | Console | None = None,
    ) -> Result:
        """Runs the experiment and returns its `Result`.

        Without a storage the run lives in this process's memory. With one (a URL such as
        ``sqlite:///runs.db``, a path such as ``runs.db``, ``postgresql://user@host/db``, or a
        `Storage`; see `poptune.storage.storage_url`) every result, decision and checkpoint
        reference is recorded there as it happens, and running the same experiment again with
        the same storage and name resumes it from its last checkpoints: same population,
        lineage and ready clocks.

        Args:
            storage: Where the run is recorded; None for memory.
            name: The run's name (letters, digits, ``-``, ``_``, ``.``); ``"run"`` by default.
            workers: Worker processes (or Ray actors); more than one means
                ``executor="processes"`` unless ``executor`` says otherwise. None: as the run
                was last executed (a resumed run keeps its workers), else 1.
            executor: ``"serial"`` (this process), ``"processes"`` (worker processes on this
                machine) or ``"ray"`` (Ray actors, extra ``[ray]``: see
                `poptune.execution.ray`); None: as the run was last executed, else by
                ``workers``.
            resume: Resume a run of that name even if its configuration differs (see
                `poptune.execution.session.prepare_run` for what may change; each accepted
                change is logged and recorded with the run).
            checkpoints: Directory or fsspec URL for checkpoint files (the run's go in
                ``checkpoints/NAME``). By default beside a SQLite file (``runs.db`` ->
                ``runs-checkpoints/``), else ``./poptune-checkpoints/<hash of the storage>/``;
                a resumed run keeps the root it was created with unless this is given. See
                `poptune.storage.folders`.
            options: Retries, retention, heartbeats: see `poptune.RunOptions`.
            source: ``FILE.py:NAME`` this experiment was loaded from (set by the CLI; lets
                worker processes and ``poptune resume`` load it again).
            devices: The devices workers train on (``["cuda:0", "cuda:1"]``): worker ``i``
                gets ``devices[i % len(devices)]``, and a member reads it as
                ``self.device`` (`poptune.torch.TorchTrainable`) or
                `poptune.trainable.worker_device`. Without ``workers``: one worker per
                device. None: as the run was last executed, else every visible GPU (one
                worker each) when the members use torch and CUDA is present, else none.
            loggers: `poptune.loggers.Logger` objects (`poptune.loggers.TensorBoardLogger`)
                fed every result and lineage event as the run commits them, read back from
                the storage by a thread of this process (`poptune.loggers.LogFeed`): never in
                a worker or a training step. They receive the run's whole history, a resumed
                run's included, and are closed when `run` returns or raises.
                Not with ``executor="ray"``: Ray places actors (see ``resources``).
            resources: ``executor="ray"``: what each actor asks Ray for, such as
                ``{"cpu": 1, "gpu": 0.5}`` (a GPU fraction lets several members share a GPU;
                other names are Ray custom resources). None: as the run was last executed,
                else one CPU.
            ray_address: ``executor="ray"``: the Ray cluster to connect to (``"auto"``,
                ``"HOST:PORT"``, ``"ray://HOST:PORT"``). None: the Ray connection this
                process holds (``ray.init`` called before), else the address the run was
                last executed with, else a local Ray instance started here.
            progress: Show the run's progress while it trains, as ``poptune run`` does
                (`poptune.progress.ProgressDisplay`): a live view on a terminal and in a
                Jupyter notebook (in the cell; plain lines there without ipywidgets), a
                plain line every few seconds elsewhere. It starts before the workers, says
                what is happening until the first ready point ("training: 8 members
                claimed, no ready point yet") and then estimates the time left from this
                execution's rate. None: shown when stdout is a terminal or a notebook; True:
                always; False: never; a rich ``Console``: drawn on it.

        Raises:
            poptune.ConfigMismatch: The run exists with another configuration.
            poptune.storage.StorageError: The storage cannot be used, or the checkpoint folder
                belongs to another run.
            poptune.RunFailed: Too many members failed for good, or user code is configured
                wrongly (a metric step() never returns). A
                `poptune.execution.ConfigurationStop` when user code cannot build,
                checkpoint or restore a member (checked on one member before any worker
                starts: `poptune.execution.preflight`): no member failed, and the run is
                kept to resume once the file is fixed.
            poptune.RunInterrupted: The run stopped before it completed (its workers stopped
                or could not start); resume it by running it again.
            KeyboardInterrupt: On Ctrl-C, after everything committed has been flushed and
                the run marked interrupted (resume it later).
            RuntimeError: Called while poptune imports the file that defines the experiment
                (``poptune run FILE.py``, ``poptune worker``, a worker process): a top-level
                ``run()`` call belongs under ``if __name__ == "__main__":``.
        """
        from poptune.execution import execute
        from poptune.execution.source import importing
        from poptune.progress import display_for

        script = importing()
        if script is not None:
            raise RuntimeError(
                f"Experiment.run() was called while poptune imported {script} to read its "
                "experiment: a run() at the top level of that file would train the run during "
                "the import, before poptune trains it. Put the call under "
                '`if __name__ == "__main__":` (poptune imports the file under another name, so '
                "that block runs only with `python FILE.py`)."
            )

        storage, display = display_for(storage, name or "run", progress)
        with display or contextlib.nullcontext():
            return execute(
                self,
                storage,
                name,
                workers=workers,
                executor=executor,
                resume=resume,
                checkpoints=checkpoints,
                source=source,
                options=options,
                devices=devices,
                loggers=loggers,
                resources=resources,
                ray_address=ray_address,
            )

    def __repr__(self) -> str:
        return (
            f"Experiment(trainable={self.trainable!r}, population_size={self.population_size}, "
            f"steps={self.steps}, interval={self.interval}, metric={self.metric!r}, "
            f"mode={self.mode!r})"
        )


def _controller_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `Experiment` that `PBT` takes."""
    return {k: v for k, v in arguments.items() if k not in ("trainable", "metric", "allow_pickle")}
