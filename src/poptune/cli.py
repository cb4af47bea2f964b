"""The ``poptune`` command: run, resume, inspect and export runs kept in a storage.

::

    poptune run examples/toy_quadratic.py            # trains, shows progress, prints the best
    poptune status                                   # every run in ./poptune.db
    poptune status toy_quadratic                     # one run's population and failures
    poptune export toy_quadratic --format csv        # history, events, best schedule
    poptune resume toy_quadratic                     # continues an interrupted run

Expected failures print one line, ``poptune: error: ...``, and exit with 2 (bad usage) or 1
(anything else); passwords in storage URLs never appear in the output.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

if TYPE_CHECKING:
    from rich.console import Console

    from poptune.execution.session import RunOptions
    from poptune.experiment import Experiment
    from poptune.progress import Mode
    from poptune.result import Result
    from poptune.storage.base import RunInfo, Storage

__all__ = ["main"]

DEFAULT_STORAGE = "sqlite:///poptune.db"
USAGE, RUNTIME, INTERRUPTED = 2, 1, 130


class CLIError(Exception):
    """An expected failure: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = RUNTIME) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see `{self.prog} --help`)", USAGE)


class _Scrubber:
    """Removes storage passwords from any text before it is printed."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def add_url(self, url: str) -> None:
        password: str | None = None
        try:
            from sqlalchemy.engine import make_url

            password = make_url(url).password
        except Exception:
            match = re.search(r"://[^/@:]*:([^@/]*)@", url)
            password = match.group(1) if match else None
        if password:
            self.secrets.update({password, quote(password, safe=""), quote(password)})

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


_scrub = _Scrubber()


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _error_line(message: str) -> str:
    return "poptune: error: " + _scrub(_first_line(message))


def _stdout() -> Console:
    from rich.console import Console

    # Piped or redirected output has no width to fit: don't fold tables to rich's default 80.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=200 if wide else None)


def _redact(url: str) -> str:
    from poptune.storage import redact_url

    return redact_url(url)


def _storage_flag(url: str) -> str:
    """`` --storage URL`` (password hidden) to repeat in a suggested command; empty if default."""
    if url == DEFAULT_STORAGE:
        return ""
    return f" --storage {shlex.quote(_redact(url))}"


def _sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL (``""`` for an in-memory one); None if not SQLite."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    return "" if database in ("", ":memory:") else database


def _check_persistent(url: str) -> None:
    if url.startswith("memory://") or _sqlite_file(url) == "":
        raise CLIError(
            f"storage {_redact(url)} keeps nothing after the command ends; use a file "
            "(sqlite:///FILE.db) or a PostgreSQL URL.",
            USAGE,
        )


def _open_storage(url: str) -> Storage:
    """Opens (and if needed creates) a storage, for a run."""
    from poptune.storage import open_storage

    _check_persistent(url)
    return open_storage(url)


def _open_existing(url: str) -> Storage:
    """Opens a storage that must already hold poptune runs (never creates one)."""
    _check_persistent(url)
    path = _sqlite_file(url)
    if path is not None and not os.path.exists(path):
        raise CLIError(
            f"No poptune storage at {_redact(url)}: {os.path.abspath(path)} does not exist. "
            "Start a run with `poptune run FILE.py`, or pass --storage."
        )
    from poptune.storage.sql import SQLStorage

    return SQLStorage(url, create=False)


def _get_run(store: Storage, name: str) -> RunInfo:
    info = store.get_run(name)
    if info is None:
        names = [r.name for r in store.list_runs()]
        there = f" Runs there: {', '.join(names)}." if names else " It holds no runs."
        raise CLIError(f"No run named {name!r} in {store.display_url}.{there}")
    return info


def _check_name(name: str, hint: str) -> str:
    from poptune.storage.checkpoints import check_run_name

    try:
        return check_run_name(name)
    except ValueError as e:
        raise CLIError(f"{e} {hint}", USAGE) from None


def _split_source(spec: str) -> str:
    """The file of ``FILE.py[:NAME]``."""
    path, sep, obj = spec.rpartition(":")
    return path if sep and path and obj.isidentifier() else spec


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


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


# -- run and resume ----------------------------------------------------------------------------


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
    from poptune.execution.session import RunFailed
    from poptune.progress import ProgressDisplay

    options = _run_options(args)
    with _open_storage(url) as store:  # fails early and clearly; creates the schema once
        before = store.get_run(name)
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
            )
    except KeyboardInterrupt:
        print(
            "Interrupted; everything up to the last ready point is saved. Resume with: "
            f"poptune resume {name}{_storage_flag(url)}",
            file=sys.stderr,
        )
        return INTERRUPTED
    except RunFailed as e:
        first = _first_line(str(e)).rstrip(":")
        raise CLIError(f"{first}; see `poptune status {name}{_storage_flag(url)}`") from None
    _summary(result, url, name, time.monotonic() - started, before=before)
    return 0


def _checkpoint_folder(root: str | None, name: str) -> str:
    if not root:
        return "-"
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


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

    url: str = args.storage
    _check_persistent(url)
    if args.name is not None:
        _check_name(args.name, "Choose another with --name.")
    path = _split_source(args.file)
    if not os.path.isfile(path):
        raise CLIError(f"No such file: {path}", USAGE)
    experiment, source = load_experiment(args.file)
    name = args.name
    if name is None:
        stem = os.path.splitext(os.path.basename(_split_source(source)))[0]
        name = _check_name(stem, f"(from the file name {stem!r}); choose one with --name.")
    return _train(
        experiment, url, name, source, args, resume=args.resume, checkpoints=args.checkpoints
    )


def cmd_resume(args: argparse.Namespace) -> int:
    from poptune.execution.source import load_experiment

    url: str = args.storage
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


# -- status ------------------------------------------------------------------------------------


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_status(args: argparse.Namespace) -> int:
    url: str = args.storage
    with _open_existing(url) as store:
        if args.run is None:
            _status_all(store)
        else:
            _status_run(store, _check_name(args.run, ""))
    return 0


def _status_all(store: Storage) -> None:
    from rich.table import Table

    from poptune.progress import Snapshot, best_member, format_score

    out = _stdout()
    runs = store.list_runs()
    if not runs:
        out.print(f"No runs in {store.display_url}.", markup=False)
        return
    table = Table(title=f"Runs in {store.display_url}", title_justify="left", header_style="bold")
    table.add_column("run", no_wrap=True)
    table.add_column("status")
    for column in ("members", "progress", "best score", "exploits"):
        table.add_column(column, justify="right")
    table.add_column("updated")
    for info in runs:
        rows = tuple(store.members(info.name))
        exploits = sum(1 for e in store.events(info.name) if e.get("kind") == "exploit")
        snap = Snapshot(info=info, members=rows)
        best = best_member(info, rows)
        table.add_row(
            info.name,
            info.status,
            str(len(rows)),
            f"{snap.fraction:.0%}",
            format_score(best.score) if best is not None else "-",
            str(exploits),
            _when(info.updated),
        )
    out.print(table)


def _status_run(store: Storage, name: str) -> None:
    from rich.table import Table

    from poptune.progress import Snapshot, best_member, format_hparams, format_score

    out = _stdout()
    info = _get_run(store, name)
    rows = tuple(store.members(name))
    failures = store.failures(name)
    events = store.events(name)
    cfg = info.config
    snap = Snapshot(info=info, members=rows)
    best = best_member(info, rows)
    exploits = sum(1 for e in events if e.get("kind") == "exploit")
    best_text = (
        f", best {format_score(best.score)} (member {best.id})"
        if best is not None and best.score is not None
        else ""
    )
    facts = [
        f"Run {name}: {info.status}, {snap.fraction:.0%} of {snap.population} members x "
        f"{snap.steps} steps, {exploits} exploits, {len(failures)} failures",
        f"  metric       {cfg.get('metric', 'score')} ({cfg.get('mode', 'max')})" + best_text,
        f"  storage      {store.display_url}",
        f"  checkpoints  {_checkpoint_folder(info.checkpoint_root, name)}",
        f"  source       {info.source or '- (started from Python)'}",
        f"  created      {_when(info.created)}, updated {_when(info.updated)}",
    ]
    if info.error:
        facts.append(f"  error        {_first_line(info.error)}")
    for line in facts:
        out.print(_scrub(line), markup=False, highlight=False, overflow="ignore", crop=False)
    table = Table(title="Population", title_justify="left", header_style="bold")
    for column in (
        "member",
        "step",
        "status",
        "score",
        "hparams",
        "owner",
        "ckpt step",
        "attempts",
    ):
        right = column in ("member", "step", "score", "ckpt step", "attempts")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for row in rows:
        s = row.state
        score = s.get("score")
        table.add_row(
            str(row.id),
            f"{s.get('step', 0)}/{snap.steps}",
            str(s.get("status", "?")),
            format_score(None if score is None else float(score)),
            format_hparams(s.get("hparams") or {}),
            row.owner or "-",
            "-" if row.checkpoint_step is None else str(row.checkpoint_step),
            str(row.attempts),
            style="bold green" if best is not None and row.id == best.id else None,
        )
    out.print(table)
    if not failures:
        out.print("No failures.", markup=False)
        return
    last_of: dict[int, Any] = {}
    count: dict[int, int] = {}
    for f in failures:
        last_of[f.member] = f
        count[f.member] = count.get(f.member, 0) + 1
    failed = {r.id for r in rows if r.state.get("status") == "failed"}
    ftable = Table(title=f"Failures: {len(failures)}", title_justify="left", header_style="bold")
    for column in ("member", "failures", "last step", "attempt", "status", "last error"):
        ftable.add_column(column, overflow="fold")
    for member, f in sorted(last_of.items()):
        ftable.add_row(
            str(member),
            str(count[member]),
            str(f.step),
            str(f.attempt),
            "failed" if member in failed else "retried",
            _scrub(_last_line(f.traceback)),
        )
    out.print(ftable)
    last = failures[-1]
    out.print(
        f"Last failure: member {last.member}, step {last.step}, attempt {last.attempt}, "
        f"at {_when(last.time)}:",
        markup=False,
    )
    out.print(_scrub(last.traceback.rstrip()), markup=False, highlight=False, crop=False)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# -- export ------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from poptune.execution.session import load_result
    from poptune.export import write_csv, write_json

    url: str = args.storage
    name = _check_name(args.run, "")
    with _open_existing(url) as store:
        info = _get_run(store, name)
        result = load_result(store, name)
        display = store.display_url
    run_facts = {
        "status": info.status,
        "source": info.source,
        "checkpoint_root": info.checkpoint_root,
        "storage": display,
        "created": info.created,
        "updated": info.updated,
    }
    summary = (
        f"{len(result.history)} history rows, {len(result.events)} events, "
        f"{len(result.schedule()) if result.members else 0} schedule steps"
    )
    if args.format == "json":
        output = args.output or f"{name}.json"
        if output == "-":
            write_json(result, sys.stdout, run=run_facts, config=info.config)
            return 0
        if os.path.isdir(output):
            output = os.path.join(output, f"{name}.json")
        write_json(result, output, run=run_facts, config=info.config)
        print(f"Wrote {output} ({summary}).")
        return 0
    if args.output == "-":
        raise CLIError("--format csv writes a directory of files; give -o DIR, not -.", USAGE)
    directory = args.output or f"{name}-csv"
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CLIError(f"--output {directory} is a file; --format csv needs a directory.", USAGE)
    paths = write_csv(result, directory)
    print(f"Wrote {', '.join(paths)} ({summary}).")
    return 0


# -- parser and entry point --------------------------------------------------------------------


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        metavar="URL",
        help=f"where runs are kept: sqlite:///FILE.db or postgresql+psycopg://USER@HOST/DB "
        f"(default: {DEFAULT_STORAGE} in the current folder)",
    )


def _add_execution(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes (default 1; more than one means --executor processes)",
    )
    p.add_argument(
        "--executor",
        choices=("serial", "processes"),
        default=None,
        help="train in this process (serial) or in worker processes",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=None,
        metavar="K",
        help="retries of a failing step before its member is replaced (default 2)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds without a heartbeat before a worker is presumed dead (default 30)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="show no live progress, only the final summary",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``poptune`` argument parser."""
    from poptune import __version__

    parser = _Parser(
        prog="poptune",
        description="Population Based Training: run, resume, inspect and export runs.",
    )
    parser.add_argument("--version", action="version", version=f"poptune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="run (or resume) the Experiment defined in a Python file")
    p.add_argument("file", metavar="FILE.py[:NAME]", help="file defining one Experiment")
    _add_storage(p)
    p.add_argument("--name", metavar="RUN", help="run name (default: the file's name)")
    p.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="checkpoint folder or fsspec URL (default: beside a SQLite file)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run of that name even if its configuration changed",
    )
    _add_execution(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a run started with `poptune run`")
    p.add_argument("run", metavar="RUN")
    _add_storage(p)
    _add_execution(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="list runs, or show one run's population and failures")
    p.add_argument("run", metavar="RUN", nargs="?")
    _add_storage(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write a run's history, events and best schedule")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="json: a file, or - for stdout (default RUN.json); csv: a directory (default RUN-csv)",
    )
    _add_storage(p)
    p.set_defaults(func=cmd_export)
    return parser


def _storage_args(argv: Sequence[str]) -> list[str]:
    """Every storage URL in ``argv``, read before parsing so that errors can be scrubbed."""
    # Any argument that looks like a URL: argparse also accepts `--stor URL`, `--storage=URL`.
    return [a.partition("=")[2] if a.startswith("--") else a for a in argv if "://" in a]


def _fail(message: str, code: int) -> int:
    print(_error_line(message), file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``poptune`` command; returns its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    for url in _storage_args(args_list):
        _scrub.add_url(url)
    from poptune.execution.session import ConfigMismatch
    from poptune.execution.source import SourceError
    from poptune.storage.base import StorageError

    handlers: list[tuple[type[BaseException], Callable[[BaseException], str], int]] = [
        (CLIError, str, USAGE),  # code taken from the error
        (ConfigMismatch, str, RUNTIME),
        (StorageError, str, RUNTIME),
        (SourceError, str, RUNTIME),
        (ImportError, str, RUNTIME),
        (ValueError, str, RUNTIME),
        (OSError, lambda e: f"{type(e).__name__}: {e}", RUNTIME),
    ]
    try:
        args = build_parser().parse_args(args_list)
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`poptune export RUN --format json -o - | head`): stop quietly,
        # and keep Python from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return RUNTIME
    except Exception as e:
        for kind, describe, default in handlers:
            if isinstance(e, kind):
                return _fail(describe(e), e.code if isinstance(e, CLIError) else default)
        # A bug, not an expected failure: its traceback helps, once the passwords are gone.
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        print(_scrub(text.rstrip()), file=sys.stderr)
        return _fail(f"unexpected {type(e).__name__}: {e}", RUNTIME)


if __name__ == "__main__":
    sys.exit(main())
