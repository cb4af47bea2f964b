"""`poptune.execution.worker.work` and ``poptune worker``: workers that join a stored run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SOURCE, WORKLOADS, check_complete, check_exact, experiment

import poptune as pt
from poptune.cli import main
from poptune.cli.worker import network_filesystem
from poptune.execution.session import prepare_run
from poptune.execution.worker import Worker as LoopWorker
from poptune.execution.worker import join_run, work
from poptune.storage import leases, open_storage
from poptune.storage.folders import claim_checkpoint_folder

SRC = str(Path(pt.__file__).resolve().parent.parent)


def create_run(url: str, root: Path, name: str = "r", source: str | None = SOURCE) -> None:
    """Creates the run as `poptune run` would, and trains nothing: workers alone will."""
    with open_storage(url) as store:
        info = prepare_run(experiment(), store, name, source=source, checkpoint_root=str(root))
    claim_checkpoint_folder(str(root), name, url, info.created)


def status(url: str, name: str = "r") -> str:
    with open_storage(url) as store:
        info = store.get_run(name)
        assert info is not None
        return info.status


# -- the loop, in this process ------------------------------------------------------------------


def test_work_trains_a_run_without_a_driver_and_completes_it(env: Any, tmp_path: Path) -> None:
    """One call of work() trains a run nobody else trains to the end, marks it completed, and
    reports every stretch it committed; every score is what the lineage says."""
    env(noise=0, pop=4, steps=20, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    seen: list[Any] = []
    report = work(
        url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE, on_commit=seen.append
    )
    assert status(url) == "completed" and report.status == "completed"
    assert report.stretches == seen and report.steps == 4 * 20 and report.members == [0, 1, 2, 3]
    assert all(s.step - s.start == 5 and s.commit_seconds >= 0 for s in report.stretches)
    assert (report.dropped, report.failures, report.stopped) == (0, 0, False)
    result = pt.load(url, "r")
    check_complete(result, 20, 4)
    assert check_exact(result, False) >= 1


@pytest.mark.parametrize(("batch", "cache"), [(1, 3), (2, 3), (3, 3), (6, 2)])
def test_a_worker_commits_the_members_it_claims_together(
    env: Any, tmp_path: Path, batch: int, cache: int
) -> None:
    """With claim_batch k, a worker claims k members, trains each to its ready point, and
    commits the k stretches in one transaction (they share its duration and end); every
    score is still what the lineage says, also when the batch is larger than the cache of
    live trainables (members beyond it are restored from their checkpoints)."""
    env(noise=0, pop=6, steps=20, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    options = pt.RunOptions(claim_batch=batch, cache_size=cache)
    report = work(url, "r", str(tmp_path / "ckpts"), options, source=SOURCE)
    assert report.status == "completed" and report.steps == 6 * 20
    commits: dict[tuple[float, float], list[int]] = {}
    for s in report.stretches:
        commits.setdefault((s.commit_seconds, s.committed_at), []).append(s.member)
    assert {len(members) for members in commits.values()} == {batch}
    assert all(len(set(members)) == batch for members in commits.values())
    result = pt.load(url, "r")
    check_complete(result, 20, 6)
    assert check_exact(result, False) >= 1


def test_a_member_that_copies_a_donor_ahead_takes_its_step_exactly(
    env: Any, tmp_path: Path
) -> None:
    """Two workers of 2 members each: A trains its members to step 10 while B's wait at 0;
    then B's are judged at step 5 against A's scores at 5, and one copies A's best member,
    whose latest state is at step 10. It takes step 10 (its history skips 6-10, its event
    says so), and every later score is exactly what the lineage says. (Seed 1 draws the best
    lr for A's member 1 and the worst for B's member 3.)"""
    env(noise=0, pop=4, steps=20, interval=5, seed=1)
    url = f"sqlite:///{tmp_path}/runs.db"
    root = tmp_path / "ckpts"
    create_run(url, root)
    options = pt.RunOptions(claim_batch=2)
    a = LoopWorker(experiment(), url, "r", str(root), options, "host:1:a")
    b = LoopWorker(experiment(), url, "r", str(root), options, "host:1:b")
    first_a, first_b = a._claim(), b._claim()
    assert isinstance(first_a, list) and isinstance(first_b, list)
    again = a._work(first_a)  # to step 5, committed; claims its own two again (B holds the rest)
    assert isinstance(again, list) and {r.id for r in again} == {r.id for r in first_a}
    a._work(again)  # to step 10
    b._work(first_b)  # to step 5, judged there: the bottom member copies A's best, at 10
    a._release_all()
    b._release_all()
    work(url, "r", str(root), options, source=SOURCE)
    result = pt.load(url, "r")
    check_complete(result, 20, 4)
    ahead = [e for e in result.events if e.donor_step is not None and e.donor_step > e.step]
    assert ahead and (ahead[0].step, ahead[0].donor_step) == (5, 10)
    assert ahead[0].member in (2, 3) and ahead[0].donor in (0, 1)
    trained = {h.step for h in result.history if h.member == ahead[0].member}
    assert trained.isdisjoint(range(6, 11)) and {5, 11} <= trained
    assert check_exact(result, False) >= 1


def test_batch_size_by_default_is_half_the_free_members_within_the_cache() -> None:
    """By default a worker leaves other workers half the claimable members, and claims no
    more than it can keep live, unless its commits cost more than its training: then enough
    that commits take a quarter of its time."""
    from poptune.execution.worker import batch_size

    default = pt.RunOptions()
    assert [batch_size(default, n) for n in (1, 2, 3, 4, 5, 6, 100)] == [1, 1, 2, 2, 3, 3, 3]
    assert batch_size(pt.RunOptions(cache_size=8), 100) == 8
    assert batch_size(pt.RunOptions(claim_batch=2), 1) == 2
    # Training a member takes 1 ms, a commit 4 ms: 12 members make the commit a quarter.
    assert batch_size(default, 100, 0.001, 0.004) == 12
    assert batch_size(default, 10, 0.001, 0.004) == 5  # still half the free members
    assert batch_size(default, 100, 0.5, 0.004) == 3  # dear steps: the cache bounds it
    # A slow commit (10 s) and 0.2 s per member: at most a second of training per batch.
    assert batch_size(default, 100, 0.2, 10.0) == 5
    assert batch_size(default, 100, 0.6, 10.0) == 3  # never below the cache
    assert batch_size(pt.RunOptions(claim_batch=2), 100, 0.001, 0.004) == 2


@pytest.mark.parametrize("slow", ["commits", "steps"])
def test_a_worker_claims_larger_batches_when_its_commits_cost_more_than_its_steps(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """Commits 50 ms slower (a distant database, say) than training a member: the worker
    claims more members than its cache holds, up to half the free ones, and the run is
    still exact. Steps of 20 ms: batches stay within the cache."""
    from poptune.execution.lifecycle import Lifecycle

    env(noise=0, pop=16, steps=20, interval=5, delay=0.02 if slow == "steps" else 0.0)
    if slow == "commits":
        commit = Lifecycle.commit

        def slow_commit(self: Lifecycle, *args: Any, **kwargs: Any) -> Any:
            time.sleep(0.05)
            return commit(self, *args, **kwargs)

        monkeypatch.setattr(Lifecycle, "commit", slow_commit)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    report = work(url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE)
    assert report.status == "completed"
    sizes = Counter((s.commit_seconds, s.committed_at) for s in report.stretches).values()
    if slow == "commits":
        assert max(sizes) > 3 and max(sizes) <= 8
    else:
        assert max(sizes) <= 3
    result = pt.load(url, "r")
    check_complete(result, 20, 16)
    check_exact(result, False)


def test_two_workers_in_threads_share_a_run(env: Any, tmp_path: Path) -> None:
    """Two workers (threads of this process, each with its own connection) share a run: each
    member-step trained is committed once, and both end when it completes."""
    env(noise=0, pop=4, steps=20, interval=2, delay=0.002)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    reports: list[Any] = []

    def one() -> None:
        reports.append(work(url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.status for r in reports] == ["completed", "completed"]
    result = pt.load(url, "r")
    check_complete(result, 20, 4)
    check_exact(result, False)  # no member-step trained twice
    # Every step a worker trained was committed, once. Fewer than 4 * 20 when a member copied
    # a donor ahead of it (it takes the donor's step); which members do depends on the threads.
    assert sum(r.steps for r in reports) == len(result.history) <= 4 * 20


def test_a_stop_event_ends_the_worker_and_releases_its_member(env: Any, tmp_path: Path) -> None:
    """Setting the stop event ends the worker after the current step; it holds nothing after,
    the run stays running for other workers, and a second worker finishes it."""
    env(noise=0, pop=2, steps=200, interval=100, delay=0.005)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    with open_storage(url) as store:
        join_run(store, "r")
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    report = work(url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE, stop=stop)
    timer.join()
    assert report.stopped and report.stretches == []  # stopped inside its first stretch
    with open_storage(url) as store:
        assert all(r.owner is None for r in store.members("r"))
        assert all(r.state["step"] == 0 for r in store.members("r"))  # the stretch dropped
    assert status(url) == "running"
    env(delay=0)
    work(url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE)
    check_complete(pt.load(url, "r"), 200, 2)


def test_join_run_marks_it_running_and_records_one_heartbeat_timeout(
    env: Any, tmp_path: Path
) -> None:
    """The first worker to join a run that records no heartbeat timeout sets it; later ones
    get that one, whatever they ask for. Created and interrupted runs become running."""
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    with open_storage(url) as store:
        assert join_run(store, "r", 2.5) == ("created", 2.5)
        assert join_run(store, "r", 9.0) == ("running", 2.5)
        store.update_run("r", status="interrupted")
        assert join_run(store, "r") == ("interrupted", 2.5)
        info = store.get_run("r")
        assert info is not None and info.status == "running"
        assert info.execution["heartbeat_timeout"] == 2.5


def test_a_driven_run_records_its_heartbeat_timeout(env: Any, tmp_path: Path) -> None:
    """Experiment.run records the heartbeat timeout its workers use, for workers that join."""
    url = f"sqlite:///{tmp_path}/runs.db"
    experiment().run(url, "r", options=pt.RunOptions(heartbeat_timeout=7.0))
    with open_storage(url) as store:
        info = store.get_run("r")
        assert info is not None and info.execution["heartbeat_timeout"] == 7.0
        assert join_run(store, "r", 1.0) == ("completed", 7.0)


# -- the command, in this process ----------------------------------------------------------------


def test_poptune_worker_trains_a_run_and_exits_0(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`poptune worker RUN` trains a run created without a driver to the end, prints each
    stretch and a summary, and exits 0; run again, it says there is nothing to train."""
    env(noise=0, pop=3, steps=10, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["worker", "r", "--storage", url]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    out = capsys.readouterr().out
    assert "training run r" in out and "(joined, was created)" in out
    assert out.count("  member ") == 6 and "steps 6-10" in out
    assert "Worker trained 30 steps in 6 stretches of 3 members (0, 1, 2)" in out
    assert "Run r is completed." in out
    check_complete(pt.load(url, "r"), 10, 3)
    assert main(["worker", "r", "--storage", url]) == 0
    assert "already completed" in capsys.readouterr().out


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_poptune_worker_refuses_another_configuration(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file whose experiment is not the run's configuration is refused, saying how it
    differs; the run is left untouched."""
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    env(steps=80)
    assert main(["worker", "r", "--storage", url]) == 1
    line = _error(capsys)
    assert "does not define the configuration of run 'r' (differs in: steps)" in line
    assert status(url) == "created"
    assert main(["worker", "r", "--storage", url, f"{WORKLOADS}:counter"]) == 1
    assert "differs in: steps" in _error(capsys)


def test_poptune_worker_needs_a_file_it_can_import(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run started from Python names no file: the worker asks for one. A run whose file is
    not on this machine (another path there): the worker says so and takes one given."""
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts", name="nosource", source=None)
    assert main(["worker", "nosource", "--storage", url]) == 2
    assert "pass the file that defines it" in _error(capsys)
    elsewhere = tmp_path / "there" / "workloads.py"
    elsewhere.parent.mkdir()
    shutil.copy(WORKLOADS, elsewhere)
    create_run(url, tmp_path / "ckpts", name="moved", source=f"{elsewhere}:counter")
    elsewhere.unlink()
    assert main(["worker", "moved", "--storage", url]) == 2
    line = _error(capsys)
    assert f"experiment file {elsewhere} of run 'moved' is not on this machine" in line
    assert "poptune worker moved PATH/TO/FILE.py" in line
    assert main(["worker", "moved", "--storage", url, f"{WORKLOADS}:counter", "-q"]) == 0
    check_complete(pt.load(url, "moved"), 40, 4)


def test_poptune_worker_needs_the_runs_checkpoint_folder(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint folder this machine does not reach, or that belongs to another run, is
    refused before anything is trained."""
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    shutil.rmtree(tmp_path / "ckpts")
    assert main(["worker", "r", "--storage", url]) == 1
    line = _error(capsys)
    assert f"{tmp_path / 'ckpts' / 'r'}, which does not exist on this machine" in line
    assert status(url) == "created"


def test_poptune_worker_keeps_the_runs_heartbeat_timeout(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker may not judge its peers by another heartbeat timeout than the run's."""
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    with open_storage(url) as store:
        join_run(store, "r", 5.0)
    assert main(["worker", "r", "--storage", url, "--heartbeat-timeout", "2"]) == 2
    assert "uses a heartbeat timeout of 5 s" in _error(capsys)


def test_poptune_worker_on_a_failed_run_fails(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    with open_storage(url) as store:
        store.update_run("r", status="failed", error="Run 'r' stopped: boom\nTraceback")
    assert main(["worker", "r", "--storage", url]) == 1
    assert "Run 'r' failed: Run 'r' stopped: boom" in _error(capsys)


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
41 40 8:17 / /mnt/shared/local rw,relatime - ext4 /dev/sdb1 rw
42 22 0:36 / /home/me/sshfs\\040dir rw - fuse.sshfs me@host:/ rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/home/me/runs.db", None),
        ("/mnt/shared/runs.db", "nfs4"),
        ("/mnt/shared/local/runs.db", None),  # a local disk mounted inside the share
        ("/mnt/sharedness/runs.db", None),  # a prefix of the name is not the mount point
        ("/home/me/sshfs dir/runs.db", "fuse.sshfs"),
    ],
)
def test_network_filesystems_are_recognised(path: str, kind: str | None) -> None:
    """SQLite files on network file systems are recognised from the mount table (workers on
    several machines would share them with locks that do not hold there)."""
    assert network_filesystem(path, MOUNTINFO) == kind


# -- workers as separate processes, on PostgreSQL -----------------------------------------------


def _namespace_prefix() -> list[str]:
    """``unshare`` arguments that start a command in a PID namespace of its own (a container
    on this host: same host name, its own PIDs), or [] where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return []
    prefix = [unshare, "--pid", "--kill-child", "--map-root-user", "--mount-proc"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True)
    return prefix if probe.returncode == 0 else []


class Worker:
    """A ``poptune worker`` process; its output lines are collected as they come."""

    def __init__(self, url: str, *extra: str, prefix: tuple[str, ...] = (), **environ: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        env.update(environ)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "poptune", "worker", "r", "--storage", url, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def id(self) -> str | None:
        """The worker id it printed first."""
        for line in self.lines:
            if line.startswith("poptune worker "):
                return line.split()[2].rstrip(":")
        return None

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def _until(what: Any, timeout: float = 60, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, message or "timed out"
        time.sleep(0.02)


def _held_by(url: str, owner: str | None) -> list[int]:
    with open_storage(url) as store:
        return [r.id for r in store.members("r") if owner is not None and r.owner == owner]


@pytest.mark.slow
def test_poptune_workers_on_postgres_survive_one_killed_mid_step(
    env: Any, tmp_path: Path, pg_url: str, workers: list[Worker]
) -> None:
    """Three `poptune worker` processes train a run created without a driver on PostgreSQL;
    one, in a PID namespace of its own (a container on this host: its pid 1 means nothing
    here), is killed with SIGKILL mid-step. Its member is taken over by another worker only
    once its heartbeat is the timeout old on the database's clock; the run completes, marked
    so by a worker, with every member at the last step and every score exact."""
    timeout = 3.0
    env(noise=0, pop=6, steps=24, interval=2, delay=0.03)
    create_run(pg_url, tmp_path / "ckpts")
    prefix = _namespace_prefix()
    # The workload's lock files name pids, which mean nothing across namespaces: the victim
    # takes no part (the history shows any member-step trained twice).
    no_locks = {"WL_LOCKS": ""} if prefix else {}
    victim = Worker(pg_url, "--heartbeat-timeout", str(timeout), prefix=tuple(prefix), **no_locks)
    workers.append(victim)
    owner = _until(lambda: victim.id, message=victim.output())
    if prefix:  # pid 1 of its own namespace, on this host: no process of ours to look up
        identity = leases.parse_worker_id(owner)
        assert identity is not None and identity.pid == 1
        assert identity.namespace != leases.namespace_id()
    held = _until(lambda: _held_by(pg_url, owner), message=victim.output())
    for _ in range(2):
        workers.append(Worker(pg_url))
    _until(lambda: sum("  member " in ln for ln in victim.lines) >= 2, message=victim.output())
    pid = victim.proc.pid
    if prefix:  # the worker is unshare's child
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pid = int(f.read().split()[0])
    while True:  # frozen while it holds a member (between two claims it may hold none)
        os.kill(pid, signal.SIGSTOP)
        held = _held_by(pg_url, owner)
        if held:
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.03)
    os.kill(pid, signal.SIGKILL)
    victim.wait()
    time.sleep(0.3)  # a heartbeat on its way is in, or never will be
    with open_storage(pg_url) as store:
        row = {r.id: r for r in store.members("r")}[held[0]]
        assert row.owner == owner and row.heartbeat is not None
        beat = row.heartbeat
        last_seen_held = store.now()
        while True:
            now = store.now()  # read before the row: while it still shows the victim,
            current = {r.id: r for r in store.members("r")}[held[0]]  # takeover is after now
            if current.owner != owner:
                break
            last_seen_held = now
            assert now < beat + 60, "the killed worker's member was never taken over"
            time.sleep(0.02)
    if prefix:  # judged by its heartbeat alone: kept at least (about) the whole timeout
        assert last_seen_held >= beat + timeout - 0.75, (last_seen_held - beat, timeout)
    for w in workers[1:]:
        assert w.wait() == 0, w.output()
        assert "Run r is completed." in w.output()
    assert status(pg_url) == "completed"
    result = pt.load(pg_url, "r")
    check_complete(result, 24, 6)
    check_exact(result, False)
    assert not (env.locks / "VIOLATION").exists()


@pytest.mark.slow
def test_a_worker_joins_a_driven_run_and_sigterm_releases_its_member(
    env: Any, tmp_path: Path, pg_url: str, workers: list[Worker]
) -> None:
    """`poptune worker` joins a run that `poptune run --executor processes` trains on
    PostgreSQL. SIGTERM stops it after the current step (exit 130), its member released at
    once; the driver, still there, completes the run and exits 0."""
    env(noise=0, pop=4, steps=30, interval=2, delay=0.02)
    pythonpath = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poptune",
            "run",
            SOURCE,
            "--name",
            "r",
            "--storage",
            pg_url,
            "--checkpoints",
            str(tmp_path / "ckpts"),
            "--executor",
            "processes",
            "--workers",
            "1",
            "--heartbeat-timeout",
            "5",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        _until(lambda: status(pg_url) == "running" if _exists(pg_url) else False)
        joined = Worker(pg_url)
        workers.append(joined)
        _until(lambda: sum("  member " in ln for ln in joined.lines) >= 2, message=joined.output())
        assert "heartbeat timeout 5 s" in joined.output()
        joined.proc.send_signal(signal.SIGTERM)
        assert joined.wait(timeout=30) == 130, joined.output()
        assert _held_by(pg_url, joined.id) == []
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, err
        assert "Run r completed" in out
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    result = pt.load(pg_url, "r")
    check_complete(result, 30, 4)
    check_exact(result, False)


def _exists(url: str) -> bool:
    try:
        with open_storage(url) as store:
            return store.get_run("r") is not None
    except Exception:
        return False


class _Outage:
    """Makes `SQLStorage.transaction` raise `StorageUnavailable` for calls ``first`` to
    ``last`` of this process (as a database server restarting, or a full disk, does)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first: int, last: int) -> None:
        from poptune.storage.base import StorageUnavailable
        from poptune.storage.sql import SQLStorage

        real = SQLStorage.transaction
        self.calls = 0
        lock = threading.Lock()

        def transaction(store: Any, name: str) -> Any:
            with lock:
                self.calls += 1
                n = self.calls
            if first <= n <= last:
                raise StorageUnavailable(f"{store.display_url} cannot be used now: test outage")
            return real(store, name)

        monkeypatch.setattr(SQLStorage, "transaction", transaction)


def test_a_worker_rides_out_a_storage_outage_and_the_run_stays_exact(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six transactions in a row cannot begin, as if the database were restarting: the worker
    waits with backoff and goes on; the run completes, exact. Before, the exception ended the
    worker (a worker process died; its driver restarted it until its budget ran out and the
    run stopped)."""
    from poptune.execution import lifecycle

    env(noise=0, pop=4, steps=20, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    monkeypatch.setattr(lifecycle, "STORAGE_BACKOFF", (0.01,) * 8)
    outage = _Outage(monkeypatch, 4, 9)
    report = work(url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE)

    assert outage.calls > 9  # the outage happened, and the worker went on after it
    assert report.status == "completed" and status(url) == "completed"
    result = pt.load(url, "r")
    check_complete(result, 20, 4)
    check_exact(result, False)


def test_a_storage_that_stays_unusable_stops_the_run_as_interrupted(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage longer than the backoff: the worker stops, the run is marked interrupted
    with what failed (once the storage answers again), and resuming it completes it."""
    from poptune.execution import lifecycle

    env(noise=0, pop=4, steps=20, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    create_run(url, tmp_path / "ckpts")
    monkeypatch.setattr(lifecycle, "STORAGE_BACKOFF", (0.01, 0.01, 0.01))
    # A commit's 4 tries, then those of the worker starting afresh: then it gives up.
    _Outage(monkeypatch, 4, 11)
    report = work(url, "r", str(tmp_path / "ckpts"), pt.RunOptions(), source=SOURCE)

    assert report.status == "interrupted"
    with open_storage(url) as store:
        info = store.get_run("r")
        assert info is not None and info.status == "interrupted"
        assert info.error is not None and "test outage" in info.error
        assert store.failures("r") == []
    monkeypatch.undo()
    env(noise=0, pop=4, steps=20, interval=5)
    result = experiment().run(url, "r", source=SOURCE, resume=True)
    check_complete(result, 20, 4)


def test_the_serial_executor_rides_out_a_storage_outage_too(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process runs wait for a storage that cannot be used for a while, as workers do."""
    from poptune.execution import lifecycle

    env(noise=0, pop=4, steps=20, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    monkeypatch.setattr(lifecycle, "STORAGE_BACKOFF", (0.01,) * 8)
    outage = _Outage(monkeypatch, 6, 11)
    result = experiment().run(url, "r", source=SOURCE)

    assert outage.calls > 11
    check_complete(result, 20, 4)
    check_exact(result, False)
