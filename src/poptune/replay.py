"""Replay: train one fresh member from scratch along a schedule a run discovered.

A PBT run's answer is a *schedule*: the hyperparameters in force at every step along a
member's ancestry (`poptune.Result.schedule`). `replay` trains a single new member of the same
experiment from step 0, switching its hyperparameters (`poptune.Trainable.set_hparams`) at
exactly the steps where the schedule changes them, records it as a run of its own in the same
storage, and gives back its score beside the original member's.

Seeds. By default the replayed member gets the seed its ancestry started from: that of the
schedule's *root ancestor* (the member that trained step 1; `poptune.controller.member_seed`
of the experiment's seed and that member's id). A member copies its donor's whole state
(weights, optimizer, random streams) at an exploit, so, along an ancestry, every step was
trained from the state the root's seed began: with the root's seed, a deterministic member
replays its original exactly, and one whose randomness is not part of its state (noise drawn
from a stream the member keeps for itself, not checkpointed) replays it within that noise.
``seed=N`` gives the member seed ``N`` instead: a fresh draw, to see how much of the original
score was luck.

The replay is recorded when it has trained to the end, as run ``RUN-replay-mID`` (by default)
with one member (its id is the replayed member's), its history, one event of kind
``"schedule"`` at each change of hyperparameters (so `poptune.Result.schedule` of the replay
gives back the schedule it followed), its final checkpoint, and ``config["replay"]`` naming
the source run, member, root ancestor and seed. ``poptune status``, ``export`` and
`poptune.load` read it like any run.

Example:
    >>> import poptune as pt
    >>> def init(hp, seed): return 0.0
    >>> def step(x, hp): return x + hp["lr"], x + hp["lr"]
    >>> exp = pt.Experiment(pt.trainable(init, step), {"lr": pt.Float(0.1, 1.0)},
    ...                     population_size=4, steps=20, interval=5, seed=1)
    >>> result = exp.run()
    >>> replay = result.replay()
    >>> replay.score == result.best.score
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from poptune.controller import MemberState, member_seed
from poptune.result import Event, Result
from poptune.storage.base import MemberRow, ResultRow

if TYPE_CHECKING:
    from poptune.experiment import Experiment
    from poptune.storage.base import Storage

__all__ = ["Replay", "replay", "replay_name"]

#: The kind of the events a replay records where its schedule changes hyperparameters.
SCHEDULE_EVENT = "schedule"


@dataclass(frozen=True)
class Replay:
    """A replayed schedule and how it compares with the original.

    Attributes:
        run: The source run.
        member: The member whose schedule was replayed.
        root: The member that trained step 1 of that schedule (its root ancestor).
        name: The replay's own run name.
        seed: The seed the replayed member was built with.
        steps: Steps trained.
        changes: How many times the hyperparameters changed along the schedule.
        metric: The score's metric; ``mode``: ``"max"`` or ``"min"``.
        original: The member's final score in the source run (None if it had none).
        score: The replayed member's score at the same step.
        result: The replay's `poptune.Result` (one member, its history and schedule).
    """

    run: str
    member: int
    root: int
    name: str
    seed: int
    steps: int
    changes: int
    metric: str
    mode: str
    original: float | None
    score: float
    result: Result

    @property
    def difference(self) -> float:
        """``score - original`` (NaN when the original had no score)."""
        return math.nan if self.original is None else self.score - self.original

    def __str__(self) -> str:
        original = "-" if self.original is None else f"{self.original:.6g}"
        return (
            f"{self.metric} ({self.mode}) at step {self.steps}: original {original} "
            f"(run {self.run}, member {self.member}), replayed {self.score:.6g} "
            f"(run {self.name}), difference {self.difference:+.3g}"
        )


def replay_name(run: str, member: int) -> str:
    """The default name of a replay: ``RUN-replay-mID``."""
    return f"{run}-replay-m{member}"


def replay(
    source: Result,
    member: int | None = None,
    *,
    experiment: Experiment | None = None,
    storage: str | Storage | None = None,
    name: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> Replay:
    """Trains one fresh member along ``member``'s schedule and records it as a run.

    The member trains with the math-library threads (torch, OpenMP, BLAS) that each of the
    run's workers had: as fast as it trained in the run, and without one thread per core
    fighting the other processes of the machine for them. This process's setting is put back
    afterwards.

    Args:
        source: The run whose schedule is replayed (`Experiment.run` or `poptune.load`).
        member: The member; the best member when None.
        experiment: The `poptune.Experiment` that builds members; by default the one that ran
            (or the one its ``FILE.py:NAME`` source defines, for a run started from a file).
        storage: Where the replay is recorded; by default the source run's storage.
        name: The replay's run name; ``RUN-replay-mID`` by default. It must not exist.
        seed: The replayed member's seed; None: the root ancestor's (see the module
            docstring).
        device: Where to build the member (``"cuda:0"``); by default the member's own default.
        threads: Math-library threads while it trains (>= 1); None: ``OMP_NUM_THREADS`` when
            the environment sets it, else each of the run's workers' share of the cores
            (`poptune.execution.threads.member_threads`).

    Raises:
        ValueError: No such member, a member with no history to replay, no experiment to
            build members with, an experiment that does not fit the run, or a replay name
            that is taken.
    """
    from poptune.execution.lifecycle import read_metrics
    from poptune.execution.session import fingerprint, load_result
    from poptune.execution.threads import limited_threads, member_threads
    from poptune.trainable import MemberContext, Trainable, set_worker_device, worker_device

    record = _member(source, member)
    schedule = source.schedule(record.id)
    if not schedule:
        raise ValueError(
            f"Member {record.id} of run {source.name!r} has no history to replay (it is at "
            f"step {record.step}: it never trained a step)."
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"`threads` must be None or an integer >= 1, but got {threads!r}.")
    exp = _experiment(source, experiment)
    count = member_threads(threads, source.states.execution if source.states else {})
    root = schedule[0].member
    member_seed_ = member_seed(exp.seed, root) if seed is None else _check_seed(seed)
    name = name or replay_name(source.name, record.id)
    ref, store, where, ckpts, root_dir = _destination(source, storage, name)
    owned = store is not ref
    try:
        # Every check before training: a replay can be long.
        if store.get_run(name) is not None:
            raise ValueError(
                f"Run {name!r} already exists in {store.display_url}: choose another name "
                "(name=, --name) or delete it first (poptune delete)."
            )
        before = worker_device()
        set_worker_device(device if device is not None else before)
        try:
            with limited_threads(count):
                trainable = exp.trainable(dict(schedule[0].hparams), member_seed_)
                if not isinstance(trainable, Trainable):
                    raise ValueError(
                        f"`trainable` must build a pt.Trainable, but {exp.trainable!r} returned "
                        f"{type(trainable).__name__}."
                    )
                results: list[ResultRow] = []
                events: list[Event] = []
                segment: int | None = None
                try:
                    current = dict(schedule[0].hparams)
                    trainable.set_hparams(current)
                    trainable.context = MemberContext(
                        run=name, member=record.id, worker="replay", step=0, device=worker_device()
                    )
                    for s in schedule:
                        if dict(s.hparams) != current:
                            segment = len(events)
                            events.append(
                                _switch(segment, record.id, s.step - 1, current, s.hparams)
                            )
                            current = dict(s.hparams)
                            trainable.set_hparams(current)
                        metrics, score = read_metrics(trainable.step(), exp.metric)
                        results.append(
                            ResultRow(record.id, s.step, score, metrics, segment, worker_device())
                        )
                    state = trainable.state_dict()
                finally:
                    trainable.close()
        finally:
            set_worker_device(before)
        end = schedule[-1].step
        config = dict(exp.describe())
        config.update(
            population_size=1,
            steps=end,
            initial_population={str(record.id): dict(schedule[0].hparams)},
            replay={"run": source.name, "member": record.id, "root": root, "seed": member_seed_},
        )
        saved = ckpts.save(name, record.id, end, state)
        final = results[-1].score
        window = [r.score for r in results[-10:]]
        row = MemberRow(
            MemberState(
                id=record.id,
                hparams=current,
                step=end,
                last_ready=end,
                score=final,
                score_step=end,
                window=window,
                status="finished",
                segment=segment,
            ).to_dict(),
            checkpoint=saved.location,
            checkpoint_step=end,
        )
        info = store.create_run(
            name,
            config,
            fingerprint(config),
            checkpoint_root=root_dir,
            members=[row],
        )
        if root_dir is not None:
            from poptune.storage.folders import claim_checkpoint_folder

            claim_checkpoint_folder(root_dir, name, where, info.created)
        with store.transaction(name) as tx:
            tx.add_results(results)
            tx.add_events([e.to_dict() for e in events])
            tx.add_checkpoint(record.id, end, saved.location, int(saved.size))
            tx.set_status("completed")
        store.update_run(name, execution={"executor": "replay", "workers": 1})
        replayed = load_result(
            store,
            name,
            checkpoints=ckpts if root_dir is None else None,
            experiment=exp,
            storage_ref=ref,
        )
    finally:
        if owned:
            store.close()
    return Replay(
        run=source.name,
        member=record.id,
        root=root,
        name=name,
        seed=member_seed_,
        steps=end,
        changes=len(events),
        metric=source.metric,
        mode=source.mode,
        original=record.score,
        score=final,
        result=replayed,
    )


def _member(source: Result, member: int | None) -> Any:
    if not source.members:
        raise ValueError(f"Run {source.name!r} has no members: nothing to replay.")
    if member is None:
        return source.best
    try:
        return source.member(member)
    except KeyError:
        ids = ", ".join(str(m.id) for m in source.members)
        raise ValueError(
            f"Run {source.name!r} has no member {member!r}; its members are {ids}."
        ) from None


def _experiment(source: Result, given: Experiment | None) -> Experiment:
    states = source.states
    exp = given or (states.experiment if states is not None else None)
    if exp is None and states is not None and states.source:
        from poptune.execution.source import load_experiment

        exp = load_experiment(states.source)[0]
    if exp is None:
        raise ValueError(
            f"Run {source.name!r}: pass experiment= to replay it (it was not started from a "
            "file poptune can load again)."
        )
    if exp.metric != source.metric or exp.mode != source.mode:
        raise ValueError(
            f"The experiment scores {exp.metric!r} ({exp.mode}), but run {source.name!r} "
            f"scored {source.metric!r} ({source.mode}): it is not the experiment that ran."
        )
    names = {k for h in source.initial_hparams.values() for k in h}
    if names and names != set(exp.space):
        raise ValueError(
            f"The experiment's hyperparameters are {sorted(exp.space)}, but run "
            f"{source.name!r} has {sorted(names)}: it is not the experiment that ran."
        )
    return exp


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be None or an integer >= 0, but got seed={seed!r}.")
    return seed


def _destination(
    source: Result, storage: str | Storage | None, name: str
) -> tuple[str | Storage, Storage, str, Any, str | None]:
    """Where to record: the storage as given (a URL or a `Storage`), the storage opened, its
    identity, and the checkpoint store and root for the replay's final state."""
    from poptune.storage import open_storage
    from poptune.storage.checkpoints import check_run_name
    from poptune.storage.memory import MemoryCheckpointStore

    check_run_name(name)
    ref = storage if storage is not None else (source.states.storage if source.states else None)
    if ref is None:
        raise ValueError(
            f"Run {source.name!r}: pass storage= to record its replay (this Result does not "
            "say where its run is kept)."
        )
    store = open_storage(ref)
    where = ref if isinstance(ref, str) else store.display_url
    if store.display_url.startswith("memory://"):
        held = source.states.store if source.states is not None else None
        ckpts = held if hasattr(held, "save") else MemoryCheckpointStore()
        return ref, store, where, ckpts, None
    try:
        from poptune.execution import default_checkpoint_root
        from poptune.storage.checkpoints import CheckpointStore
        from poptune.storage.folders import check_checkpoint_folder

        info = store.get_run(source.name)
        root = (info.checkpoint_root if info is not None else None) or default_checkpoint_root(
            where
        )
        check_checkpoint_folder(root, name, where, None)
        allow = bool(info is not None and info.config.get("allow_pickle", False))
        return ref, store, where, CheckpointStore(root, allow_pickle=allow), root
    except BaseException:
        if store is not ref:
            store.close()
        raise


def _switch(
    index: int, member: int, step: int, old: Mapping[str, Any], new: Mapping[str, Any]
) -> Event:
    return Event(
        index=index,
        member=member,
        step=step,
        donor=member,
        donor_step=step,
        old_hparams=dict(old),
        new_hparams=dict(new),
        kind=SCHEDULE_EVENT,
    )
