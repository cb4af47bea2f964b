"""The storage contract (`poptune.storage.base`), checked against every backend.

Each test runs on the in-memory storage, a SQLite file and a real PostgreSQL database (see
``conftest.py``). The process tests start real worker processes that share one database, as
distributed workers do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from poptune.storage import (
    CheckpointRow,
    FailureRow,
    LeaseLost,
    MemberBusy,
    MemberRow,
    ResultRow,
    RunExists,
    Storage,
    StorageError,
    open_storage,
)
from poptune.storage.leases import namespace_id, new_worker_id

RUN = "run-a"
OTHER = "run-b"

CONFIG: dict[str, Any] = {
    "seed": 7,
    "population": 4,
    "lr": 0.001,
    "tiny": 1e-300,
    "whole": 1.0,
    "negative_zero": -0.0,
    "huge_int": 2**63 - 1,
    "name": "ünïcode ✓ \"quoted\" 'single'",
    "flag": True,
    "off": False,
    "nothing": None,
    "empty": {},
    "space": {
        "lr": {"low": 1e-5, "high": 0.1, "log": True},
        "layers": [1, 2, 3],
        "mixed": [1, 2.5, "x", None, True, {"deep": [[], [0.0, -1]]}],
    },
}


def member_state(
    member: int,
    *,
    step: int = 0,
    score: float | None = 0.5,
    window: Sequence[float] = (0.5,),
    hparams: Mapping[str, Any] | None = None,
    status: str = "ready",
) -> dict[str, Any]:
    """A member's state as `poptune.MemberState.to_dict` writes it."""
    return {
        "id": member,
        "hparams": dict(
            hparams or {"lr": 0.01, "batch": 32, "optimizer": "adam", "nesterov": True}
        ),
        "step": step,
        "last_ready": step,
        "score": score,
        "score_step": None if score is None else step,
        "window": list(window),
        "status": status,
        "decisions": 0,
        "replaces": None,
    }


def event(index: int, member: int = 0, *, kind: str = "exploit") -> dict[str, Any]:
    """A lineage event as `poptune.Event` fields."""
    return {
        "index": index,
        "member": member,
        "step": 10 * (index + 1),
        "donor": None if kind == "replace" else (member + 1) % 4,
        "donor_step": None if kind == "replace" else 10 * index,
        "kind": kind,
        "old_hparams": {"lr": 0.01, "batch": 32, "optimizer": "adam", "nested": {"on": True}},
        "new_hparams": {"lr": 0.012, "batch": 64, "optimizer": "sgd", "nested": {"on": False}},
        "operations": {"lr": "*1.2", "batch": "resample"},
    }


def assert_exact(got: Any, want: Any, path: str = "value") -> None:
    """Equal with the same scalar types: NaN matches NaN, 1 is not 1.0, -0.0 is not 0.0."""
    if dataclasses.is_dataclass(want) and not isinstance(want, type):
        assert type(got) is type(want), f"{path}: {type(got).__name__}, want {type(want)}"
        for f in dataclasses.fields(want):
            assert_exact(getattr(got, f.name), getattr(want, f.name), f"{path}.{f.name}")
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"{path}: {got!r} is not a mapping"
        assert set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_exact(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)), f"{path}: {got!r} is not a sequence"
        assert len(got) == len(want), f"{path}: {len(got)} items, want {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_exact(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want), f"{path}: {got!r} ({type(got).__name__}), want {want!r}"
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r}, want nan"
        else:
            assert got == want, f"{path}: {got!r}, want {want!r}"
            if isinstance(want, float):
                assert math.copysign(1.0, got) == math.copysign(1.0, want), f"{path}: sign"


def by_id(rows: Sequence[MemberRow]) -> dict[int, MemberRow]:
    return {row.id: row for row in rows}


class Boom(Exception):
    """Raised inside a transaction to make it fail."""


# -- runs -------------------------------------------------------------------------------------


def test_create_run_round_trips_the_record(storage: Storage) -> None:
    """A created run reads back with its config exactly as given and status "created"."""
    before = time.time()
    created = storage.create_run(
        RUN, CONFIG, "fp-1", source="train.py:main", checkpoint_root="/ckpt/root"
    )
    got = storage.get_run(RUN)
    assert got is not None
    for info in (created, got):
        assert info.name == RUN
        assert_exact(info.config, CONFIG, "config")
        assert info.fingerprint == "fp-1"
        assert info.status == "created"
        assert info.source == "train.py:main"
        assert info.checkpoint_root == "/ckpt/root"
        assert info.error is None
        assert info.generation == 0
        assert_exact(info.pending, {}, "pending")
        assert before - 1 <= info.created <= info.updated <= time.time() + 1
    assert [r.name for r in storage.list_runs()] == [RUN]


def test_create_run_defaults_source_and_checkpoint_root_to_none(storage: Storage) -> None:
    """Optional run fields left out read back as None."""
    storage.create_run(RUN, {}, "fp")
    info = storage.get_run(RUN)
    assert info is not None
    assert (info.source, info.checkpoint_root, dict(info.config)) == (None, None, {})


def test_create_run_twice_raises_run_exists(storage: Storage) -> None:
    """A second run with a taken name raises RunExists and leaves the first one untouched."""
    storage.create_run(RUN, CONFIG, "fp-1", members=[MemberRow(member_state(0))])
    with pytest.raises(RunExists, match=RUN):
        storage.create_run(RUN, {"other": 1}, "fp-2", members=[MemberRow(member_state(5))])
    assert issubclass(RunExists, StorageError)
    info = storage.get_run(RUN)
    assert info is not None
    assert_exact(info.config, CONFIG, "config")
    assert info.fingerprint == "fp-1"
    assert [m.id for m in storage.members(RUN)] == [0]
    assert len(storage.list_runs()) == 1


def test_unknown_run_reads_as_none(storage: Storage) -> None:
    """get_run of a name never created is None, and an empty storage lists no runs."""
    assert storage.get_run("nope") is None
    assert storage.list_runs() == []
    storage.create_run(RUN, {}, "fp")
    assert storage.get_run("nope") is None


def test_operations_on_an_unknown_run_raise_storage_error(storage: Storage) -> None:
    """Writing to or reading the population of a run that does not exist is an error."""
    with pytest.raises(StorageError, match="nope"), storage.transaction("nope"):
        pass
    with pytest.raises(StorageError, match="nope"):
        storage.update_run("nope", status="running")
    for read in (storage.members, storage.results, storage.events, storage.checkpoints):
        with pytest.raises(StorageError, match="nope"):
            read("nope")


def test_list_runs_is_oldest_first(storage: Storage) -> None:
    """list_runs returns runs in creation order, not name order."""
    for name in ("b", "a", "c"):
        storage.create_run(name, {"name": name}, "fp")
    assert [r.name for r in storage.list_runs()] == ["b", "a", "c"]
    assert [r.config["name"] for r in storage.list_runs()] == ["b", "a", "c"]


