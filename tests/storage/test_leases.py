"""Worker ids and the liveness rule (`poptune.storage.leases`), with real processes.

The lease rules built on them (claim, require_owner, release) are checked on every backend in
``test_conformance.py``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable

import pytest

from poptune.execution import session
from poptune.storage.leases import (
    UNKNOWN_NAMESPACE,
    WorkerIdentity,
    from_local_process,
    namespace_id,
    new_worker_id,
    owner_alive,
    parse_worker_id,
    process_alive,
    same_process_namespace,
)

HOST = socket.gethostname()
OTHER_NAMESPACE = "abcdef012345"
FRESH = {"heartbeat": 100.0, "timeout": 30.0, "now": 101.0}
STALE = {"heartbeat": 100.0, "timeout": 30.0, "now": 200.0}


def here(pid: int, token: str = "cafebabe") -> str:
    """A worker id of process ``pid`` of this host and PID namespace."""
    namespace = namespace_id()
    if namespace is None:
        pytest.skip("this platform has no known PID namespace")
    return f"{HOST}:{pid}:{namespace}:{token}"


# -- worker ids -------------------------------------------------------------------------------


def test_new_worker_id_names_this_process_and_its_namespace() -> None:
    """A new id parses back to this host, this pid and this PID namespace, and never repeats."""
    owner = new_worker_id()
    assert parse_worker_id(owner) == WorkerIdentity(HOST, os.getpid(), namespace_id())
    assert len(owner.split(":")) == 4
    assert new_worker_id() != owner
    assert same_process_namespace(owner)


def test_session_names_are_the_leases_functions() -> None:
    """poptune.execution.session keeps new_worker_id and owner_alive, with the same rules."""
    owner = session.new_worker_id()
    assert parse_worker_id(owner) == WorkerIdentity(HOST, os.getpid(), namespace_id())
    assert session.owner_alive(owner, **FRESH) is True
    assert session.owner_alive(owner, **STALE) is False
    assert session.owner_alive(None, **FRESH) is False


def test_worker_ids_with_a_tag_parse() -> None:
    """Worker processes append ``-TAG`` to their id; it still names their process."""
    owner = f"{new_worker_id()}-w3"
    assert parse_worker_id(owner) == WorkerIdentity(HOST, os.getpid(), namespace_id())
    assert same_process_namespace(owner)


def test_old_format_ids_parse_without_a_namespace() -> None:
    """``HOST:PID:TOKEN`` ids (poptune before namespaces) parse, with namespace None."""
    assert parse_worker_id("node7:4242:9c1e22aa") == WorkerIdentity("node7", 4242, None)
    assert parse_worker_id("node7:4242:9c1e22aa-w1") == WorkerIdentity("node7", 4242, None)
    assert not same_process_namespace(f"{HOST}:{os.getpid()}:9c1e22aa")


def test_unknown_namespace_parses_as_none() -> None:
    """An id minted where the namespace could not be determined carries no namespace."""
    owner = f"{HOST}:{os.getpid()}:{UNKNOWN_NAMESPACE}:9c1e22aa"
    assert parse_worker_id(owner) == WorkerIdentity(HOST, os.getpid(), None)
    assert not same_process_namespace(owner)


@pytest.mark.parametrize(
    "owner", [None, "", "w1", "worker-3", "host:abc:9c1e22aa", "host:12", ":12:x", "host:-1:x"]
)
def test_other_strings_are_not_worker_ids(owner: str | None) -> None:
    """Owners that are not worker ids (tests, other tools) parse as None: heartbeat only."""
    assert parse_worker_id(owner) is None
    assert not same_process_namespace(owner)


def test_same_process_namespace_needs_host_and_namespace() -> None:
    """Only an id of this host *and* this namespace is judged by this process table."""
    pid = os.getpid()
    assert same_process_namespace(here(pid))
    assert not same_process_namespace(f"other-{HOST}:{pid}:{namespace_id()}:cafebabe")
    assert not same_process_namespace(f"{HOST}:{pid}:{OTHER_NAMESPACE}:cafebabe")


def test_from_local_process_matches_pid_host_and_namespace() -> None:
    """from_local_process recognises the ids a given child process of this host minted."""
    assert from_local_process(here(1234, "aa-w2"), 1234)
    assert not from_local_process(here(1234), 12345)
    assert not from_local_process(f"{HOST}:1234:{OTHER_NAMESPACE}:aa", 1234)
    assert not from_local_process(None, 1234)


# -- processes --------------------------------------------------------------------------------


def test_process_alive_of_this_and_of_an_exited_process(dead_pid: int) -> None:
    """This process is alive; a child that exited and was reaped is not."""
    assert process_alive(os.getpid()) is True
    assert process_alive(os.getppid()) is True
    assert process_alive(dead_pid) is False


def test_a_zombie_is_not_alive(zombie_pid: int) -> None:
    """A process that exited but was never reaped still exists, yet is dead (kill -9 of a
    process group in a container whose init reaps nothing leaves such workers)."""
    os.kill(zombie_pid, 0)  # no error: the old check took this for a live worker
    assert process_alive(zombie_pid) is False


@pytest.mark.parametrize("pid", [0, -1])
def test_process_group_ids_are_never_probed(pid: int) -> None:
    """pid 0 and negative pids address process groups: their liveness is unknown (None)."""
    assert process_alive(pid) is None


# -- owner_alive ------------------------------------------------------------------------------


def test_owner_alive_follows_the_heartbeat() -> None:
    """A live owner is alive while its heartbeat is younger than the timeout, not at it."""
    owner = new_worker_id()
    assert owner_alive(owner, heartbeat=100.0, timeout=30.0, now=129.999)
    assert not owner_alive(owner, heartbeat=100.0, timeout=30.0, now=130.0)
    assert not owner_alive(owner, heartbeat=None, timeout=30.0, now=100.0)
    assert not owner_alive(None, heartbeat=100.0, timeout=30.0, now=100.0)


def test_a_live_process_never_outlives_its_heartbeat() -> None:
    """The pid check only shortens the wait: a live but silent owner is presumed dead."""
    assert process_alive(os.getpid())
    assert not owner_alive(here(os.getpid()), **STALE)


def test_an_exited_owner_of_this_namespace_is_dead_at_once(dead_pid: int, zombie_pid: int) -> None:
    """Owners of this host and namespace whose process is gone or a zombie are dead even with
    a fresh heartbeat: a resume right after a crash need not wait for the timeout."""
    assert not owner_alive(here(dead_pid), **FRESH)
    assert not owner_alive(here(zombie_pid), **FRESH)
    assert not owner_alive(f"{here(zombie_pid)}-w1", **FRESH)


def test_a_pid_of_another_namespace_or_host_is_judged_by_heartbeat_only(dead_pid: int) -> None:
    """The same pid names another process in another container or on another host: that it
    is dead here says nothing, so a fresh heartbeat keeps the owner alive."""
    for owner in (
        f"{HOST}:{dead_pid}:{OTHER_NAMESPACE}:cafebabe",
        f"other-{HOST}:{dead_pid}:{namespace_id() or OTHER_NAMESPACE}:cafebabe",
        f"{HOST}:{dead_pid}:{UNKNOWN_NAMESPACE}:cafebabe",
        f"{HOST}:{dead_pid}:cafebabe",  # old format: its namespace is unknown
        "worker-1",
    ):
        assert owner_alive(owner, **FRESH), owner
        assert not owner_alive(owner, **STALE), owner


def test_ids_minted_in_another_pid_namespace_are_not_judged_here(
    in_new_pid_namespace: Callable[[str], str],
) -> None:
    """A worker in another PID namespace on this host (another container, same host name)
    mints an id with another namespace, and judges this live process's id, whose pid does not
    exist in its namespace, by the heartbeat alone: it never steals a live worker's member."""
    mine = new_worker_id()
    code = f"""
import json
from poptune.storage import leases
mine = {mine!r}
print(json.dumps({{
    "id": leases.new_worker_id(),
    "my_pid_there": leases.process_alive(leases.parse_worker_id(mine).pid),
    "same_namespace": leases.same_process_namespace(mine),
    "alive": leases.owner_alive(mine, 100.0, 30.0, 101.0),
}}))
"""
    seen = json.loads(in_new_pid_namespace(code))
    theirs = parse_worker_id(seen["id"])
    assert theirs is not None
    assert (theirs.host, theirs.namespace is not None) == (HOST, True)
    assert theirs.namespace != namespace_id()
    assert not same_process_namespace(seen["id"])
    assert seen["my_pid_there"] is False  # what fooled the old same-host check
    assert seen["same_namespace"] is False
    assert seen["alive"] is True


