"""Fault injection: real `poptune run` processes, killed, frozen, starved and corrupted.

Each faulted run starts ``poptune run benchmarks/chaos.py:NAME --workers N`` on SQLite or
PostgreSQL with a short ``--heartbeat-timeout``, injects one fault when the run's committed
results first reach a fraction of the total drawn from a seeded ``numpy.random.Generator`` (a
random point in the run, whatever the machine's load), resumes the run (``poptune resume``)
whenever its driver is gone before the run completed, at most ``MAX_RESUMES`` times and within
a wall-clock cap, and then checks invariants on the stored run. The faults:

* ``worker_kill``: SIGKILL of one worker process.
* ``driver_kill``: SIGKILL of the driver (``poptune run``) only, then an immediate
  ``poptune resume``; its workers are left to live or die as poptune arranges.
* ``worker_stop``: SIGSTOP of a worker caught *inside* a transaction (SQLite: it holds the WAL
  write lock, byte 120 of the ``-shm`` file, or a write lock on the database file, in
  ``/proc/locks``; PostgreSQL: its backend in ``pg_stat_activity`` has a transaction id, found by
  ``application_name`` ``poptune-<pid>`` or else by the backend's client port and the worker's
  sockets), confirmed still there after the stop, kept stopped for twice the heartbeat timeout
  plus a second, then SIGCONT. When no worker is caught in a transaction within a few seconds,
  any worker is stopped and the run's record says ``in_transaction: false``.
* ``ckpt_truncate`` / ``ckpt_bitflip`` / ``ckpt_delete``: one checkpoint file, chosen among those
  the run's checkpoint rows reference *and* a member currently stands on (so that resuming must
  read it), is cut to half its size, has one bit flipped, or is deleted; then every process of
  the run is SIGKILLed (a crash) and the run resumed.
* ``disk_full``: the checkpoint root is a small tmpfs (``mount -t tmpfs -o size=...``); the fault
  fills it to the last page for twice the heartbeat timeout, then frees it. Where mounting is
  not allowed the run says ``simulated`` and the fault only fills the folder (no ENOSPC).
* ``db_restart``: PostgreSQL only, ``pg_ctlcluster --skip-systemctl-redirect VERSION main
  restart``.

Invariants, from the stored run (`poptune.storage.open_storage`), each a violation kind:

* ``run_not_completed``: the run's status is not ``completed`` once the resumes are spent (or
  the wall-clock cap hit: ``wall_cap`` as well);
* ``member_not_finished``: a member is not ``finished`` at the last step (one per member);
* ``step_committed_twice``: a (member, segment, step) recorded twice;
* ``history_gap``: within one lineage segment a member's steps are not consecutive;
* ``segment_mismatch``: a result names a segment whose event is of another member, or not before
  the step;
* ``donor_not_in_history``: an exploit's (donor, donor_step) was never recorded;
* ``state_not_continuous``: the member's own count of steps trained along its lineage (``t``,
  kept in its checkpointed state and reported with every step) is not what the history says:
  one more than at the previous step of the segment, or than the donor's at ``donor_step``
  right after an exploit or explore, or the step itself in the initial segment. A member
  resumed from another checkpoint than its row says breaks it;
* ``damaged_checkpoint_loaded``: after the crash, the member whose checkpoint was damaged went on
  from that checkpoint's step in the same segment, with no error and no earlier checkpoint: it
  was trained on the damaged bytes (a bit flip that unpickles);
* ``checkpoint_missing`` / ``checkpoint_unreadable``: a checkpoint row's file is gone or does not
  load with ``CheckpointStore(root).load(location)``;
* ``leaked_files``: once the run completed, files under ``ROOT/RUN/member-*/`` that no
  checkpoint row references, plus ``.tmp-`` files (counted per file);
* ``orphaned_worker``: a worker of a SIGKILLed driver still alive ``ORPHAN_GRACE`` heartbeat
  timeouts after its driver died (the harness kills it when the run ends).

Resume-to-first-commit: from the start of each ``poptune resume`` to the first time the run's
result count grows once every process of earlier drivers is gone (a growth before that may be
theirs; how many resumes waited so is reported beside).

Run it:  python benchmarks/chaos.py [--runs 30] [--seed 0] [--storages sqlite,postgres]
         [--workers 2,4] [--quick]

PostgreSQL runs use ``--postgres URL`` (default ``$POPTUNE_TEST_POSTGRES_URL``, else the local
test database) and delete their runs afterwards; the ``db_restart`` fault restarts that server
(everyone's connections to it). ``--quick``: one run per fault kind and storage, shorter runs.
``--keep DIR`` copies each run's folder (database, checkpoints, driver logs) there. It prints a
table and writes ``benchmarks/results/chaos.json`` (``chaos-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from modules import load  # benchmarks/modules.py: run these as python benchmarks/NAME.py

import poptune as pt

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
POSTGRES = os.environ.get(
    "POPTUNE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

FAULTS = (
    "worker_kill",
    "driver_kill",
    "worker_stop",
    "ckpt_truncate",
    "ckpt_bitflip",
    "ckpt_delete",
    "disk_full",
    "db_restart",
)
HEARTBEAT_TIMEOUT = 3.0
MAX_RESUMES = 4
WALL_CAP = 150.0  # seconds per faulted run, resumes included
ORPHAN_GRACE = 2.0  # heartbeat timeouts after a driver's death before its workers are orphans
TMPFS_SIZE = "8m"
POPTUNE = [sys.executable, "-m", "poptune"]

# -- Workloads (re-imported by every worker: keep this part cheap) -----------------------------

_lr = load("poptune_chaos_lr", ROOT / "examples" / "lr_schedule.py")
_wl = load("poptune_chaos_workloads", HERE.parent / "workloads.py")


class Counted:
    """Counts the steps trained along the member's lineage in its checkpointed state, and
    reports the count as the metric ``t``: an independent witness of which state a step ran on."""

    def __init__(self, hparams: Mapping[str, Any], seed: int) -> None:
        super().__init__(hparams, seed)  # type: ignore[call-arg]
        self.lineage_steps = 0  # not `t`: the lr_schedule member has its own

    def step(self) -> dict[str, float]:
        delay = float(os.environ.get("CHAOS_DELAY", "0"))
        if delay:
            time.sleep(delay)  # a sleeping step: the shared machine's cores stay free
        out = dict(super().step())  # type: ignore[misc]
        self.lineage_steps += 1
        out["t"] = float(self.lineage_steps)
        return out

    def state_dict(self) -> Any:
        return {"inner": super().state_dict(), "t": self.lineage_steps}  # type: ignore[misc]

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state["inner"])  # type: ignore[misc]
        self.lineage_steps = int(state["t"])


class ChaosLR(Counted, _lr.OwnNoise):  # type: ignore[misc,name-defined]
    """`examples/lr_schedule.py`'s member, counted, each step sleeping ``$CHAOS_DELAY`` s."""