def test_update_run_changes_only_the_fields_given(storage: Storage) -> None:
    """Each update_run changes the fields it names and nothing else."""
    storage.create_run(
        RUN,
        CONFIG,
        "fp-1",
        source="a.py:f",
        checkpoint_root="/c",
        members=[MemberRow(member_state(0, step=3))],
    )

    def info() -> Any:
        got = storage.get_run(RUN)
        assert got is not None
        return got

    storage.update_run(RUN, fingerprint="fp-2")
    got = info()
    assert (got.fingerprint, got.status, got.source, got.error) == (
        "fp-2",
        "created",
        "a.py:f",
        None,
    )
    assert_exact(got.config, CONFIG, "config")

    storage.update_run(RUN, status="failed", error="boom")
    got = info()
    assert (got.fingerprint, got.status, got.error, got.source) == (
        "fp-2",
        "failed",
        "boom",
        "a.py:f",
    )

    new_config = {"seed": 8, "lr": 0.5, "nested": {"a": [1.5, None]}}
    storage.update_run(RUN, config=new_config)
    got = info()
    assert_exact(got.config, new_config, "config")
    assert (got.fingerprint, got.status, got.error, got.source) == (
        "fp-2",
        "failed",
        "boom",
        "a.py:f",
    )

    storage.update_run(RUN, source="b.py:g")
    got = info()
    assert (got.source, got.status, got.error, got.checkpoint_root) == (
        "b.py:g",
        "failed",
        "boom",
        "/c",
    )
    assert got.updated >= got.created
    assert [m.state["step"] for m in storage.members(RUN)] == [3]
    assert got.generation == 0


# -- transactions -----------------------------------------------------------------------------


def _write_everything(tx: Any, keep_location: str) -> None:
    """One of every transactional write, on a run created by `_run_with_history`."""
    rows = by_id(tx.members())
    tx.put_members(
        [
            replace(rows[0], owner="w1", heartbeat=5.0, state=member_state(0, step=9)),
            MemberRow(member_state(2, step=1)),
        ]
    )
    tx.add_results([ResultRow(0, 9, 0.75, {"loss": 0.25})])
    tx.add_events([event(0)])
    tx.add_checkpoint(0, 9, "ckpt/new", 123)
    tx.delete_checkpoints([keep_location])
    tx.set_status("running")
    tx.set_controller(3, {"waiting": [1]})
    tx.add_failure(FailureRow(1, 4, 1, "Traceback: boom", 6.0))


def _run_with_history(storage: Storage) -> CheckpointRow:
    storage.create_run(
        RUN, CONFIG, "fp", members=[MemberRow(member_state(0)), MemberRow(member_state(1))]
    )
    with storage.transaction(RUN) as tx:
        return tx.add_checkpoint(1, 0, "ckpt/keep", 10)


def test_failed_transaction_leaves_nothing_behind(storage: Storage) -> None:
    """An exception inside a transaction rolls back every write made in it."""
    keep = _run_with_history(storage)
    members_before = storage.members(RUN)

    with pytest.raises(Boom), storage.transaction(RUN) as tx:
        _write_everything(tx, keep.location)
        raise Boom

    assert_exact(storage.members(RUN), members_before, "members")
    assert storage.results(RUN) == []
    assert storage.events(RUN) == []
    assert storage.failures(RUN) == []
    assert storage.checkpoints(RUN) == [keep]
    info = storage.get_run(RUN)
    assert info is not None
    assert (info.status, info.generation, dict(info.pending)) == ("created", 0, {})
    with storage.transaction(RUN) as tx:
        assert tx.event_count() == 0
        assert tx.checkpoints() == [keep]


def test_storage_is_usable_after_a_failed_transaction(storage: Storage) -> None:
    """A rolled-back transaction releases the run: the next one commits normally."""
    keep = _run_with_history(storage)
    with pytest.raises(Boom), storage.transaction(RUN) as tx:
        _write_everything(tx, keep.location)
        raise Boom
    with storage.transaction(RUN) as tx:
        _write_everything(tx, keep.location)
    assert [m.id for m in storage.members(RUN)] == [0, 1, 2]
    assert len(storage.results(RUN)) == 1


def test_successful_transaction_makes_every_write_visible(storage: Storage) -> None:
    """A transaction that completes publishes all of its writes together."""
    keep = _run_with_history(storage)
    with storage.transaction(RUN) as tx:
        _write_everything(tx, keep.location)

    rows = by_id(storage.members(RUN))
    assert sorted(rows) == [0, 1, 2]
    assert (rows[0].owner, rows[0].heartbeat, rows[0].state["step"]) == ("w1", 5.0, 9)
    assert_exact(rows[1].state, member_state(1), "member 1")
    assert_exact(rows[2].state, member_state(2, step=1), "member 2")
    assert_exact(storage.results(RUN), [ResultRow(0, 9, 0.75, {"loss": 0.25})], "results")
    assert_exact(storage.events(RUN), [event(0)], "events")
    assert [(c.member, c.step, c.location, c.size) for c in storage.checkpoints(RUN)] == [
        (0, 9, "ckpt/new", 123)
    ]
    assert_exact(storage.failures(RUN), [FailureRow(1, 4, 1, "Traceback: boom", 6.0)], "failures")
    info = storage.get_run(RUN)
    assert info is not None
    assert (info.status, info.error, info.generation) == ("running", None, 3)
    assert_exact(info.pending, {"waiting": [1]}, "pending")


def test_transaction_run_is_the_committed_record(storage: Storage) -> None:
    """tx.run() inside a transaction shows the run's committed record."""
    storage.create_run(RUN, CONFIG, "fp-1", source="s.py:f")
    storage.update_run(RUN, status="running")
    with storage.transaction(RUN) as tx:
        info = tx.run()
        assert (info.name, info.fingerprint, info.status, info.source) == (
            RUN,
            "fp-1",
            "running",
            "s.py:f",
        )
        assert_exact(info.config, CONFIG, "config")


def test_transaction_reads_see_its_own_member_writes(storage: Storage) -> None:
    """tx.members() returns rows put earlier in the same transaction."""
    storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0))])
    with storage.transaction(RUN) as tx:
        tx.put_members([MemberRow(member_state(0, step=4), owner="w"), MemberRow(member_state(1))])
        rows = by_id(tx.members())
        assert sorted(rows) == [0, 1]
        assert (rows[0].state["step"], rows[0].owner) == (4, "w")


def test_runs_are_isolated(storage: Storage) -> None:
    """Writes to one run never show up in another."""
    storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0))])
    storage.create_run(OTHER, {}, "fp", members=[MemberRow(member_state(0, step=7))])
    with storage.transaction(RUN) as tx:
        tx.put_members([MemberRow(member_state(0, step=1), owner="w")])
        tx.add_results([ResultRow(0, 1, 0.5, {})])
        tx.add_events([event(0)])
        tx.add_checkpoint(0, 1, "a/ckpt", 1)
        tx.add_failure(FailureRow(0, 1, 1, "tb", 1.0))
        tx.set_controller(2, {"x": 1})
        tx.set_status("running")
    assert [(m.state["step"], m.owner) for m in storage.members(OTHER)] == [(7, None)]
    assert storage.results(OTHER) == []
    assert storage.events(OTHER) == []
    assert storage.checkpoints(OTHER) == []
    assert storage.failures(OTHER) == []
    other = storage.get_run(OTHER)
    assert other is not None
    assert (other.status, other.generation, dict(other.pending)) == ("created", 0, {})
    with storage.transaction(OTHER) as tx:
        assert tx.event_count() == 0
        assert tx.checkpoints() == []


