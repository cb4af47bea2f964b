"""Checkpoint folders: where a run's checkpoints go by default, and which run owns a folder.

A run's checkpoints live in ``ROOT/RUN``. Unless the caller names a root, it is
``<stem>-checkpoints/`` beside a SQLite file (``runs.db`` -> ``runs-checkpoints/``), and for
any other storage ``./poptune-checkpoints/<hash>/``, where ``<hash>`` is a short hash of the
storage's URL (password removed): a PostgreSQL run and a SQLite run of the same name in
``./poptune.db`` never meet in ``./poptune-checkpoints/RUN``.

Whatever the root, two runs never share a folder. When a run is created, ``ROOT/RUN`` gets a
marker file, ``.poptune-run``: JSON naming the storage (URL without password), the run and the
time the run was created. Every execution checks it, and refuses a folder that another run
owns (another storage, another name, or a run of that name created at another time: one
deleted and started anew).

Roots given as fsspec URLs (``s3://...``, ``memory://...``) skip the marker: checking and
writing it there would cost round trips to remote storage on every start, and such roots are
chosen explicitly, never by default. ``file://`` URLs are local folders and are checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from poptune.storage import redact_url
from poptune.storage import storage_url as _normalise
from poptune.storage.base import StorageError
from poptune.storage.checkpoints import _local_root, check_run_name

__all__ = [
    "MARKER",
    "RunMarker",
    "check_checkpoint_folder",
    "claim_checkpoint_folder",
    "default_checkpoint_root",
    "delete_checkpoint_folder",
    "read_marker",
    "require_checkpoint_folder",
    "storage_identity",
]

#: The marker file's name, in ``ROOT/RUN``.
MARKER = ".poptune-run"

# Two records of one run's creation time may differ by float rounding in a database.
_SAME_TIME = 1e-3


def _sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL; None for any other URL or an in-memory database."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def storage_identity(url: str) -> str:
    """A storage's URL in one canonical form, without its password: what a marker records.

    A SQLite file is named by its absolute path; any other URL is normalised (`storage_url`)
    and its password left out. The same storage always gives the same text, whether it was
    named by a relative path, a ``sqlite:///`` URL, or a `Storage` object's ``display_url``,
    with a password or without.

    Example:
        >>> storage_identity("postgres://me:s3cret@db.example/pbt")
        'postgresql+psycopg://me@db.example/pbt'
    """
    try:
        normal = _normalise(url)
    except StorageError:  # a custom Storage's display_url: taken as it is
        return redact_url(url)
    path = _sqlite_file(normal)
    if path is not None:
        return "sqlite:///" + os.path.abspath(path)
    if normal.startswith("memory://"):
        return normal
    from sqlalchemy.engine import make_url

    try:
        return make_url(normal)._replace(password=None).render_as_string()
    except Exception:  # storage_url() parsed it; kept safe all the same
        return redact_url(normal)


def default_checkpoint_root(storage_url: str) -> str:
    """The checkpoint root a run uses unless told otherwise (an absolute path).

    Beside a SQLite file: ``runs.db`` -> ``runs-checkpoints/``. For any other storage:
    ``./poptune-checkpoints/<12 hex digits>/``, a hash of the storage's URL without its
    password, so runs of different storages never share a folder.

    Example:
        >>> import os
        >>> default_checkpoint_root("sqlite:///runs.db") == os.path.abspath("runs-checkpoints")
        True
    """
    try:
        path = _sqlite_file(_normalise(storage_url))
    except StorageError:
        path = None
    if path is not None:
        stem, _ = os.path.splitext(os.path.abspath(path))
        return stem + "-checkpoints"
    digest = hashlib.sha256(storage_identity(storage_url).encode()).hexdigest()[:12]
    return os.path.abspath(os.path.join("poptune-checkpoints", digest))


@dataclass(frozen=True)
class RunMarker:
    """What a checkpoint folder's marker says: the run that owns the folder.

    Attributes:
        storage: The run's storage (`storage_identity`: no password).
        run: The run's name.
        created: When the run was created (seconds since the epoch, as its record says).
    """

    storage: str
    run: str
    created: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        return f"run {self.run!r} of {self.storage} (created {when})"


def _folder(root: str, run: str) -> str | None:
    """The local folder ``ROOT/RUN``; None when ``root`` is an fsspec URL."""
    check_run_name(run)
    local = _local_root(root)
    return None if local is None else os.path.join(local, run)


def read_marker(root: str, run: str) -> RunMarker | None:
    """The marker of ``ROOT/RUN``; None if it has none or ``root`` is an fsspec URL.

    Raises:
        StorageError: The marker exists but cannot be read.
    """
    folder = _folder(root, run)
    if folder is None:
        return None
    path = os.path.join(folder, MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return RunMarker(str(data["storage"]), str(data["run"]), float(data["created"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise StorageError(
            f"Cannot read the checkpoint folder marker {path} ({type(e).__name__}: {e}). "
            "Remove it if that folder belongs to this run, or pass another folder with "
            "checkpoints= (--checkpoints)."
        ) from None


def _owns(marker: RunMarker, run: str, identity: str, created: float | None) -> bool:
    if marker.storage != identity or marker.run != run:
        return False
    return created is None or abs(marker.created - created) < _SAME_TIME


def check_checkpoint_folder(root: str, run: str, storage: str, created: float | None) -> None:
    """Refuses ``ROOT/RUN`` if another run owns it.

    Args:
        root: The checkpoint root (a path or URL; fsspec URLs are not checked).
        run: The run's name.
        storage: The run's storage URL (or a `Storage`'s ``display_url``).
        created: When the run was created; None for a run not created yet (then only the
            storage and the name are compared).

    Raises:
        StorageError: The folder's marker names another storage, another run, or a run of
            this name created at another time. The message names the owner.
    """
    marker = read_marker(root, run)
    if marker is None:
        return
    identity = storage_identity(storage)
    if _owns(marker, run, identity, created):
        return
    folder = _folder(root, run)
    raise StorageError(
        f"Checkpoint folder {folder} belongs to {marker.describe()}, not to run {run!r} of "
        f"{identity}; two runs never share a checkpoint folder. Pass another folder with "
        "checkpoints= (--checkpoints), or remove that one if its run is gone."
    )


def require_checkpoint_folder(root: str, run: str, storage: str, created: float) -> None:
    """Checks, before anything is read from ``ROOT/RUN``, that its marker names this run.

    What reads a stored run's checkpoints (``poptune export``, `poptune.Result.load_state`,
    replay) takes the folder from the run's record: a folder without a marker, or with
    another run's, is not read, whatever files it holds. fsspec roots have no marker.

    Raises:
        StorageError: The folder has no marker, or another run's (the message says which).
    """
    if _folder(root, run) is None:
        return
    if read_marker(root, run) is None:
        raise StorageError(
            f"Checkpoint folder {_folder(root, run)} has no {MARKER} marker naming run {run!r} "
            f"of {storage_identity(storage)}, so its files are not read: they may not be this "
            "run's. If they are, resume the run once (it writes the marker)."
        )
    check_checkpoint_folder(root, run, storage, created)


def claim_checkpoint_folder(root: str, run: str, storage: str, created: float) -> None:
    """Marks ``ROOT/RUN`` as the folder of this run, or checks that it already is.

    A folder without a marker (a run started before markers, or a new one) is claimed.

    Raises:
        StorageError: Another run owns the folder (see `check_checkpoint_folder`).
    """
    folder = _folder(root, run)
    if folder is None:
        return
    check_checkpoint_folder(root, run, storage, created)
    path = os.path.join(folder, MARKER)
    if os.path.exists(path):
        return
    os.makedirs(folder, exist_ok=True)
    text = json.dumps({"storage": storage_identity(storage), "run": run, "created": created})
    # Written whole under a temporary name, then linked: a concurrent claim either finds the
    # complete marker or none, and of two claims at once only the first marker stays.
    tmp = os.path.join(folder, f"{MARKER}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    check_checkpoint_folder(root, run, storage, created)


def delete_checkpoint_folder(
    root: str, run: str, storage: str, created: float
) -> Literal["deleted", "absent", "remote", "foreign"]:
    """Deletes the checkpoint files of a run in ``ROOT/RUN``, if its marker says they are its.

    Only what a run writes there is removed: the marker and the ``member-NNNNN`` folders.
    The folder itself goes when nothing else is left in it.

    Returns:
        ``"deleted"``; ``"absent"`` (no such folder); ``"remote"`` (an fsspec root: left
        alone); ``"foreign"`` (no marker, or another run's: left alone).

    Raises:
        StorageError: The marker cannot be read.
        OSError: A file could not be removed.
    """
    folder = _folder(root, run)
    if folder is None:
        return "remote"
    if not os.path.isdir(folder):
        return "absent"
    marker = read_marker(root, run)
    if marker is None or not _owns(marker, run, storage_identity(storage), created):
        return "foreign"
    for entry in os.scandir(folder):
        name = entry.name
        if entry.is_dir(follow_symlinks=False) and name.startswith("member-"):
            shutil.rmtree(entry.path)
        elif name.startswith(f"{MARKER}.tmp-"):
            os.remove(entry.path)
    os.remove(os.path.join(folder, MARKER))
    with contextlib.suppress(OSError):  # something else lives there: not ours to remove
        os.rmdir(folder)
    return "deleted"