class ChaosDigits(Counted, _wl.DigitsMLP):  # type: ignore[misc,name-defined]
    """`benchmarks/workloads.py`'s PyTorch digits MLP, counted."""


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def lr_schedule() -> pt.Experiment:
    """The learning-rate schedule task (PBT variant), ``$CHAOS_STEPS`` steps, 8 members, ready
    every 5."""
    return pt.Experiment(
        trainable=ChaosLR,
        space=_lr.SPACE,
        population_size=8,
        steps=_env("CHAOS_STEPS", 120),
        interval=_lr.INTERVAL,
        metric="acc",
        mode="max",
        seed=_env("CHAOS_SEED", 0),
        **_lr.VARIANTS["PBT"],
    )


def digits() -> pt.Experiment:
    """The digits MLP, ``$CHAOS_STEPS`` steps, 8 members, ready every 10."""
    return pt.Experiment(
        trainable=ChaosDigits,
        space=_wl.DIGITS_SPACE,
        population_size=_wl.POPULATION,
        steps=_env("CHAOS_STEPS", 100),
        interval=10,
        metric="val_acc",
        mode="max",
        exploit=pt.Truncation(0.25),
        explore=pt.Perturb(),
        seed=_env("CHAOS_SEED", 0),
    )


@dataclass(frozen=True)
class Workload:
    name: str  # the function above
    steps: int
    population: int
    delay: float  # CHAOS_DELAY


WORKLOADS = {
    "lr_schedule": Workload("lr_schedule", steps=120, population=8, delay=0.04),
    "digits": Workload("digits", steps=100, population=8, delay=0.03),
}
QUICK_WORKLOADS = {
    "lr_schedule": Workload("lr_schedule", steps=60, population=8, delay=0.04),
    "digits": Workload("digits", steps=50, population=8, delay=0.03),
}


# -- Processes ---------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, str] | None:
    """``(ppid, start time, state)`` of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[19]), rest[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Proc:
    """A process of the run: a driver (``poptune run``/``resume``) or one of its workers."""

    pid: int
    start: int  # /proc start time: a reused pid is another process
    role: str  # "driver" or "worker"
    driver: int  # which driver (0, 1, ...) it is or belongs to
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        st = _stat(self.pid)
        return st is not None and st[1] == self.start and st[2] != "Z"

    def signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                out.setdefault(st[0], []).append(int(entry.name))
    return out


# -- Finding a worker inside a transaction -----------------------------------------------------

_WAL_WRITE_LOCK = 120  # byte of the -shm file a WAL writer locks (SQLite's WAL_WRITE_LOCK)
_RESERVED_BYTE = 0x40000001  # byte of the database file a rollback-journal writer locks


def sqlite_writers(db: Path) -> set[int]:
    """Pids inside a write transaction on the SQLite file ``db``, read from ``/proc/locks``:
    holding poptune's writers' queue (an ``flock`` on ``DB-poptune-lock``, taken around every
    transaction), SQLite's WAL write lock (byte 120 of ``DB-shm``) or a rollback-journal
    writer's reserved byte of the database file."""
    wanted: dict[int, int | None] = {}  # inode -> the locked byte, None for any
    for path, byte in (
        (Path(f"{db}-poptune-lock"), None),
        (Path(f"{db}-shm"), _WAL_WRITE_LOCK),
        (db, _RESERVED_BYTE),
    ):
        with _suppress_os():
            wanted[os.stat(path).st_ino] = byte
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 8 or parts[1] == "->" or parts[3] != "WRITE":
                continue  # "->": a process waiting for the lock, not holding it
            ino = int(parts[5].rsplit(":", 1)[1])
            if ino in wanted and wanted[ino] in (None, int(parts[6])):
                out.add(int(parts[4]))
    return out