# -- members ----------------------------------------------------------------------------------


NAN_STATES = [
    member_state(0, step=0, score=None, window=()),
    member_state(1, step=12, score=math.nan, window=[math.nan, 1.0, math.inf, -math.inf, 0.25]),
    member_state(2, step=30, score=math.inf, window=[-0.0, 2.0]),
    member_state(
        3,
        step=31,
        score=-math.inf,
        window=[-1e308, 5e-324],
        hparams={
            "lr": 1e-3,
            "batch": 64,
            "optimizer": "sgd",
            "nesterov": False,
            "momentum": 0.9,
            "warmup": 2.0,
            "layers": 3,
            "name": "ünï",
        },
    ),
]


def _rows() -> list[MemberRow]:
    return [
        MemberRow(NAN_STATES[0]),
        MemberRow(
            NAN_STATES[1],
            owner="host:1:abc",
            heartbeat=1712345678.123456,
            checkpoint="run-a/member-00001/step-000000012",
            checkpoint_step=12,
            attempts=2,
        ),
        MemberRow(NAN_STATES[2], owner="w2", heartbeat=0.5, checkpoint="c2", checkpoint_step=30),
        MemberRow(NAN_STATES[3], checkpoint="c3", checkpoint_step=0, attempts=7),
    ]


def test_members_round_trip_exactly(storage: Storage) -> None:
    """Member rows read back exactly: NaN/inf, ints vs floats, bools and every row field."""
    storage.create_run(RUN, {}, "fp", members=_rows()[:2])
    with storage.transaction(RUN) as tx:
        tx.put_members(_rows()[2:])
        assert_exact(tx.members(), _rows(), "members in tx")
    assert_exact(storage.members(RUN), _rows(), "members")
    assert [m.id for m in storage.members(RUN)] == [0, 1, 2, 3]


def test_put_members_updates_existing_and_inserts_new(storage: Storage) -> None:
    """put_members replaces rows whose id exists, adds the others, and reads come back by id."""
    storage.create_run(
        RUN, {}, "fp", members=[MemberRow(member_state(0)), MemberRow(member_state(1))]
    )
    updated = MemberRow(
        member_state(1, step=8, score=0.9),
        owner="w",
        heartbeat=3.0,
        checkpoint="c",
        checkpoint_step=8,
        attempts=1,
    )
    with storage.transaction(RUN) as tx:
        tx.put_members([MemberRow(member_state(5)), updated, MemberRow(member_state(3))])
    assert_exact(
        storage.members(RUN),
        [
            MemberRow(member_state(0)),
            updated,
            MemberRow(member_state(3)),
            MemberRow(member_state(5)),
        ],
        "members",
    )


def _since(storage: Storage, version: int | None) -> tuple[int, list[int]]:
    with storage.transaction(RUN) as tx:
        now, rows = tx.members_since(version)
    return now, [r.id for r in rows]


def test_members_since_returns_every_row_changed_after_a_version(storage: Storage) -> None:
    """members_since(v) holds (at least) every row written after version v, by any writer:
    a transaction, a claim, a heartbeat; the whole population for None. A worker that keeps
    rows and reads only these sees exactly what a full read would show."""
    storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(i)) for i in range(4)])
    storage.create_run(OTHER, {}, "fp", members=[MemberRow(member_state(0))])
    start, everyone = _since(storage, None)
    assert everyone == [0, 1, 2, 3]
    kept = {r.id: r for r in storage.members(RUN)}

    def refresh(version: int) -> int:
        with storage.transaction(RUN) as tx:
            now, rows = tx.members_since(version)
        assert now >= version
        kept.update((r.id, r) for r in rows)
        assert_exact(sorted(kept.values(), key=lambda r: r.id), storage.members(RUN), "kept")
        return now

    with storage.transaction(RUN) as tx:
        tx.put_members([MemberRow(member_state(2, step=4), owner="w1", heartbeat=1.0)])
    v1 = refresh(start)
    assert 2 in _since(storage, start)[1]
    with storage.transaction(RUN) as tx:
        tx.claim(1, "w1", timeout=30.0)
    v2 = refresh(v1)
    assert 1 in _since(storage, v1)[1]
    assert storage.heartbeat(RUN, "w1", 50.0) == 2
    v3 = refresh(v2)
    assert {1, 2} <= set(_since(storage, v2)[1])
    with storage.transaction(OTHER) as tx:  # another run's writes are not this run's
        tx.put_members([MemberRow(member_state(0, step=9))])
    with storage.transaction(RUN) as tx:  # a transaction that rolls back changes nothing
        tx.put_members([MemberRow(member_state(3, step=99))])
        tx.set_status("failed")
        with contextlib.suppress(ZeroDivisionError):
            raise ZeroDivisionError
    refresh(v3)


def test_transaction_checkpoints_of_some_members_or_locations(storage: Storage) -> None:
    """checkpoints(members, locations): the rows of these members and at these locations,
    oldest first, its own writes included."""
    storage.create_run(RUN, {}, "fp")
    with storage.transaction(RUN) as tx:
        rows = [tx.add_checkpoint(i % 3, i, f"c{i}", i) for i in range(6)]
    with storage.transaction(RUN) as tx:
        new = tx.add_checkpoint(2, 9, "c9", 9)
        assert tx.checkpoints([0]) == [rows[0], rows[3]]
        assert tx.checkpoints([1], ["c2", "nowhere"]) == [rows[1], rows[2], rows[4]]
        assert tx.checkpoints([2]) == [rows[2], rows[5], new]
        assert tx.checkpoints([], ["c5"]) == [rows[5]]
        assert tx.checkpoints([]) == []
        tx.delete_checkpoints(["c3"])
        assert tx.checkpoints([0]) == [rows[0]]


def test_event_count_follows_events_added_in_the_transaction(storage: Storage) -> None:
    """event_count() is the index of the next event, within a transaction and after it."""
    storage.create_run(RUN, {}, "fp")

    def event(i: int) -> dict[str, Any]:
        return {
            "index": i,
            "member": 0,
            "step": i,
            "donor": None,
            "donor_step": None,
            "kind": "explore",
            "old_hparams": {},
            "new_hparams": {},
            "operations": {},
        }

    with storage.transaction(RUN) as tx:
        assert tx.event_count() == 0
        tx.add_events([event(0), event(1)])
        assert tx.event_count() == 2
    with storage.transaction(RUN) as tx:
        assert tx.event_count() == 2
        tx.add_events([event(2)])
        tx.set_controller(3, {})
    with storage.transaction(RUN) as tx:
        assert (tx.event_count(), tx.run().generation) == (3, 3)
    assert len(storage.events(RUN)) == 3


def test_put_members_can_clear_owner_and_checkpoint(storage: Storage) -> None:
    """Writing None into owner, heartbeat and checkpoint fields clears them."""
    held = MemberRow(
        member_state(0), owner="w", heartbeat=1.0, checkpoint="c", checkpoint_step=2, attempts=3
    )
    storage.create_run(RUN, {}, "fp", members=[held])
    with storage.transaction(RUN) as tx:
        tx.put_members([MemberRow(member_state(0))])
    assert_exact(storage.members(RUN), [MemberRow(member_state(0))], "members")


