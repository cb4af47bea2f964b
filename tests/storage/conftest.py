"""Storage fixtures: one test, every backend (in memory, a SQLite file, a real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from poptune.storage import Storage, open_storage

#: Every backend; the conformance suite runs against each.
BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
#: SQL backends: several processes can open them by URL and share them.
SQL_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def backend_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty storage of this backend, private to the requesting test."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/p.db"
    if backend == "postgres":
        # Asked for lazily, so memory and SQLite tests never need a server.
        return str(request.getfixturevalue("pg_url"))
    raise ValueError(f"Unknown backend {backend!r}.")


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty storage, once per backend."""
    return backend_url(request.param, request, tmp_path)


@pytest.fixture(params=SQL_BACKENDS)
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty SQL database that several processes can open (SQLite file, PostgreSQL)."""
    return backend_url(request.param, request, tmp_path)


@pytest.fixture
def storage(storage_url: str) -> Iterator[Storage]:
    """An open, empty storage, once per backend; closed after the test."""
    opened = open_storage(storage_url)
    try:
        yield opened
    finally:
        opened.close()