class _suppress_os:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *exc: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


def worker_ports(pids: Iterable[int]) -> dict[int, int]:
    """Local TCP port -> pid, for the sockets of ``pids``."""
    port_of: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with _suppress_os(), open(table) as f:
            for line in list(f)[1:]:
                parts = line.split()
                port_of[f"socket:[{parts[9]}]"] = int(parts[1].rsplit(":", 1)[1], 16)
    out: dict[int, int] = {}
    for pid in pids:
        with _suppress_os():
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with _suppress_os():
                    port = port_of.get(os.readlink(fd.path))
                    if port is not None:
                        out[port] = pid
    return out


_PG_IN_TX = (
    "SELECT pid, application_name, client_port, xact_start, state, query "
    "FROM pg_stat_activity WHERE datname = current_database() AND backend_xid IS NOT NULL "
    "AND pid <> pg_backend_pid()"
)


def postgres_writers(
    conn: Any, pids: set[int], ports: dict[int, int]
) -> dict[int, tuple[int, Any]]:
    """Worker pid -> (backend pid, transaction start) for each of ``pids`` whose backend holds a
    transaction id (it has locked or written rows) and has not sent COMMIT yet: found by
    ``application_name`` ``poptune-<pid>``, else by the backend's client port among ``ports``
    (`worker_ports`; refreshed here when a port is unknown)."""
    out: dict[int, tuple[int, Any]] = {}
    for backend, app, port, started, state, query in conn.execute(_PG_IN_TX).fetchall():
        if state == "active" and query.strip().upper().startswith(("COMMIT", "ROLLBACK")):
            continue  # on its way out: a stop now would not freeze the transaction
        m = re.fullmatch(r"poptune-(\d+)", app or "")
        pid = int(m.group(1)) if m and int(m.group(1)) in pids else None
        if pid is None and port is not None and port > 0:
            if port not in ports:
                ports.update(worker_ports(pids))
            pid = ports.get(port)
        if pid is not None and pid in pids:
            out[pid] = (backend, started)
    return out


# -- One faulted run ---------------------------------------------------------------------------


@dataclass
class Plan:
    """What one faulted run does."""

    index: int
    storage: str  # "sqlite" or "postgres"
    workers: int
    workload: Workload
    fault: str
    at: float  # fraction of the run's results committed when the fault fires
    seed: int


@dataclass
class Outcome:
    """What one faulted run did and what its stored run showed."""

    plan: Plan
    status: str = "unknown"
    fault_fired: bool = False
    fault_detail: dict[str, Any] = field(default_factory=dict)
    resumes: int = 0
    resume_to_first_commit_s: list[float] = field(default_factory=list)
    resumes_after_orphans: int = 0  # first commits that waited for an earlier driver's workers
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few violation details
    leaked_files: int = 0
    failures: int = 0  # user-code exceptions the run recorded
    wall_s: float = 0.0


def _pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")])
    return versions[-1]


def _psycopg_url(url: str) -> str:
    return re.sub(r"^postgresql\+psycopg://", "postgresql://", url)