def test_steps_beyond_32_bits_round_trip(storage: Storage) -> None:
    """Step counts above 2**31 (environment frames, tokens) read back exactly everywhere."""
    big = 3_000_000_000
    storage.create_run(
        RUN,
        {},
        "fp",
        members=[MemberRow(member_state(0, step=big), checkpoint="c", checkpoint_step=big)],
    )
    with storage.transaction(RUN) as tx:
        tx.add_results([ResultRow(0, big, 1.0, {})])
        tx.add_events([{**event(0), "step": big, "donor_step": big - 1}])
        tx.add_checkpoint(0, big, "c", 1)
        tx.add_failure(FailureRow(0, big, 1, "tb", 1.0))
    row = storage.members(RUN)[0]
    assert (row.state["step"], row.checkpoint_step) == (big, big)
    assert storage.results(RUN)[0].step == big
    assert (storage.events(RUN)[0]["step"], storage.events(RUN)[0]["donor_step"]) == (big, big - 1)
    assert storage.checkpoints(RUN)[0].step == big
    assert storage.failures(RUN)[0].step == big


# -- results ----------------------------------------------------------------------------------


def test_results_keep_commit_order_and_exact_values(storage: Storage) -> None:
    """Results read back in commit order across transactions, NaN/inf and metrics intact."""
    storage.create_run(RUN, {}, "fp")
    batches = [
        [
            ResultRow(3, 1, math.nan, {"loss": math.nan, "acc": 0.5}),
            ResultRow(0, 1, 0.1, {"loss": 1.5, "epoch": 1}),
        ],
        [ResultRow(1, 1, math.inf, {})],
        [
            ResultRow(0, 2, -math.inf, {"loss": math.inf}),
            ResultRow(2, 1, -0.0, {"loss": -0.0}),
            ResultRow(0, 3, 1e-300, {"big": 1e300, "whole": 2.0}),
        ],
    ]
    for batch in batches:
        with storage.transaction(RUN) as tx:
            tx.add_results(batch)
    with pytest.raises(Boom), storage.transaction(RUN) as tx:
        tx.add_results([ResultRow(9, 9, 9.0, {})])
        raise Boom
    assert_exact(storage.results(RUN), [r for batch in batches for r in batch], "results")


def test_results_keep_their_lineage_segment(storage: Storage) -> None:
    """Each result reads back with the segment it was written with (None: the initial one)."""
    storage.create_run(RUN, {}, "fp")
    rows = [
        ResultRow(0, 1, 0.5, {}),
        ResultRow(0, 2, 0.6, {}, segment=None),
        ResultRow(0, 3, 0.7, {"loss": 0.3}, segment=0),
        ResultRow(1, 3, 0.1, {}, segment=7),
        ResultRow(1, 4, 0.2, {}, segment=2**31 - 1),
    ]
    with storage.transaction(RUN) as tx:
        tx.add_results(rows[:2])
    with storage.transaction(RUN) as tx:
        tx.add_results(rows[2:])
    assert_exact(storage.results(RUN), rows, "results")
    assert [r.segment for r in storage.results(RUN)] == [None, None, 0, 7, 2**31 - 1]


def test_results_and_events_from_a_start_read_only_the_newer_ones(storage: Storage) -> None:
    """``results(start=n)`` is ``results()[n:]``, across runs sharing the storage (and
    ``events(start=n)`` is ``events()[n:]``): what a reader that has seen n results (a logger
    following the run) reads next."""
    storage.create_run(RUN, {}, "fp")
    storage.create_run("other", {}, "fp")
    rows = [ResultRow(m, s, float(s), {"x": float(m)}) for s in (1, 2, 3) for m in (0, 1)]
    for i, row in enumerate(rows):
        with storage.transaction(RUN) as tx:
            tx.add_results([row])
        with storage.transaction("other") as tx:  # interleaved rows of another run
            tx.add_results([ResultRow(9, i, 0.0, {})])
    for start in (0, 1, 4, 6, 10):
        assert_exact(storage.results(RUN, start=start), rows[start:], f"start={start}")
    with storage.transaction(RUN) as tx:
        tx.add_events([event(i, i) for i in range(4)])
    for start in (0, 3, 4, 9):
        assert storage.events(RUN, start=start) == storage.events(RUN)[start:]


# -- events -----------------------------------------------------------------------------------


def test_events_round_trip_in_index_order(storage: Storage) -> None:
    """Events read back by index with every field, and event_count is the next index."""
    storage.create_run(RUN, {}, "fp")
    with storage.transaction(RUN) as tx:
        assert tx.event_count() == 0
        tx.add_events([event(0, 1), event(1, 2, kind="explore")])
        assert tx.event_count() == 2
    with storage.transaction(RUN) as tx:
        assert tx.event_count() == 2
        tx.add_events([event(2, 3, kind="replace")])
        tx.add_events([event(3, 0)])
        assert tx.event_count() == 4
    with storage.transaction(RUN) as tx:
        assert tx.event_count() == 4
    want = [event(0, 1), event(1, 2, kind="explore"), event(2, 3, kind="replace"), event(3, 0)]
    assert_exact(storage.events(RUN), want, "events")


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_ids_increase_and_rows_round_trip(storage: Storage) -> None:
    """add_checkpoint returns rows with growing ids that read back exactly, oldest first."""
    storage.create_run(RUN, {}, "fp")
    added: list[CheckpointRow] = []
    before = time.time()
    with storage.transaction(RUN) as tx:
        added += [tx.add_checkpoint(0, 10, "a", 1), tx.add_checkpoint(1, 10, "b", 5 * 2**30)]
    with pytest.raises(Boom), storage.transaction(RUN) as tx:
        tx.add_checkpoint(2, 10, "lost", 1)
        raise Boom
    with storage.transaction(RUN) as tx:
        added += [tx.add_checkpoint(0, 20, "c", 0)]
    ids = [c.id for c in added]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert [(c.member, c.step, c.location, c.size) for c in added] == [
        (0, 10, "a", 1),
        (1, 10, "b", 5 * 2**30),
        (0, 20, "c", 0),
    ]
    assert all(before - 1 <= c.created <= time.time() + 1 for c in added)
    assert storage.checkpoints(RUN) == added


def test_add_checkpoints_records_several_in_order(storage: Storage) -> None:
    """add_checkpoints is add_checkpoint for each row, in order, in one call: ids grow, and
    a transaction that fails records none of them."""
    storage.create_run(RUN, {}, "fp")
    with storage.transaction(RUN) as tx:
        first = tx.add_checkpoint(4, 1, "before", 7)
        tx.add_checkpoints([(2, 5, "x", 10), (0, 5, "y", 0), (2, 6, "z", 5 * 2**30)])
        tx.add_checkpoints([])
    with pytest.raises(Boom), storage.transaction(RUN) as tx:
        tx.add_checkpoints([(1, 9, "lost", 1)])
        raise Boom
    rows = storage.checkpoints(RUN)
    assert rows[0] == first
    assert [(c.member, c.step, c.location, c.size) for c in rows[1:]] == [
        (2, 5, "x", 10),
        (0, 5, "y", 0),
        (2, 6, "z", 5 * 2**30),
    ]
    ids = [c.id for c in rows]
    assert ids == sorted(ids) and len(set(ids)) == 4


