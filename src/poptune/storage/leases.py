"""Who holds a member, and whether that worker may still be working on it.

A worker id names a process: ``HOST:PID:NAMESPACE:TOKEN``, for example
``node7:4242:3f9a0c12b7de:9c1e22aa`` (worker processes append a tag: ``...:9c1e22aa-w3``).

* ``HOST`` is the host name, ``PID`` the process id in the process's own PID namespace.
* ``NAMESPACE`` names that PID namespace: 12 hex digits of a hash of the namespace's identity
  (the inode of ``/proc/self/ns/pid``) and of the boot (``/proc/sys/kernel/random/boot_id``).
  Two containers that share a host name have different PID namespaces, so the same PID means
  two unrelated processes there; ``000000000000`` means the namespace could not be determined.
* ``TOKEN`` is random, so ids never repeat even when a PID is reused.

`owner_alive` is the one liveness rule. A worker id's PID is looked up in this process's table
only when its host *and* namespace are this process's own: then a process that no longer exists,
or exists only as a zombie (killed workers that nothing reaps, as in a container whose init does
not wait for orphans), is dead at once. In every other case (another host, another namespace,
an unknown namespace, an id in the old ``HOST:PID:TOKEN`` format, an id that is not a worker id
at all) only the heartbeat decides: the owner is alive while its heartbeat is younger than the
timeout, on the storage's clock. The PID check can only ever shorten the wait for a dead worker;
it never keeps a silent worker alive and never judges a process of another namespace.

Only the standard library is used.

Example:
    >>> owner = new_worker_id()
    >>> parse_worker_id(owner).pid == os.getpid()
    True
    >>> owner_alive(owner, heartbeat=100.0, timeout=30.0, now=110.0)
    True
    >>> owner_alive(owner, heartbeat=100.0, timeout=30.0, now=200.0)  # silent too long
    False
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import uuid
from dataclasses import dataclass

__all__ = [
    "UNKNOWN_NAMESPACE",
    "WorkerIdentity",
    "from_local_process",
    "namespace_id",
    "new_worker_id",
    "owner_alive",
    "parse_worker_id",
    "process_alive",
    "same_process_namespace",
]

#: The namespace part of a worker id minted where the PID namespace could not be determined.
UNKNOWN_NAMESPACE = "0" * 12

_NEW_FORMAT = re.compile(r"(?P<host>.+):(?P<pid>[0-9]+):(?P<ns>[0-9a-f]{12}):(?P<token>[^:]+)")
_OLD_FORMAT = re.compile(r"(?P<host>.+):(?P<pid>[0-9]+):(?P<token>[^:]+)")

# (pid, namespace id, whether /proc shows this namespace's processes); recomputed after a fork.
_probe_cache: tuple[int, str | None, bool] | None = None


@dataclass(frozen=True)
class WorkerIdentity:
    """The process a worker id names.

    Attributes:
        host: Host name of the machine (or container) the worker ran on.
        pid: Its process id, in its own PID namespace.
        namespace: Its PID namespace id (12 hex digits); None for ids in the old
            ``HOST:PID:TOKEN`` format and for ids minted where it could not be determined.
    """

    host: str
    pid: int
    namespace: str | None


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return None


def _probe() -> tuple[str | None, bool]:
    """This process's namespace id, and whether ``/proc`` lists this namespace's processes."""
    global _probe_cache
    pid = os.getpid()
    if _probe_cache is not None and _probe_cache[0] == pid:
        return _probe_cache[1], _probe_cache[2]
    namespace: str | None = None
    procfs = False
    if sys.platform.startswith("linux"):
        try:
            ns = os.stat("/proc/self/ns/pid")
        except OSError:
            pass  # no /proc, or no namespace files (very old kernels): unknown
        else:
            boot = _read_first_line("/proc/sys/kernel/random/boot_id") or ""
            text = f"linux:{ns.st_dev}:{ns.st_ino}:{boot}"
            namespace = hashlib.sha256(text.encode()).hexdigest()[:12]
        try:
            # /proc mounted from another PID namespace would list other processes.
            procfs = os.readlink("/proc/self") == str(pid)
        except OSError:
            procfs = False
    elif os.name == "posix":
        # macOS and the BSDs have no PID namespaces: the host's process table is the one table.
        namespace = hashlib.sha256(f"{sys.platform}:host".encode()).hexdigest()[:12]
    # Elsewhere (Windows) process ids are not checked at all: namespace stays unknown.
    _probe_cache = (pid, namespace, procfs)
    return namespace, procfs


def namespace_id() -> str | None:
    """This process's PID namespace id (12 hex digits), or None where it cannot be determined.

    Equal for processes of one PID namespace during one boot, different across namespaces
    (containers) and boots.
    """
    return _probe()[0]


def new_worker_id() -> str:
    """A new id for a worker of this process: ``HOST:PID:NAMESPACE:TOKEN`` (see module doc)."""
    namespace = namespace_id() or UNKNOWN_NAMESPACE
    return f"{socket.gethostname()}:{os.getpid()}:{namespace}:{uuid.uuid4().hex[:8]}"


def parse_worker_id(owner: str | None) -> WorkerIdentity | None:
    """The process a worker id names, or None when ``owner`` is not a worker id.

    Reads the current format ``HOST:PID:NAMESPACE:TOKEN`` and the old ``HOST:PID:TOKEN`` (whose
    namespace is None); a tag appended to the token (``...:9c1e22aa-w3``) is allowed.
    """
    if not owner:
        return None
    match = _NEW_FORMAT.fullmatch(owner)
    if match is not None:
        ns: str | None = match["ns"]
        return WorkerIdentity(
            match["host"], int(match["pid"]), None if ns == UNKNOWN_NAMESPACE else ns
        )
    match = _OLD_FORMAT.fullmatch(owner)
    if match is not None:
        return WorkerIdentity(match["host"], int(match["pid"]), None)
    return None


def same_process_namespace(owner: str | None) -> bool:
    """Whether ``owner`` names a process of this host and this PID namespace, so that its PID
    means the same process here. False for old-format ids and unknown namespaces."""
    identity = parse_worker_id(owner)
    if identity is None or identity.namespace is None:
        return False
    return identity.namespace == namespace_id() and identity.host == socket.gethostname()


def from_local_process(owner: str | None, pid: int) -> bool:
    """Whether ``owner`` is a worker id minted by process ``pid`` of this host and namespace
    (for a parent that frees the members of a child process it saw die)."""
    identity = parse_worker_id(owner)
    return identity is not None and identity.pid == pid and same_process_namespace(owner)


def process_state(pid: int) -> str | None:
    """The state letter ``/proc/PID/stat`` shows for process ``pid`` (R, S, T: stopped, Z:
    zombie...), or None where it cannot be read (no such process, no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # "PID (COMM) STATE ...": COMM may itself hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else None


def process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this PID namespace is running.

    False when it does not exist or is a zombie (exited, not yet reaped by its parent) or dead
    (``/proc/PID/stat`` state ``Z`` or ``X``); True when it exists otherwise; None when this
    cannot be told (not a valid pid, or a platform without a usable process table). Zombies are
    recognised only where ``/proc`` shows this namespace's processes; elsewhere a zombie counts
    as alive, and only its heartbeat ends it.
    """
    if pid <= 0 or os.name != "posix":
        # pid 0 and negative pids address process groups; Windows' os.kill(pid, 0) would
        # send CTRL_C_EVENT rather than probe the process.
        return None
    if pid == os.getpid():
        return True
    if _probe()[1]:
        state = process_state(pid)
        if state is not None:  # else gone, or hidden from us (hidepid): os.kill tells which
            return state not in ("Z", "X", "x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return None
    return True


def owner_alive(owner: str | None, heartbeat: float | None, timeout: float, now: float) -> bool:
    """Whether a member's owner may still be working on it.

    Args:
        owner: The member's ``owner`` field (None: nobody holds it).
        heartbeat: The owner's last heartbeat, on the storage's clock (`Storage.now`).
        timeout: Seconds without a heartbeat after which the owner is presumed dead.
        now: The current time on the storage's clock.

    Returns:
        False when nobody holds the member, when the heartbeat is missing or ``timeout``
        seconds old or older, or when the owner is a process of this host and PID namespace
        that has exited (zombies included); True otherwise.
    """
    if owner is None:
        return False
    if same_process_namespace(owner):
        identity = parse_worker_id(owner)
        if identity is not None and process_alive(identity.pid) is False:
            return False
    return heartbeat is not None and now - heartbeat < timeout
