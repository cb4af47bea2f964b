"""Where runs live: in memory, SQLite or PostgreSQL; and where checkpoints are written."""

from __future__ import annotations

from poptune.storage.base import (
    CheckpointRow,
    FailureRow,
    LeaseLost,
    MemberBusy,
    MemberRow,
    ResultRow,
    RunExists,
    RunInfo,
    Storage,
    StorageError,
    Transaction,
)
from poptune.storage.checkpoints import (
    CheckpointInfo,
    CheckpointRef,
    CheckpointStore,
    check_run_name,
    select_for_deletion,
)
from poptune.storage.memory import InMemoryStorage, MemoryCheckpointStore

__all__ = [
    "CheckpointInfo",
    "CheckpointRef",
    "CheckpointRow",
    "CheckpointStore",
    "FailureRow",
    "InMemoryStorage",
    "LeaseLost",
    "MemberBusy",
    "MemberRow",
    "MemoryCheckpointStore",
    "ResultRow",
    "RunExists",
    "RunInfo",
    "Storage",
    "StorageError",
    "Transaction",
    "check_run_name",
    "open_storage",
    "redact_url",
    "select_for_deletion",
]

DEFAULT_URL = "sqlite:///poptune.db"


def open_storage(storage: str | Storage | None) -> Storage:
    """A storage from a URL (``sqlite:///FILE``, ``postgresql+psycopg://...``, ``memory://``).

    A `Storage` object is returned as it is; None means a new in-memory storage.
    """
    if storage is None:
        return InMemoryStorage()
    if isinstance(storage, Storage):
        return storage
    if not isinstance(storage, str):
        raise ValueError(f"`storage` must be a URL or a poptune Storage, but got {storage!r}.")
    if storage.startswith("memory://"):
        return InMemoryStorage()
    from poptune.storage.sql import SQLStorage  # SQLAlchemy is imported only when needed

    return SQLStorage(storage)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``: safe to print and log."""
    from poptune.storage.sql import redact_url as _redact

    return _redact(url)