def test_delete_checkpoints_removes_only_given_locations(storage: Storage) -> None:
    """delete_checkpoints forgets exactly the named rows; unknown names are ignored."""
    storage.create_run(RUN, {}, "fp")
    storage.create_run(OTHER, {}, "fp")
    with storage.transaction(RUN) as tx:
        rows = [tx.add_checkpoint(i, i, loc, i) for i, loc in enumerate("abcde")]
    with storage.transaction(OTHER) as tx:
        other = tx.add_checkpoint(0, 0, "a", 0)
    with storage.transaction(RUN) as tx:
        tx.delete_checkpoints(["a", "c", "not-there"])
        tx.delete_checkpoints([])
    assert storage.checkpoints(RUN) == [rows[1], rows[3], rows[4]]
    assert storage.checkpoints(OTHER) == [other]


def test_transaction_checkpoints_see_its_own_writes(storage: Storage) -> None:
    """tx.checkpoints() includes rows added and excludes rows deleted earlier in the same tx."""
    storage.create_run(RUN, {}, "fp")
    with storage.transaction(RUN) as tx:
        old = tx.add_checkpoint(0, 1, "old", 1)
        kept = tx.add_checkpoint(1, 1, "kept", 1)
    with storage.transaction(RUN) as tx:
        new = tx.add_checkpoint(0, 2, "new", 2)
        assert tx.checkpoints() == [old, kept, new]
        tx.delete_checkpoints(["old"])
        assert tx.checkpoints() == [kept, new]
    assert storage.checkpoints(RUN) == [kept, new]


# -- failures ---------------------------------------------------------------------------------


def test_failures_round_trip_with_traceback(storage: Storage) -> None:
    """Recorded failures read back oldest first with their full traceback text."""
    storage.create_run(RUN, {}, "fp")
    try:
        raise ValueError("bad 'lr' = \"nan\" ✗\n\tsecond line")
    except ValueError:
        text = traceback.format_exc()
    failures = [FailureRow(2, 40, 1, text, 1712345678.5), FailureRow(0, 3, 2, "", 2.0)]
    with storage.transaction(RUN) as tx:
        tx.add_failure(failures[0])
    with storage.transaction(RUN) as tx:
        tx.add_failure(failures[1])
    assert_exact(storage.failures(RUN), failures, "failures")
    assert "second line" in storage.failures(RUN)[0].traceback


# -- heartbeat --------------------------------------------------------------------------------


def test_heartbeat_touches_only_the_owners_rows(storage: Storage) -> None:
    """heartbeat refreshes the rows the owner holds in that run, returns their count, and
    changes nothing else."""
    rows = [
        MemberRow(member_state(0), owner="w1", heartbeat=10.0, checkpoint="c0", checkpoint_step=0),
        MemberRow(member_state(1), owner="w2", heartbeat=20.0),
        MemberRow(member_state(2, step=5), owner="w1", heartbeat=30.0, attempts=1),
        MemberRow(member_state(3)),
    ]
    storage.create_run(RUN, {}, "fp", members=rows)
    storage.create_run(
        OTHER, {}, "fp", members=[MemberRow(member_state(0), owner="w1", heartbeat=1.0)]
    )

    assert storage.heartbeat(RUN, "w1", 99.5) == 2
    want = [replace(rows[0], heartbeat=99.5), rows[1], replace(rows[2], heartbeat=99.5), rows[3]]
    assert_exact(storage.members(RUN), want, "members")
    assert storage.members(OTHER)[0].heartbeat == 1.0
    assert storage.heartbeat(RUN, "nobody", 100.0) == 0
    assert_exact(storage.members(RUN), want, "members")


def test_heartbeat_without_a_time_writes_the_storage_clock(storage: Storage) -> None:
    """heartbeat(name, owner) stamps the owner's rows with the storage's clock (on PostgreSQL,
    the server's), between two readings of Storage.now; other rows keep theirs."""
    storage.create_run(
        RUN,
        {},
        "fp",
        members=[
            MemberRow(member_state(0), owner="w1", heartbeat=1.0),
            MemberRow(member_state(1), owner="w2", heartbeat=2.0),
        ],
    )
    before = storage.now()
    assert storage.heartbeat(RUN, "w1") == 1
    after = storage.now()
    rows = storage.members(RUN)
    assert rows[0].heartbeat is not None
    assert before <= rows[0].heartbeat <= after
    assert rows[1].heartbeat == 2.0
    assert abs(after - time.time()) < 60  # a clock in seconds since the epoch
    with storage.transaction(RUN) as tx:
        assert after <= tx.now() <= storage.now()


# -- leases -----------------------------------------------------------------------------------

TIMEOUT = 30.0
OTHER_NAMESPACE = "abcdef012345"


def _held(storage: Storage, owner: str | None, age: float, member: int = 0) -> MemberRow:
    """Creates the run with one member held by ``owner``, its heartbeat ``age`` seconds old on
    the storage's clock, and a checkpoint and attempt count a claim must keep."""
    row = MemberRow(
        member_state(member, step=8),
        owner=owner,
        heartbeat=None if owner is None else storage.now() - age,
        checkpoint="ckpt/8",
        checkpoint_step=8,
        attempts=1,
    )
    storage.create_run(RUN, {}, "fp", members=[row, MemberRow(member_state(member + 1))])
    return row


def test_claim_makes_the_caller_owner_with_the_storage_clock(storage: Storage) -> None:
    """Claiming a free member names the caller as owner, with the storage's time as its
    heartbeat, and changes nothing else in the row."""
    row = _held(storage, None, 0)
    before = storage.now()
    with storage.transaction(RUN) as tx:
        claimed = tx.claim(0, "w1", TIMEOUT)
        assert claimed == tx.members()[0]
    after = storage.now()
    assert claimed.owner == "w1"
    assert claimed.heartbeat is not None and before <= claimed.heartbeat <= after
    assert_exact(storage.members(RUN)[0], claimed, "member 0")
    assert claimed == replace(row, owner="w1", heartbeat=claimed.heartbeat)
    assert storage.members(RUN)[1].owner is None


def test_a_live_lease_cannot_be_claimed_by_another_owner(storage: Storage) -> None:
    """While its owner's heartbeat is fresh, a second owner's claim raises MemberBusy (a
    StorageError) naming the holder, and writes nothing."""
    _held(storage, None, 0)
    with storage.transaction(RUN) as tx:
        first = tx.claim(0, "w1", TIMEOUT)
    with storage.transaction(RUN) as tx, pytest.raises(MemberBusy, match="w1") as info:
        tx.claim(0, "w2", TIMEOUT)
    assert isinstance(info.value, StorageError)
    assert "w2" in str(info.value)
    assert_exact(storage.members(RUN)[0], first, "member 0")
    with storage.transaction(RUN) as tx:
        assert tx.require_owner(0, "w1") == first
        with pytest.raises(LeaseLost):
            tx.require_owner(0, "w2")


def test_claiming_a_member_you_hold_refreshes_it(storage: Storage) -> None:
    """A holder's claim succeeds whatever its heartbeat's age, and renews the heartbeat."""
    _held(storage, "w1", 10 * TIMEOUT)
    before = storage.now()
    with storage.transaction(RUN) as tx:
        again = tx.claim(0, "w1", TIMEOUT)
    assert again.owner == "w1"
    assert again.heartbeat is not None and again.heartbeat >= before
    assert_exact(storage.members(RUN)[0], again, "member 0")


