"""Checkpoint files for the members of PBT runs: atomic, verified, confined and safe to load.

A `CheckpointStore` keeps each saved member state in its own file,
``<root>/<run>/member-00003/step-000000120-<12 hex>-<32 hex>.ckpt``, and names it by that
*location* relative to ``root``. A save writes a ``.tmp-`` file in the same directory, flushes
and fsyncs it, and renames it to its final name, so a reader (or a resumed run) never sees a
half-written checkpoint: a crash or ``SIGKILL`` at any point leaves either the complete new file
or none, plus at worst a temporary file that `CheckpointStore.cleanup_temporary` removes.

**Integrity.** The last 32 hex digits of the name are the SHA-256 of the file's bytes
(truncated to 128 bits), computed while it is written. The location is what every record of
the run refers to (the member rows, the checkpoint rows), so the checksum is recorded with each
of them, and `CheckpointStore.load` verifies it before it reads anything from the file: a
truncated, bit-flipped or replaced file raises `DamagedCheckpoint`, a missing one
`MissingCheckpoint`. (Files written before checksums, without the digest in their name, load
unverified.)

**Safe loading.** Each file starts with a 9-byte header (``b"POPTUNE1"`` and one format byte):
states holding torch objects are written with ``torch.save``, everything else with ``pickle``
(protocol 5). Loading admits only tensors and plain data by default: ``torch.load`` with
``weights_only=True``, and for pickles an unpickler that only builds numbers, strings, bytes,
containers, numpy arrays and scalars, random-generator states and a few standard value types.
A file naming anything else raises `UnsafeCheckpoint` and runs no code. Loading arbitrary
objects (a state holding instances of your own classes) is an explicit opt-in,
``Experiment(allow_pickle=True)``, recorded with the run: then a file can run any code it
names when loaded, so only do it when every file under the root is trusted.

`select_for_deletion` decides which checkpoints a retention policy may delete. It does no I/O;
the caller deletes what it returns with `CheckpointStore.delete`.

    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), fsync=False)
    >>> info = store.save("demo", member=0, step=10, state={"w": [1.0, 2.0]})
    >>> info.format, store.load(info.location)
    ('pickle', {'w': [1.0, 2.0]})
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import io
import operator
import os
import pickle
import posixpath
import re
import sys
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal, cast
from urllib.parse import unquote, urlsplit

__all__ = [
    "CheckpointInfo",
    "CheckpointRef",
    "CheckpointStore",
    "DamagedCheckpoint",
    "MissingCheckpoint",
    "UnsafeCheckpoint",
    "check_run_name",
    "checkpoint_owner",
    "select_for_deletion",
]

Format = Literal["pickle", "torch"]

_MAGIC = b"POPTUNE1"
_FORMAT_BYTES: dict[Format, bytes] = {"pickle": b"P", "torch": b"T"}
_FORMATS: dict[bytes, Format] = {v: k for k, v in _FORMAT_BYTES.items()}
_HEADER_SIZE = len(_MAGIC) + 1
_TMP_PREFIX = ".tmp-"
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}", re.ASCII)
#: Hex digits of the SHA-256 a checkpoint's name records (128 bits).
_DIGEST_HEX = 32
_FILE_NAME = re.compile(r"step-(\d{9})-([0-9a-f]{12})(?:-([0-9a-f]{32}))?\.ckpt")
_MEMBER_DIR = re.compile(r"member-(\d{5})")
_CHUNK = 1 << 20
_OPT_IN = (
    "poptune loads only tensors and plain data by default (numbers, strings, containers, "
    "numpy arrays, random-generator states), so that a planted file cannot run code. If every "
    "file under the run's checkpoint root is yours, set Experiment(..., allow_pickle=True), "
    "which is recorded with the run; or keep only such data in state_dict()."
)


class DamagedCheckpoint(ValueError):
    """A checkpoint file that must not be used: its bytes differ from the checksum its name
    records (truncated, changed or replaced after it was written), or it is not a checkpoint
    `CheckpointStore` wrote, or its payload cannot be read.

    Attributes:
        location: The checkpoint's location.
        reason: What is wrong with it, in a few words.
    """

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"Checkpoint {location!r} cannot be used: {reason}.")
        self.location = location
        self.reason = reason

    def __reduce__(self) -> Any:  # keeps location and reason across processes
        return (type(self), (self.location, self.reason))


class MissingCheckpoint(DamagedCheckpoint, FileNotFoundError):
    """No checkpoint file is at a location a record refers to."""


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint names an object that safe loading does not build (see the module docstring):
    nothing in it was run. The message names the object and the opt-in."""