class FaultedRun:
    """Starts a run's driver, watches its processes and results, fires the fault, resumes."""

    def __init__(self, plan: Plan, url: str, tmp: Path, keep: Path | None = None) -> None:
        self.plan, self.url, self.tmp, self.keep = plan, url, tmp, keep
        self.name = f"chaos-{plan.seed}-{plan.index}-{os.getpid()}"
        self.root = tmp / "checkpoints"
        self.root.mkdir()
        self.procs: list[Proc] = []
        self.drivers = 0
        self.driver: Proc | None = None
        self.killed_drivers: dict[int, float] = {}  # driver number -> when it died
        self.out = Outcome(plan)
        self.storage: Any = None
        self.count = 0  # results seen
        # A resume whose first commit is awaited: when it started, whether every earlier
        # driver's process was gone before the last read, whether one was seen alive.
        self.pending: tuple[float, bool, bool] | None = None
        self.mounted = False
        # A damaged current checkpoint: (member, its step, the member's segment, results then)
        self.damaged: tuple[int, int, int | None, int] | None = None
        self.env = {
            **os.environ,
            "CHAOS_STEPS": str(plan.workload.steps),
            "CHAOS_SEED": str(plan.seed),
            "CHAOS_DELAY": str(plan.workload.delay),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }

    # -- processes

    def start_driver(self, verb: str) -> None:
        p = self.plan
        poptune = POPTUNE
        common = [
            "--storage",
            self.url,
            "--workers",
            str(p.workers),
            "--heartbeat-timeout",
            f"{HEARTBEAT_TIMEOUT:g}",
            "--no-progress",
        ]
        if verb == "run":
            argv = [
                *poptune,
                "run",
                f"{HERE}:{p.workload.name}",
                "--name",
                self.name,
                "--checkpoints",
                str(self.root),
                *common,
            ]
        else:
            argv = [*poptune, "resume", self.name, *common]
        logfile = open(self.tmp / f"driver-{self.drivers}.log", "wb")  # noqa: SIM115
        popen = subprocess.Popen(
            argv, env=self.env, stdout=logfile, stderr=subprocess.STDOUT, cwd=self.tmp
        )
        logfile.close()
        st = _stat(popen.pid)
        start = st[1] if st is not None else 0
        self.driver = Proc(popen.pid, start, "driver", self.drivers, popen)
        self.procs.append(self.driver)
        self.drivers += 1

    def track(self) -> None:
        """Adds the workers of the current driver (spawned, not the resource tracker)."""
        if self.driver is None:
            return
        known = {(q.pid, q.start) for q in self.procs}
        children = _children()
        todo = list(children.get(self.driver.pid, []))
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            st = _stat(pid)
            if st is None or (pid, st[1]) in known or "spawn_main" not in _cmdline(pid):
                continue
            self.procs.append(Proc(pid, st[1], "worker", self.driver.driver))

    def workers(self) -> list[Proc]:
        assert self.driver is not None
        return [q for q in self.procs if q.role == "worker" and q.driver == self.driver.driver]

    def crash(self) -> None:
        """SIGKILLs every process of the run (SIGCONT first, for a stopped one)."""
        for q in self.procs:
            q.signal(signal.SIGKILL)
            q.signal(signal.SIGCONT)
        for q in self.procs:
            if q.popen is not None:
                q.popen.wait()
        deadline = time.monotonic() + 5
        while any(q.alive() for q in self.procs) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- storage

    def read(self, what: Callable[[Any], Any]) -> Any:
        """Reads the stored run, reopening the storage while the connection is broken (a
        restarting database server), for up to 20 s."""
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.storage is None:
                    self.storage = open_storage(self.url)
                return what(self.storage)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                with _suppress_all():
                    self.storage.close()
                self.storage = None
                time.sleep(0.5)

    def poll(self) -> None:
        """Tracks processes, counts results, times resumes.

        A resumed run's first own commit is the first growth of its results read after a poll
        that found every process of earlier drivers gone *before* reading: a worker of a killed
        driver commits its last stretch before it exits, so its rows are in that read."""
        self.track()
        earlier_alive = any(q.alive() for q in self.procs if q.driver < self.drivers - 1)
        new = self.read(lambda s: len(s.results(self.name, start=self.count)))
        now = time.monotonic()
        if self.pending is not None:
            started, clean, waited = self.pending
            if earlier_alive:
                self.pending = (started, False, True)
            elif not clean:
                self.pending = (started, True, waited)  # counted from this read on
            elif new:
                self.out.resume_to_first_commit_s.append(now - started)
                self.out.resumes_after_orphans += waited
                self.pending = None
        self.count += new

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.05)

    def resume(self) -> None:
        self.out.resumes += 1
        earlier_alive = any(q.alive() for q in self.procs if q.driver < self.drivers)
        self.start_driver("resume")
        self.pending = (time.monotonic(), not earlier_alive, earlier_alive)

    # -- the run

    def execute(self) -> Outcome:
        p = self.plan
        t0 = time.monotonic()
        if p.fault == "disk_full":
            self.mount()
        total = p.workload.population * p.workload.steps
        self.start_driver("run")
        try:
            while True:
                self.poll()
                if not self.out.fault_fired and self.count >= p.at * total:
                    self.out.fault_fired = True
                    self.fire()
                if time.monotonic() - t0 > WALL_CAP:
                    self.out.violations["wall_cap"] += 1
                    self.examples(f"wall-clock cap {WALL_CAP:g} s reached")
                    break
                assert self.driver is not None and self.driver.popen is not None
                if self.driver.popen.poll() is not None:
                    info = self.read(lambda s: s.get_run(self.name))
                    if info is not None and info.status == "completed":
                        break
                    if self.out.resumes >= MAX_RESUMES:
                        break
                    self.resume()
                time.sleep(0.05)
            self.settle_orphans()
        finally:
            self.crash()
        self.out.wall_s = time.monotonic() - t0
        try:
            self.check()
        finally:
            with _suppress_all():
                self.storage.close()
            if self.keep is not None:
                shutil.copytree(self.tmp, self.keep / self.name, dirs_exist_ok=True)
            if self.mounted:
                subprocess.run(["umount", str(self.root)], check=False)
        return self.out

    def examples(self, text: str) -> None:
        """Keeps a few violation details, without this machine's paths."""
        if len(self.out.examples) < 8:
            self.out.examples.append(text.replace(str(self.tmp), "TMP")[:300])

    def settle_orphans(self) -> None:
        """Workers of a killed driver still alive ORPHAN_GRACE heartbeat timeouts after."""
        for number, died in self.killed_drivers.items():
            left = died + ORPHAN_GRACE * HEARTBEAT_TIMEOUT - time.monotonic()
            if left > 0:
                self.wait(left)
            alive = [q for q in self.procs if q.driver == number and q.role == "worker"]
            orphans = sum(q.alive() for q in alive)
            if orphans:
                self.out.violations["orphaned_worker"] += orphans
                self.examples(f"{orphans} worker(s) of killed driver {number} still alive")

    # -- faults

    def fire(self) -> None:
        kind = self.plan.fault
        rng = np.random.default_rng([self.plan.seed, self.plan.index, 1])
        detail = self.out.fault_detail
        detail["at_results"] = self.count
        if kind == "none":  # a control run
            pass
        elif kind == "worker_kill":
            victim = self.pick_worker(rng)
            detail["killed"] = victim is not None and victim.signal(signal.SIGKILL)
        elif kind == "driver_kill":
            assert self.driver is not None
            self.track()
            self.driver.signal(signal.SIGKILL)
            self.driver.popen.wait()  # type: ignore[union-attr]
            self.killed_drivers[self.driver.driver] = time.monotonic()
            self.resume()
        elif kind == "worker_stop":
            self.stop_in_transaction(rng)
        elif kind.startswith("ckpt_"):
            self.crash()
            self.damage(kind, rng)
            self.resume()
        elif kind == "disk_full":
            self.fill_disk()
        elif kind == "db_restart":
            t = time.monotonic()
            done = subprocess.run(
                [
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    _pg_version(),
                    "main",
                    "restart",
                ],
                capture_output=True,
                check=False,
            )
            detail["restart_rc"] = done.returncode
            detail["restart_s"] = round(time.monotonic() - t, 2)
        else:
            raise ValueError(f"Unknown fault {kind!r}; expected one of {FAULTS}.")

    def pick_worker(self, rng: np.random.Generator) -> Proc | None:
        self.track()
        alive = [q for q in self.workers() if q.alive()]
        return alive[int(rng.integers(len(alive)))] if alive else None

    def stop_in_transaction(self, rng: np.random.Generator) -> None:
        detail = self.out.fault_detail
        conn = None
        if self.plan.storage == "postgres":
            import psycopg

            conn = psycopg.connect(_psycopg_url(self.url), autocommit=True)
        try:
            victim, attempts, deadline = None, 0, time.monotonic() + 8.0
            ports: dict[int, int] = {}
            while victim is None and time.monotonic() < deadline:
                self.track()
                workers = {q.pid: q for q in self.workers() if q.alive()}
                if conn is not None:
                    inside = postgres_writers(conn, set(workers), ports)
                else:
                    inside = {
                        pid: (pid, None)
                        for pid in sqlite_writers(self.tmp / "chaos.db")
                        if pid in workers
                    }
                if not inside:
                    time.sleep(0.002)
                    continue
                pid = sorted(inside)[0]
                attempts += 1
                workers[pid].signal(signal.SIGSTOP)
                time.sleep(0.05)  # let the stop land, then look again: still inside?
                if conn is not None:
                    again = postgres_writers(conn, set(workers), ports).get(pid)
                    still = again == inside[pid]
                else:
                    still = pid in sqlite_writers(self.tmp / "chaos.db")
                if still:
                    victim = workers[pid]
                else:
                    workers[pid].signal(signal.SIGCONT)
            detail["in_transaction"] = victim is not None
            detail["catch_attempts"] = attempts
            if victim is None:
                victim = self.pick_worker(rng)
                if victim is None:
                    detail["stopped"] = False
                    return
                victim.signal(signal.SIGSTOP)
            detail["stopped"] = True
            hold = 2 * HEARTBEAT_TIMEOUT + 1
            detail["stopped_s"] = hold
            self.wait(hold)
            victim.signal(signal.SIGCONT)
        finally:
            if conn is not None:
                conn.close()

    def damage(self, kind: str, rng: np.random.Generator) -> None:
        detail = self.out.fault_detail
        rows = self.read(lambda s: s.checkpoints(self.name))
        members = self.read(lambda s: s.members(self.name))
        referenced = {r.location for r in rows if (self.root / r.location).is_file()}
        current = sorted(referenced & {m.checkpoint for m in members if m.checkpoint})
        choices = current or sorted(referenced)
        detail["current_checkpoint"] = bool(current)
        if not choices:
            detail["damaged"] = False
            return
        location = choices[int(rng.integers(len(choices)))]
        path = self.root / location
        size = path.stat().st_size
        detail["damaged"] = True
        detail["location"] = location  # relative to the checkpoint root
        detail["size"] = size
        owner = next((m for m in members if m.checkpoint == location), None)
        if owner is not None:
            results = self.read(lambda s: s.results(self.name))
            own = [r for r in results if r.member == owner.id]
            self.damaged = (
                owner.id,
                int(owner.checkpoint_step or 0),
                own[-1].segment if own else None,
                len(results),
            )
        if kind == "ckpt_truncate":
            os.truncate(path, size // 2)
        elif kind == "ckpt_bitflip":
            offset, bit = int(rng.integers(size)), int(rng.integers(8))
            with open(path, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ (1 << bit)]))
            detail["offset"], detail["bit"] = offset, bit
        else:
            path.unlink()

    def mount(self) -> None:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(self.root)],
            capture_output=True,
            check=False,
        )
        self.mounted = done.returncode == 0
        self.out.fault_detail["simulated"] = not self.mounted

    def fill_disk(self) -> None:
        """Fills the checkpoint root to its last page, holds it full, frees it."""
        filler = self.root / "chaos-filler"
        written = 0
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (1 << 20, 4096):
                block = b"\0" * chunk
                while self.mounted or written < 1 << 20:  # simulated: 1 MiB, no ENOSPC
                    try:
                        written += os.write(fd, block)
                    except OSError:
                        break
        finally:
            os.close(fd)
        self.out.fault_detail["filled_bytes"] = written
        self.out.fault_detail["full_s"] = 2 * HEARTBEAT_TIMEOUT
        self.wait(2 * HEARTBEAT_TIMEOUT)
        filler.unlink()

    # -- invariants

    def check(self) -> None:
        from poptune.storage.checkpoints import CheckpointStore

        out, name, steps = self.out, self.name, self.plan.workload.steps
        info = self.read(lambda s: s.get_run(name))
        out.status = info.status if info is not None else "missing"
        if out.status != "completed":
            out.violations["run_not_completed"] += 1
            error = (info.error or "").strip().splitlines() if info is not None else []
            self.examples(f"run {out.status}: {error[-1] if error else ''}"[:300])
        alive = 0
        for m in self.read(lambda s: s.members(name)):
            status, step = m.state["status"], m.state["step"]
            if status == "failed":  # its training lost; a replacement took its place
                out.violations["member_failed"] += 1
                self.examples(f"member {m.id} failed at step {step}")
                continue
            alive += 1
            if status != "finished" or step != steps:
                out.violations["member_not_finished"] += 1
                self.examples(f"member {m.id}: {status} at step {step}")
        if alive != self.plan.workload.population:
            out.violations["population_short"] += 1
            self.examples(f"{alive} members not failed, of {self.plan.workload.population}")
        results = self.read(lambda s: s.results(name))
        events = {e["index"]: e for e in self.read(lambda s: s.events(name))}
        out.failures = len(self.read(lambda s: s.failures(name)))
        if self.damaged is not None:
            member, step, segment, before = self.damaged
            after = [r for r in results[before:] if r.member == member]
            if after and after[0].step == step + 1 and after[0].segment == segment:
                # Nothing else held that state after the crash: the damaged file was trained on.
                out.violations["damaged_checkpoint_loaded"] += 1
                self.examples(f"member {member} went on from its damaged step-{step} checkpoint")
        for kind, text in lineage_violations(results, events):
            out.violations[kind] += 1
            self.examples(text)
        rows = self.read(lambda s: s.checkpoints(name))
        store = CheckpointStore(str(self.root))
        for r in rows:
            if not (self.root / r.location).is_file():
                out.violations["checkpoint_missing"] += 1
                self.examples(f"checkpoint row of member {r.member} step {r.step}: no file")
                continue
            try:
                store.load(r.location)
            except Exception as e:
                out.violations["checkpoint_unreadable"] += 1
                self.examples(f"member {r.member} step {r.step}: {type(e).__name__}: {e}"[:300])
        if out.status == "completed":
            referenced = {r.location for r in rows}
            leaked = [
                f
                for f in (self.root / name).rglob("*")
                if f.is_file()
                and (
                    f.name.startswith(".tmp-")
                    or (
                        f.parent.name.startswith("member-")
                        and f.relative_to(self.root).as_posix() not in referenced
                    )
                )
            ]
            out.leaked_files = len(leaked)
            if leaked:
                out.violations["leaked_files"] += len(leaked)
                self.examples(f"{len(leaked)} leaked file(s), e.g. {leaked[0].name}")


