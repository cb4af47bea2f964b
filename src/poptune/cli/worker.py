"""``poptune worker RUN [FILE]``: claim and train members of a stored run, from any machine.

Any number of workers, on any machines that reach the run's storage (PostgreSQL) and its
checkpoint root, train one run together, with or without the process that started it: each
runs `poptune.execution.worker.work`, the loop the processes executor's workers run. The
worker reads the run's configuration and checkpoint root from the storage, imports the
experiment from ``FILE`` (else from the file the run was started from) and refuses it unless
its configuration is the run's. It exits 0 once the run is completed (the worker that finds no
member left to train marks it so, exactly once); SIGINT or SIGTERM stop it after the current
step, releasing its member for the other workers (exit 130). A worker killed outright loses its
member to another worker once its heartbeat is ``heartbeat_timeout`` seconds old on the
database's clock.

A run trained by the serial executor (``poptune run`` with one worker) is held whole by that
process, member by member, until it stops: a worker started while it is alive could never claim
a member, so it says so and exits 1 at once instead of waiting. Once that process has stopped
(or died), workers may join the run and finish it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from poptune.cli._common import (
    INTERRUPTED,
    RUNTIME,
    USAGE,
    CLIError,
    _check_name,
    _checkpoint_folder,
    _describe_holders,
    _first_line,
    _get_run,
    _live_holders,
    _open_existing,
    _redact,
    _scrub,
    _split_source,
    _sqlite_file,
    _storage_flag,
    _storage_url,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from poptune.execution.session import RunOptions
    from poptune.execution.worker import Stretch
    from poptune.experiment import Experiment
    from poptune.storage.base import MemberRow, RunInfo, Storage

#: File systems on which SQLite's locks do not hold across machines.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs", "ncpfs"}
)


def network_filesystem(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the network file system ``path`` lives on (``"nfs4"``), or None for a local
    one or where it cannot be told. ``mountinfo``: the text of ``/proc/self/mountinfo``
    (read when None)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split()[0]
    return kind if kind in NETWORK_FILESYSTEMS else None


def _check_sqlite(url: str) -> None:
    """A SQLite run can take workers only on the machine that holds its file."""
    path = _sqlite_file(url)
    if not path:
        return
    kind = network_filesystem(path)
    if kind is not None:
        raise CLIError(
            f"The storage {_redact(url)} is a SQLite file on a network file system ({kind}). "
            "SQLite's locks do not hold across machines and its heartbeats are on each "
            "machine's own clock, so workers on several machines need PostgreSQL "
            "(--storage postgresql://...). Run `poptune worker` on the machine whose disk "
            "holds the file."
        )


def _experiment(info: RunInfo, file: str | None, url: str) -> tuple[Experiment, str]:
    """The run's experiment, from ``file`` or the run's own source, checked to be the run's."""
    from poptune.execution.session import ConfigMismatch, differences, fingerprint
    from poptune.execution.source import load_experiment

    spec = file or info.source
    if not spec:
        raise CLIError(
            f"Run {info.name!r} was not started from a file (`poptune run`), so this machine "
            f"cannot tell where its experiment is: pass the file that defines it, `poptune "
            f"worker {info.name} FILE.py[:NAME]`.",
            USAGE,
        )
    path = _split_source(spec)
    if not os.path.isfile(path):
        how = (
            f"pass it: poptune worker {info.name} PATH/TO/FILE.py"
            if file is None
            else "check the path"
        )
        raise CLIError(
            f"The experiment file {path} of run {info.name!r} is not on this machine; {how} "
            "(the same experiment, importable here).",
            USAGE,
        )
    experiment, source = load_experiment(spec)
    config = experiment.describe()
    if fingerprint(config) != info.fingerprint:
        raise ConfigMismatch(
            f"{source} does not define the configuration of run {info.name!r} "
            f"({differences(info.config, config)}): a worker trains the run as it is "
            "configured. Use the file the run's other workers use, or reconfigure the run "
            f"first: `poptune run FILE --name {info.name} --resume{_storage_flag(url)}`."
        )
    return experiment, source


