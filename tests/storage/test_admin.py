"""`poptune.storage.admin.delete_run` on every backend: one run goes, whole; the others stay."""

from __future__ import annotations

import pytest

from poptune.storage import FailureRow, MemberRow, ResultRow, Storage, StorageError
from poptune.storage.admin import delete_run


def fill(storage: Storage, name: str) -> None:
    """A run with a row in every table: members, results, events, checkpoints, failures."""
    members = [MemberRow({"id": m, "step": 0, "status": "running", "hparams": {}}) for m in (0, 1)]
    storage.create_run(name, {"seed": 1}, "fp", checkpoint_root="/ckpt", members=members)
    with storage.transaction(name) as tx:
        tx.add_results([ResultRow(0, 1, 0.5, {"score": 0.5}), ResultRow(1, 1, 0.7, {"score": 0.7})])
        tx.add_events(
            [
                {
                    "index": 0,
                    "member": 0,
                    "step": 1,
                    "donor": 1,
                    "donor_step": 1,
                    "kind": "exploit",
                    "old_hparams": {},
                    "new_hparams": {},
                    "operations": {},
                }
            ]
        )
        tx.add_checkpoint(0, 1, f"{name}/member-00000/step-1.ckpt", 10)
        tx.add_failure(FailureRow(1, 1, 1, "Traceback: boom", 0.0))
        tx.set_status("running")


def contents(storage: Storage, name: str) -> tuple[int, ...]:
    return (
        len(storage.members(name)),
        len(storage.results(name)),
        len(storage.events(name)),
        len(storage.checkpoints(name)),
        len(storage.failures(name)),
    )


def test_delete_run_removes_the_run_and_keeps_the_others(storage: Storage) -> None:
    """The deleted run is gone from every read; its neighbours keep every row; the name is free."""
    fill(storage, "doomed")
    fill(storage, "kept")
    assert contents(storage, "doomed") == contents(storage, "kept") == (2, 2, 1, 1, 1)
    delete_run(storage, "doomed")
    assert storage.get_run("doomed") is None
    assert [r.name for r in storage.list_runs()] == ["kept"]
    assert contents(storage, "kept") == (2, 2, 1, 1, 1)
    with pytest.raises(StorageError, match="doomed"):
        storage.members("doomed")
    fill(storage, "doomed")  # the name may be used again, and starts empty
    assert contents(storage, "doomed") == (2, 2, 1, 1, 1)


def test_delete_run_leaves_no_row_behind(sql_url: str) -> None:
    """Counted in the database itself: no table keeps a row of the deleted run."""
    import sqlalchemy as sa

    from poptune.storage import open_storage
    from poptune.storage.sql import metadata, runs_table

    with open_storage(sql_url) as storage:
        fill(storage, "doomed")
        fill(storage, "kept")
        engine = sa.create_engine(sql_url)
        with engine.connect() as conn:
            doomed_id = conn.execute(
                sa.select(runs_table.c.id).where(runs_table.c.name == "doomed")
            ).scalar_one()
        delete_run(storage, "doomed")
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                if "run_id" in table.c:
                    left = conn.execute(
                        sa.select(sa.func.count()).where(table.c.run_id == doomed_id)
                    ).scalar_one()
                    assert left == 0, table.name
            assert conn.execute(sa.select(sa.func.count()).select_from(runs_table)).scalar() == 1
        engine.dispose()


def test_delete_of_an_unknown_run_is_an_error(storage: Storage) -> None:
    fill(storage, "kept")
    with pytest.raises(StorageError, match="No run named 'nope'"):
        delete_run(storage, "nope")
    assert contents(storage, "kept") == (2, 2, 1, 1, 1)


def test_delete_refuses_a_storage_it_does_not_know() -> None:
    """Only the backends poptune ships: delete_run never guesses at another one's layout."""
    with pytest.raises(TypeError, match="InMemoryStorage or a SQLStorage, but got object"):
        delete_run(object(), "x")  # type: ignore[arg-type]
