"""``poptune run`` and ``poptune resume``: train with a progress view, then print a summary.

``poptune run FILE --baseline random`` trains the PBT run first and then, once it completed,
its random-search baseline (`poptune.Experiment.baseline`) as run ``RUN-random``, with the same
storage and execution options, and ends with both side by side (`poptune.cli.compare`). The
baseline records its source as ``FILE.py:NAME.baseline``, so that ``poptune resume``,
``poptune worker`` and worker processes build the baseline, not the PBT experiment, from it.

Neither command joins a run that live workers are training: they stop with the workers'
names and what to do (``poptune worker`` adds workers on purpose).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from poptune.cli._common import (
    INTERRUPTED,
    RUNTIME,
    USAGE,
    CLIError,
    _check_name,
    _check_persistent,
    _checkpoint_folder,
    _describe_holders,
    _first_line,
    _get_run,
    _live_holders,
    _open_existing,
    _open_storage,
    _redact,
    _scrub,
    _split_source,
    _stdout,
    _storage_failed,
    _storage_failure,
    _storage_flag,
    _storage_url,
)

if TYPE_CHECKING:
    from poptune.execution.session import RunOptions
    from poptune.experiment import Experiment
    from poptune.loggers import Logger
    from poptune.progress import Mode
    from poptune.result import Result
    from poptune.storage.base import RunInfo, Storage


def _run_options(args: argparse.Namespace) -> RunOptions:
    from poptune.execution.session import RunOptions

    kwargs: dict[str, Any] = {}
    if args.max_retries is not None:
        kwargs["max_retries"] = args.max_retries
    if args.heartbeat_timeout is not None:
        kwargs["heartbeat_timeout"] = args.heartbeat_timeout
    try:
        return RunOptions(**kwargs)
    except ValueError as e:
        raise CLIError(str(e), USAGE) from None


def _devices(args: argparse.Namespace) -> list[str] | None:
    from poptune.execution.devices import check_devices

    try:
        return check_devices(args.devices)
    except ValueError as e:
        raise CLIError(str(e), USAGE) from None


def _resources(args: argparse.Namespace) -> dict[str, float] | None:
    """``--resources cpu=1,gpu=0.5`` as a dict."""
    if args.resources is None:
        return None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in args.resources.split(","))):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value) if sep else math.nan
        except ValueError:
            out[key.strip()] = math.nan
    from poptune.execution.ray import check_resources

    try:
        if not out:
            raise ValueError(
                f"--resources must list NAME=AMOUNT pairs, but got {args.resources!r}."
            )
        return check_resources(out)
    except ValueError as e:
        raise CLIError(f"{e} Write it as --resources cpu=1,gpu=0.5.", USAGE) from None


def _progress_mode(args: argparse.Namespace) -> Mode:
    if args.no_progress:
        return "off"
    return "live" if sys.stdout.isatty() else "lines"


def _train(
    experiment: Experiment,
    url: str,
    name: str,
    source: str,
    args: argparse.Namespace,
    *,
    resume: bool,
    checkpoints: str | None,
) -> int:
    """Runs the experiment with a progress view, then prints the summary (or the interruption)."""
    from poptune.execution.session import ConfigurationStop, RunFailed
    from poptune.progress import ProgressDisplay

    options = _run_options(args)
    loggers = _loggers(args)  # before training: a missing extra fails at once
    with _open_storage(url) as store:  # fails early and clearly; creates the schema once
        before = store.get_run(name)
        if before is not None and before.status == "running":
            _refuse_live(store, before, url)
    if url.startswith("postgresql"):
        stored = before.checkpoint_root if before is not None else None
        _note_shared_checkpoints(url, name, checkpoints or stored)
    started = time.monotonic()
    display = ProgressDisplay(url, name, mode=_progress_mode(args))
    try:
        with display:
            result = experiment.run(
                url,
                name,
                workers=args.workers,
                executor=args.executor,
                resume=resume,
                checkpoints=checkpoints,
                options=options,
                source=source,
                devices=_devices(args),
                loggers=loggers,
                resources=_resources(args),
                ray_address=args.ray_address,
                progress=False,  # the display above shows it
            )
    except KeyboardInterrupt:
        print(
            "Interrupted; everything up to the last ready point is saved. Resume with: "
            f"poptune resume {name}{_storage_flag(url)}",
            file=sys.stderr,
        )
        return INTERRUPTED
    except ConfigurationStop as e:
        # The cause is what there is to fix: all of it, here, not a pointer to the status.
        print(_scrub(f"poptune: error: {e}"), file=sys.stderr)
        return RUNTIME
    except RunFailed as e:
        first = _first_line(str(e)).rstrip(":")
        raise CLIError(f"{first}; see `poptune status {name}{_storage_flag(url)}`") from None
    except Exception as e:
        reason = _storage_failure(e)
        if reason is None:
            raise
        # The executor has marked the run interrupted where the storage still let it.
        raise CLIError(_storage_failed(url, reason, name)) from e
    _summary(result, url, name, time.monotonic() - started, before=before)
    if args.tensorboard is not None:
        where = os.path.abspath(args.tensorboard)
        _stdout().print(
            f"TensorBoard:   tensorboard --logdir {where}  (run {name}: one curve per member, "
            "and best)",
            markup=False,
            highlight=False,
            overflow="ignore",
            crop=False,
        )
    return 0


#: Seconds `poptune run` / `resume` waits for the workers holding a run to go before it says
#: the run is being trained (those of a driver just killed are ending); the environment
#: variable ``POPTUNE_LIVE_GRACE`` sets another.
LIVE_GRACE = 10.0


def _refuse_live(store: Storage, info: RunInfo, url: str) -> None:
    """A run that live workers train is not joined by running it again (its processes would
    silently train beside theirs, or a serial executor would fail to claim its members)."""
    holders = _live_holders(store, info)
    if holders:
        # The workers of a driver killed a moment ago end within seconds (they watch their
        # parent; Ray ends its actors): `poptune resume` right after kill -9 waits for them.
        grace = float(os.environ.get("POPTUNE_LIVE_GRACE") or LIVE_GRACE)
        deadline = time.monotonic() + grace
        while holders and time.monotonic() < deadline:
            time.sleep(0.5)
            holders = _live_holders(store, info)
    if not holders:
        return  # marked running, but whoever ran it is gone: this run resumes it
    name, flag = info.name, _storage_flag(url)
    if info.execution.get("executor") == "serial":
        more = (
            "it is trained by the serial executor, which holds every member, so no other "
            "process can train it meanwhile"
        )
    else:
        more = f"to add workers to it on purpose, use `poptune worker {name}{flag}`"
    raise CLIError(
        f"Run {name!r} is being trained right now: {_describe_holders(holders)}. Running it "
        f"again would not start it anew; {more}. Else wait until it ends (`poptune status "
        f"{name}{flag}`), stop that process, or delete the run with `poptune delete {name} "
        f"--force{flag}`."
    )


def _loggers(args: argparse.Namespace) -> list[Logger]:
    """The loggers the command line asks for (``--tensorboard DIR``)."""
    if args.tensorboard is None:
        return []
    from poptune.loggers import TensorBoardLogger

    return [TensorBoardLogger(args.tensorboard)]


def _note_shared_checkpoints(url: str, name: str, root: str | None) -> None:
    """Says where a PostgreSQL run's checkpoints go: workers on other machines must reach them."""
    from poptune.storage.folders import default_checkpoint_root

    root = root or default_checkpoint_root(url)
    if "://" in root:
        return  # an fsspec URL, chosen to be shared
    folder = _checkpoint_folder(os.path.abspath(root), name)
    print(
        f"poptune: note: checkpoints are in {folder}; every worker machine must reach that "
        "path (or pass --checkpoints with a shared path or an fsspec URL).",
        file=sys.stderr,
    )


