"""What code builds a run's members, as hashes of its files: to tell, on resume, which of them
changed since the run's checkpoints were written.

A run records (in its ``execution`` record, under ``code``) a hash of each file that defines
how a member is built: the experiment file (the run's ``source``) and the files of the
trainable and of its base classes (or, for `poptune.trainable`, of its ``init`` and ``step``
functions). Files of poptune itself, of the standard library and of installed packages are
left out (a library upgrade is not an edit of the user's), and so is anything whose file
cannot be found or read. Files are named relative to the experiment file's folder where they
lie under it, so a project moved (or checked out on another machine) as a whole keeps its
names; a file only one side knows is never called changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sysconfig
from collections.abc import Mapping
from typing import Any

__all__ = ["changed_files", "code_print", "library_file"]


def code_print(trainable: object, source: str | None) -> dict[str, Any]:
    """The run's ``code`` record: ``{"files": {name: sha256}, "hash": sha256 of them all}``.

    Args:
        trainable: The experiment's trainable (a class, a factory, `poptune.trainable`'s).
        source: The run's source (``FILE.py[:NAME]``), if known.
    """
    from poptune.execution.source import _split

    base: str | None = None
    paths: list[str] = []
    if source:
        path = os.path.abspath(_split(source)[0])
        base = os.path.dirname(path)
        paths.append(path)
    paths += [p for p in _defining_files(trainable) if p not in paths]
    files: dict[str, str] = {}
    for path in paths:
        digest = _digest(path)
        if digest is not None:
            files[_name(path, base)] = digest
    whole = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:32]
    return {"files": files, "hash": whole}


def changed_files(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The files both records name whose content differs, sorted (none when ``old`` is None:
    a run recorded before code was)."""
    if not old:
        return []
    before, after = old.get("files", {}), new.get("files", {})
    return sorted(k for k in set(before) & set(after) if before[k] != after[k])


def _defining_files(trainable: object) -> list[str]:
    """Source files of the trainable's own code, outside poptune and installed packages."""
    objects: list[object] = []
    if isinstance(trainable, type):
        objects += list(trainable.__mro__)
    else:
        # `pt.trainable(init, step)`: the functions are the user's code, the factory is ours.
        objects += [getattr(trainable, "init", None), getattr(trainable, "step", None)]
        objects += [trainable, type(trainable)]
    out: list[str] = []
    for obj in objects:
        if obj is None:
            continue
        with contextlib.suppress(Exception):  # built-ins, C code, objects made in a REPL
            path = inspect.getsourcefile(obj)  # type: ignore[arg-type]
            if path is not None:
                path = os.path.abspath(path)
                if not library_file(path) and path not in out:
                    out.append(path)
    return out


def library_file(path: str) -> bool:
    """Whether ``path`` belongs to poptune, the standard library or installed packages."""
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = [ours]
    paths = sysconfig.get_paths()
    roots += [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(r) + os.sep) for r in roots)


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:32]
    except OSError:
        return None


def _name(path: str, base: str | None) -> str:
    """``path`` relative to ``base`` when it lies under it, else absolute."""
    if base is not None:
        rel = os.path.relpath(path, base)
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            return rel.replace(os.sep, "/")
    return path
