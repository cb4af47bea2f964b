"""Math-library threads for the processes that train members outside the run's own workers.

The processes executor gives each of its workers its share of the cores
(`poptune.RunOptions.threads_per_worker`): torch, OpenMP and BLAS otherwise start one thread
per core in every process, and processes that each use every core make one another wait (a
joined ``poptune worker`` made a 2-worker run on 2 cores 2.5 times slower; a replay of a small
PPO agent took 2 min 04 s, against 20 s with ``OMP_NUM_THREADS=1``). The other places a member
trains or is built get the same rule here:

* ``poptune worker`` (`worker_threads`): the cores divided among this worker and the processes
  of this machine that hold members of the run now;
* a replay and `poptune.Result.load_member` (`member_threads`): the share each of the run's
  workers had, so a member trains with the threads it trained with in the run.

Always: a count given (``--threads``, ``threads=``) wins; else ``OMP_NUM_THREADS``, when the
environment sets it, is kept.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from poptune.execution.lifecycle import THREAD_VARIABLES, limit_threads
from poptune.execution.session import RunOptions
from poptune.storage.base import MemberRow
from poptune.storage.leases import parse_worker_id, process_alive, same_process_namespace

__all__ = [
    "limited_threads",
    "local_processes",
    "member_threads",
    "set_torch_threads",
    "worker_threads",
]


def local_processes(rows: Iterable[MemberRow]) -> int:
    """How many live processes of this machine (and PID namespace) hold members in ``rows``."""
    pids = set()
    for row in rows:
        if not same_process_namespace(row.owner):
            continue
        identity = parse_worker_id(row.owner)
        if identity is not None and process_alive(identity.pid) is not False:
            pids.add(identity.pid)
    pids.discard(os.getpid())
    return len(pids)


def worker_threads(threads: int | None, rows: Iterable[MemberRow]) -> int:
    """Threads for a worker joining a run whose members are ``rows``: ``threads`` if given,
    else ``OMP_NUM_THREADS`` if set, else the cores divided among this worker and the processes
    of this machine that hold members now (`local_processes`), at least 1."""
    return RunOptions(threads=threads).threads_per_worker(1 + local_processes(rows))


def member_threads(threads: int | None, execution: Mapping[str, Any]) -> int:
    """Threads for a member trained or built outside the run's workers (a replay,
    `poptune.Result.load_member`): ``threads`` if given, else ``OMP_NUM_THREADS`` if set, else
    what each of the run's workers had as the run was last executed (``execution``,
    `poptune.storage.base.RunInfo.execution`): the cores divided by its workers, or a Ray
    actor's CPUs."""
    if execution.get("executor") == "ray" and threads is None:
        given = os.environ.get("OMP_NUM_THREADS", "")
        if given.isdigit() and int(given) >= 1:
            return int(given)
        cpu = (execution.get("resources") or {}).get("cpu", 1.0)
        return max(1, int(cpu))
    workers = execution.get("workers")
    workers = workers if isinstance(workers, int) and workers >= 1 else 1
    return RunOptions(threads=threads).threads_per_worker(workers)


@contextlib.contextmanager
def limited_threads(count: int) -> Iterator[None]:
    """Sets this process's math-library threads to ``count`` (`limit_threads`) for the block,
    then puts back the environment variables and torch's thread count as they were."""
    saved = {var: os.environ.get(var) for var in THREAD_VARIABLES}
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    limit_threads(count)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        torch = sys.modules.get("torch")
        if torch is not None:
            with contextlib.suppress(Exception):
                torch.set_num_threads(before if before is not None else _default_torch_threads())


def set_torch_threads(count: int) -> None:
    """Sets torch's thread count, when torch is imported; the environment is left as it is
    (a later run would take our ``OMP_NUM_THREADS`` for the user's own setting)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(count)


def _default_torch_threads() -> int:
    """torch's own default (one per physical core, as it reports it when first imported)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