def _summary(
    result: Result, url: str, name: str, seconds: float, *, before: RunInfo | None
) -> None:
    """What the run left and where: best member, counts, storage, checkpoints, next commands."""
    from poptune.progress import format_duration, format_hparams, format_score

    with _open_storage(url) as store:
        info = store.get_run(name)
        failures = len(store.failures(name))
    status = info.status if info is not None else "?"
    root = info.checkpoint_root if info is not None else None
    exploits = sum(1 for e in result.events if e.kind == "exploit")
    other = len(result.events) - exploits
    best = result.best
    flag = _storage_flag(url)
    out = _stdout()
    # Completed before and not reconfigured since (a new `steps` would have reopened it).
    if (
        before is not None
        and before.status == "completed"
        and info is not None
        and info.fingerprint == before.fingerprint
    ):
        head = f"Run {name} was already completed; nothing to do."
    else:
        head = f"Run {name} {status} in {format_duration(seconds)}."
    steps = len(result.history)
    lines = [
        head,
        f"  best member  {best.id}: {result.metric} = {format_score(best.score)} at step "
        f"{best.step} ({result.mode})",
        f"  hparams      {format_hparams(best.hparams)}",
        f"  population   {len(result.members)} members, {steps} steps trained, {exploits} "
        f"exploits{f' (+{other} other events)' if other else ''}, {failures} failures",
        f"  storage      {_redact(url)}  (run {name})",
        f"  checkpoints  {_checkpoint_folder(root, name)}",
        f"See them:      poptune status {name}{flag}",
        f"               poptune export {name} --format csv{flag}",
    ]
    for line in lines:
        out.print(_scrub(line), markup=False, highlight=False, overflow="ignore", crop=False)


