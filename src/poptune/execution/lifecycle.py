"""The member lifecycle: what every executor does with a member, in one place.

Every executor runs the same stages for a member; they differ only in where the stages run
(the serial executor interleaves the whole population in lockstep in this process; the
processes executor's worker processes run a small batch of members each, one after the
other, and commit the batch together):

1. **claim**: the worker becomes the member's owner in the storage (`claim_order` says which
   member a free worker takes);
2. **restore**: the member's trainable, at its stored checkpoint (its own, or the donor's it was
   told to copy), rebuilt only when it must be (`Lifecycle.restore`);
3. **set_hparams**: after every load, so framework state never brings back old values;
4. **train** up to the next ready point (`next_ready`, the one readiness rule);
5. **checkpoint** the state reached (`Lifecycle.save`);
6. **commit**, in one transaction and only while still the owner: the results, the controller's
   decisions at the ready point (every one, synchronous generations included), the lineage
   events, the checkpoint references, retention (`Lifecycle.commit`);
7. the **decision** takes effect at the member's next restore, which loads what its row names.

An exception raised by user code in stages 2 to 5 (``load_state_dict``, ``set_hparams``,
``step``, ``state_dict``) takes one path, `Lifecycle.record_failure`: retried from the last
checkpoint up to ``max_retries`` times, then the member fails for good and a copy of a top
member replaces it; more than ``max_failures`` members failing for good stops the run. A
configuration error (a metric ``step()`` never returns, a state that safe loading refuses,
an explore strategy that returns hyperparameters outside the space) stops the run at once.

A member's ``load_state_dict`` failing on a checkpoint is most often the code's doing, not the
member's: the model was edited since the checkpoints were written, or every member fails to
load the same way. Then the run stops (`ConfigurationStop`, the run left ``interrupted``) with
the cause, and the member is neither failed nor charged a retry: when the run's code changed
since its checkpoints were written (`poptune.execution.codeprint`), at the first such failure;
else when another member already failed to load a checkpoint with the same exception type
and message (before that, the serial executor retries the one member it restores first, and
may fail it for good).

What is not user code is never charged to a member:

* a checkpoint that fails its checksum or is missing (`DamagedCheckpoint`) takes
  `Lifecycle.record_damaged`: the file is forgotten (never a donor again), the failure is
  recorded against the member whose file it is, and every member standing on it goes back to
  that member's previous kept checkpoint (or starts afresh), with a ``rollback`` lineage event;
* a checkpoint that cannot be written (a full disk: `OSError`) is retried with backoff, then
  ends the run as interrupted (`InfrastructureError`) with one line saying what failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from poptune.controller import PBT, Decision, member_seed, ready_step
from poptune.execution.session import (
    CheckpointBackend,
    ConfigurationStop,
    RunFailed,
    RunIdentity,
    RunInterrupted,
    RunOptions,
    check_identity,
    member_rows,
    retention,
    stop_message,
    write_population,
)
from poptune.result import Event
from poptune.storage.base import (
    FailureRow,
    MemberRow,
    ResultRow,
    Storage,
    StorageError,
    StorageUnavailable,
    Transaction,
)
from poptune.storage.checkpoints import DamagedCheckpoint, UnsafeCheckpoint, checkpoint_owner
from poptune.strategies.explore import ExploreError
from poptune.trainable import MemberContext, Trainable, worker_device

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = [
    "ConfigurationError",
    "InfrastructureError",
    "Lifecycle",
    "MetricInvalid",
    "MetricMissing",
    "TrainableCache",
    "Trained",
    "claim_order",
    "deferred_interrupts",
    "exception_text",
    "next_ready",
]


class ConfigurationError(ValueError):
    """User code is configured wrongly for this experiment: retrying cannot help."""


class MetricMissing(ConfigurationError):
    """``step()`` did not return the experiment's metric."""


class InfrastructureError(RunInterrupted):
    """Something outside user code kept failing (a checkpoint disk that stays full, say): the
    run stops as interrupted, nothing committed is lost, and no member is blamed."""


#: Seconds a worker waits before each new try of a checkpoint write that failed (`OSError`):
#: a disk that fills up for a moment is no reason to stop a run.
SAVE_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)