def checkpoint_owner(location: str) -> int | None:
    """The member whose state a location holds (its ``member-NNNNN`` folder), if it has one.

    Example:
        >>> checkpoint_owner("run/member-00003/step-000000120-0123456789ab.ckpt")
        3
    """
    parts = location.split("/")
    found = _MEMBER_DIR.fullmatch(parts[-2]) if len(parts) >= 2 else None
    return int(found.group(1)) if found else None


def _recorded_digest(location: str) -> str | None:
    """The checksum a location's file name records; None for a file written before them."""
    found = _FILE_NAME.fullmatch(location.rsplit("/", 1)[-1])
    return found.group(3) if found else None


def check_run_name(name: str) -> str:
    """Returns ``name`` if it is a safe run name, which cannot leave the checkpoint directory.

    A run name is 1-200 ASCII letters, digits, ``-``, ``_`` or ``.``, and does not start with
    ``.`` or ``-`` (so it is never ``.``, ``..`` or hidden, never holds a path separator, and
    is never taken for an option in a printed command such as ``poptune resume NAME``).

    Raises:
        ValueError: ``name`` is not a safe run name.
    """
    if not isinstance(name, str) or _RUN_NAME.fullmatch(name) is None:
        raise ValueError(
            "Run name must be 1-200 characters of letters, digits, '-', '_' or '.', not "
            f"starting with '.' or '-'; got {name!r}."
        )
    return name


@dataclass(frozen=True)
class CheckpointInfo:
    """What `CheckpointStore.save` wrote.

    Attributes:
        location: The checkpoint's path relative to the store's root, with ``/`` separators;
            pass it to `CheckpointStore.load`.
        size: The file's size in bytes, header included.
        format: ``"torch"`` when written with ``torch.save``, else ``"pickle"``.
    """

    location: str
    size: int
    format: Format


@dataclass(frozen=True)
class CheckpointRef:
    """One existing checkpoint, as `select_for_deletion` sees it.

    Attributes:
        location: The checkpoint's location in its store.
        member: The member whose state it holds.
        step: The training step it was saved at.
        created: When it was saved, as a number that only grows (a sequence number or row id);
            "most recent" means the largest ``created``, not the largest step, since a member
            that exploits goes back to its donor's (smaller) step.
    """

    location: str
    member: int
    step: int
    created: int


