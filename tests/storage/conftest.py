"""Storage fixtures: one test, every backend (in memory, a SQLite file, a real PostgreSQL)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import poptune
from poptune.storage import Storage, leases, open_storage
from poptune.storage.leases import process_state as proc_state

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


# -- processes, for the liveness rules ----------------------------------------------------------


@pytest.fixture
def zombie_pid() -> Iterator[int]:
    """The pid of a child process that has exited and that nobody has waited for: a zombie,
    as killed workers are in a container whose init never reaps orphans. Reaped afterwards."""
    if proc_state(os.getpid()) is None:
        pytest.skip("needs /proc")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while proc_state(child.pid) != "Z":
            if time.monotonic() > deadline:
                pytest.fail(f"child {child.pid} never became a zombie: {proc_state(child.pid)}")
            time.sleep(0.01)
        yield child.pid
    finally:
        child.wait()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child process that has exited and been reaped: no process has it now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert leases.process_alive(child.pid) is False  # (not reused in the meantime)
    return child.pid


@pytest.fixture
def in_new_pid_namespace() -> Callable[[str], str]:
    """Runs Python code in a new PID namespace (as in another container on this host, with its
    own /proc) and returns what it printed; skips where ``unshare`` is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux and unshare(1)")
    src = str(Path(poptune.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [unshare, "--pid", "--fork", "--map-root-user", "--mount-proc", sys.executable]
    probe = subprocess.run([*command, "-c", "pass"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.strip()[:200]}")

    def run(code: str) -> str:
        done = subprocess.run(
            [*command, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run