class MetricInvalid(ConfigurationError, TypeError):
    """``step()`` returned something that is not a number where a metric must be one."""


# -- pure rules ----------------------------------------------------------------------------------


def next_ready(state: Mapping[str, Any], interval: int, burn_in: int, steps: int) -> int:
    """The step a member trains to before it is judged: its next ready point, or ``steps``.

    `poptune.controller.ready_step` (as `PBT.next_ready`) on a stored member state: workers
    need it before they have rebuilt a controller.
    """
    return ready_step(int(state["step"]), int(state["last_ready"]), interval, burn_in, steps)


def claim_order(
    row: MemberRow, mode: str, cached: Container[int] = ()
) -> tuple[int, int, float, int]:
    """Sort key of the members a free worker may claim: the least advanced first; among
    equals those the worker holds live (``cached``: no rebuild, no load), then the
    best-scoring first, so that the members most likely to copy another are judged when most
    of their peers have reached the same step (a member never copies a donor behind it).
    """
    score = row.state.get("score")
    value = -math.inf if score is None or not math.isfinite(float(score)) else float(score)
    return (
        int(row.state["step"]),
        0 if row.id in cached else 1,
        -value if mode == "max" else value,
        row.id,
    )


def read_metrics(raw: object, metric: str) -> tuple[dict[str, float], float]:
    """Turns what ``step()`` returned into a metrics dict and the score.

    Raises:
        MetricMissing: A dict without the experiment's metric (a NaN *value* is a score; a
            missing key is a configuration error that would silently turn PBT into random
            search).
        MetricInvalid: Not a number or a dict of numbers (``None``, a string...): the same
            code returns the same kind of value when retried, so the run stops at once.
    """
    if isinstance(raw, Mapping):
        metrics = {str(k): _number(v, str(k)) for k, v in raw.items()}
        score = metrics.get(metric)
        if score is None:
            raise MetricMissing(
                f"step() must return the experiment's metric {metric!r}, but returned the keys "
                f"{sorted(metrics)}. Set metric= to one of them, or return {metric!r}."
            )
        return metrics, score
    score = _number(raw, None)
    return {metric: score}, score


def _number(value: object, key: str | None) -> float:
    """``value`` as a float; a string is refused even when it reads as one."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        if key is None:
            what = f"step() must return a number or a dict of numbers, but returned {value!r}."
        else:
            what = (
                f"step() must return a number for the metric {key!r}, but returned "
                f"{key!r}: {value!r} ({type(value).__name__})."
            )
        raise MetricInvalid(what) from None


def build_member(experiment: Experiment, member: int, hparams: Mapping[str, Any]) -> Trainable:
    """Constructs a member's trainable from its hyperparameters and its own seed."""
    trainable = experiment.trainable(dict(hparams), member_seed(experiment.seed, member))
    if not isinstance(trainable, Trainable):
        raise ConfigurationError(
            f"`trainable` must build a pt.Trainable, but {experiment.trainable!r} returned "
            f"{type(trainable).__name__}."
        )
    return trainable


