"""Executors: how a population is trained (one process, several worker processes, or Ray
actors)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from poptune.execution.session import (
    ConfigMismatch,
    ConfigurationStop,
    RunFailed,
    RunInterrupted,
    RunOptions,
    load_result,
)
from poptune.storage.folders import default_checkpoint_root

if TYPE_CHECKING:
    from poptune.experiment import Experiment
    from poptune.loggers import Logger
    from poptune.result import Result
    from poptune.storage.base import Storage

__all__ = [
    "ConfigMismatch",
    "ConfigurationStop",
    "RunFailed",
    "RunInterrupted",
    "RunOptions",
    "default_checkpoint_root",
    "execute",
]

_MAIN_GUARD = (
    "run() was called while a worker process was starting: the script that starts the run "
    "is imported again by every worker process, so its top-level run() call runs again "
    'there. Put it under `if __name__ == "__main__":`, or start the run with '
    "`poptune run FILE.py`."
)

EXECUTORS = ("serial", "processes", "ray")


def execute(
    experiment: Experiment,
    storage: str | Storage | None = None,
    name: str | None = None,
    *,
    workers: int | None = None,
    executor: str | None = None,
    resume: bool = False,
    checkpoints: str | None = None,
    source: str | None = None,
    options: RunOptions | None = None,
    devices: Sequence[str] | None = None,
    loggers: Sequence[Logger] | None = None,
    resources: Mapping[str, float] | None = None,
    ray_address: str | None = None,
) -> Result:
    """Runs (or resumes) ``experiment`` as run ``name`` in ``storage``; see `Experiment.run`."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # In a spawned worker re-importing the main script: touching the run here would
        # start workers of workers and mark the run interrupted.
        raise RuntimeError(_MAIN_GUARD)
    from poptune.execution.devices import check_devices
    from poptune.execution.session import configuration_stop, prepare_run
    from poptune.execution.tidy import tidy_checkpoints
    from poptune.storage import open_storage, storage_url
    from poptune.storage.folders import check_checkpoint_folder, claim_checkpoint_folder
    from poptune.storage.memory import MemoryCheckpointStore

    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"`workers >= 1` must hold for an integer, but got workers={workers!r}.")
    if executor is not None and executor not in EXECUTORS:
        raise ValueError(f"`executor` must be one of {EXECUTORS}, but got {executor!r}.")
    devices = check_devices(devices)
    resources = _check_resources(resources)
    options = options or RunOptions()
    # Normalised once: worker processes reopen this very URL.
    url = storage_url(storage) if isinstance(storage, str) else None
    store = open_storage(url if url is not None else storage)
    in_memory = store.display_url.startswith("memory://")
    name = name or "run"
    existing = store.get_run(name)
    stored = existing.execution if existing else {}
    if stored.get("heartbeat_timeout") is not None and not options.heartbeat_timeout_given:
        # Resuming: the timeout the run's workers judge each other by stays as it was set.
        options = replace(options, heartbeat_timeout=float(stored["heartbeat_timeout"]))
    workers, executor, devices = _how(stored, workers, executor, devices)
    if executor == "ray":
        resources, ray_address = _ray_how(stored, resources, ray_address, devices)
    elif resources is not None or ray_address is not None:
        raise ValueError(
            f"`resources` and `ray_address` are for executor='ray', but the executor is "
            f"{executor!r}."
        )
    if in_memory and executor in ("processes", "ray"):
        raise ValueError(
            f"executor={executor!r} needs a storage that its workers share: pass "
            "storage='sqlite:///FILE.db' or a PostgreSQL URL."
        )
    if executor in ("processes", "ray") and url is None:
        raise ValueError(
            f"executor={executor!r} needs the storage as a URL string, to open it in each worker."
        )
    root: str | None = None
    where = url or store.display_url
    if not in_memory:
        root = checkpoints or (existing.checkpoint_root if existing else None)
        root = root or default_checkpoint_root(where)
        if "://" not in root:
            root = os.path.abspath(root)
        _check_same_root(name, existing.checkpoint_root if existing else None, root)
        check_checkpoint_folder(root, name, where, existing.created if existing else None)
    info = prepare_run(experiment, store, name, resume=resume, source=source, checkpoint_root=root)
    if root is not None:
        claim_checkpoint_folder(root, name, where, info.created)
    if not in_memory:
        store.update_run(
            name,
            execution={
                **info.execution,
                "executor": executor,
                "workers": workers,
                "devices": devices,
                # Every worker of the run judges the others by one timeout: `poptune worker`
                # on another machine reads it here.
                "heartbeat_timeout": float(options.heartbeat_timeout),
                **(
                    {"resources": resources, "ray_address": ray_address}
                    if executor == "ray"
                    else {}
                ),
            },
        )
    ckpt: Any = MemoryCheckpointStore() if in_memory else None
    if info.status != "completed":
        from poptune.execution.preflight import preflight
        from poptune.storage.checkpoints import CheckpointStore

        if ckpt is None:
            assert root is not None
            ckpt = CheckpointStore(root, allow_pickle=experiment.allow_pickle)
        # One member built and checkpointed before any worker starts: a mistake every member
        # would make stops the run here, naming it. This process builds it on the CPU when
        # worker processes train: it would hold a GPU's memory for the whole run.
        probe = (devices[0] if devices else None) if executor == "serial" else "cpu"
        preflight(experiment, store, name, checkpoints=ckpt, in_memory=in_memory, device=probe)
    feed: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if loggers:
        from poptune.loggers import LogFeed

        # Follows what the executor commits, from a thread of this process: one mechanism for
        # every executor, and nothing on a worker's path.
        feed = LogFeed(store, name, loggers)
    with feed:
        if info.status != "completed":
            if not in_memory:
                # Judged by the timeout the run's workers were started with, not this one's.
                tidy_checkpoints(store, name, ckpt, stored.get("heartbeat_timeout"))
            if executor == "serial":
                from poptune.execution.serial import run_serial

                device = devices[0] if devices else None
                run_serial(experiment, store, name, ckpt, options, device)
            elif executor == "ray":
                from poptune.execution.ray import run_ray

                assert url is not None and root is not None
                run_ray(
                    experiment,
                    store,
                    url,
                    name,
                    root,
                    workers,
                    options,
                    source,
                    resources,
                    ray_address,
                )
            else:
                from poptune.execution.processes import run_processes

                assert url is not None and root is not None
                run_processes(experiment, store, url, name, root, workers, options, source, devices)
    final = store.get_run(name)
    stop = configuration_stop(final)
    if stop is not None:  # a worker process stopped it: say why, as the serial executor does
        raise ConfigurationStop(stop)
    if final is None or final.status != "completed":
        status = final.status if final is not None else "gone"
        why = f" {final.error}" if final is not None and final.error else ""
        raise RunInterrupted(
            f"Run {name!r} did not complete (its status is {status!r}).{why} Everything "
            "committed is kept: run it again with the same storage and name to resume it."
        )
    if root is not None:
        from poptune.storage.checkpoints import CheckpointStore

        # Files of stretches never committed (their workers were killed) go now.
        if ckpt is None:
            ckpt = CheckpointStore(root, allow_pickle=experiment.allow_pickle)
        tidy_checkpoints(store, name, ckpt)
    # An in-memory run's checkpoints live in this process; a stored run's in its folder.
    result = load_result(
        store,
        name,
        checkpoints=ckpt if in_memory else None,
        experiment=experiment,
        storage_ref=url if url is not None else store,
    )
    _warn_if_unscored(result)
    return result