def test_two_workers_with_the_same_pid_in_two_namespaces_are_two_live_workers(
    in_new_pid_namespace: Callable[[str], str],
) -> None:
    """Two workers, each pid 1 of its own PID namespace on this host (two containers with one
    host name): their ids differ, and each judges the other by its heartbeat alone, neither as
    itself nor as dead because the pid it names is (or is not) alive in its own namespace."""
    first = json.loads(
        in_new_pid_namespace(
            "import json; from poptune.storage import leases\n"
            "print(json.dumps({'id': leases.new_worker_id(), 'ns': leases.namespace_id()}))"
        )
    )
    code = f"""
import json, os
from poptune.storage import leases
other = {first["id"]!r}
print(json.dumps({{
    "id": leases.new_worker_id(),
    "pid": os.getpid(),
    "same_namespace": leases.same_process_namespace(other),
    "same_process": leases.from_local_process(other, os.getpid()),
    "fresh": leases.owner_alive(other, 100.0, 30.0, 101.0),
    "stale": leases.owner_alive(other, 100.0, 30.0, 200.0),
}}))
"""
    second = json.loads(in_new_pid_namespace(code))
    one, two = parse_worker_id(first["id"]), parse_worker_id(second["id"])
    assert one is not None and two is not None
    assert (one.host, one.pid) == (two.host, two.pid) == (HOST, 1) == (HOST, second["pid"])
    assert one.namespace != two.namespace and first["id"] != second["id"]
    assert one.namespace == first["ns"]
    assert second["same_namespace"] is False and second["same_process"] is False
    assert (second["fresh"], second["stale"]) == (True, False)
    assert not same_process_namespace(first["id"]) and owner_alive(first["id"], **FRESH)