def retry_seed(seed: int, member: int, step: int, attempt: int) -> int:
    """The seed a member's streams are re-seeded with for retry ``attempt`` from ``step``:
    derived from the experiment's seed alone, so the same run retries the same way.

    Example:
        >>> retry_seed(0, 3, 40, 1) == retry_seed(0, 3, 40, 1) != retry_seed(0, 3, 40, 2)
        True
    """
    import numpy as np

    words = np.random.SeedSequence([seed, member, step, attempt, 0x5EED]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


#: Trainable classes already said to replay their draws on a retry (`Lifecycle.reseed_retry`).
_SAID_NO_RESEED: set[type] = set()


# -- interrupts ----------------------------------------------------------------------------------


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) back until the block ends, then raises KeyboardInterrupt.

    Storage commits run inside: an interrupt never lands in the middle of a database call
    (which printed driver tracebacks and could leave a run marked running). Only the main
    thread receives signals; elsewhere this does nothing, and so it does where Ctrl-C is
    ignored (a worker process) or only asks a worker to stop (a handler marked
    ``poptune_graceful``, as `poptune.execution.worker.work` installs: it raises nothing).
    """
    handler = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or handler is signal.SIG_IGN  # a worker process: ignored
        or getattr(handler, "poptune_graceful", False)
    ):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signal.SIGINT, None)
        raise KeyboardInterrupt


# -- live trainables -----------------------------------------------------------------------------


class TrainableCache:
    """The live trainables a worker keeps: at most ``size``, the least recently used closed first.

    Each entry remembers the checkpoint its trainable's state is at, so a member claimed again
    by the same worker continues in memory when nobody else trained it since.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[int, tuple[str | None, Trainable]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, member: object) -> bool:
        return member in self._entries

    def take(self, member: int) -> tuple[str | None, Trainable] | None:
        """Removes and returns the member's entry (its trainable stays open)."""
        return self._entries.pop(member, None)

    def put(self, member: int, location: str | None, trainable: Trainable) -> None:
        """Keeps a trainable at ``location``; closes the least recently used beyond ``size``."""
        old = self._entries.pop(member, None)
        if old is not None and old[1] is not trainable:
            _close(old[1])
        self._entries[member] = (location, trainable)
        while len(self._entries) > self.size:
            _, (_, evicted) = self._entries.popitem(last=False)
            _close(evicted)

    def make_room(self) -> None:
        """Closes entries so that one more trainable (the one being trained) fits."""
        while self._entries and len(self._entries) >= self.size:
            _, (_, evicted) = self._entries.popitem(last=False)
            _close(evicted)

    def drop(self, member: int) -> None:
        entry = self._entries.pop(member, None)
        if entry is not None:
            _close(entry[1])

    def clear(self) -> None:
        while self._entries:
            _, (_, t) = self._entries.popitem()
            _close(t)


def _close(trainable: Trainable) -> None:
    with contextlib.suppress(Exception):  # a failing close() must not take a worker down
        trainable.close()


# -- the lifecycle -------------------------------------------------------------------------------


@dataclass
class Trained:
    """A stretch a member trained: its results and the checkpoint of the state it reached."""

    member: int
    step: int
    results: list[ResultRow]
    location: str
    size: int


@dataclass
class Committed:
    """What a commit left: every member's row (the decisions are in them: checkpoint to
    restore from, hyperparameters) and the checkpoint files retention gave up."""

    rows: list[MemberRow]
    doomed: list[str] = field(default_factory=list)