def _check_same_root(name: str, recorded: str | None, given: str) -> None:
    """Refuses another checkpoint root for an existing run: its files would be split between
    two folders, members would fail to find their checkpoints, and its best model could not
    be exported.

    Raises:
        ValueError: ``given`` names another folder than ``recorded``.
    """
    if recorded is None or recorded == given:
        return
    same = "://" not in recorded and os.path.realpath(recorded) == os.path.realpath(given)
    if not same:
        raise ValueError(
            f"Run {name!r} keeps its checkpoints in {recorded}, but checkpoints={given!r} "
            "(--checkpoints) names another folder; a run's checkpoints stay in one folder. Leave "
            "it out to resume the run, or move the folder and keep its path (or start a new "
            "run under another name)."
        )


def _how(
    stored: Any, workers: int | None, executor: str | None, devices: list[str] | None
) -> tuple[int, str, list[str] | None]:
    """Workers, executor and devices: as given; what is not given, as the run was executed
    before (when resuming); else one worker per device given, else one worker per visible
    GPU when the members use torch and CUDA is present, else one worker in this process."""
    from poptune.execution.devices import visible_gpus

    if workers is None and executor is None:
        workers, executor = stored.get("workers"), stored.get("executor")
        if devices is None:
            devices = stored.get("devices")
    if workers is None and executor is None:
        if devices is None:
            devices = visible_gpus() or None
        if devices is not None:
            workers = len(devices)
    if workers is None:
        workers = 1 if executor in (None, "serial") else int(stored.get("workers") or 2)
    if executor is None:
        executor = "processes" if workers > 1 else "serial"
    if executor == "serial" and workers != 1:
        raise ValueError(f"executor='serial' runs one worker, but got workers={workers}.")
    return int(workers), str(executor), devices


def _check_resources(resources: object) -> dict[str, float] | None:
    from poptune.execution.ray import check_resources

    return check_resources(resources)


def _ray_how(
    stored: Any,
    resources: dict[str, float] | None,
    address: str | None,
    devices: list[str] | None,
) -> tuple[dict[str, float], str | None]:
    """Resources per actor and the Ray address: as given, else as the run was executed
    before (when its executor was Ray), else one CPU per actor and a local Ray instance."""
    if devices is not None:
        raise ValueError(
            "executor='ray' lets Ray place actors on GPUs: pass resources={'gpu': 1} (or a "
            f"fraction, to share a GPU) instead of devices={devices!r}."
        )
    if stored.get("executor") == "ray":
        if resources is None:
            resources = stored.get("resources")
        if address is None:
            address = stored.get("ray_address")
    return dict(resources or {"cpu": 1.0}), address


class UnscoredRunWarning(RuntimeWarning):
    """Every score of a run was NaN or infinite: PBT could compare no members."""


def _warn_if_unscored(result: Result) -> None:
    import math
    import warnings

    if result.history and not any(math.isfinite(h.score) for h in result.history):
        warnings.warn(
            UnscoredRunWarning(
                f"Run {result.name!r}: every score of {result.metric!r} was NaN or infinite, so "
                "no member could be compared with another: this was random search. Check what "
                "step() returns."
            ),
            stacklevel=3,
        )
