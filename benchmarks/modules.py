"""Loading an example or workload file as a module, for the benchmarks in this folder.

A file loaded by path (not on ``sys.path``) is registered in ``sys.modules`` under ``name``, so
that its classes pickle for worker processes and Ray actors.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load(name: str, path: Path) -> ModuleType:
    """Imports the Python file ``path`` as module ``name`` (once: later calls return it)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