class Lifecycle:
    """One worker's side of the member lifecycle (see the module docstring).

    Args:
        experiment: The configuration.
        storage: The run's storage.
        name: The run's name.
        checkpoints: Where checkpoint files go.
        options: Retries, failure budget, retention, heartbeats.
        worker: This worker's id (the owner it writes into member rows).
        failed_before: Members already failed for good when this execution started (the
            failure budget counts those failing during this execution).
    """

    def __init__(
        self,
        experiment: Experiment,
        storage: Storage,
        name: str,
        checkpoints: CheckpointBackend,
        options: RunOptions,
        worker: str,
        *,
        failed_before: int = 0,
    ) -> None:
        self.exp, self.storage, self.name = experiment, storage, name
        self.ckpts, self.options, self.worker = checkpoints, options, worker
        self.failed_before = failed_before
        self.budget = options.failure_budget(experiment.population_size)
        self._immutable = [k for k, p in experiment.space.items() if not p.mutable]
        # The last exception a member's load_state_dict raised, and the checkpoint it loaded:
        # `record_failure` tells a failed restore by it.
        self._restore_failure: tuple[BaseException, str] | None = None

    # -- restore -------------------------------------------------------------------------------

    def restore(
        self,
        row: MemberRow,
        held: tuple[str | None, Trainable] | None,
    ) -> Trainable:
        """The member's trainable at its stored checkpoint with its stored hyperparameters.

        ``held`` is a live trainable of this member and the checkpoint its state is at: reused
        when it is at the stored checkpoint, loaded into when it is not (an exploit), rebuilt
        when a ``mutable=False`` hyperparameter differs. `Trainable.set_hparams` is called
        after every load. Exceptions come from user code (the caller's failure path).
        """
        try:
            return self._restore(row, held)
        except UnsafeCheckpoint as e:
            raise ConfigurationError(str(e)) from None

    def _restore(self, row: MemberRow, held: tuple[str | None, Trainable] | None) -> Trainable:
        hparams = row.state["hparams"]
        location = row.checkpoint
        if held is not None:
            at, trainable = held
            if not any(trainable.hparams.get(k) != hparams[k] for k in self._immutable):
                if at == location:
                    if trainable.hparams != hparams:
                        trainable.set_hparams(hparams)
                    return trainable
                if location is not None:
                    self._load(trainable, location, row)
                    trainable.set_hparams(hparams)
                    return trainable
            _close(trainable)
        trainable = build_member(self.exp, row.id, hparams)
        if location is not None:
            self._load(trainable, location, row)
        trainable.set_hparams(hparams)
        return trainable

    def _load(self, trainable: Trainable, location: str, row: MemberRow) -> None:
        """Loads a checkpoint into a trainable, remembering what ``load_state_dict`` raised.

        A replacement in its first stretch (it copied a top member when a member failed for
        good, and has not been judged since) then takes random streams of its own
        (`Trainable.reseed` with its member seed): it is a new member, and the donor's
        streams may be what the failed member met its fault with."""
        state = self.ckpts.load(location)
        try:
            trainable.load_state_dict(state)
        except Exception as e:
            self._restore_failure = (e, location)
            raise
        if row.state.get("replaces") is not None and not row.state.get("decisions"):
            trainable.reseed(member_seed(self.exp.seed, row.id))

    def reseed_retry(self, trainable: Trainable, row: MemberRow) -> None:
        """Before a retry (``row.attempts > 0``): re-seeds the member's streams with
        `retry_seed`, so that a failure drawn from its own randomness is not replayed exactly
        (`Trainable.reseed`). A trainable that cannot re-seed is said to, once per process."""
        if row.attempts <= 0:
            return
        seed = retry_seed(self.exp.seed, row.id, int(row.state["step"]), row.attempts)
        if not trainable.reseed(seed) and type(trainable) not in _SAID_NO_RESEED:
            _SAID_NO_RESEED.add(type(trainable))
            _log_retry(
                f"Member {row.id} is retried (attempt {row.attempts}) with the random draws its "
                f"checkpoint holds: {type(trainable).__name__} has no reseed(), so a retry helps "
                "only against faults outside the member (see Trainable.reseed)."
            )

    def context(self, trainable: Trainable, member: int, step: int) -> None:
        """Tells the trainable who it is (`Trainable.context`) before it trains."""
        trainable.context = MemberContext(
            run=self.name, member=member, worker=self.worker, step=step, device=worker_device()
        )

    # -- train and checkpoint ------------------------------------------------------------------

    def step(self, trainable: Trainable, member: int, step: int, segment: int | None) -> ResultRow:
        """Trains one step (from ``step - 1`` to ``step``) and returns its record."""
        metrics, score = read_metrics(trainable.step(), self.exp.metric)
        return ResultRow(member, step, score, metrics, segment, worker_device())

    def save(self, trainable: Trainable, member: int, step: int) -> tuple[str, int]:
        """Checkpoints the trainable's state (user code: ``state_dict``).

        A write that fails (`OSError`: a full disk, a lost mount) is tried again after each
        pause of `SAVE_BACKOFF`; then the run cannot go on.

        Raises:
            ConfigurationError: The state holds objects safe loading refuses.
            InfrastructureError: The checkpoint could not be written, after every try.
        """
        state = trainable.state_dict()
        for pause in (*SAVE_BACKOFF, None):
            try:
                saved = self.ckpts.save(self.name, member, step, state)
                return saved.location, int(saved.size)
            except UnsafeCheckpoint as e:
                raise ConfigurationError(str(e)) from None
            except OSError as e:
                if pause is None:
                    raise InfrastructureError(
                        f"Run {self.name!r}: checkpoints cannot be written ({type(e).__name__}: "
                        f"{e}), member {member} at step {step}, after {len(SAVE_BACKOFF)} "
                        "retries. Everything committed is kept; free space (or fix the "
                        "checkpoint folder), then resume the run."
                    ) from None
                _log_retry(f"Checkpoint write failed ({e}); retrying in {pause:g} s.")
                time.sleep(pause)
        raise AssertionError("unreachable")

    # -- commit --------------------------------------------------------------------------------

    def commit(
        self,
        tx: Transaction,
        pbt: PBT,
        trained: Sequence[Trained],
        stored: Mapping[int, MemberRow],
        *,
        keep_owner: bool,
    ) -> Committed:
        """Records trained stretches and judges the members at their ready points.

        ``pbt`` is the controller as stored (or, for a worker holding every member, as kept
        in memory); the results are reported to it here. Members that reached a ready point
        or their last step are judged in id order; a synchronous generation's decisions for
        members not in ``trained`` are recorded too. Refused (`LeaseLost`) unless this worker
        holds every trained member.
        """
        for t in trained:
            tx.require_owner(t.member, self.worker, known=stored)
        results: list[ResultRow] = []
        changes: dict[int, dict[str, Any]] = {}
        refs = {mid: (r.checkpoint, r.checkpoint_step) for mid, r in stored.items()}
        t_now = tx.now()
        for t in trained:
            for r in t.results:
                pbt.report(t.member, r.step, r.score)
            results.extend(t.results)
            refs[t.member] = (t.location, t.step)
            changes[t.member] = {
                "checkpoint": t.location,
                "checkpoint_step": t.step,
                "attempts": 0,
                "owner": self.worker if keep_owner else None,
                "heartbeat": t_now if keep_owner else None,
            }
        tx.add_checkpoints([(t.member, t.step, t.location, t.size) for t in trained])
        batches: list[list[Decision]] = []
        for t in sorted(trained, key=lambda t: t.member):
            m = pbt.members[t.member]
            if m.status != "running" or m.step < pbt.next_ready(t.member):
                continue
            d = pbt.decide(t.member)
            batches.append([d])
            batches.append(pbt.collect())
        events = self._lineage(tx, pbt, batches, refs, changes, {})
        rows = member_rows(pbt, stored, changes)
        write_population(tx, pbt, rows, stored)
        tx.add_results(results)
        tx.add_events(events)
        saved = {t.member for t in trained}
        doomed = retention(tx, self.options.keep_checkpoints, rows, stored, saved)
        return Committed(rows, doomed)

    def _lineage(
        self,
        tx: Transaction,
        pbt: PBT,
        batches: Sequence[Sequence[Decision]],
        refs: dict[int, tuple[str | None, int | None]],
        changes: dict[int, dict[str, Any]],
        kinds: Mapping[int, str],
    ) -> list[dict[str, Any]]:
        """Lineage events for the decisions that changed members, and the checkpoint each such
        member must be restored from.

        Decisions of one batch (a synchronous generation) were all made against the states at
        the barrier, so a member copying a donor takes the donor's checkpoint as it was before
        the batch; later batches see what earlier ones changed. Each changed member's
        ``segment`` becomes its new event's index.
        """
        events: list[dict[str, Any]] = []
        first = tx.event_count()
        for batch in batches:
            before = dict(refs)
            for d in batch:
                if d.action not in ("exploit", "explore"):
                    continue
                if d.copies_state:
                    assert d.donor is not None
                    refs[d.member] = before[d.donor]
                elif d.donor is None:  # a fresh replacement: no state to load
                    refs[d.member] = (None, None)
                location, step = refs.get(d.member, (None, None))
                changes.setdefault(d.member, {}).update(
                    {"checkpoint": location, "checkpoint_step": step}
                )
                index = first + len(events)
                pbt.members[d.member].segment = index
                events.append(_event(index, d, kinds.get(d.member)).to_dict())
        return events

    # -- failures ------------------------------------------------------------------------------

    def record_failure(
        self,
        tx: Transaction,
        pbt: PBT,
        member: int,
        exc: BaseException,
        stored: Mapping[int, MemberRow],
        *,
        keep_owner: bool,
        results: Sequence[ResultRow] = (),
        step: int | None = None,
    ) -> tuple[str, Committed | None]:
        """The one failure policy. Returns ``("retry", None)`` when the member is to be
        restored from its last checkpoint and trained again, or ``("replaced", committed)``
        when it failed for good and a copy of a top member took its place. ``results``: steps
        the member trained and reported before the failure and not yet committed; kept when it
        fails for good (a retry replays them). ``step``: the member's step when it failed (by
        default its stored step).

        Raises:
            RunFailed: A configuration error, or more members failed for good than
                ``max_failures`` allows; the run is marked failed in ``tx``.
            ConfigurationStop: ``exc`` is a failed restore (``load_state_dict``) that the
                code is to blame for (see the module docstring); the run is marked
                interrupted in ``tx``, the member released and not charged a retry.
        """
        tx.require_owner(member, self.worker, known=stored)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        row = stored[member]
        step = int(row.state["step"]) if step is None else step
        attempt = row.attempts + 1
        restoring, self._restore_failure = self._restore_failure, None
        if restoring is not None and restoring[0] is exc:
            location = restoring[1]
            text = _restore_head(member, location, exc) + text
            cause = self._code_to_blame(tx, member, location, exc)
            if cause is not None:
                tx.add_failure(FailureRow(member, step, row.attempts, text, tx.now()))
                tx.put_members([self._held(tx, row, row.attempts, keep_owner)])
                self._halt(tx, cause)
        # A retry re-seeds the member's streams with retry_seed(seed, member, step, attempt):
        # what this record holds is all it takes to know with what.
        tx.add_failure(FailureRow(member, step, attempt, text, tx.now()))
        if isinstance(exc, ConfigurationError):
            self._stop(tx, f"{exc}\n\n{text}")
        if attempt <= self.options.max_retries:
            tx.put_members([self._held(tx, row, attempt, keep_owner)])
            return "retry", None
        failed = sum(1 for r in stored.values() if r.state["status"] == "failed") + 1
        if failed - self.failed_before > self.budget:
            tx.put_members([self._held(tx, row, attempt, keep_owner)])
            self._stop(
                tx,
                f"Run {self.name!r} stopped: {failed - self.failed_before} members failed after "
                f"{self.options.max_retries} retries each (more than max_failures="
                f"{self.budget}). Last one, member {member} at step {step}:\n{text}",
            )
        tx.add_results(results)
        pbt.fail(member)
        batches: list[list[Decision]] = [pbt.collect()]
        new = pbt.replace(member)
        batches += [[new], pbt.collect()]
        changes: dict[int, dict[str, Any]] = {member: {"attempts": attempt}}
        if not keep_owner:
            changes[member].update({"owner": None, "heartbeat": None})
        else:
            changes[new.member] = {"owner": self.worker, "heartbeat": tx.now()}
        refs = {mid: (r.checkpoint, r.checkpoint_step) for mid, r in stored.items()}
        events = self._lineage(tx, pbt, batches, refs, changes, {new.member: "replace"})
        rows = member_rows(pbt, stored, changes)
        write_population(tx, pbt, rows, stored)
        tx.add_events(events)
        return "replaced", Committed(rows)

    def record_damaged(
        self,
        tx: Transaction,
        pbt: PBT,
        member: int,
        exc: DamagedCheckpoint,
        stored: Mapping[int, MemberRow],
        *,
        keep_owner: bool,
    ) -> Committed:
        """A checkpoint that ``member`` could not restore from is damaged or missing: no
        member's fault. Records the failure against the member whose file it is (attempt 0:
        no retry is used up), forgets the file so that no member copies it again, and puts
        every member standing on it back to that member's previous kept checkpoint, retraining
        the steps between (`PBT.rollback`; from scratch when none is left), each with a
        ``rollback`` lineage event. Members another worker holds are left to it. ``member``
        is released (or kept, with ``keep_owner``).
        """
        tx.require_owner(member, self.worker, known=stored)
        location = exc.location
        owner = checkpoint_owner(location)
        rows_of_owner = tx.checkpoints([owner]) if owner is not None else []
        kept = [c for c in rows_of_owner if c.member == owner and c.location != location]
        bad = [c for c in rows_of_owner if c.location == location]
        bad_step = bad[0].step if bad else stored[member].checkpoint_step or 0
        # Its previous checkpoint, else (a copier standing on an old file) its newest one.
        earlier = [c for c in kept if c.step <= bad_step] or kept
        fallback = max(earlier, key=lambda c: c.id) if earlier else None
        tx.delete_checkpoints([location])
        # A member another worker holds is left to it: it trains on from its live state, or
        # finds the damage itself when it loads the file (and goes back then).
        on_it = sorted(
            mid
            for mid, r in stored.items()
            if r.checkpoint == location
            and r.state["status"] != "failed"
            and r.owner in (None, self.worker)
        )
        where = (
            f"member {owner}'s checkpoint at step {fallback.step}"
            if fallback is not None
            else "scratch (no other checkpoint of it is kept)"
        )
        text = (
            f"Damaged checkpoint: {exc} Found by member {member} restoring it; members "
            f"{on_it} went back to {where}.\n"
        )
        blamed = owner if owner is not None and owner in stored else member
        if bad or on_it:  # else: found and dealt with already (a worker's batch held a row
            # read before another member of the batch met the file); only the finder is freed
            tx.add_failure(FailureRow(blamed, int(bad_step), 0, text, tx.now()))
            _log_retry(text.strip())
        step = fallback.step if fallback is not None else 0
        changes: dict[int, dict[str, Any]] = {}
        events: list[dict[str, Any]] = []
        first = tx.event_count()
        for mid in on_it:
            pbt.rollback(mid, step)
            m = pbt.members[mid]
            m.segment = first + len(events)
            events.append(
                Event(
                    index=m.segment,
                    member=mid,
                    step=step,
                    donor=owner if fallback is not None else None,
                    donor_step=step,
                    old_hparams=dict(m.hparams),
                    new_hparams=dict(m.hparams),
                    kind="rollback",
                ).to_dict()
            )
            changes[mid] = {
                "checkpoint": fallback.location if fallback is not None else None,
                "checkpoint_step": step if fallback is not None else None,
                "attempts": 0,
            }
        if not keep_owner:
            changes.setdefault(member, {}).update({"owner": None, "heartbeat": None})
        rows = member_rows(pbt, stored, changes)
        write_population(tx, pbt, rows, stored)
        tx.add_events(events)
        return Committed(rows)

    def _code_to_blame(
        self, tx: Transaction, member: int, location: str, exc: BaseException
    ) -> str | None:
        """The message that stops the run when ``member`` failing to load ``location`` is the
        code's doing (the module docstring says when), else None."""
        what = exception_text(exc)
        changed = tx.run().execution.get("code_changed")
        if changed:
            files = ", ".join(changed.get("files", []))
            return stop_message(
                self.name,
                f"code changed since the run's checkpoints were written ({files}): restoring "
                f"member {member} failed with {what}",
                "No member was failed. Revert the file (then resume the run), or start a new "
                "run under another name.",
            )
        signature = _signature(exc)
        # Read only for a failed restore, which is rare: the run's failures may be many.
        for f in self.storage.failures(self.name):
            head = _RESTORE_HEAD.match(f.traceback)
            if head is None or head["signature"] != signature:
                continue
            other, where = int(head["member"]), head["location"]
            if other != member:
                return stop_message(
                    self.name,
                    f"every restore fails the same way: member {other} loading {where} and "
                    f"member {member} loading {location} both failed with {what}",
                    "That is the code or its environment (an edited model, another library "
                    "version), not a member's fault: no member was failed and no retry used "
                    "up. Fix it (or revert the edit), then resume the run.",
                )
        return None

    def _halt(self, tx: Transaction, message: str) -> None:
        """Stops the run without blaming a member: it is marked interrupted in ``tx``."""
        tx.set_status("interrupted", message)
        raise _Halt(message)

    def _held(self, tx: Transaction, row: MemberRow, attempts: int, keep_owner: bool) -> MemberRow:
        """The row after a failed attempt: still this worker's, or released for any worker."""
        if keep_owner:
            return replace(row, attempts=attempts, owner=self.worker, heartbeat=tx.now())
        return replace(row, attempts=attempts, owner=None, heartbeat=None)

    def _stop(self, tx: Transaction, message: str) -> None:
        tx.set_status("failed", message)
        raise _Stop(message)


