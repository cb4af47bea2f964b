"""Setting up, resuming and reading back a run in a storage; shared by every executor."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from poptune.controller import PBT
from poptune.result import Event, HistoryRecord, MemberRecord, Result, StateAccess
from poptune.storage import leases
from poptune.storage.base import (
    MemberRow,
    RunInfo,
    Storage,
    StorageError,
    Transaction,
)

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = [
    "CheckpointBackend",
    "ConfigMismatch",
    "ConfigurationStop",
    "RunFailed",
    "RunInterrupted",
    "RunOptions",
    "RunReplaced",
    "check_identity",
    "configuration_stop",
    "controller_from",
    "differences",
    "fingerprint",
    "load_result",
    "member_rows",
    "new_worker_id",
    "owner_alive",
    "prepare_run",
    "retention",
]


_log = logging.getLogger("poptune")


class ConfigMismatch(StorageError):
    """A run of that name exists with another configuration."""


class RunFailed(RuntimeError):
    """The run was stopped by a failure in user code: too many members failed for good, or a
    configuration error no retry can fix. The message holds the traceback."""


class ConfigurationStop(RunFailed):
    """The run stopped because user code cannot build, checkpoint or restore a member the way
    the run needs (a hyperparameter target that does not exist, a model edited since the run's
    checkpoints were written, every restore failing the same way): no retry can help, and no
    member is blamed. The message says which stage failed and with what exception.

    No member is failed, none is replaced, and no retry is used up. The run is kept resumable:
    its status stays ``created`` when nothing was trained yet (the check before any worker
    starts, `poptune.execution.preflight`), else it becomes ``interrupted``, with this message
    as its error. Fix the file (or revert the edit) and run it again: it resumes.
    """


class RunInterrupted(RuntimeError):
    """The run stopped before it completed (its workers stopped, or another process marked it
    interrupted); everything committed is kept: resume it. The message says how."""


class RunReplaced(RunInterrupted):
    """The run a worker or driver was started for is gone: deleted, replaced by another run
    of the same name, or resumed elsewhere with another configuration. It stops, writing
    nothing more to the run that now has that name."""


def stop_message(name: str, cause: str, advice: str) -> str:
    """The text of a `ConfigurationStop` of run ``name`` (also recorded as the run's error, where
    `configuration_stop` recognises it)."""
    return f"{_STOP_HEAD.format(name=name)}{cause}\n{advice}"


_STOP_HEAD = "Run {name!r} cannot train its members: "


def configuration_stop(info: RunInfo | None) -> str | None:
    """The message of the `ConfigurationStop` that left the run as it is, if one did: its
    status is ``created`` or ``interrupted`` and its error is such a message (a later status
    change clears the error, so an old stop is never taken for a new one)."""
    if info is None or info.status not in ("created", "interrupted") or not info.error:
        return None
    return info.error if info.error.startswith(_STOP_HEAD.format(name=info.name)) else None


#: A run's identity: when it was created and its configuration's fingerprint. Its name alone
#: is not enough: ``poptune delete --force`` and a new run of that name keep the name.
RunIdentity = tuple[float, str]


def run_identity(info: RunInfo) -> RunIdentity:
    """The identity of the run ``info`` records."""
    return (float(info.created), str(info.fingerprint))


def check_identity(info: RunInfo | None, name: str, identity: RunIdentity | None) -> None:
    """Raises `RunReplaced` unless the run ``info`` records is the one ``identity`` names.

    ``identity`` None checks nothing.
    """
    if identity is None:
        return
    created, fp = identity
    if info is not None and abs(info.created - created) < 1e-3 and info.fingerprint == fp:
        return
    if info is None:
        what = "was deleted"
    elif abs(info.created - created) >= 1e-3:
        what = "was deleted, and another run of that name was created"
    else:
        what = "was resumed elsewhere with another configuration"
    raise RunReplaced(
        f"Run {name!r} {what} after this process started; it stops without writing to it. "
        "Start it again to train the run that has that name now."
    )


class CheckpointBackend(Protocol):
    """What executors need of a checkpoint store."""

    def save(self, run: str, member: int, step: int, state: object) -> Any: ...
    def load(self, location: str) -> object: ...
    def delete(self, location: str) -> None: ...


class _DefaultSeconds(float):
    """A default number of seconds: a float that remembers nobody chose it."""

    __slots__ = ()


@dataclass(frozen=True)
class RunOptions:
    """How a run is executed (none of this changes its results).

    Every field is checked when the options are built: a `ValueError` says what must hold and
    what was given. Integers must be integers (a bool is not one); floats must be finite.

    Example:
        >>> RunOptions(max_retries=0, max_failures=0).failure_budget(population_size=8)
        0
    """

    max_retries: int = 2
    """Times a member's failing step is retried from its last checkpoint before the member
    fails for good (>= 0)."""

    max_failures: int | None = None
    """The run stops (`RunFailed`) when more than this many members have failed for good (all
    retries used) during this execution; retried transient errors do not count. None means
    ``population_size``; 0 stops the run at the first member that fails for good. See
    `failure_budget`."""

    keep_checkpoints: int = 2
    """Checkpoints kept per member (>= 1); those a member's state still refers to are kept
    too."""

    heartbeat_timeout: float = _DefaultSeconds(30.0)
    """Seconds without a heartbeat after which a member's worker is presumed dead and the
    member is reclaimed from its last checkpoint (> 0, finite). A run records it (every
    worker judges the others by the same one); resuming a run without giving one keeps the
    recorded one (`heartbeat_timeout_given`)."""

    poll_interval: float = 0.05
    """Seconds a worker with nothing to do waits before looking again (> 0, finite)."""

    max_lag: int | None = None
    """Processes executor: a member is not claimed while it is this many steps or more ahead
    of the slowest running member, so no member races to the end against stale scores while
    another waits for a worker (None or >= 1). None: two ``interval``s (one interval makes a
    worker that finishes a round early wait for the slowest member)."""

    cache_size: int = 3
    """Live trainables a worker keeps, the member being trained included (>= 1)."""

    claim_batch: int | None = None
    """Workers (processes, ``poptune worker``, Ray actors): members a worker claims at once,
    trains to their ready points one after the other, and commits in one transaction (None or
    >= 1). The transaction, under the run's lock, is what limits a run of cheap steps; a batch
    shares one among its members. None: half the claimable members, so that other workers
    find members to claim too, and at most ``cache_size``, unless the worker's commits take
    longer than training its members does (cheap steps): it then claims enough members that
    its commits take about a quarter of its time (`poptune.execution.worker.batch_size`). A
    member beyond the cache of live trainables is restored from its checkpoint."""

    threads: int | None = None
    """Math-library threads per worker (None or >= 1). None: ``OMP_NUM_THREADS`` when the
    environment sets it, else the machine's cores divided by the number of workers, at
    least 1."""

    def __post_init__(self) -> None:
        # Stored as plain int and float (numpy scalars are accepted): options are pickled
        # to workers and printed.
        checked = {
            "max_retries": _check_int("max_retries", self.max_retries, minimum=0),
            "max_failures": _check_int("max_failures", self.max_failures, 0, optional=True),
            "keep_checkpoints": _check_int("keep_checkpoints", self.keep_checkpoints, 1),
            "heartbeat_timeout": self.heartbeat_timeout
            if isinstance(self.heartbeat_timeout, _DefaultSeconds)
            else _check_seconds("heartbeat_timeout", self.heartbeat_timeout),
            "poll_interval": _check_seconds("poll_interval", self.poll_interval),
            "max_lag": _check_int("max_lag", self.max_lag, minimum=1, optional=True),
            "cache_size": _check_int("cache_size", self.cache_size, minimum=1),
            "claim_batch": _check_int("claim_batch", self.claim_batch, 1, optional=True),
            "threads": _check_int("threads", self.threads, minimum=1, optional=True),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def heartbeat_timeout_given(self) -> bool:
        """Whether ``heartbeat_timeout`` was chosen (passed, even as 30) rather than left at
        its default: only a chosen one replaces the timeout a resumed run recorded."""
        return not isinstance(self.heartbeat_timeout, _DefaultSeconds)

    def failure_budget(self, population_size: int) -> int:
        """How many members may fail for good before the run stops: it stops when more do.

        ``max_failures``, or ``population_size`` when that is None.

        Raises:
            ValueError: ``population_size`` is not an integer >= 1.
        """
        _check_int("population_size", population_size, minimum=1)
        return int(population_size) if self.max_failures is None else self.max_failures

    def threads_per_worker(self, workers: int) -> int:
        """Math-library threads each of ``workers`` workers uses: ``threads``, else
        ``OMP_NUM_THREADS`` when the environment sets it, else the cores this process may use
        divided by ``workers``, at least 1.

        Raises:
            ValueError: ``workers`` is not an integer >= 1.
        """
        _check_int("workers", workers, minimum=1)
        if self.threads is not None:
            return self.threads
        given = os.environ.get("OMP_NUM_THREADS", "")
        if given.isdigit() and int(given) >= 1:
            return int(given)  # the user's own setting wins over our share
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may run on
        except AttributeError:  # macOS, Windows
            cores = os.cpu_count() or 1
        return max(1, cores // int(workers))


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """``int(value)`` if it is an integer >= ``minimum`` (or None, when ``optional``)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "None or an integer" if optional else "an integer"
        note = " (a bool is not an integer)" if isinstance(value, bool) else ""
        raise ValueError(
            f"`{name} >= {minimum}` must hold for {kind}, but got {name}={value!r}{note}."
        )
    return int(value)