def test_an_expired_lease_is_claimed_and_its_old_owner_loses_it(storage: Storage) -> None:
    """Once the owner's heartbeat is older than the timeout (storage clock), another worker
    claims the member; the old owner's late commit is then refused with LeaseLost and rolled
    back, and its heartbeats no longer touch the member."""
    _held(storage, "w1", TIMEOUT + 5)
    with storage.transaction(RUN) as tx:
        claimed = tx.claim(0, "w2", TIMEOUT)
    assert (claimed.owner, claimed.checkpoint, claimed.attempts) == ("w2", "ckpt/8", 1)

    with pytest.raises(LeaseLost, match="w2") as info, storage.transaction(RUN) as tx:
        tx.add_results([ResultRow(0, 9, 0.9, {})])  # the old owner's late commit...
        tx.add_checkpoint(0, 9, "ckpt/9-by-w1", 1)
        row = tx.require_owner(0, "w1")  # ...checks its lease, as every commit must
        tx.put_members([replace(row, state=member_state(0, step=9))])
    assert isinstance(info.value, StorageError)
    assert "w1" in str(info.value)
    assert storage.results(RUN) == []
    assert storage.checkpoints(RUN) == []
    assert_exact(storage.members(RUN)[0], claimed, "member 0")
    assert storage.heartbeat(RUN, "w1") == 0
    assert storage.members(RUN)[0].owner == "w2"


def test_a_lease_within_the_timeout_is_kept(storage: Storage) -> None:
    """A heartbeat a little younger than the timeout still holds the member."""
    _held(storage, "w1", TIMEOUT - 10)
    with storage.transaction(RUN) as tx, pytest.raises(MemberBusy):
        tx.claim(0, "w2", TIMEOUT)
    assert storage.members(RUN)[0].owner == "w1"


def test_require_owner_of_a_free_member_raises_lease_lost(storage: Storage) -> None:
    """A worker whose member was released (say, by the parent that saw it die) holds nothing."""
    _held(storage, None, 0)
    with storage.transaction(RUN) as tx, pytest.raises(LeaseLost, match="nobody"):
        tx.require_owner(0, "w1")


def test_release_frees_only_the_holders_member(storage: Storage) -> None:
    """release by a non-holder does nothing; by the holder it clears owner and heartbeat and
    keeps the rest (checkpoint, attempts, state)."""
    row = _held(storage, "w1", 0)
    with storage.transaction(RUN) as tx:
        tx.release(0, "w2")
        tx.release(1, "w1")
    assert storage.members(RUN)[0].owner == "w1"
    with storage.transaction(RUN) as tx:
        tx.release(0, "w1")
        assert tx.members()[0].owner is None
    assert_exact(storage.members(RUN)[0], replace(row, owner=None, heartbeat=None), "member 0")
    with storage.transaction(RUN) as tx:
        tx.claim(0, "w2", TIMEOUT)  # free again for anyone


def test_release_all_frees_every_member_an_owner_matches(storage: Storage) -> None:
    """release_all frees the members whose owner the predicate accepts and returns their ids."""
    owners = ["host:1:a-w1", None, "host:1:a-w2", "host:2:b-w1", "host:1:a-w1"]
    storage.create_run(
        RUN,
        {},
        "fp",
        members=[
            MemberRow(member_state(i), owner=o, heartbeat=None if o is None else 5.0)
            for i, o in enumerate(owners)
        ],
    )
    with storage.transaction(RUN) as tx:
        assert tx.release_all(lambda owner: owner.startswith("host:1:")) == [0, 2, 4]
        assert tx.release_all(lambda owner: owner == "nobody") == []
    rows = storage.members(RUN)
    assert [r.owner for r in rows] == [None, None, None, "host:2:b-w1", None]
    assert [r.heartbeat for r in rows] == [None, None, None, 5.0, None]


def test_lease_methods_refuse_unknown_members_and_bad_arguments(storage: Storage) -> None:
    """claim, require_owner and release of a member the run lacks raise StorageError naming
    it; a timeout that is not positive or an empty owner raises ValueError."""
    _held(storage, None, 0)
    with storage.transaction(RUN) as tx:
        for call in (
            lambda: tx.claim(9, "w1", TIMEOUT),
            lambda: tx.require_owner(9, "w1"),
            lambda: tx.release(9, "w1"),
        ):
            with pytest.raises(StorageError, match="no member 9"):
                call()
        with pytest.raises(ValueError, match="timeout > 0"):
            tx.claim(0, "w1", 0.0)
        with pytest.raises(ValueError, match="owner"):
            tx.claim(0, "", TIMEOUT)
    assert storage.members(RUN)[0].owner is None


def test_a_zombie_owner_of_this_host_is_not_alive(storage: Storage, zombie_pid: int) -> None:
    """A worker of this host and namespace that exited but was never reaped (a zombie) loses
    its member at once, although its heartbeat is fresh: resuming right after kill -9 of a
    whole process group must not wait for, or be refused by, dead workers."""
    namespace = namespace_id()
    if namespace is None:
        pytest.skip("no PID namespace id on this platform")
    zombie = f"{socket.gethostname()}:{zombie_pid}:{namespace}:cafebabe-w1"
    _held(storage, zombie, 0)
    with storage.transaction(RUN) as tx:
        assert tx.claim(0, "w2", TIMEOUT).owner == "w2"


def test_an_owner_of_another_namespace_is_judged_by_its_heartbeat(
    storage: Storage, dead_pid: int
) -> None:
    """An owner on this host name but in another PID namespace (another container) whose pid
    does not exist here keeps its member while its heartbeat is fresh: it is never stolen. The
    same pid in this namespace would be dead."""
    host = socket.gethostname()
    namespace = namespace_id()
    if namespace is None:
        pytest.skip("no PID namespace id on this platform")
    assert namespace != OTHER_NAMESPACE
    elsewhere = f"{host}:{dead_pid}:{OTHER_NAMESPACE}:cafebabe"
    _held(storage, elsewhere, 0)
    with storage.transaction(RUN) as tx, pytest.raises(MemberBusy):
        tx.claim(0, "w2", TIMEOUT)
    assert storage.members(RUN)[0].owner == elsewhere
    with storage.transaction(RUN) as tx:  # the same pid, in this namespace: dead
        tx.put_members([replace(tx.members()[0], owner=f"{host}:{dead_pid}:{namespace}:cafebabe")])
    with storage.transaction(RUN) as tx:
        assert tx.claim(0, "w2", TIMEOUT).owner == "w2"


def test_own_live_worker_id_is_busy_until_its_heartbeat_expires(storage: Storage) -> None:
    """The pid check never keeps an owner alive: this live process's id with a fresh heartbeat
    holds its member, with an expired one loses it."""
    me = new_worker_id()
    _held(storage, me, 0)
    with storage.transaction(RUN) as tx, pytest.raises(MemberBusy):
        tx.claim(0, "w2", TIMEOUT)
    with storage.transaction(RUN) as tx:
        tx.put_members([replace(tx.members()[0], heartbeat=tx.now() - TIMEOUT - 1)])
    with storage.transaction(RUN) as tx:
        assert tx.claim(0, "w2", TIMEOUT).owner == "w2"


