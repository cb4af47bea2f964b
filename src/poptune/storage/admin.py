"""Housekeeping on a storage that the run lifecycle never needs: deleting a run.

Kept apart from the storage contract (`poptune.storage.base`): training never deletes a run,
so the backends need not implement it; these functions know the two backends poptune ships.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from poptune.storage.base import Storage, StorageError
from poptune.storage.memory import InMemoryStorage

if TYPE_CHECKING:
    from poptune.storage.sql import SQLStorage

__all__ = ["delete_run"]


def delete_run(storage: Storage, name: str) -> None:
    """Deletes run ``name`` and everything the storage keeps of it, atomically.

    Its record, members, results, events, checkpoint rows and failures go together: either
    all of them or (on an error) none. Checkpoint *files* are not touched; see
    `poptune.storage.folders.delete_checkpoint_folder`. The run's name may then be used again.
    Whether the run is still being trained is not checked: that is the caller's decision.

    Args:
        storage: An `InMemoryStorage` or a `SQLStorage` (SQLite or PostgreSQL).
        name: The run's name.

    Raises:
        StorageError: No run named ``name``.
        TypeError: ``storage`` is another kind of storage.
    """
    if isinstance(storage, InMemoryStorage):
        with storage._lock:
            if storage._runs.pop(name, None) is None:
                raise StorageError(f"No run named {name!r} in {storage.display_url}.")
        return
    from poptune.storage.sql import SQLStorage  # SQLAlchemy only when needed

    if isinstance(storage, SQLStorage):
        _delete_sql_run(storage, name)
        return
    raise TypeError(
        "delete_run() deletes runs of an InMemoryStorage or a SQLStorage, but got "
        f"{type(storage).__name__}."
    )


def _delete_sql_run(storage: SQLStorage, name: str) -> None:
    import sqlalchemy as sa

    from poptune.storage.sql import metadata, runs_table

    # Every table that refers to a run, found from the schema rather than listed here, so a
    # table added later with a foreign key to poptune_runs is emptied too. Children first:
    # SQLite enforces the foreign keys.
    references = [
        (table, fk)
        for table in reversed(metadata.sorted_tables)
        for fk in table.foreign_keys
        if fk.column.table is runs_table
    ]
    # The run row first, as every transaction takes it: no deadlock with a commit.
    with storage._write(name, storage._lock_run(name)) as (conn, run):
        if run is None:
            raise StorageError(f"No run named {name!r} in {storage.display_url}.")
        for table, fk in references:
            conn.execute(sa.delete(table).where(fk.parent == run._mapping[fk.column.name]))
        conn.execute(sa.delete(runs_table).where(runs_table.c.id == run.id))