def _log_retry(message: str) -> None:
    import logging

    logging.getLogger("poptune").warning(message)


class _Stop(RunFailed):
    """Raised inside a transaction that must still commit (the run is marked failed in it)."""


class _Halt(_Stop):
    """A `_Stop` that leaves the run resumable (`ConfigurationStop`)."""


#: The first line of a failed restore's record: who loaded what, and a signature of the
#: exception (its type and message), by which `Lifecycle.record_failure` finds the same
#: failure of another member.
_RESTORE_HEAD = re.compile(
    r"Restoring member (?P<member>\d+) from checkpoint (?P<location>\S+) failed in "
    r"load_state_dict \[(?P<signature>[0-9a-f]{16})\]"
)


def _restore_head(member: int, location: str, exc: BaseException) -> str:
    return (
        f"Restoring member {member} from checkpoint {location} failed in load_state_dict "
        f"[{_signature(exc)}]\n"
    )


def _signature(exc: BaseException) -> str:
    kind = type(exc)
    text = f"{kind.__module__}.{kind.__qualname__}: {exc}"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


def exception_text(error: BaseException, lines: int = 12, chars: int = 2000) -> str:
    """``Type: message`` of an exception, cut to ``lines`` lines and ``chars`` characters
    (a state_dict size mismatch lists every tensor)."""
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    cut = "\n".join(text.splitlines()[:lines])[:chars]
    return cut + (" ..." if cut != text else "")