@pytest.mark.postgres
def test_postgres_heartbeats_use_the_servers_clock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, Storage.now, Transaction.now, heartbeat(None) and claim all read the
    server's clock: a worker whose own clock is an hour slow still writes the right time."""
    with open_storage(pg_url) as storage:
        storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0), owner="w1")])
        true_now = time.time  # the server runs on this machine: its clock is this one
        monkeypatch.setattr(time, "time", lambda: true_now() - 3600.0)
        assert abs(storage.now() - true_now()) < 60
        storage.heartbeat(RUN, "w1")
        beat = storage.members(RUN)[0].heartbeat
        assert beat is not None and abs(beat - true_now()) < 60
        with storage.transaction(RUN) as tx:
            assert abs(tx.now() - true_now()) < 60
            claimed = tx.claim(0, "w1", TIMEOUT)
        assert claimed.heartbeat is not None and abs(claimed.heartbeat - true_now()) < 60
        monkeypatch.undo()


def _claim_in_namespace(url: str) -> str:
    """Python code that tries to claim member 0 of RUN and prints whether it could."""
    return f"""
import json
from poptune.storage import MemberBusy, open_storage
with open_storage({url!r}) as storage, storage.transaction({RUN!r}) as tx:
    try:
        tx.claim(0, "thief", {TIMEOUT!r})
        outcome = "claimed"
    except MemberBusy:
        outcome = "busy"
print(json.dumps({{"outcome": outcome}}))
"""


@pytest.mark.slow
def test_a_worker_in_another_container_never_steals_a_live_member(
    sql_url: str, in_new_pid_namespace: Callable[[str], str]
) -> None:
    """A worker in another PID namespace of this host (same host name), sharing the database,
    cannot claim a member this live process holds, though this pid does not exist there."""
    me = new_worker_id()
    with open_storage(sql_url) as storage:
        storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0))])
        with storage.transaction(RUN) as tx:
            tx.claim(0, me, TIMEOUT)
    out = in_new_pid_namespace(_claim_in_namespace(sql_url))
    assert json.loads(out) == {"outcome": "busy"}
    with open_storage(sql_url) as storage:
        assert storage.members(RUN)[0].owner == me


# -- controller state -------------------------------------------------------------------------


def test_set_controller_round_trips(storage: Storage) -> None:
    """set_controller stores the generation and pending decisions; a later call replaces them."""
    storage.create_run(RUN, {}, "fp")
    pending = {
        "waiting": [1, 3],
        "decisions": {"2": {"donor": 0, "score": 0.5, "ok": True}},
        "none": None,
    }
    with storage.transaction(RUN) as tx:
        tx.set_controller(4, pending)
    info = storage.get_run(RUN)
    assert info is not None
    assert info.generation == 4
    assert_exact(info.pending, pending, "pending")
    with storage.transaction(RUN) as tx:
        tx.set_controller(5, {})
    info = storage.get_run(RUN)
    assert info is not None
    assert (info.generation, dict(info.pending)) == (5, {})


def test_set_status_in_a_transaction_round_trips(storage: Storage) -> None:
    """tx.set_status stores status and error text; a later status without error clears it."""
    storage.create_run(RUN, {}, "fp")
    with storage.transaction(RUN) as tx:
        tx.set_status("failed", "Traceback ...\nValueError: x")
    info = storage.get_run(RUN)
    assert info is not None
    assert (info.status, info.error) == ("failed", "Traceback ...\nValueError: x")
    with storage.transaction(RUN) as tx:
        tx.set_status("running")
    info = storage.get_run(RUN)
    assert info is not None
    assert (info.status, info.error) == ("running", None)


def test_set_execution_in_a_transaction_is_atomic(storage: Storage) -> None:
    """tx.set_execution replaces the execution record with the transaction's other writes, and
    not at all when the transaction is rolled back."""
    storage.create_run(RUN, {}, "fp")
    with storage.transaction(RUN) as tx:
        tx.set_execution({"heartbeat_timeout": 2.5, "workers": 3})
        tx.set_status("running")
    info = storage.get_run(RUN)
    assert info is not None
    assert (dict(info.execution), info.status) == (
        {"heartbeat_timeout": 2.5, "workers": 3},
        "running",
    )
    with pytest.raises(RuntimeError), storage.transaction(RUN) as tx:
        tx.set_execution({"heartbeat_timeout": 9.0})
        raise RuntimeError("rolled back")
    info = storage.get_run(RUN)
    assert info is not None
    assert dict(info.execution) == {"heartbeat_timeout": 2.5, "workers": 3}


# -- snapshots --------------------------------------------------------------------------------


def _try(mutate: Callable[[], object]) -> None:
    """Mutates a returned value; an immutable one (TypeError) is a snapshot too."""
    with contextlib.suppress(TypeError, AttributeError):
        mutate()


def _populated(storage: Storage) -> None:
    storage.create_run(RUN, CONFIG, "fp", members=[MemberRow(member_state(0))])
    with storage.transaction(RUN) as tx:
        tx.add_results([ResultRow(0, 1, 0.5, {"loss": 1.0})])
        tx.add_events([event(0)])
        tx.set_controller(1, {"waiting": [0]})


def test_reads_return_snapshots(storage: Storage) -> None:
    """Mutating anything a read returned never changes what the storage holds."""
    _populated(storage)
    info = storage.get_run(RUN)
    listed = storage.list_runs()[0]
    rows = storage.members(RUN)
    results = storage.results(RUN)
    events = storage.events(RUN)
    assert info is not None
    for config in (info.config, listed.config):
        _try(lambda c=config: c.__setitem__("lr", 99.0))
        _try(lambda c=config: c["space"]["layers"].append(4))
        _try(lambda c=config: c["space"]["lr"].__setitem__("low", 0.0))
    _try(lambda: info.pending["waiting"].append(7))
    _try(lambda: rows[0].state.__setitem__("step", 999))
    _try(lambda: rows[0].state["hparams"].__setitem__("lr", 99.0))
    _try(lambda: rows[0].state["window"].append(1.0))
    _try(lambda: results[0].metrics.__setitem__("loss", 99.0))
    _try(lambda: events[0]["new_hparams"].__setitem__("lr", 99.0))
    _try(lambda: events[0].__setitem__("member", 99))
    rows.clear()
    results.clear()
    events.clear()

    again = storage.get_run(RUN)
    assert again is not None
    assert_exact(again.config, CONFIG, "config")
    assert_exact(again.pending, {"waiting": [0]}, "pending")
    assert_exact(storage.members(RUN), [MemberRow(member_state(0))], "members")
    assert_exact(storage.results(RUN), [ResultRow(0, 1, 0.5, {"loss": 1.0})], "results")
    assert_exact(storage.events(RUN), [event(0)], "events")


def test_create_run_result_is_a_snapshot(storage: Storage) -> None:
    """Mutating the record create_run returned never changes the stored config."""
    created = storage.create_run(RUN, CONFIG, "fp")
    _try(lambda: created.config.__setitem__("lr", 99.0))
    _try(lambda: created.config["space"]["layers"].append(4))
    info = storage.get_run(RUN)
    assert info is not None
    assert_exact(info.config, CONFIG, "config")


