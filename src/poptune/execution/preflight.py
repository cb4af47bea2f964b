"""The check before any worker starts: one member built and put through a checkpoint once.

A member whose ``hparam_targets`` names an attribute that does not exist, whose state safe
loading refuses, or whose ``load_state_dict`` cannot take its own ``state_dict`` fails the same
way in every member and every retry: left to the workers, a run of eight members spent minutes
failing them all, replacing them, and then said only how many had failed. `preflight` builds
one member first, in the process that starts the run (`poptune.execution.execute`, every
executor) or joins it (``poptune worker``), and puts it through every stage a worker does:

1. **build**: the trainable with the member's hyperparameters and its own seed
   (`poptune.torch.TorchTrainable` resolves every ``hparam_targets`` entry here);
2. **set_hparams**;
3. when the code that builds members changed since the run's checkpoints were written
   (`poptune.execution.codeprint`), **load_state_dict** of the member's stored checkpoint,
   then set_hparams: the restore every worker is about to do;
4. **state_dict**, **save** and **load** with the run's checkpoint format and its safe loading
   (a `poptune.storage.CheckpointStore` in a temporary folder, with the experiment's
   ``allow_pickle``; for an in-memory run, its in-memory store), **load_state_dict** of that
   state, and **set_hparams** again;

then closes it. Any exception stops the run at once with a `ConfigurationStop` that names the
stage and gives the exception's type and message (and the line of user code that raised it):
no member is failed and no worker is started. The run is left resumable: a new run stays
``created``, another becomes ``interrupted``; fix the file and run it again. A completed run is
not checked (nothing will be trained).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from poptune.controller import member_seed
from poptune.execution.lifecycle import build_member, exception_text
from poptune.execution.session import CheckpointBackend, ConfigurationStop, stop_message
from poptune.storage.base import MemberRow, Storage
from poptune.trainable import Trainable, set_worker_device, worker_device

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = ["preflight"]

#: The run name the probe's checkpoint is saved under, in its temporary folder.
_PROBE = "preflight"


class _StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(stage)
        self.stage, self.error = stage, error


def preflight(
    experiment: Experiment,
    storage: Storage,
    name: str,
    *,
    checkpoints: CheckpointBackend | None = None,
    in_memory: bool = False,
    device: str | None = None,
    mark: bool = True,
) -> None:
    """Builds one member of run ``name`` and puts it through a checkpoint (module docstring).

    The member is the first one still to train (member 0 of a new run), with its stored
    hyperparameters and its own seed, built on ``device`` (the executor's; the process that
    starts worker processes passes ``"cpu"``, so that it holds no GPU memory while they train).

    Args:
        experiment: The run's experiment.
        storage: The run's storage; the run must have been prepared (`prepare_run`).
        name: The run's name.
        checkpoints: The run's own checkpoint store, to load a stored checkpoint with changed
            code; None skips that stage.
        in_memory: Round-trip through the in-memory store (an in-memory run's format).
        device: The device the member is built on (`poptune.trainable.worker_device`).
        mark: Record the failure as the run's error (a new run stays ``created``, another
            becomes ``interrupted``). ``poptune worker`` passes False: a worker that cannot
            build members leaves the run, and the workers training it, alone.

    Raises:
        ConfigurationStop: A stage failed; the message names it and the exception.
    """
    info = storage.get_run(name)
    if info is None or info.status == "completed":
        return
    rows = storage.members(name)
    pending = info.execution.get("code_changed") or None
    row = _probe(rows, bool(pending))
    mid = row.id if row is not None else 0
    hparams = dict(row.state["hparams"]) if row is not None else _initial(experiment)
    restore = row.checkpoint if (pending and row is not None and checkpoints) else None
    before = worker_device()
    set_worker_device(device)
    try:
        with _round_trip_store(experiment, in_memory) as store:
            _check(experiment, mid, hparams, store, checkpoints, restore)
    except _StageFailed as failed:
        status = "created" if info.status == "created" else "interrupted"
        kept = f"the run is kept (status {status!r})" if mark else "the run is left as it was"
        message = _message(name, mid, hparams, failed, pending, kept, experiment.seed)
        if mark:
            storage.update_run(name, status=status, error=message)
        raise ConfigurationStop(message) from failed.error
    finally:
        set_worker_device(before)
    if pending and mark:
        # The new code loads the run's checkpoints: it is the run's code from now on. The
        # pending note stays for this execution (a restore failing later still stops the run
        # instead of failing a member); the next resume clears it.
        latest = storage.get_run(name) or info
        storage.update_run(name, execution={**latest.execution, "code": pending["code"]})


def _probe(rows: list[MemberRow], restoring: bool) -> MemberRow | None:
    """The member to build: the first still to train; with changed code, the first of those
    with a checkpoint to load. None for a run without members."""
    alive = [r for r in sorted(rows, key=lambda r: r.id) if r.state["status"] != "failed"]
    training = [r for r in alive if r.state["status"] in ("running", "waiting")] or alive
    if restoring:
        stored = [r for r in training if r.checkpoint is not None]
        if stored:
            return stored[0]
    return training[0] if training else (rows[0] if rows else None)


def _initial(experiment: Experiment) -> dict[str, Any]:
    return dict(experiment.controller().members[0].hparams)


@contextlib.contextmanager
def _round_trip_store(experiment: Experiment, in_memory: bool) -> Iterator[CheckpointBackend]:
    if in_memory:
        from poptune.storage.memory import MemoryCheckpointStore

        yield MemoryCheckpointStore()
        return
    from poptune.storage.checkpoints import CheckpointStore

    with tempfile.TemporaryDirectory(prefix="poptune-preflight-") as folder:
        yield CheckpointStore(folder, fsync=False, allow_pickle=experiment.allow_pickle)


def _check(
    experiment: Experiment,
    mid: int,
    hparams: Mapping[str, Any],
    store: CheckpointBackend,
    run_checkpoints: CheckpointBackend | None,
    restore: str | None,
) -> None:
    with _stage("build"):
        trainable = build_member(experiment, mid, hparams)
    try:
        with _stage("set_hparams"):
            trainable.set_hparams(hparams)
        if restore is not None and run_checkpoints is not None:
            state: object = _stored_state(run_checkpoints, restore)
            if state is not _UNREADABLE:
                with _stage(f"load_state_dict of its checkpoint {restore}"):
                    trainable.load_state_dict(state)
                with _stage("set_hparams after load_state_dict"):
                    trainable.set_hparams(hparams)
        with _stage("state_dict"):
            state = trainable.state_dict()
        with _stage("save (the checkpoint format)"):
            saved = store.save(_PROBE, mid, 0, state)
        with _stage("load (the checkpoint format)"):
            state = store.load(saved.location)
        with _stage("load_state_dict of its own state_dict"):
            trainable.load_state_dict(state)
        with _stage("set_hparams after load_state_dict"):
            trainable.set_hparams(hparams)
    finally:
        _close(trainable)


_UNREADABLE = object()


def _stored_state(checkpoints: CheckpointBackend, location: str) -> object:
    """The stored state, or `_UNREADABLE`: a damaged or missing file is the workers' to handle
    (`poptune.execution.lifecycle.Lifecycle.record_damaged`), not a fault of the code."""
    try:
        return checkpoints.load(location)
    except Exception:
        return _UNREADABLE


@contextlib.contextmanager
def _stage(stage: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        raise _StageFailed(stage, e) from e


def _close(trainable: Trainable) -> None:
    with contextlib.suppress(Exception):
        trainable.close()


def _message(
    name: str,
    mid: int,
    hparams: Mapping[str, Any],
    failed: _StageFailed,
    pending: Mapping[str, Any] | None,
    kept: str,
    seed: int,
) -> str:
    error = failed.error
    where = _user_line(error)
    at = f" (at {where})" if where else ""
    what = f"{exception_text(error)}{at}"
    if pending and failed.stage.startswith("load_state_dict of its checkpoint"):
        files = ", ".join(pending.get("files", []))
        cause = (
            f"code changed since the run's checkpoints were written ({files}): restoring "
            f"member {mid} failed with {what}"
        )
        advice = (
            f"Checked before any worker started: no member failed, and {kept}. Revert the "
            "file (then resume the run), or start a new run under another name."
        )
        return stop_message(name, cause, advice)
    hp = ", ".join(f"{k}={v!r}" for k, v in hparams.items())
    cause = (
        f"member {mid} (hyperparameters {hp}; seed {member_seed(seed, mid)}) failed in "
        f"{failed.stage}: {what}"
    )
    advice = (
        "Checked before any worker started: nothing was trained and no member failed. Fix the "
        f"experiment and run it again; {kept}."
    )
    return stop_message(name, cause, advice)


def _user_line(error: BaseException) -> str | None:
    """``FILE:LINE in FUNCTION`` of the innermost frame of user code (outside poptune, the
    standard library and installed packages) the exception passed through, if any."""
    from poptune.execution.codeprint import library_file

    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.isfile(frame.filename) and not library_file(frame.filename):
            found = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
    return found
