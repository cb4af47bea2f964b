"""Fixtures for executor tests: the workload's environment (inherited by worker processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Sets ``WL_*`` variables for `workloads.counter`; ``env.locks`` is the lock folder."""
    locks = tmp_path / "locks"
    locks.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("WL_LOCKS", str(locks))
    monkeypatch.setenv("WL_MARKS", str(marks))

    def set_env(**values: object) -> None:
        for k, v in values.items():
            monkeypatch.setenv(f"WL_{k.upper()}", str(v))

    set_env.locks = locks  # type: ignore[attr-defined]
    return set_env