def _checkpoint_root(info: RunInfo) -> str:
    """The run's checkpoint root, checked to be reachable and the run's own from here."""
    from poptune.storage.folders import read_marker

    root = info.checkpoint_root
    if not root:
        raise CLIError(f"Run {info.name!r} records no checkpoint root: it cannot take workers.")
    if "://" in root and not root.startswith("file://"):
        from poptune.storage.checkpoints import CheckpointStore

        CheckpointStore(root)  # fsspec must be here (ImportError says what to install)
        return root
    folder = _checkpoint_folder(root, info.name)
    if not os.path.isdir(folder):
        raise CLIError(
            f"Run {info.name!r} keeps its checkpoints in {folder}, which does not exist on "
            "this machine. Every worker must reach that folder at that path (mount the shared "
            "file system there), or start the run with --checkpoints on shared storage (an "
            "fsspec URL such as s3://bucket/prefix)."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"This worker cannot write the run's checkpoint folder {folder}.")
    marker = read_marker(root, info.name)
    # The storage is not compared: this machine may name the same database another way.
    if marker is not None and (
        marker.run != info.name or abs(marker.created - info.created) >= 1e-3
    ):
        raise CLIError(
            f"The checkpoint folder {folder} here belongs to {marker.describe()}, not to this "
            f"run {info.name!r}: this machine's {root} is not the shared folder the run's "
            "other workers use."
        )
    return root


def _options(info: RunInfo, timeout: float, args: argparse.Namespace) -> RunOptions:
    """The run's heartbeat timeout (every worker of a run must judge the others by the same
    one), with this worker's own retries and threads."""
    from poptune.execution.session import RunOptions

    given = args.heartbeat_timeout
    if given is not None and float(given) != timeout:
        raise CLIError(
            f"Run {info.name!r} uses a heartbeat timeout of {timeout:g} s, but "
            f"--heartbeat-timeout {given:g} was given: every worker of a run must presume "
            "the others dead after the same silence. Leave the option out.",
            USAGE,
        )
    kwargs: dict[str, object] = {"heartbeat_timeout": timeout}
    if args.max_retries is not None:
        kwargs["max_retries"] = args.max_retries
    if args.threads is not None:
        kwargs["threads"] = args.threads
    try:
        return RunOptions(**kwargs)  # type: ignore[arg-type]
    except ValueError as e:
        raise CLIError(str(e), USAGE) from None


def _threads(args: argparse.Namespace, rows: Sequence[MemberRow]) -> int:
    """``--threads``, else ``OMP_NUM_THREADS``, else this worker's share of the cores beside
    the processes of this machine that hold the run's members: a worker using every core
    made a 2-worker run on 2 cores 2.5 times slower."""
    from poptune.execution.threads import worker_threads

    return worker_threads(args.threads, rows)


def _preflight(
    experiment: Experiment, store: Storage, name: str, root: str, devices: list[str] | None
) -> str | None:
    """Builds one member and puts it through a checkpoint before this worker joins
    (`poptune.execution.preflight`); the message that stops it, if it fails. The run is left
    as it is: other workers may be training it with a file that works."""
    from poptune.execution.preflight import preflight
    from poptune.execution.session import ConfigurationStop
    from poptune.storage.checkpoints import CheckpointStore

    ckpts = CheckpointStore(root, allow_pickle=experiment.allow_pickle)
    try:
        preflight(
            experiment,
            store,
            name,
            checkpoints=ckpts,
            device=devices[0] if devices else None,
            mark=False,
        )
    except ConfigurationStop as e:
        return str(e)
    return None


