"""Executors: how a population is trained (one process, or several worker processes)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from poptune.execution.session import ConfigMismatch, RunFailed, RunOptions, load_result
from poptune.storage.folders import default_checkpoint_root

if TYPE_CHECKING:
    from poptune.experiment import Experiment
    from poptune.result import Result
    from poptune.storage.base import Storage

__all__ = ["ConfigMismatch", "RunFailed", "RunOptions", "default_checkpoint_root", "execute"]

EXECUTORS = ("serial", "processes")


def execute(
    experiment: Experiment,
    storage: str | Storage | None = None,
    name: str | None = None,
    *,
    workers: int = 1,
    executor: str | None = None,
    resume: bool = False,
    checkpoints: str | None = None,
    source: str | None = None,
    options: RunOptions | None = None,
) -> Result:
    """Runs (or resumes) ``experiment`` as run ``name`` in ``storage``; see `Experiment.run`."""
    from poptune.execution.session import prepare_run
    from poptune.storage import open_storage, storage_url
    from poptune.storage.folders import check_checkpoint_folder, claim_checkpoint_folder
    from poptune.storage.memory import MemoryCheckpointStore

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers >= 1` must hold for an integer, but got workers={workers!r}.")
    if executor is None:
        executor = "processes" if workers > 1 else "serial"
    if executor not in EXECUTORS:
        raise ValueError(f"`executor` must be one of {EXECUTORS}, but got {executor!r}.")
    if executor == "serial" and workers != 1:
        raise ValueError(f"executor='serial' runs one worker, but got workers={workers}.")
    options = options or RunOptions()
    # Normalised once: worker processes reopen this very URL.
    url = storage_url(storage) if isinstance(storage, str) else None
    store = open_storage(url if url is not None else storage)
    in_memory = store.display_url.startswith("memory://")
    if in_memory and executor == "processes":
        raise ValueError(
            "executor='processes' needs a storage that worker processes share: pass "
            "storage='sqlite:///FILE.db' or a PostgreSQL URL."
        )
    if executor == "processes" and url is None:
        raise ValueError(
            "executor='processes' needs the storage as a URL string, to open it in "
            "each worker process."
        )
    name = name or "run"
    existing = store.get_run(name)
    root: str | None = None
    where = url or store.display_url
    if not in_memory:
        root = checkpoints or (existing.checkpoint_root if existing else None)
        root = root or default_checkpoint_root(where)
        if "://" not in root:
            root = os.path.abspath(root)
        check_checkpoint_folder(root, name, where, existing.created if existing else None)
    info = prepare_run(experiment, store, name, resume=resume, source=source, checkpoint_root=root)
    if root is not None:
        claim_checkpoint_folder(root, name, where, info.created)
    if info.status != "completed":
        if in_memory:
            ckpt: Any = MemoryCheckpointStore()
        else:
            from poptune.storage.checkpoints import CheckpointStore

            assert root is not None
            ckpt = CheckpointStore(root)
            ckpt.cleanup_temporary(name)
        if executor == "serial":
            from poptune.execution.serial import run_serial

            run_serial(experiment, store, name, ckpt, options)
        else:
            from poptune.execution.processes import run_processes

            assert url is not None and root is not None
            run_processes(experiment, store, url, name, root, workers, options, source)
    return load_result(store, name)