def cmd_run(args: argparse.Namespace) -> int:
    from poptune.execution.source import load_experiment

    url = _storage_url(args)
    _check_persistent(url)
    if args.name is not None:
        _check_name(args.name, "Choose another with --name.")
    path = _split_source(args.file)
    if not os.path.isfile(path):
        raise CLIError(f"No such file: {path}", USAGE)
    if args.baseline_name is not None and args.baseline is None:
        raise CLIError("--baseline-name names the baseline of --baseline random; add it.", USAGE)
    experiment, source = load_experiment(args.file)
    name = args.name
    if name is None:
        stem = os.path.splitext(os.path.basename(_split_source(source)))[0]
        name = _check_name(stem, f"(from the file name {stem!r}); choose one with --name.")
    baseline_name = None
    if args.baseline is not None:
        baseline_name = args.baseline_name or f"{name}-{args.baseline}"
        _check_name(baseline_name, "Choose another with --baseline-name.")
        if baseline_name == name:
            raise CLIError(
                f"--baseline-name must differ from the run's name, but both are {name!r}.", USAGE
            )
    code = _train(
        experiment, url, name, source, args, resume=args.resume, checkpoints=args.checkpoints
    )
    if code != 0 or baseline_name is None:
        return code
    _stdout().print(
        f"Baseline: the same experiment as random search at equal compute (no exploit, no "
        f"explore), as run {baseline_name}.",
        markup=False,
        highlight=False,
        crop=False,
    )
    code = _train(
        experiment.baseline(args.baseline),
        url,
        baseline_name,
        f"{source}.baseline",
        args,
        resume=args.resume,
        checkpoints=args.checkpoints,
    )
    if code != 0:
        return code
    _compare_at_end(url, name, baseline_name)
    return 0


def _compare_at_end(url: str, name: str, baseline: str) -> None:
    """The run and its baseline side by side, and how to compare them again."""
    from poptune.cli.compare import print_comparison
    from poptune.report.compare import read_comparison

    with _open_storage(url) as store:
        cmp = read_comparison(store, name, baseline)
    print_comparison(cmp)
    flag = _storage_flag(url)
    for line in (
        f"Compare them: poptune compare {name} {baseline}{flag}",
        f"  with their curves: poptune compare {name} {baseline}{flag} --output compare.html",
    ):
        _stdout().print(_scrub(line), markup=False, highlight=False, overflow="ignore", crop=False)


def cmd_resume(args: argparse.Namespace) -> int:
    from poptune.execution.source import load_experiment

    url = _storage_url(args)
    name = _check_name(args.run, "")
    with _open_existing(url) as store:
        info = _get_run(store, name)
    if not info.source:
        raise CLIError(
            f"Run {name!r} was not started with `poptune run`; resume it from Python with "
            "experiment.run(storage, name)."
        )
    experiment, source = load_experiment(info.source)
    return _train(experiment, url, name, source, args, resume=True, checkpoints=None)