def _say(text: str) -> None:
    print(_scrub(text), flush=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from poptune.execution.devices import check_devices
    from poptune.execution.session import (
        ConfigurationStop,
        RunFailed,
        configuration_stop,
        new_worker_id,
    )
    from poptune.execution.worker import join_run, work

    url = _storage_url(args)
    name = _check_name(args.run, "")
    try:
        devices = check_devices(args.device)
    except ValueError as e:
        raise CLIError(str(e), USAGE) from None
    if devices is not None and len(devices) != 1:
        raise CLIError(f"--device takes one device, but got {args.device!r}.", USAGE)
    _check_sqlite(url)
    with _open_existing(url) as store:
        info = _get_run(store, name)
        if info.status == "completed":
            _say(f"Run {name} is already completed; nothing to train.")
            return 0
        if info.status == "failed":
            raise CLIError(
                f"Run {name!r} failed: {_first_line(info.error or '')}; see `poptune status "
                f"{name}{_storage_flag(url)}`."
            )
        if info.status == "running" and info.execution.get("executor") == "serial":
            holders = _live_holders(store, info)
            if holders:
                raise CLIError(
                    f"Run {name!r} is trained by the serial executor, which holds every member "
                    f"until it stops ({_describe_holders(holders)}): a worker can never claim "
                    "one while it runs. Let it finish, or stop it (Ctrl-C) and continue with "
                    f"`poptune resume {name} --executor processes --workers N{_storage_flag(url)}`"
                    ", which workers can join."
                )
        experiment, source = _experiment(info, args.file, url)
        root = _checkpoint_root(info)
        given = args.heartbeat_timeout
        if given is not None and not (0 < given < float("inf")):
            raise CLIError(f"--heartbeat-timeout must be a number > 0, but got {given!r}.", USAGE)
        recorded = info.execution.get("heartbeat_timeout")
        if recorded is not None:
            _options(info, float(recorded), args)  # refused before the run is touched
        stop = _preflight(experiment, store, name, root, devices)
        if stop is not None:
            print(_scrub(f"poptune: error: {stop}"), file=sys.stderr)
            return RUNTIME
        # The first worker of a run started without a timeout sets it for the others.
        before, timeout = join_run(store, name, given)
        options = _options(info, timeout, args)
        threads = _threads(args, store.members(name))
    worker_id = new_worker_id()
    _say(
        f"poptune worker {worker_id}: training run {name} of {_redact(url)} "
        f"({'joined, was ' + before if before != 'running' else 'running'}); experiment "
        f"{source}; checkpoints in {_checkpoint_folder(root, name)}; heartbeat timeout "
        f"{options.heartbeat_timeout:g} s; {threads} math-library thread"
        f"{'s' if threads != 1 else ''}."
    )

    def show(s: Stretch) -> None:
        if not args.quiet:
            _say(
                f"  member {s.member}: steps {s.start + 1}-{s.step}, {experiment.metric} "
                f"{s.score:.6g} (commit {1000 * s.commit_seconds:.0f} ms)"
            )

    from poptune.execution.threads import limited_threads

    try:
        # Put back afterwards: `main` may run in a caller's process (tests do).
        with limited_threads(threads):
            report = work(
                url,
                name,
                root,
                options,
                experiment=experiment,
                device=devices[0] if devices else None,
                threads=threads,
                worker_id=worker_id,
                handle_signals=True,
                on_commit=show,
            )
    except ConfigurationStop as e:
        print(_scrub(f"poptune: error: {e}"), file=sys.stderr)
        return RUNTIME
    except RunFailed as e:
        raise CLIError(
            f"{_first_line(str(e)).rstrip(':')}; see `poptune status {name}{_storage_flag(url)}`"
        ) from None
    with _open_existing(url) as store:
        final = _get_run(store, name)
    members = report.members
    listed = ", ".join(map(str, members[:20])) + (", ..." if len(members) > 20 else "")
    _say(
        f"Worker trained {report.steps} steps in {len(report.stretches)} stretches of "
        f"{len(members)} members ({listed or 'none'}); {report.failures} failures, "
        f"{report.dropped} stretches dropped (presumed dead meanwhile). Run {name} is "
        f"{final.status}."
    )
    if report.stopped:
        print(
            f"Stopped; this worker's member was released. Other workers carry on; rejoin with "
            f"`poptune worker {name}{_storage_flag(url)}`.",
            file=sys.stderr,
        )
        return INTERRUPTED
    if final.status == "completed":
        return 0
    stopped = configuration_stop(final)
    if stopped is not None:  # another worker found the code to blame
        print(_scrub(f"poptune: error: {stopped}"), file=sys.stderr)
        return RUNTIME
    if final.status == "failed":
        raise CLIError(
            f"Run {name!r} failed: {_first_line(final.error or '')}; see `poptune status "
            f"{name}{_storage_flag(url)}`."
        )
    raise CLIError(
        f"Run {name!r} was {final.status} before it completed (its driver was stopped, or "
        f"`poptune resume` took it over). Continue it with `poptune resume {name}` or "
        f"`poptune worker {name}`{_storage_flag(url)}."
    )
