"""Where runs live: in memory, SQLite or PostgreSQL; and where checkpoints are written."""

from __future__ import annotations

import os
import re

from poptune.storage.base import (
    CheckpointRow,
    FailureRow,
    LeaseLost,
    LockTimeout,
    MemberBusy,
    MemberRow,
    ResultRow,
    RunExists,
    RunInfo,
    Storage,
    StorageError,
    Transaction,
    TransactionLost,
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
    "LockTimeout",
    "MemberBusy",
    "MemberRow",
    "MemoryCheckpointStore",
    "ResultRow",
    "RunExists",
    "RunInfo",
    "Storage",
    "StorageError",
    "Transaction",
    "TransactionLost",
    "check_run_name",
    "open_storage",
    "redact_url",
    "select_for_deletion",
    "storage_url",
]

DEFAULT_URL = "sqlite:///poptune.db"

#: What `storage_url` accepts, for error messages.
ACCEPTED_FORMS = (
    "SQLite (sqlite:///FILE.db, or a path ending in .db, .sqlite or .sqlite3), "
    "PostgreSQL (postgresql://USER@HOST/DB; also postgres:// or postgresql+psycopg://) "
    "or memory://"
)
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|passwd|pwd)=)[^&;#]*")


def storage_url(text: str) -> str:
    """The storage URL that ``text`` names, normalised; what every command and worker opens.

    * A bare path ending in ``.db``, ``.sqlite`` or ``.sqlite3`` (``runs/x.db``,
      ``/abs/p.sqlite``, ``~/poptune.db``) is a SQLite file: ``sqlite:///runs/x.db``.
    * ``postgres://`` and ``postgresql://`` mean PostgreSQL through psycopg 3:
      ``postgresql+psycopg://``.
    * ``sqlite:///...``, ``sqlite://`` (in memory), ``postgresql+DRIVER://...`` and
      ``memory://`` are returned as they are.

    Example:
        >>> storage_url("runs/x.db")
        'sqlite:///runs/x.db'
        >>> storage_url("postgres://me@db.example/pbt")
        'postgresql+psycopg://me@db.example/pbt'

    Raises:
        StorageError: ``text`` is none of these; the message quotes it with its password
            replaced by ``***`` and lists the accepted forms.
    """
    if not isinstance(text, str):
        raise StorageError(f"A storage URL must be a string, but got {text!r}.")
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text.lower().endswith(_SQLITE_SUFFIXES) and text.strip() == text:
            import sqlalchemy as sa

            path = os.path.expanduser(text)
            # Rendered by SQLAlchemy so that a path holding '%', '?' or '#' reads back as is.
            return sa.URL.create("sqlite", database=path).render_as_string()
        raise StorageError(f"Not a storage URL: {redact_url(text)!r}. Expected {ACCEPTED_FORMS}.")
    given, scheme = text, scheme.lower()
    if scheme == "memory":
        return text
    if scheme in ("postgres", "postgresql"):
        text = "postgresql+psycopg://" + rest
    elif not (scheme == "sqlite" or scheme.startswith(("sqlite+", "postgresql+"))):
        raise StorageError(f"Unsupported storage {redact_url(text)!r}: expected {ACCEPTED_FORMS}.")
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(text)
    except Exception:
        raise StorageError(
            f"Not a storage URL: {redact_url(given)!r} cannot be parsed. Expected {ACCEPTED_FORMS}."
        ) from None
    if parsed.host is not None and "@" in parsed.host:
        # An unencoded '@' in the password: SQLAlchemy would take part of it for the host.
        raise StorageError(
            f"Not a storage URL: {redact_url(given)!r}. Percent-encode special characters of "
            "the user name and password ('@' as %40, '/' as %2F, ':' as %3A)."
        )
    return text


def open_storage(storage: str | Storage | None) -> Storage:
    """A storage from a URL (see `storage_url`: ``sqlite:///FILE``, ``FILE.db``,
    ``postgresql://...``, ``memory://``).

    A `Storage` object is returned as it is; None means a new in-memory storage.

    Raises:
        StorageError: ``storage`` is not an accepted URL, or the storage cannot be used.
    """
    if storage is None:
        return InMemoryStorage()
    if isinstance(storage, Storage):
        return storage
    if not isinstance(storage, str):
        raise ValueError(f"`storage` must be a URL or a poptune Storage, but got {storage!r}.")
    url = storage_url(storage)
    if url.startswith("memory://"):
        return InMemoryStorage()
    from poptune.storage.sql import SQLStorage  # SQLAlchemy is imported only when needed

    return SQLStorage(url)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``: safe to print and log.

    Works on any text, parseable or not: everything between the user name and the last ``@``
    is hidden (so a password holding an unencoded ``@`` is hidden whole, and so is one in
    ``user:password@host`` without a scheme), as is a ``password=`` query parameter. Text
    without credentials, such as a path, is returned as it is.

    Example:
        >>> redact_url("postgresql://me:s3cret@db.example/pbt")
        'postgresql://me:***@db.example/pbt'
    """
    head, rest = _split_scheme(url)
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon and "/" not in user:
            rest = f"{user}:***{rest[at:]}"
    return _QUERY_SECRET.sub(r"\1***", head + rest)


def _split_scheme(url: str) -> tuple[str, str]:
    """``("scheme://", rest)``, or ``("", url)`` when there is no scheme."""
    scheme, sep, rest = url.partition("://")
    return (scheme + sep, rest) if sep else ("", url)


def _url_secrets(url: str) -> set[str]:
    """Every password that ``url`` holds (the user's and a ``password=`` parameter), as
    written: what must never be printed."""
    _, rest = _split_scheme(url)
    found: set[str] = set()
    at = rest.rfind("@")
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon and "/" not in user and password:
            found.add(password)
    for match in _QUERY_SECRET.finditer(url):
        secret = url[match.end(1) : match.end()]
        if secret:
            found.add(secret)
    return found