def select_for_deletion(
    checkpoints: Sequence[CheckpointRef], keep_last: int, protected: Collection[str]
) -> list[str]:
    """The locations a retention policy deletes: all but each member's ``keep_last`` newest.

    Members are independent: one member's checkpoints never make another's old. A location in
    ``protected`` (the state a member currently stands on, a pending exploit's donor state, the
    best member's state) is never returned and does not use up one of the ``keep_last`` places.

    Args:
        checkpoints: Every checkpoint that may be deleted, in any order.
        keep_last: How many of its most recent checkpoints each member keeps; at least 1.
        protected: Locations that must not be deleted.

    Returns:
        The locations to delete, each once, in the order of ``checkpoints``.

    Raises:
        ValueError: ``keep_last < 1``.

    Example:
        >>> refs = [CheckpointRef(f"c{i}", member=0, step=i, created=i) for i in range(4)]
        >>> select_for_deletion(refs, keep_last=2, protected={"c0"})
        ['c1']
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"`keep_last >= 1` must hold, but got keep_last={keep_last!r}.")
    by_member: dict[int, list[CheckpointRef]] = {}
    for ref in checkpoints:
        by_member.setdefault(ref.member, []).append(ref)
    kept = set(protected)
    for refs in by_member.values():
        newest = sorted(refs, key=lambda r: r.created, reverse=True)[:keep_last]
        kept.update(r.location for r in newest)
    doomed: list[str] = []
    for ref in checkpoints:
        if ref.location not in kept:
            kept.add(ref.location)  # each location once
            doomed.append(ref.location)
    return doomed


class _HoldsTorch(Exception):
    """Raised while pickling when the state turns out to hold a torch object."""


class _TorchSpotter(pickle.Pickler):
    """A pickler that stops at the first torch object, so such a state goes to ``torch.save``."""

    def __init__(self, file: IO[bytes], tensor_type: type) -> None:
        super().__init__(file, protocol=5)
        self._tensor_type = tensor_type

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        module = getattr(cls, "__module__", None) or ""
        if module == "torch" or module.startswith("torch.") or isinstance(obj, self._tensor_type):
            raise _HoldsTorch
        return NotImplemented


class _Digest:
    """A writable file that hashes what is written to it.

    Writers only append (pickle, ``torch.save``); one that seeks elsewhere or truncates makes
    the running hash void, and the file is then hashed again once written (`_file_digest`).
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.exact = True

    def write(self, data: Any) -> int:
        self._hash.update(data)
        return self._f.write(data)

    def restart(self) -> None:
        """Empties the file and the hash (a pickle abandoned for ``torch.save``)."""
        self._f.seek(0)
        self._f.truncate()
        self._hash = hashlib.sha256()
        self.exact = True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._f.seek(offset, whence)
        if position != self._end():
            self.exact = False
        return position

    def truncate(self, size: int | None = None) -> int:
        self.exact = False
        return self._f.truncate(size)

    def _end(self) -> int:
        here = self._f.tell()
        end = self._f.seek(0, os.SEEK_END)
        self._f.seek(here)
        return end

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:_DIGEST_HEX]

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, name...
        return getattr(self._f, name)


def _file_digest(f: IO[bytes]) -> str:
    """The checksum of a whole open file, read from its start."""
    f.seek(0)
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()[:_DIGEST_HEX]


def _dump(out: _Digest, state: object) -> Format:
    """Writes the header and payload of ``state``: a pickle, or ``torch.save`` if it holds
    torch objects (a state can only hold them if torch was imported, so torch is never
    imported here, and without it the plain C pickler does the work)."""
    out.write(_MAGIC + _FORMAT_BYTES["pickle"])
    tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
    if not isinstance(tensor_type, type):
        pickle.dump(state, cast(IO[bytes], out), protocol=5)
        return "pickle"
    try:
        _TorchSpotter(cast(IO[bytes], out), tensor_type).dump(state)
        return "pickle"
    except _HoldsTorch:
        out.restart()
    import torch

    out.write(_MAGIC + _FORMAT_BYTES["torch"])
    torch.save(state, cast(IO[bytes], out))
    return "torch"


def _read_format(f: IO[bytes], where: str) -> Format:
    header = f.read(_HEADER_SIZE)
    fmt = _FORMATS.get(header[-1:]) if header[:-1] == _MAGIC else None
    if fmt is None:
        raise DamagedCheckpoint(
            where,
            f"it must start with {_MAGIC!r} and a format byte, but starts with {header!r}: it "
            "was not written by CheckpointStore",
        )
    return fmt


class _Window(io.RawIOBase):
    """A read-only view of a file from its current position on, seen as position 0.

    ``torch.load`` reads a zip archive, whose offsets count from the archive's first byte, not
    from the file's (which is our header).
    """

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self._f = f
        self._start = f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell() - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            offset += self._start
        return self._f.seek(offset, whence) - self._start

    def read(self, size: int | None = -1) -> bytes:
        return self._f.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# What safe loading builds from a pickle: plain values, numpy arrays and scalars, random