def test_writes_copy_their_inputs(storage: Storage) -> None:
    """Mutating an argument after the write never changes what the storage holds."""
    config = {"nested": {"lr": [0.1, 0.2]}}
    state = member_state(0)
    storage.create_run(RUN, config, "fp", members=[MemberRow(state)])
    metrics = {"loss": 1.0}
    ev = event(0)
    pending: dict[str, Any] = {"waiting": [0]}
    new_state = member_state(1)
    with storage.transaction(RUN) as tx:
        tx.put_members([MemberRow(new_state)])
        tx.add_results([ResultRow(0, 1, 0.5, metrics)])
        tx.add_events([ev])
        tx.set_controller(1, pending)
    config["nested"]["lr"].append(9.0)
    state["hparams"]["lr"] = 9.0
    new_state["window"].append(9.0)
    metrics["loss"] = 9.0
    ev["new_hparams"]["lr"] = 9.0
    pending["waiting"].append(9)

    info = storage.get_run(RUN)
    assert info is not None
    assert_exact(info.config, {"nested": {"lr": [0.1, 0.2]}}, "config")
    assert_exact(info.pending, {"waiting": [0]}, "pending")
    assert_exact(
        storage.members(RUN), [MemberRow(member_state(0)), MemberRow(member_state(1))], "members"
    )
    assert_exact(storage.results(RUN), [ResultRow(0, 1, 0.5, {"loss": 1.0})], "results")
    assert_exact(storage.events(RUN), [event(0)], "events")


def test_rows_read_in_a_transaction_are_snapshots(storage: Storage) -> None:
    """Mutating a row read inside a transaction, without put_members, stores nothing."""
    storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0))])
    with storage.transaction(RUN) as tx:
        row = tx.members()[0]
        _try(lambda: row.state.__setitem__("step", 999))
        _try(lambda: row.state["window"].append(9.0))
        _try(lambda: tx.run().config.__setitem__("x", 1))
    assert_exact(storage.members(RUN), [MemberRow(member_state(0))], "members")
    info = storage.get_run(RUN)
    assert info is not None
    assert dict(info.config) == {}


# -- exclusivity ------------------------------------------------------------------------------


def _increment(storage: Storage, run: str, times: int, rng: np.random.Generator) -> None:
    """Read-modify-write of member 0's step, with a pause inside the transaction."""
    for _ in range(times):
        with storage.transaction(run) as tx:
            row = tx.members()[0]
            step = int(row.state["step"])
            time.sleep(float(rng.uniform(0.0, 0.002)))
            tx.put_members([replace(row, state={**row.state, "step": step + 1})])


def test_transactions_are_exclusive_across_threads(storage: Storage) -> None:
    """Threads sharing one storage object never lose an update made inside a transaction."""
    storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0))])
    threads, times = 4, 15
    barrier = threading.Barrier(threads)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait(timeout=30)
        _increment(storage, RUN, times, rng)

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, seed) for seed in range(threads)]:
            future.result(timeout=60)
    assert storage.members(RUN)[0].state["step"] == threads * times


def _process_main(
    target: Callable[..., Any], index: int, args: tuple[Any, ...], barrier: Any, queue: Any
) -> None:
    """Entry point of a worker process: runs ``target(barrier, *args)`` and reports back."""
    try:
        queue.put((index, True, target(barrier, *args)))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


def run_processes(target: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Runs ``target(barrier, *a)`` in one fresh 'spawn' process per ``a``; returns the values.

    The barrier lets every worker open its storage first and then start together, so their
    transactions really overlap.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(len(args)), ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(target, i, a, barrier, queue), daemon=True)
        for i, a in enumerate(args)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    try:
        for _ in procs:
            index, ok, value = queue.get(timeout=120)
            if not ok:
                pytest.fail(f"worker {index} failed:\n{value}")
            values[index] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[i] for i in range(len(args))]


def _increment_worker(barrier: Any, url: str, run: str, times: int, seed: int) -> int:
    storage = open_storage(url)
    try:
        barrier.wait(timeout=60)
        _increment(storage, run, times, np.random.default_rng(seed))
    finally:
        storage.close()
    return times


@pytest.mark.slow
def test_transactions_are_exclusive_across_processes(sql_url: str) -> None:
    """Processes incrementing one counter in transactions never lose an update."""
    processes, times = 4, 25
    with open_storage(sql_url) as storage:
        storage.create_run(RUN, {}, "fp", members=[MemberRow(member_state(0))])
    done = run_processes(
        _increment_worker, [(sql_url, RUN, times, seed) for seed in range(processes)]
    )
    assert done == [times] * processes
    with open_storage(sql_url) as storage:
        assert storage.members(RUN)[0].state["step"] == processes * times


def _claim_worker(
    barrier: Any, url: str, run: str, me: str, rounds: int, seed: int
) -> dict[str, list[Any]]:
    """Claims a member with `Transaction.claim` (busy ones refuse), holds it briefly, commits
    after `require_owner` and releases it; records any sign of a double claim."""
    rng = np.random.default_rng(seed)
    claims: list[int] = []
    problems: list[str] = []
    storage = open_storage(url)
    try:
        barrier.wait(timeout=60)
        for _ in range(rounds):
            mine = None
            with storage.transaction(run) as tx:
                rows = tx.members()
                wanted = rows[int(rng.integers(len(rows)))].id
                with contextlib.suppress(MemberBusy):  # held by another worker: try again
                    mine = tx.claim(wanted, me, timeout=600.0).id
            if mine is None:
                time.sleep(0.0005)
                continue
            claims.append(mine)
            time.sleep(float(rng.uniform(0.0, 0.002)))
            seen = by_id(storage.members(run))[mine].owner
            if seen != me:
                problems.append(f"{me} holds member {mine}, but a read names {seen!r}")
            with storage.transaction(run) as tx:
                try:
                    row = tx.require_owner(mine, me)
                except LeaseLost as e:
                    problems.append(f"{me} holds member {mine}, but its tx says: {e}")
                    continue
                state = {**row.state, "step": int(row.state["step"]) + 1}
                tx.put_members([replace(row, state=state)])
                tx.release(mine, me)
    finally:
        storage.close()
    return {"claims": claims, "problems": problems}


@pytest.mark.slow
def test_no_member_is_claimed_twice_across_processes(sql_url: str) -> None:
    """Workers claiming members with Transaction.claim never hold the same member at once."""
    processes, rounds, members = 4, 25, 2
    with open_storage(sql_url) as storage:
        storage.create_run(
            RUN, {}, "fp", members=[MemberRow(member_state(i)) for i in range(members)]
        )
    reports = run_processes(
        _claim_worker, [(sql_url, RUN, f"worker-{i}", rounds, i) for i in range(processes)]
    )
    problems = [p for r in reports for p in r["problems"]]
    assert problems == []
    claims = sum(len(r["claims"]) for r in reports)
    assert claims >= rounds  # the workers really competed for the members
    with open_storage(sql_url) as storage:
        rows = storage.members(RUN)
    # Every claim released its member with step + 1: a double claim would lose one.
    assert sum(int(m.state["step"]) for m in rows) == claims
    assert [m.owner for m in rows] == [None] * members