@contextlib.contextmanager
def committing(
    storage: Storage, name: str, identity: RunIdentity | None = None
) -> Iterator[Transaction]:
    """A run transaction that commits even when the failure policy stops the run in it (the
    run's failed status and the failure record must be kept), with Ctrl-C held back.

    With ``identity``, the run must still be the one its worker was started for
    (`check_identity`): else `RunReplaced` is raised before anything is written.

    A storage that cannot be used when the transaction begins (`StorageUnavailable`: a
    database server restarting, a full disk) is waited for, after each pause of
    `STORAGE_BACKOFF` (about a minute in all); then the error is raised. Nothing was written.

    A configuration error raised in it (an explore strategy returning hyperparameters outside
    the space, in a commit's decisions) rolls it back and marks the run failed in a
    transaction of its own: every worker would make the same decision and fail the same way,
    so retrying it (or restarting the worker) cannot help.
    """
    stop: _Stop | None = None
    entered = False
    try:
        # Ctrl-C is held back from the beginning of the transaction to its end (an interrupt
        # between the two would leave it open, holding the run's lock), but not during the
        # pauses of an outage: those are outside.
        for pause in (*STORAGE_BACKOFF, None):
            unavailable: StorageUnavailable | None = None
            with deferred_interrupts():
                stack = contextlib.ExitStack()
                try:
                    tx = stack.enter_context(storage.transaction(name))
                except StorageUnavailable as e:
                    if pause is None:
                        raise
                    unavailable = e
                else:
                    with stack:
                        check_identity(tx.run() if identity is not None else None, name, identity)
                        entered = True
                        try:
                            yield tx
                        except _Stop as e:
                            stop = e
            if unavailable is None:
                break
            assert pause is not None
            _log_retry(f"{unavailable}; trying again in {pause:g} s.")
            time.sleep(pause)
    except StorageError:
        if not entered and identity is not None and storage.get_run(name) is None:
            check_identity(None, name, identity)  # deleted: RunReplaced, not "no such run"
        raise
    except (ConfigurationError, ExploreError) as e:
        cause = e.__cause__
        trace = "" if cause is None else "\n\n" + "".join(traceback.format_exception(cause))
        stop = _Stop(f"Run {name!r} stopped by a configuration error: {e}{trace}")
        with deferred_interrupts(), storage.transaction(name) as tx:
            tx.set_status("failed", str(stop))
    if stop is not None:
        kind = ConfigurationStop if isinstance(stop, _Halt) else RunFailed
        raise kind(str(stop)) from None


#: Seconds waited before each new try to begin a transaction on a storage that cannot be used
#: (`committing`): about a minute in all, then `StorageUnavailable` is raised.
STORAGE_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def _event(index: int, d: Decision, kind: str | None) -> Event:
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


class Heartbeat:
    """Refreshes the heartbeat of every member a worker holds, from a daemon thread."""

    def __init__(self, storage: Storage, name: str, worker: str, timeout: float) -> None:
        self.storage, self.name, self.worker = storage, name, worker
        self.interval = timeout / 4
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poptune-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is retried
                self.storage.heartbeat(self.name, self.worker)  # on the storage's clock

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def limit_threads(count: int) -> None:
    """Sets this process's math-library thread count (torch too, when it is imported)."""
    import sys

    for var in THREAD_VARIABLES:
        os.environ[var] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(count)
