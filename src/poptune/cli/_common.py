"""What the ``poptune`` commands share: errors, exit codes, scrubbing, storages, names, options."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from rich.console import Console

    from poptune.storage.base import RunInfo, Storage

DEFAULT_STORAGE = "sqlite:///poptune.db"
#: The environment variable that, when set, is every command's default ``--storage``.
STORAGE_ENV = "POPTUNE_STORAGE"
USAGE, RUNTIME, INTERRUPTED = 2, 1, 130


class CLIError(Exception):
    """An expected failure: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = RUNTIME) -> None:
        super().__init__(message)
        self.code = code


class _Scrubber:
    """Removes storage passwords from any text before it is printed."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def add_url(self, url: str) -> None:
        from poptune.storage import _url_secrets

        # As written, decoded and encoded: a message may quote any of them. (SQLAlchemy's own
        # parse is not used: it takes a password with an unencoded '@' for a shorter one.)
        for password in _url_secrets(url):
            self.secrets.update(
                {password, unquote(password), quote(password, safe=""), quote(password)}
            )

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


_scrub = _Scrubber()


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _error_line(message: str) -> str:
    return "poptune: error: " + _scrub(_first_line(message))


def _storage_failure(e: BaseException) -> str | None:
    """Why the storage failed, when ``e`` says it did (a database server that is down or went
    away, a read-only database, a full disk), else None."""
    import sqlite3

    import sqlalchemy.exc

    if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return _first_line(str(e.orig)) or type(e.orig).__name__
    if isinstance(e, sqlite3.OperationalError):
        return _first_line(str(e)) or type(e).__name__
    from poptune.storage.base import StorageUnavailable

    if isinstance(e, StorageUnavailable):
        return e.reason
    return None


def _storage_failed(url: str | None, reason: str, name: str | None = None) -> str:
    """One line: which storage failed and why (no password), and, for a run, how to go on."""
    where = f"Storage {_redact(url)}" if url else "The storage"
    line = f"{where} failed: {reason.rstrip('.')}."
    if name is not None:
        line += (
            " What was committed before is kept; once the storage works again, continue with "
            f"`poptune resume {name}{_storage_flag(url)}`."
            if url
            else f" Continue with `poptune resume {name} --storage URL` once it works again."
        )
    return line


def _stdout() -> Console:
    from rich.console import Console

    # Piped or redirected output has no width to fit: don't fold tables to rich's default 80.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=200 if wide else None)


def _redact(url: str) -> str:
    from poptune.storage import redact_url

    return redact_url(url)


def _default_storage() -> tuple[str, str]:
    """The storage a command uses without ``--storage``, and where that choice comes from."""
    from_env = os.environ.get(STORAGE_ENV)
    if from_env:
        return from_env, f"(from {STORAGE_ENV})"
    return DEFAULT_STORAGE, "(the default)"


def _storage_url(args: argparse.Namespace) -> str:
    """The command's storage URL, normalised: ``--storage``, else $POPTUNE_STORAGE, else
    ``sqlite:///poptune.db``."""
    from poptune.storage import storage_url
    from poptune.storage.base import StorageError

    if args.storage is not None:
        return storage_url(args.storage)
    text, origin = _default_storage()
    try:
        return storage_url(text)
    except StorageError as e:
        raise StorageError(f"{e} {origin}") from None


def _storage_flag(url: str) -> str:
    """`` --storage URL`` (password hidden) to repeat in a suggested command; empty when the
    command would use that storage without it."""
    from poptune.storage import storage_url
    from poptune.storage.base import StorageError

    try:
        default = storage_url(_default_storage()[0])
    except StorageError:
        default = DEFAULT_STORAGE
    if url == default:
        return ""
    return f" --storage {shlex.quote(_redact(url))}"


def _sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL (``""`` for an in-memory one); None if not SQLite."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    return "" if database in ("", ":memory:") else database