def _check_seconds(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        note = " (a bool is not a number)" if isinstance(value, bool) else ""
        raise ValueError(
            f"`{name} > 0` must hold for a finite number of seconds, but got "
            f"{name}={value!r}{note}."
        )
    return float(value)


def fingerprint(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a configuration."""
    text = json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def new_worker_id() -> str:
    """A new worker id for this process (`poptune.storage.leases.new_worker_id`)."""
    return leases.new_worker_id()


def owner_alive(owner: str | None, heartbeat: float | None, timeout: float, now: float) -> bool:
    """Whether a member's owner may still be working on it (`poptune.storage.leases`)."""
    return leases.owner_alive(owner, heartbeat, timeout, now)


def member_rows(
    pbt: PBT,
    previous: Mapping[int, MemberRow],
    changes: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[MemberRow]:
    """Rows for every member of the controller, keeping what the controller doesn't know
    (owner, heartbeat, checkpoint, attempts) from ``previous`` except where ``changes`` (by
    member id) sets it."""
    out = []
    for mid, m in pbt.members.items():
        old = previous.get(mid)
        # Built once per member and commit (on the hot path of in-memory runs): no replace().
        fields: dict[str, Any] = {
            "owner": old.owner if old else None,
            "heartbeat": old.heartbeat if old else None,
            "checkpoint": old.checkpoint if old else None,
            "checkpoint_step": old.checkpoint_step if old else None,
            "attempts": old.attempts if old else 0,
        }
        if changes and mid in changes:
            fields.update(changes[mid])
        out.append(MemberRow(m.to_dict(), **fields))
    return out


def write_population(
    tx: Transaction,
    pbt: PBT,
    rows: Sequence[MemberRow],
    stored: Mapping[int, MemberRow] | None = None,
) -> None:
    """Stores the members' rows and the controller-wide state (generation, pending).

    ``stored``: the rows as read earlier in ``tx`` (by id); a row equal to its stored one is
    not written again. A worker's commit changes one member or a few, and writing all of
    them made every commit cost as much as the population (a thousand row updates at a
    thousand members, under the run's lock).
    """
    if stored is not None:
        rows = [r for r in rows if stored.get(r.id) != r]
    tx.put_members(rows)
    tx.set_controller(pbt.generation, pbt.pending_state())


def release_held(tx: Transaction, held: Callable[[str], bool]) -> None:
    """Frees, in ``tx``, every member whose owner ``held`` recognises."""
    tx.put_members([released(r) for r in tx.members() if r.owner is not None and held(r.owner)])


def released(row: MemberRow, attempts: int | None = None) -> MemberRow:
    """The row with no owner (optionally with a new count of failed attempts)."""
    free = replace(row, owner=None, heartbeat=None)
    return free if attempts is None else replace(free, attempts=attempts)


def controller_from(experiment: Experiment, info: RunInfo, rows: Iterable[MemberRow]) -> PBT:
    """The experiment's controller, restored to the state stored for the run."""
    return experiment.controller(
        snapshot={
            "generation": info.generation,
            "members": [r.state for r in rows],
            "pending": info.pending,
        }
    )


def _check_jsonable(pbt: PBT) -> None:
    for m in pbt.members.values():
        try:
            json.dumps(m.hparams, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                f"Hyperparameters must be JSON values (numbers, strings, booleans, None) to be "
                f"stored, but member {m.id} has {m.hparams!r}."
            ) from None


def prepare_run(
    experiment: Experiment,
    storage: Storage,
    name: str,
    *,
    resume: bool = False,
    source: str | None = None,
    checkpoint_root: str | None = None,
) -> RunInfo:
    """Creates the run, or checks that an existing one may be resumed with this experiment.

    An existing run with the same configuration is resumed. One with a different configuration
    is refused unless ``resume`` is true. Resuming accepts changes to how the search goes on
    (``steps``, which is how a run is extended; ``interval``, ``burn_in``, exploit and explore
    strategies, bounds of the hyperparameters, ``synchronous``, ``seed``), says so in a
    warning on the ``poptune`` logger, and keeps a record of each in the run's ``execution``
    record (``changes``). It refuses changes that would make the stored history mean
    something else: the population size, the hyperparameter names, the metric and the mode.
    """
    from poptune.storage.checkpoints import check_run_name

    check_run_name(name)
    config = experiment.describe()
    fp = fingerprint(config)
    info = storage.get_run(name)
    if info is None:
        pbt = experiment.controller()
        _check_jsonable(pbt)
        rows = member_rows(pbt, {})
        try:
            info = storage.create_run(
                name, config, fp, source=source, checkpoint_root=checkpoint_root, members=rows
            )
            return _note_code(storage, info, experiment, source)
        except StorageError:
            info = storage.get_run(name)  # created by another process in the meantime
            if info is None:
                raise
    if info.fingerprint != fp:
        diff = differences(info.config, config)
        if not resume:
            raise ConfigMismatch(
                f"Run {name!r} exists in {storage.display_url} with a different configuration "
                f"({diff}). Choose another name, or resume it with this configuration "
                "(--resume / resume=True)."
            )
        fixed = [
            k for k in ("population_size", "metric", "mode") if info.config.get(k) != config.get(k)
        ]
        if sorted(info.config.get("space", {})) != sorted(config["space"]):
            fixed.append("hyperparameter names")
        if fixed:
            raise ConfigMismatch(
                f"Run {name!r} cannot be resumed with this experiment: {', '.join(fixed)} "
                f"differ, which would change what its history means ({diff}). Start a new run "
                "(another name) instead."
            )
        changes = accepted_changes(info.config, config)
        record = dict(info.execution)
        record["changes"] = [*record.get("changes", []), {"time": time.time(), **changes}]
        storage.update_run(name, config=config, fingerprint=fp, source=source, execution=record)
        _log.warning("Resuming run %r with a changed configuration: %s", name, describe(changes))
        if info.status == "completed":
            with storage.transaction(name) as tx:
                _reopen_finished(experiment, tx)
        info = storage.get_run(name) or info
    elif source is not None and info.source != source:
        storage.update_run(name, source=source)
    return _note_code(storage, info, experiment, source)


def _note_code(
    storage: Storage, info: RunInfo, experiment: Experiment, source: str | None
) -> RunInfo:
    """Compares the code that builds members with the code the run recorded
    (`poptune.execution.codeprint`), says which files changed, and keeps the record.

    A change is kept pending (``execution["code_changed"]``: the files and the new record)
    rather than recorded at once: `poptune.execution.preflight` first loads one of the run's
    checkpoints with the new code and adopts it only when that works. Restoring a member
    failing while the change is pending stops the run without failing the member
    (`poptune.execution.lifecycle.Lifecycle.record_failure`). A resume with the old files
    back finds nothing changed and clears it.
    """
    from poptune.execution.codeprint import changed_files, code_print

    code = code_print(experiment.trainable, source)
    record = dict(info.execution)
    old = record.get("code")
    changed = changed_files(old, code)
    if changed:
        record["code_changed"] = {"files": changed, "code": code}
        _log.warning(
            "Resuming run %r with changed code: %s changed since the run's checkpoints were "
            "written. If members cannot load those checkpoints, the run stops without failing "
            "any: then revert the file, or start a new run under another name.",
            info.name,
            ", ".join(changed),
        )
    else:
        record.pop("code_changed", None)
        record["code"] = code
    if record == dict(info.execution):
        return info
    storage.update_run(info.name, execution=record)
    return replace(info, execution=record)


#: Configuration keys derived from others (a different seed or space draws another initial
#: population): not reported as changes of their own.
_DERIVED = ("initial_population",)


def accepted_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What resuming with ``new`` changes in a run configured with ``old``: ``{"changed":
    {key: [old, new]}}``, recorded with the run."""
    keys = sorted((set(old) | set(new)) - set(_DERIVED))
    return {"changed": {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}}


def describe(changes: Mapping[str, Any]) -> str:
    """One line for a record of `accepted_changes`: ``steps 40 -> 80; interval 4 -> 5``;
    inside the space and the strategies, each value that changed, by its path:
    ``space.lr.high 0.1 -> 0.2; explore.factors [0.8, 1.2] -> [0.7, 1.3]``."""
    parts: list[str] = []
    for key, (before, after) in changes.get("changed", {}).items():
        parts += _leaf_changes(str(key), before, after)
    return "; ".join(parts) or "no visible change"


def _leaf_changes(path: str, before: Any, after: Any) -> list[str]:
    """``path before -> after`` for each value that differs, descending into dicts."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            if before.get(key) != after.get(key):
                out += _leaf_changes(f"{path}.{key}", before.get(key), after.get(key))
        return out
    return [f"{path} {_short(before)} -> {_short(after)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reopen_finished(experiment: Experiment, tx: Transaction) -> None:
    """A completed run extended to more steps: finished members below ``steps`` run again."""
    rows = tx.members()
    changed = []
    for r in rows:
        if r.state["status"] == "finished" and int(r.state["step"]) < experiment.steps:
            changed.append(replace(released(r, 0), state={**r.state, "status": "running"}))
    tx.put_members(changed)
    if changed:
        tx.set_status("interrupted")


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which keys two configurations differ in: ``"differs in: steps, interval"``."""
    keys = sorted(set(old) | set(new))
    diffs = [k for k in keys if old.get(k) != new.get(k)]
    return "differs in: " + ", ".join(diffs) if diffs else "same keys"


def retention(
    tx: Transaction,
    keep_last: int,
    rows: Sequence[MemberRow],
    stored: Mapping[int, MemberRow] | None = None,
    saved: Collection[int] | None = None,
) -> list[str]:
    """Forgets old checkpoints in ``tx``; returns the locations whose files may be deleted.

    A checkpoint that any member's current state refers to (its own, or a donor's it copied)
    is never collected, whatever its age.

    With ``stored`` (the rows as read earlier in ``tx``) and ``saved`` (the members that
    recorded a checkpoint in it), only the checkpoints this transaction may have made
    collectable are looked at: those of the ``saved`` members, and those of the members whose
    checkpoint a row stopped referring to. Retention keeps each member's newest ones
    (`poptune.storage.checkpoints.select_for_deletion` judges members independently), so no
    other member's checkpoints can have become collectable, and every earlier transaction
    collected its own.
    """
    from poptune.storage.checkpoints import CheckpointRef, select_for_deletion

    protected = {r.checkpoint for r in rows if r.checkpoint is not None}
    if stored is None or saved is None:
        kept = tx.checkpoints()
    else:
        released = {
            old.checkpoint
            for r in rows
            if (old := stored.get(r.id)) is not None
            and old.checkpoint is not None
            and old.checkpoint != r.checkpoint
            and old.checkpoint not in protected
        }
        kept = tx.checkpoints(saved, released)
        # A released checkpoint of a member that saved none here (a donor's, which a member
        # copied and has now trained past): that member's other checkpoints decide its fate.
        others = {c.member for c in kept if c.location in released} - set(saved)
        if others:
            seen = {c.id for c in kept}
            kept += [c for c in tx.checkpoints(others) if c.id not in seen]
    refs = [
        CheckpointRef(location=c.location, member=c.member, step=c.step, created=c.id) for c in kept
    ]
    doomed = select_for_deletion(refs, keep_last, protected)
    tx.delete_checkpoints(doomed)
    return doomed


def load_result(
    storage: Storage,
    name: str,
    *,
    checkpoints: Any = None,
    experiment: Experiment | None = None,
    storage_ref: str | Storage | None = None,
    history: Sequence[HistoryRecord] | None = None,
) -> Result:
    """The `Result` of a run, read back from its storage.

    Its `Result.load_state` reads the members' checkpoints from ``checkpoints`` (a store with
    ``load(location)``), by default the run's own checkpoint folder; `Result.load_member`
    builds members with ``experiment``, by default the one the run's source file defines;
    `Result.replay` records in ``storage_ref`` (the storage's URL, to open it again), by
    default ``storage`` itself. ``history``: the run's results as already read, in commit
    order (a `poptune.loggers.LogFeed` that followed the run), so they are not read again.
    """
    info = storage.get_run(name)
    if info is None:
        raise StorageError(f"No run named {name!r} in {storage.display_url}.")
    cfg = info.config
    rows = storage.members(name)
    members = [MemberRecord.from_state(r.state) for r in rows]
    stored_initial = cfg.get("initial_population") or {}
    if checkpoints is None and info.checkpoint_root is not None:
        checkpoints = functools.partial(
            open_run_checkpoints, info, storage_ref if isinstance(storage_ref, str) else storage
        )
    return Result(
        name=name,
        mode=str(cfg.get("mode", "max")),
        metric=str(cfg.get("metric", "score")),
        initial_hparams={
            m.id: stored_initial[str(m.id)] for m in members if str(m.id) in stored_initial
        },
        members=sorted(members, key=lambda m: m.id),
        history=list(history)
        if history is not None
        else [
            HistoryRecord(r.member, r.step, r.metrics, r.score, r.segment, r.device)
            for r in storage.results(name)
        ],
        events=[Event.from_dict(e) for e in storage.events(name)],
        states=StateAccess(
            locations={r.id: r.checkpoint for r in rows},
            store=checkpoints,
            experiment=experiment,
            source=info.source,
            storage=storage_ref if storage_ref is not None else storage,
            execution=dict(info.execution),
        ),
    )


def open_run_checkpoints(info: RunInfo, storage: str | Storage) -> Any:
    """The checkpoint store of a stored run, for reading its members' states: its recorded
    root, once the folder's marker names this very run (storage, name, creation time), and
    with the loading rules recorded with the run (``allow_pickle``). A run that allows pickles
    has its experiment file imported first, so that the classes its states hold are found.

    Raises:
        StorageError: The folder has no marker, or another run's.
    """
    from poptune.storage.checkpoints import CheckpointStore
    from poptune.storage.folders import require_checkpoint_folder

    assert info.checkpoint_root is not None
    where = storage if isinstance(storage, str) else storage.display_url
    require_checkpoint_folder(info.checkpoint_root, info.name, where, info.created)
    allow = bool(info.config.get("allow_pickle", False))
    if allow and info.source:
        from poptune.execution.source import SourceError, load_experiment

        with contextlib.suppress(SourceError):  # then only its classes cannot be found
            load_experiment(info.source)
    return CheckpointStore(info.checkpoint_root, allow_pickle=allow)
