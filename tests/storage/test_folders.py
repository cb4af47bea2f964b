"""Checkpoint folders: default roots per storage, and the marker that keeps runs apart."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import poptune as pt
from poptune.execution import default_checkpoint_root
from poptune.storage import StorageError, open_storage
from poptune.storage.admin import delete_run
from poptune.storage.folders import (
    MARKER,
    delete_checkpoint_folder,
    read_marker,
    storage_identity,
)


def experiment(steps: int = 4) -> pt.Experiment:
    return pt.Experiment(
        pt.trainable(lambda hp, s: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=2,
        steps=steps,
        interval=2,
    )


# -- default roots ----------------------------------------------------------------------------


def test_sqlite_default_root_is_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_checkpoint_root("sqlite:///runs.db") == str(tmp_path / "runs-checkpoints")
    assert default_checkpoint_root("runs.db") == str(tmp_path / "runs-checkpoints")
    assert default_checkpoint_root("sqlite:////x/y/p.sqlite") == "/x/y/p-checkpoints"


def test_other_storages_get_a_folder_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: ./poptune-checkpoints/<hash>/, one per storage, never a SQLite run's root.

    It used to be ./poptune-checkpoints, where a SQLite run of the same name in ./poptune.db
    keeps its files too.
    """
    monkeypatch.chdir(tmp_path)
    root = default_checkpoint_root("postgresql+psycopg://me:secret@db.example/pbt")
    assert re.fullmatch(re.escape(str(tmp_path / "poptune-checkpoints")) + r"/[0-9a-f]{12}", root)
    # The same database however it is spelled, whatever the password.
    for same in ("postgres://me:other@db.example/pbt", "postgresql://me@db.example/pbt"):
        assert default_checkpoint_root(same) == root
    assert default_checkpoint_root("postgresql://me@db.example/other") != root
    assert default_checkpoint_root("postgresql://me@elsewhere/pbt") != root
    assert root != default_checkpoint_root("sqlite:///poptune.db")
    assert "secret" not in storage_identity("postgresql://me:secret@db.example/pbt")


def test_sqlite_and_postgres_runs_of_one_name_keep_separate_folders(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run "x" in ./poptune.db and a run "x" in PostgreSQL never mix their checkpoints."""
    monkeypatch.chdir(tmp_path)
    experiment().run("poptune.db", "x")
    experiment().run(pg_url, "x")
    with open_storage("poptune.db") as lite, open_storage(pg_url) as pg:
        lite_info, pg_info = lite.get_run("x"), pg.get_run("x")
    assert lite_info is not None and pg_info is not None
    assert lite_info.checkpoint_root == str(tmp_path / "poptune-checkpoints")
    assert pg_info.checkpoint_root == default_checkpoint_root(pg_url)
    assert pg_info.checkpoint_root != lite_info.checkpoint_root
    pg_marker = read_marker(pg_info.checkpoint_root, "x")
    assert pg_marker is not None and pg_marker.storage == storage_identity(pg_url)
    assert pg_marker.created == pytest.approx(pg_info.created)


# -- the marker ---------------------------------------------------------------------------------


def test_a_new_run_marks_its_folder(tmp_path: Path) -> None:
    """ROOT/RUN/.poptune-run says which storage and run own the folder, and since when."""
    db = tmp_path / "runs.db"
    experiment().run(str(db), "r")
    with open_storage(str(db)) as store:
        info = store.get_run("r")
    assert info is not None and info.checkpoint_root is not None
    data = json.loads((Path(info.checkpoint_root) / "r" / MARKER).read_text())
    assert data == {"storage": f"sqlite:///{db}", "run": "r", "created": info.created}


def test_two_storages_cannot_share_a_run_folder(tmp_path: Path) -> None:
    """A second storage's run of the same name in the same folder is refused before it starts."""
    shared = str(tmp_path / "ckpt")
    experiment().run(str(tmp_path / "a.db"), "x", checkpoints=shared)
    with pytest.raises(StorageError) as caught:
        experiment().run(str(tmp_path / "b.db"), "x", checkpoints=shared)
    message = str(caught.value)
    assert f"belongs to run 'x' of sqlite:///{tmp_path / 'a.db'}" in message
    assert "checkpoints=" in message and "--checkpoints" in message
    with open_storage(str(tmp_path / "b.db")) as other:
        assert other.get_run("x") is None  # refused before the run was created


def test_a_new_run_of_an_old_name_cannot_take_the_old_runs_folder(tmp_path: Path) -> None:
    """Same storage and name, but another run (the first was deleted): refused, by its date."""
    db, shared = str(tmp_path / "runs.db"), str(tmp_path / "ckpt")
    experiment().run(db, "x", checkpoints=shared)
    with open_storage(db) as store:
        delete_run(store, "x")
    with pytest.raises(StorageError, match=r"belongs to run 'x' of .*\(created "):
        experiment().run(db, "x", checkpoints=shared)


def test_the_same_run_passes_and_an_unmarked_folder_is_adopted(tmp_path: Path) -> None:
    """Resuming finds its own marker; a run's folder without one (older poptune) gets one."""
    db = str(tmp_path / "runs.db")
    experiment(steps=4).run(db, "r")
    marker = tmp_path / "runs-checkpoints" / "r" / MARKER
    first = marker.read_text()
    experiment(steps=6).run(db, "r", resume=True)
    assert marker.read_text() == first
    marker.unlink()
    result = experiment(steps=8).run(db, "r", resume=True)
    assert {m.step for m in result.members} == {8}
    assert marker.read_text() == first


def test_fsspec_roots_skip_the_marker(tmp_path: Path) -> None:
    """An fsspec root is used as given, without a marker (documented in poptune.storage.folders)."""
    pytest.importorskip("fsspec")
    root = "memory://poptune-test-folders"
    experiment().run(str(tmp_path / "a.db"), "x", checkpoints=root)
    assert read_marker(root, "x") is None
    experiment().run(str(tmp_path / "b.db"), "x", checkpoints=root)


def test_deleting_a_folder_removes_only_what_the_run_wrote(tmp_path: Path) -> None:
    """Its member folders and marker go; a stranger's file stays, and so does the folder."""
    db = str(tmp_path / "runs.db")
    experiment().run(db, "r")
    with open_storage(db) as store:
        info = store.get_run("r")
    assert info is not None and info.checkpoint_root is not None
    folder = Path(info.checkpoint_root) / "r"
    assert any(p.name.startswith("member-") for p in folder.iterdir())
    (folder / "notes.txt").write_text("mine")
    assert delete_checkpoint_folder(info.checkpoint_root, "r", db, info.created) == "deleted"
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    assert delete_checkpoint_folder(info.checkpoint_root, "r", db, info.created) == "foreign"
    folder.rmdir()
    assert delete_checkpoint_folder(info.checkpoint_root, "r", db, info.created) == "absent"


def test_a_folder_of_another_run_is_not_deleted(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    experiment().run(db, "r")
    root = str(tmp_path / "runs-checkpoints")
    assert delete_checkpoint_folder(root, "r", str(tmp_path / "other.db"), 0.0) == "foreign"
    assert (Path(root) / "r" / MARKER).is_file()