def _check_persistent(url: str) -> None:
    if url.startswith("memory://") or _sqlite_file(url) == "":
        raise CLIError(
            f"storage {_redact(url)} keeps nothing after the command ends; use a file "
            "(sqlite:///FILE.db) or a PostgreSQL URL.",
            USAGE,
        )


def _open_storage(url: str) -> Storage:
    """Opens (and if needed creates) a storage, for a run."""
    from poptune.storage import open_storage

    _check_persistent(url)
    return open_storage(url)


def _open_existing(url: str) -> Storage:
    """Opens a storage that must already hold poptune runs (never creates one)."""
    _check_persistent(url)
    path = _sqlite_file(url)
    if path is not None and not os.path.exists(path):
        raise CLIError(
            f"No poptune storage at {_redact(url)}: {os.path.abspath(path)} does not exist. "
            "Start a run with `poptune run FILE.py`, or pass --storage."
        )
    from poptune.storage.sql import SQLStorage

    return SQLStorage(url, create=False)


def _missing_storage(url: str) -> bool:
    """Whether ``url`` names a SQLite file that does not exist yet (nothing was ever run
    there)."""
    path = _sqlite_file(url)
    return path is not None and path != "" and not os.path.exists(path)


def _live_holders(store: Storage, info: RunInfo) -> list[tuple[str, list[int], float | None]]:
    """The workers that may be training run ``info`` right now: ``(worker id, members it holds,
    seconds since its heartbeat)`` for each, judged as the run's workers judge each other (on
    the storage's clock, by the run's heartbeat timeout)."""
    from poptune.execution.session import RunOptions, owner_alive

    timeout = float(info.execution.get("heartbeat_timeout") or RunOptions().heartbeat_timeout)
    now = store.now()
    held: dict[str, tuple[list[int], float | None]] = {}
    for row in store.members(info.name):
        if row.owner is not None and owner_alive(row.owner, row.heartbeat, timeout, now):
            age = None if row.heartbeat is None else now - row.heartbeat
            held.setdefault(row.owner, ([], age))[0].append(row.id)
    return [(owner, members, age) for owner, (members, age) in held.items()]


def _describe_holders(holders: list[tuple[str, list[int], float | None]]) -> str:
    """``worker W (host H, pid P) holds members 0, 1 (heartbeat 2 s ago)``, and how many
    other workers do."""
    from poptune.storage.leases import parse_worker_id

    owner, members, age = holders[0]
    who = parse_worker_id(owner)
    where = f" (host {who.host}, pid {who.pid})" if who is not None else ""
    listed = ", ".join(map(str, members[:10])) + (", ..." if len(members) > 10 else "")
    text = f"worker {owner}{where} holds member{'s' if len(members) > 1 else ''} {listed}" + (
        "" if age is None else f" (heartbeat {max(0.0, age):.0f} s ago)"
    )
    if len(holders) > 1:
        text += f", and {len(holders) - 1} other worker{'s' if len(holders) > 2 else ''} too"
    return text


def _get_run(store: Storage, name: str) -> RunInfo:
    info = store.get_run(name)
    if info is None:
        names = [r.name for r in store.list_runs()]
        there = f" Runs there: {', '.join(names)}." if names else " It holds no runs."
        raise CLIError(f"No run named {name!r} in {store.display_url}.{there}")
    return info


def _checkpoint_folder(root: str | None, name: str) -> str:
    if not root:
        return "-"
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


def _check_name(name: str, hint: str) -> str:
    from poptune.storage.checkpoints import check_run_name

    try:
        return check_run_name(name)
    except ValueError as e:
        raise CLIError(f"{e} {hint}", USAGE) from None


def _split_source(spec: str) -> str:
    """The file of ``FILE.py[:NAME]`` (``NAME`` may be dotted: ``EXPERIMENT.baseline``)."""
    path, sep, obj = spec.rpartition(":")
    named = bool(obj) and all(part.isidentifier() for part in obj.split("."))
    return path if sep and path and named else spec


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