class _suppress_all:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *exc: object) -> bool:
        return kind is not None and issubclass(kind, Exception)


def lineage_violations(
    results: list[Any], events: Mapping[int, Mapping[str, Any]]
) -> list[tuple[str, str]]:
    """The history's disagreements with itself and with the lineage, as ``(kind, detail)``.

    ``results``: the run's result rows in commit order, each with the metric ``t`` (steps
    trained along the member's lineage, see `Counted`); ``events``: the lineage by index. See
    the module docstring for the kinds."""
    found: list[tuple[str, str]] = []
    t_at: dict[tuple[int, int], set[int]] = {}
    stretches: dict[tuple[int, int | None], list[Any]] = {}
    for r in results:
        t_at.setdefault((r.member, r.step), set()).add(round(r.metrics["t"]))
        stretches.setdefault((r.member, r.segment), []).append(r)

    def t_of(member: int, step: int, before: int) -> set[int]:
        """The member's ``t`` at ``step`` after its events numbered below ``before``: the
        donor's when the member reached ``step`` by a copy (at that step, or of a donor ahead
        of it: its step became the donor's), else its own recorded ones (as `check_exact`)."""
        copies = [
            e
            for e in events.values()
            if e["member"] == member
            and e["index"] < before
            and e.get("donor_step") == step
            and e.get("donor") not in (None, member)
        ]
        if copies:
            e = max(copies, key=lambda e: e["index"])
            return t_of(int(e["donor"]), int(e["donor_step"]), int(e["index"]))
        return {0} if step == 0 else t_at.get((member, step), set())

    donor_t: dict[int, set[int]] = {}
    for e in events.values():
        donor, at = e.get("donor"), e.get("donor_step")
        if donor is None or at is None:
            continue
        if e.get("kind") == "rollback":  # the donor's own file: its t as it trained to `at`
            donor_t[e["index"]] = {0} if at == 0 else t_at.get((int(donor), int(at)), set())
        else:
            donor_t[e["index"]] = t_of(int(donor), int(at), int(e["index"]))
        if not donor_t[e["index"]]:
            found.append(
                (
                    "donor_not_in_history",
                    f"event {e['index']}: member {e['member']} took member {donor} at step "
                    f"{at}, which it never recorded nor copied",
                )
            )
    for (member, segment), rows in stretches.items():
        where = f"member {member} segment {segment}"
        seen = Counter(r.step for r in rows)
        for step, n in sorted(seen.items()):
            if n > 1:
                found.append(("step_committed_twice", f"{where}: step {step} x{n}"))
        ordered = sorted({r.step: r for r in rows}.values(), key=lambda r: r.step)
        first = ordered[0]
        t_first = round(first.metrics["t"])
        if segment is None:
            if first.step != 1:
                found.append(("history_gap", f"{where}: starts at step {first.step}"))
            if t_first != first.step:
                found.append(("state_not_continuous", f"{where}: t {t_first} at step {first.step}"))
        else:
            e = events.get(segment)
            if e is None or e["member"] != member or e["step"] >= first.step:
                found.append(("segment_mismatch", f"{where}: first step {first.step}, event {e}"))
            elif e.get("donor") is not None:
                at = int(e["donor_step"])
                base = donor_t[segment]
                if first.step != at + 1:
                    found.append(
                        ("history_gap", f"{where}: starts at {first.step} after donor step {at}")
                    )
                elif base and t_first - 1 not in base:
                    found.append(
                        (
                            "state_not_continuous",
                            f"{where}: t {t_first} at step {first.step}, donor {e['donor']} had "
                            f"t {sorted(base)} at step {at}",
                        )
                    )
        for a, b in itertools.pairwise(ordered):
            if b.step != a.step + 1:
                found.append(("history_gap", f"{where}: step {a.step} then {b.step}"))
            elif round(b.metrics["t"]) != round(a.metrics["t"]) + 1:
                found.append(
                    (
                        "state_not_continuous",
                        f"{where}: t {a.metrics['t']:g} at step {a.step}, "
                        f"{b.metrics['t']:g} at {b.step}",
                    )
                )
    return found


