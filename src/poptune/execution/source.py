"""Loading an `Experiment` from a Python file: ``FILE.py`` or ``FILE.py:NAME``."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poptune.experiment import Experiment

__all__ = ["SourceError", "importing", "load_experiment"]

#: The experiment files being imported by `load_experiment` right now (innermost last):
#: `poptune.Experiment.run` refuses to start while one is, since a top-level ``run()`` call
#: in such a file would train the run during the import, before poptune does.
_IMPORTING: list[str] = []


def importing() -> str | None:
    """The experiment file `load_experiment` is importing right now, else None."""
    return _IMPORTING[-1] if _IMPORTING else None


class SourceError(ValueError):
    """The file does not exist, does not import, or defines no usable Experiment."""


def _split(spec: str) -> tuple[str, str | None]:
    path, sep, name = spec.rpartition(":")
    # "C:\\x.py" or a plain path without a ":NAME" suffix.
    if not sep or not name or "/" in name or "\\" in name or not path:
        return spec, None
    return path, name


def module_name_for(path: str) -> str:
    """The name an experiment file is imported under: ``_poptune_user_<file stem>``.

    It does not depend on where the file is, so that objects of classes the file defines
    (pickled into checkpoints with ``allow_pickle``) load in a process that imported the same
    file from another path: ``poptune worker RUN FILE`` on another machine, ``poptune export``
    in a new process. Only when another file of the same stem is already imported in this
    process does a hash of the path tell them apart.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "_poptune_user_" + re.sub(r"\W", "_", stem, flags=re.ASCII)
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if module is None or (file is not None and os.path.abspath(file) == path):
        return name
    return f"{name}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def load_experiment(spec: str) -> tuple[Experiment, str]:
    """Imports ``FILE.py[:NAME]`` and returns its Experiment and the normalised source.

    Without ``NAME``, the file must define exactly one module-level `Experiment`. ``NAME`` may
    also name a function taking no argument that returns one, and may be a dotted path whose
    parts are read in turn, calling a function met on the way: ``EXPERIMENT.baseline`` is the
    random-search baseline of ``EXPERIMENT`` (`poptune.Experiment.baseline`), as ``poptune run
    --baseline random`` records it.
    """
    from poptune.experiment import Experiment

    path, name = _split(spec)
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SourceError(f"No such file: {path}")
    module_name = module_name_for(path)
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise SourceError(f"Cannot import {path}: not a Python file.")
        module = importlib.util.module_from_spec(loader_spec)
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        sys.modules[module_name] = module
        _IMPORTING.append(path)
        try:
            loader_spec.loader.exec_module(module)
        except BaseException as e:
            del sys.modules[module_name]
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise SourceError(f"Importing {path} failed: {type(e).__name__}: {e}") from e
        finally:
            _IMPORTING.pop()
    if name is not None:
        obj: object = module
        for part in name.split("."):
            if obj is not module and not isinstance(obj, Experiment) and callable(obj):
                obj = obj()
            if not hasattr(obj, part):
                raise SourceError(f"{path} has no {name!r}.")
            obj = getattr(obj, part)
        if not isinstance(obj, Experiment) and callable(obj):
            obj = obj()
        if not isinstance(obj, Experiment):
            raise SourceError(f"{path}:{name} is a {type(obj).__name__}, not a poptune Experiment.")
        return obj, f"{path}:{name}"
    found = {k: v for k, v in vars(module).items() if isinstance(v, Experiment)}
    if not found:
        raise SourceError(
            f"{path} defines no poptune Experiment at module level; assign one, e.g. "
            "EXPERIMENT = pt.Experiment(...), or name a function with FILE.py:NAME."
        )
    if len(found) > 1:
        names = ", ".join(sorted(found))
        raise SourceError(f"{path} defines several Experiments ({names}); choose one: {spec}:NAME.")
    ((key, exp),) = found.items()
    return exp, f"{path}:{key}"