# generators' states. Each is a value type whose construction runs no code named by the file.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_SAFE_GLOBALS = frozenset(
    [
        *(
            ("builtins", n)
            for n in (
                "bool",
                "bytearray",
                "bytes",
                "complex",
                "dict",
                "float",
                "frozenset",
                "int",
                "list",
                "range",
                "set",
                "slice",
                "str",
                "tuple",
            )
        ),
        ("_codecs", "encode"),
        ("copyreg", "_reconstructor"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("collections", "deque"),
        ("datetime", "date"),
        ("datetime", "datetime"),
        ("datetime", "time"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("random", "Random"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        *((m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar")),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random.bit_generator", "SeedSequence"),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
        ("numpy.random._pcg64", "PCG64"),
        ("numpy.random._pcg64", "PCG64DXSM"),
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random._philox", "Philox"),
        ("numpy.random._sfc64", "SFC64"),
    ]
)


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only what `_SAFE_GLOBALS` names."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafeCheckpoint(f"the checkpoint names {module}.{name}, which {_OPT_IN}")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=1)
def _safe_torch_globals() -> list[Any]:
    """The numpy objects `_SAFE_GLOBALS` admits, for ``torch.load(weights_only=True)``."""
    modern = importlib.util.find_spec("numpy._core") is not None
    found = []
    for module, name in sorted(_SAFE_GLOBALS):
        if not module.startswith("numpy") or (modern and module.startswith("numpy.core")):
            continue  # torch's own list has the plain types; numpy.core is numpy._core's alias
        with contextlib.suppress(Exception):
            found.append(getattr(importlib.import_module(module), name))
    import numpy as np

    found += [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDGSUV"]
    return found


def _load_payload(f: IO[bytes], fmt: Format, allow_pickle: bool) -> object:
    if fmt == "pickle":
        return (pickle.Unpickler(f) if allow_pickle else _SafeUnpickler(f)).load()
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "This checkpoint was written with torch.save; loading it needs torch: "
            "pip install 'poptune[torch]'."
        ) from e
    map_location = None if torch.cuda.is_available() else "cpu"
    window = cast(IO[bytes], _Window(f))
    if allow_pickle:
        return torch.load(window, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_torch_globals()):
            return torch.load(window, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(
            f"torch.load(weights_only=True) refused the checkpoint ({first}); {_OPT_IN}"
        ) from None


def _fsync_dir(path: str) -> None:
    """Makes a rename or a new entry in directory ``path`` durable (where the OS allows it)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened to fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_root(root: str) -> str | None:
    """The local directory ``root`` names, or None if it is a URL for fsspec."""
    if "::" not in root and "://" not in root:
        return root
    parts = urlsplit(root)
    if "::" not in root and parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return unquote(parts.path)  # a plain file:// URL gets the fast, fsync'ed local path
    return None


class CheckpointStore:
    """Saves, loads and deletes checkpoints of member states under one root directory.

    Every save writes a new file with a unique name, so savers never overwrite each other: one
    store may be shared by threads, and several processes may open the same root. A reader
    never sees a partly written checkpoint (see the module docstring).

    Args:
        root: A local directory, created if missing, or an fsspec URL (``"memory://x"``,
            ``"s3://bucket/prefix"``; needs ``pip install 'poptune[fsspec]'``). A plain
            ``file://`` URL is treated as the local directory it names.
        fsync: Whether a save fsyncs the file and its directory before returning, so the
            checkpoint survives a power loss or OS crash, not only a crash of the process.
            Local directories only; fsspec file systems are as durable as their ``close``.
        allow_pickle: Load arbitrary pickled objects (see the module docstring): only for a
            root whose every file is trusted. False (the default): tensors and plain data
            only, and the store's first save is loaded back at once, so that a state safe
            loading would refuse fails on its first checkpoint, not at its first restore.

    Raises:
        ImportError: ``root`` is a URL and fsspec is not installed.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, fsync: bool = True, allow_pickle: bool = False
    ) -> None:
        self._url = os.fspath(root)
        self._fsync = fsync
        self.allow_pickle = bool(allow_pickle)
        self._checked = self.allow_pickle  # whether a saved state was loaded back safely
        self._fs: Any = None
        self._dirs: set[str] = set()  # directories known to exist
        local = _local_root(self._url)
        if local is not None:
            os.makedirs(local, exist_ok=True)
            self._root = os.path.realpath(local)
            return
        try:
            import fsspec
        except ImportError as e:
            raise ImportError(
                f"Checkpoint storage at the URL {self._url!r} needs fsspec: "
                "pip install 'poptune[fsspec]'."
            ) from e
        self._fs, path = fsspec.core.url_to_fs(self._url)
        self._root = str(path).rstrip("/")

    @property
    def root(self) -> str:
        """The root as given (a path or URL)."""
        return self._url

    def __repr__(self) -> str:
        extra = ", allow_pickle=True" if self.allow_pickle else ""
        return f"CheckpointStore({self._url!r}, fsync={self._fsync}{extra})"

    def save(self, run: str, member: int, step: int, state: object) -> CheckpointInfo:
        """Writes ``state`` as a new checkpoint of ``member`` at ``step`` in ``run``.

        Args:
            run: The run's name (see `check_run_name`).
            member: The member's id, ``>= 0``.
            step: The training step, ``>= 0``.
            state: Anything picklable: with ``torch.save`` if it holds torch objects (tensors,
                state dicts of modules and optimizers), else with pickle.

        Returns:
            Where the checkpoint is (its name records the file's checksum), its size and its
            format.

        Raises:
            ValueError: ``run`` is not a safe run name, or ``member`` or ``step`` is negative.
            UnsafeCheckpoint: The store's first state holds objects safe loading refuses
                (unless ``allow_pickle``); nothing is kept.
            OSError: The file could not be written (a full disk, say); nothing is kept.
        """
        check_run_name(run)
        member = _non_negative("member", member)
        step = _non_negative("step", step)
        directory = f"{run}/member-{member:05d}"
        stem = f"step-{step:09d}-{uuid.uuid4().hex[:12]}"
        if self._fs is None:
            name, size, fmt = self._save_local(directory, stem, state)
        else:
            name, size, fmt = self._save_fsspec(directory, stem, state)
        info = CheckpointInfo(location=f"{directory}/{name}", size=size, format=fmt)
        if not self._checked:
            try:
                self.load(info.location)
            except UnsafeCheckpoint as e:
                self.delete(info.location)
                raise UnsafeCheckpoint(
                    f"A state_dict() of member {member} at step {step} holds objects that "
                    f"safe loading refuses: {e}"
                ) from None
            self._checked = True
        return info

    def load(self, location: str) -> object:
        """Reads the checkpoint at ``location``, a location that `save` returned, once its
        bytes match the checksum its name records.

        Tensors are mapped to the CPU when CUDA is not available.

        Raises:
            ValueError: ``location`` is outside this store's root.
            MissingCheckpoint: No checkpoint is there (also a `FileNotFoundError`).
            DamagedCheckpoint: The file fails its checksum, or is not a checkpoint `save`
                wrote, or its payload cannot be read. Nothing of it was unpickled.
            UnsafeCheckpoint: It names objects that safe loading does not build (the store
                was not opened with ``allow_pickle``); nothing was run.
        """
        try:
            if self._fs is None:
                f = open(self._local_path(location), "rb")  # noqa: SIM115 (closed below)
            else:
                f = self._fs.open(self._remote_path(location), "rb")
        except FileNotFoundError:
            raise MissingCheckpoint(location, "the file does not exist") from None
        with f:
            return self._read(f, location)

    def _read(self, f: IO[bytes], location: str) -> object:
        expected = _recorded_digest(location)
        if expected is not None:
            actual = _file_digest(f)
            if actual != expected:
                raise DamagedCheckpoint(
                    location,
                    f"its bytes hash to {actual}, but its name records {expected} (it was "
                    "truncated, changed or replaced after it was written)",
                )
            f.seek(0)
        fmt = _read_format(f, location)
        try:
            return _load_payload(f, fmt, self.allow_pickle)
        except (UnsafeCheckpoint, ImportError):
            raise
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
            raise DamagedCheckpoint(
                location, f"its payload cannot be read ({type(e).__name__}: {e})"
            ) from None

    def delete(self, location: str) -> None:
        """Deletes the checkpoint at ``location``; a missing one is not an error.

        Raises:
            ValueError: ``location`` is outside this store's root.
        """
        if self._fs is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._local_path(location))
            return
        path = self._remote_path(location)
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(path)

    def exists(self, location: str) -> bool:
        """Whether a checkpoint is at ``location``.

        Raises:
            ValueError: ``location`` is outside this store's root.
        """
        if self._fs is None:
            return os.path.isfile(self._local_path(location))
        return bool(self._fs.isfile(self._remote_path(location)))

    def cleanup_temporary(self, run: str) -> int:
        """Removes the temporary files that interrupted saves left in ``run``; returns how many.

        Call it when no process is saving into ``run`` (before resuming it): it would also
        remove the temporary file of a save in progress, which would then fail.

        Raises:
            ValueError: ``run`` is not a safe run name.
        """
        check_run_name(run)
        removed = 0
        if self._fs is None:
            for directory, _, files in os.walk(os.path.join(self._root, run)):
                for name in files:
                    if name.startswith(_TMP_PREFIX):
                        try:
                            os.remove(os.path.join(directory, name))
                        except FileNotFoundError:
                            continue
                        removed += 1
            return removed
        top = f"{self._root}/{run}"
        if not self._fs.exists(top):
            return 0
        for path in self._fs.find(top):
            if posixpath.basename(path).startswith(_TMP_PREFIX):
                try:
                    self._fs.rm(path)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    def collect_unreferenced(self, run: str, referenced: Collection[str]) -> int:
        """Deletes ``run``'s checkpoint files whose locations are not in ``referenced``;
        returns how many.

        Only the ``.ckpt`` files directly inside the run's ``member-*`` folders are looked at:
        temporary files (`cleanup_temporary`), the run folder's own files and anything else
        are left alone. A saved checkpoint is referenced only once its worker commits it, so
        call this only when no worker can commit into ``run`` any more (the run is over, or
        none of its workers is alive).

        Raises:
            ValueError: ``run`` is not a safe run name.
        """
        check_run_name(run)
        keep = set(referenced)
        removed = 0
        for location in self._checkpoint_files(run):
            if location in keep:
                continue
            try:
                if self._fs is None:
                    os.remove(self._local_path(location))
                else:
                    self._fs.rm(self._remote_path(location))
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def _checkpoint_files(self, run: str) -> list[str]:
        """The locations of the ``.ckpt`` files in ``run``'s ``member-*`` folders."""
        found: list[str] = []
        if self._fs is None:
            try:
                with os.scandir(os.path.join(self._root, run)) as entries:
                    folders = list(entries)
            except FileNotFoundError:
                return []
            for folder in folders:
                if not (folder.name.startswith("member-") and folder.is_dir(follow_symlinks=False)):
                    continue
                with os.scandir(folder.path) as files:
                    found += [
                        f"{run}/{folder.name}/{f.name}"
                        for f in files
                        if _is_checkpoint_name(f.name) and f.is_file(follow_symlinks=False)
                    ]
            return found
        top = f"{self._root}/{run}"
        if not self._fs.exists(top):
            return []
        for path in self._fs.find(top):
            parts = posixpath.relpath(str(path), top).split("/")
            if len(parts) == 2 and parts[0].startswith("member-") and _is_checkpoint_name(parts[1]):
                found.append(f"{run}/{parts[0]}/{parts[1]}")
        return found

    def _save_local(self, directory: str, stem: str, state: object) -> tuple[str, int, Format]:
        folder = os.path.join(self._root, *directory.split("/"))
        self._make_local_dir(folder)
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{stem}.ckpt")
        f = self._create_local(folder, tmp)
        try:
            with f:
                out = _Digest(f)
                fmt = _dump(out, state)
                f.flush()
                size = f.tell()
                digest = out.hexdigest() if out.exact else _file_digest(f)
                if self._fsync:
                    os.fsync(f.fileno())
            name = f"{stem}-{digest}.ckpt"
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            _remove_quietly(tmp)
            raise
        if self._fsync:
            _fsync_dir(folder)
        return name, size, fmt

    def _create_local(self, folder: str, tmp: str) -> IO[bytes]:
        try:
            return open(tmp, "xb")
        except FileNotFoundError:  # the directory was removed since we made it
            self._dirs.clear()
            self._make_local_dir(folder)
            return open(tmp, "xb")

    def _make_local_dir(self, folder: str) -> None:
        if folder in self._dirs:
            return
        missing = []
        path = folder
        while not os.path.isdir(path) and path != self._root:
            missing.append(path)
            path = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        if self._fsync:  # a new directory is durable once its parent's entry is
            for path in reversed(missing):
                _fsync_dir(os.path.dirname(path))
        self._dirs.add(folder)

    def _save_fsspec(self, directory: str, stem: str, state: object) -> tuple[str, int, Format]:
        folder = f"{self._root}/{directory}"
        if folder not in self._dirs:
            self._fs.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        tmp = f"{folder}/{_TMP_PREFIX}{stem}.ckpt"
        # Remote files cannot always seek or truncate (a pickle abandoned for torch.save):
        # the file is made in memory, then written in one piece.
        buffer = io.BytesIO()
        out = _Digest(buffer)
        fmt = _dump(out, state)
        data = buffer.getbuffer()
        digest = out.hexdigest() if out.exact else _file_digest(buffer)
        name = f"{stem}-{digest}.ckpt"
        try:
            with self._fs.open(tmp, "wb") as f:
                f.write(data)
            size = len(data)
            self._fs.mv(tmp, f"{folder}/{name}")
        except BaseException:
            with contextlib.suppress(Exception):  # the original error matters, not this one
                self._fs.rm(tmp)
            raise
        return name, int(size), fmt

    def _local_path(self, location: str) -> str:
        parts = self._check_location(location)
        path = os.path.realpath(os.path.join(self._root, *parts))
        if not path.startswith(self._root + os.sep):  # e.g. through a symlink
            raise self._outside(location)
        return path

    def _remote_path(self, location: str) -> str:
        return "/".join([self._root, *self._check_location(location)])

    def _check_location(self, location: str) -> list[str]:
        if not isinstance(location, str):
            raise TypeError(f"A checkpoint location must be a str; got {location!r}.")
        parts = location.split("/")
        if (
            not location
            or location.startswith("/")
            or os.path.isabs(location)
            or "\\" in location
            or "\0" in location
            or ":" in parts[0]  # a drive ("C:") or a URL
            or ".." in parts
        ):
            raise self._outside(location)
        return parts

    def _outside(self, location: object) -> ValueError:
        return ValueError(
            "A checkpoint location must be a relative path that stays inside the run's "
            f"storage {self._url!r}; got {location!r}, which is outside it."
        )


def _non_negative(name: str, value: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = -1
    if number < 0:
        raise ValueError(f"`{name}` must be an int >= 0, but got {name}={value!r}.")
    return number


def _is_checkpoint_name(name: str) -> bool:
    """Whether a file name is a saved checkpoint's (not a temporary file's)."""
    return name.endswith(".ckpt") and not name.startswith(_TMP_PREFIX)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