def open_storage(url: str) -> Any:
    from poptune.storage import open_storage as _open

    return _open(url)


# -- The campaign ------------------------------------------------------------------------------


def plans(
    runs: int,
    seed: int,
    storages: list[str],
    workers: list[int],
    workloads: Mapping[str, Workload],
    faults: list[str] | None = None,
) -> list[Plan]:
    """``runs`` faulted runs cycling through storages and worker counts; each run's fault is
    drawn so that every kind comes up about equally often (``db_restart`` on PostgreSQL only),
    its firing point uniformly in 10-70% of the results; every fourth run trains the digits
    MLP when torch is installed."""
    rng = np.random.default_rng(seed)
    try:
        import torch  # noqa: F401

        digits_ok = "digits" in workloads
    except ImportError:
        digits_ok = False
    decks: dict[str, list[str]] = {}
    out = []
    for i in range(runs):
        storage = storages[i % len(storages)]
        n = workers[(i // len(storages)) % len(workers)]
        kinds = [k for k in (faults or FAULTS) if storage == "postgres" or k != "db_restart"]
        deck = decks.setdefault(storage, [])
        if not deck:
            deck.extend(kinds[j] for j in rng.permutation(len(kinds)))
        workload = workloads["digits" if digits_ok and i % 4 == 3 else "lr_schedule"]
        out.append(Plan(i, storage, n, workload, deck.pop(), float(rng.uniform(0.1, 0.7)), seed))
    return out


def run_plan(plan: Plan, keep: Path | None = None, postgres: str = POSTGRES) -> Outcome:
    """One faulted run in a fresh temporary folder (and, on PostgreSQL, deleted afterwards);
    ``keep``: a folder to copy the run's folder to (database, checkpoints, driver logs)."""
    with tempfile.TemporaryDirectory(prefix="poptune-chaos-") as tmp:
        url = postgres if plan.storage == "postgres" else f"sqlite:///{tmp}/chaos.db"
        run = FaultedRun(plan, url, Path(tmp), keep)
        try:
            return run.execute()
        finally:
            if plan.storage == "postgres":
                subprocess.run(
                    [*POPTUNE, "delete", run.name, "--storage", url, "--yes", "--force"],
                    env=run.env,
                    capture_output=True,
                    check=False,
                )


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures of a campaign (no paths of this machine)."""
    latencies = [x for o in outcomes for x in o.resume_to_first_commit_s]
    violations: Counter[str] = Counter()
    for o in outcomes:
        violations.update(o.violations)
    by_fault: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        row = by_fault.setdefault(
            o.plan.fault, {"runs": 0, "fired": 0, "clean_runs": 0, "violations": Counter()}
        )
        row["runs"] += 1
        row["fired"] += o.fault_fired
        row["clean_runs"] += not o.violations
        row["violations"].update(o.violations)
    return {
        "runs": len(outcomes),
        "clean_runs": sum(not o.violations for o in outcomes),
        "completed_runs": sum(o.status == "completed" for o in outcomes),
        "faults": dict(Counter(o.plan.fault for o in outcomes if o.fault_fired)),
        "violations": dict(violations),
        "leaked_files": sum(o.leaked_files for o in outcomes),
        "resumes": sum(o.resumes for o in outcomes),
        "resume_to_first_commit_s": {
            "count": len(latencies),
            "median": statistics.median(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
            "waited_for_orphans": sum(o.resumes_after_orphans for o in outcomes),
        },
        "by_fault": {
            k: {**v, "violations": dict(v["violations"])} for k, v in sorted(by_fault.items())
        },
    }


def outcome_record(o: Outcome) -> dict[str, Any]:
    p = o.plan
    return {
        "run": p.index,
        "storage": p.storage,
        "workers": p.workers,
        "workload": p.workload.name,
        "steps": p.workload.steps,
        "fault": p.fault,
        "fires_at_fraction": round(p.at, 3),
        "fired": o.fault_fired,
        "fault_detail": o.fault_detail,
        "status": o.status,
        "resumes": o.resumes,
        "resume_to_first_commit_s": [round(x, 3) for x in o.resume_to_first_commit_s],
        "violations": dict(o.violations),
        "examples": o.examples,
        "leaked_files": o.leaked_files,
        "user_failures": o.failures,
        "wall_s": round(o.wall_s, 2),
    }


def table(outcomes: list[Outcome]) -> str:
    head = f"{'#':>3} {'storage':<9}{'w':>2} {'workload':<12}{'fault':<14}{'status':<11}"
    lines = [head + f"{'res':>4}{'1st commit s':>13}{'wall s':>8}  violations"]
    for o in outcomes:
        p = o.plan
        first = ",".join(f"{x:.1f}" for x in o.resume_to_first_commit_s) or "-"
        bad = ", ".join(f"{k} {v}" for k, v in sorted(o.violations.items())) or "none"
        lines.append(
            f"{p.index:>3} {p.storage:<9}{p.workers:>2} {p.workload.name:<12}"
            f"{p.fault + ('' if o.fault_fired else '?'):<14}{o.status:<11}{o.resumes:>4}"
            f"{first:>13}{o.wall_s:>8.1f}  {bad}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storages", default="sqlite,postgres")
    parser.add_argument("--workers", default="2,4")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help="kinds to draw from ('none': control runs)"
    )
    parser.add_argument("--quick", action="store_true", help="one run per fault kind, shorter runs")
    parser.add_argument("--postgres", default=POSTGRES, metavar="URL")
    parser.add_argument("--keep", type=Path, help="copy each run's folder here, to inspect")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    storages = args.storages.split(",")
    faults = args.faults.split(",")
    bad = [k for k in faults if k not in (*FAULTS, "none")] + [
        s for s in storages if s not in ("sqlite", "postgres")
    ]
    if bad:
        parser.error(
            f"unknown fault or storage {bad}; faults: {FAULTS}; storages: sqlite, postgres"
        )
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    runs = args.runs
    if args.quick and runs == parser.get_default("runs"):
        runs = len(faults) * len(storages)
    todo = plans(
        runs, args.seed, storages, [int(w) for w in args.workers.split(",")], workloads, faults
    )
    figures: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "seed": args.seed,
        "quick": args.quick,
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT,
        "max_resumes": MAX_RESUMES,
        "wall_cap_s": WALL_CAP,
    }
    outcomes = []
    for plan in todo:
        o = run_plan(plan, args.keep, args.postgres)
        outcomes.append(o)
        print(table([o]).splitlines()[1], flush=True)
    print()
    print(table(outcomes))
    figures.update(summarize(outcomes))
    figures["load_after"] = os.getloadavg()
    figures["details"] = [outcome_record(o) for o in outcomes]
    s = figures
    lat = s["resume_to_first_commit_s"]
    print(
        f"\n{s['runs']} runs, {s['completed_runs']} completed, "
        f"{s['clean_runs']} without violation; "
        f"faults {s['faults']}"
    )
    print(f"violations {s['violations'] or 'none'}; leaked files {s['leaked_files']}")
    if lat["count"]:
        print(
            f"resume to first commit: median {lat['median']:.2f} s, max {lat['max']:.2f} s "
            f"over {lat['count']} resumes ({lat['waited_for_orphans']} waited for orphans)"
        )
    out = args.out or RESULTS / ("chaos-quick.json" if args.quick else "chaos.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, default=str))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name}")


if __name__ == "__main__":
    main()
