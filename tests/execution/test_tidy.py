"""Checkpoint files no worker will commit are removed, but never while a worker may be saving."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import SOURCE, check_complete, experiment, unreferenced

import poptune as pt
from poptune.execution.session import prepare_run
from poptune.execution.tidy import tidy_checkpoints
from poptune.execution.worker import join_run, work
from poptune.storage import MemberBusy, Storage, open_storage
from poptune.storage.checkpoints import CheckpointStore
from poptune.storage.folders import MARKER, claim_checkpoint_folder
from poptune.storage.leases import new_worker_id

#: A worker of another machine: only its heartbeat tells whether it is alive.
REMOTE = "elsewhere:4242:0123456789ab:9c1e22aa"
TEMPORARY = "r/member-00001/.tmp-step-000000005-aaaaaaaaaaaa.ckpt"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty SQL storage: a SQLite file, or a PostgreSQL database (on its server's clock)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path}/runs.db"


def create_run(url: str, root: Path, timeout: float = 30.0) -> None:
    """Creates the run as `poptune run` would, recording ``timeout`` as its heartbeat timeout."""
    with open_storage(url) as store:
        info = prepare_run(experiment(), store, "r", source=SOURCE, checkpoint_root=str(root))
        join_run(store, "r", timeout)
    claim_checkpoint_folder(str(root), "r", url, info.created)


def hold(store: Storage, member: int, owner: str, age: float) -> None:
    """Makes ``owner`` hold ``member``, its last heartbeat ``age`` seconds old."""
    with store.transaction("r") as tx:
        tx.claim(member, owner, 30.0)
    store.heartbeat("r", owner, now=store.now() - age)


def leftovers(root: Path) -> tuple[str, str]:
    """A temporary file and a saved checkpoint that no row refers to, as a killed worker leaves
    them; their locations."""
    stray = CheckpointStore(root).save("r", 1, 5, {"x": 0.0}).location
    (root / TEMPORARY).write_bytes(b"POPTUNE1P")
    return TEMPORARY, stray


@pytest.mark.parametrize(
    ("owner", "age", "timeout"),
    [
        (new_worker_id(), 0.0, 30.0),  # this process: alive, its heartbeat fresh
        (REMOTE, 60.0, 600.0),  # silent for 60 s, but the run's workers wait 600 s
    ],
    ids=["live-process", "recorded-timeout"],
)
def test_nothing_is_removed_while_a_worker_may_be_working(
    env: Any, tmp_path: Path, url: str, owner: str, age: float, timeout: float
) -> None:
    """While a member is held by an owner that may still be working (judged by the run's
    recorded heartbeat timeout), its temporary and uncommitted files stay, and so does its
    claim."""
    root = tmp_path / "ckpts"
    create_run(url, root, timeout)
    files = leftovers(root)
    with open_storage(url) as store:
        hold(store, 1, owner, age)
        assert tidy_checkpoints(store, "r", CheckpointStore(root)) is None
        assert store.members("r")[1].owner == owner
    assert all((root / f).is_file() for f in files)


def test_once_every_owner_is_dead_unreferenced_files_go_and_claims_are_freed(
    env: Any, tmp_path: Path, url: str
) -> None:
    """With no owner that may still be working, the temporary and unreferenced checkpoint files
    go, the dead owner's claim is freed (a late commit of it is refused), and every file a
    checkpoint row or a member row names stays, as does the run folder's marker."""
    root = tmp_path / "ckpts"
    create_run(url, root)
    files = leftovers(root)
    ckpts = CheckpointStore(root)
    recorded = ckpts.save("r", 0, 5, {"x": 1.0}).location
    stood_on = ckpts.save("r", 2, 5, {"x": 2.0}).location
    with open_storage(url) as store:
        with store.transaction("r") as tx:
            tx.add_checkpoint(0, 5, recorded, 1)
            row = tx.members()[2]
            tx.put_members([replace(row, checkpoint=stood_on, checkpoint_step=5)])
        hold(store, 1, REMOTE, 100.0)
        assert tidy_checkpoints(store, "r", ckpts) == len(files)
        assert [m.owner for m in store.members("r")] == [None] * len(store.members("r"))
        assert tidy_checkpoints(store, "r", ckpts) == 0
    assert not any((root / f).exists() for f in files)
    assert ckpts.exists(recorded) and ckpts.exists(stood_on)
    assert (root / "r" / MARKER).is_file()


def test_a_second_execution_of_a_live_run_leaves_its_files_and_a_later_one_tidies(
    env: Any, tmp_path: Path
) -> None:
    """Running a run again while one of its workers is alive (`poptune resume` on a live run)
    does not touch that worker's temporary and uncommitted files; once it is gone, running the
    run again completes it and leaves no file that no row names."""
    env(pop=4, steps=10, interval=5)
    url, root = f"sqlite:///{tmp_path}/runs.db", tmp_path / "ckpts"
    create_run(url, root)
    files = leftovers(root)
    with open_storage(url) as store:
        hold(store, 1, new_worker_id(), 0.0)
        with pytest.raises(MemberBusy):
            experiment().run(url, "r", workers=1)
        assert all((root / f).is_file() for f in files)
        store.heartbeat("r", store.members("r")[1].owner or "", now=store.now() - 100)
    result = experiment().run(url, "r", workers=1)
    check_complete(result, 10, 4)
    assert unreferenced(url, root) == []


def test_the_worker_that_completes_a_run_removes_files_never_committed(
    env: Any, tmp_path: Path
) -> None:
    """The worker that marks a run completed (here a lone `work` call, as ``poptune worker``
    runs it, with no driver) removes the files of stretches nobody committed."""
    env(pop=4, steps=10, interval=5)
    url, root = f"sqlite:///{tmp_path}/runs.db", tmp_path / "ckpts"
    create_run(url, root)
    files = leftovers(root)
    report = work(url, "r", str(root), pt.RunOptions(), source=SOURCE)
    assert report.status == "completed"
    assert not any(os.path.exists(root / f) for f in files)
    assert unreferenced(url, root) == []
