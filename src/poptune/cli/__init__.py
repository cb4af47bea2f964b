"""The ``poptune`` command: run, resume, inspect and export runs kept in a storage.

::

    poptune run examples/toy_quadratic.py            # trains, shows progress, prints the best
    poptune run examples/toy_quadratic.py --baseline random  # and random search beside it
    poptune compare toy_quadratic toy_quadratic-random  # two runs side by side
    poptune status                                   # every run in ./poptune.db
    poptune status toy_quadratic                     # one run's population and failures
    poptune export toy_quadratic --format csv        # history, events, best schedule
    poptune report toy_quadratic                     # HTML report and PNG figures
    poptune dashboard                                # live views of every run, in a browser
    poptune resume toy_quadratic                     # continues an interrupted run
    poptune replay toy_quadratic                     # the best schedule, trained from scratch
    poptune worker toy_quadratic --storage postgresql://...  # trains it from another machine
    poptune delete toy_quadratic                     # its rows and checkpoint folder, once asked

Every command's ``--storage`` defaults to ``$POPTUNE_STORAGE``, else ``sqlite:///poptune.db``.
Expected failures (a storage that is down, read-only or full among them) print one line,
``poptune: error: ...``, and exit with 2 (bad usage) or 1 (anything else); ``POPTUNE_DEBUG=1``
prints their traceback too. Passwords in storage URLs never appear in the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from poptune.cli._common import (
    DEFAULT_STORAGE,
    INTERRUPTED,
    RUNTIME,
    STORAGE_ENV,
    USAGE,
    CLIError,
    _error_line,
    _positive_int,
    _scrub,
    _storage_failed,
    _storage_failure,
    _storage_url,
)
from poptune.cli.compare import cmd_compare
from poptune.cli.dashboard import cmd_dashboard
from poptune.cli.delete import cmd_delete
from poptune.cli.export import cmd_export
from poptune.cli.replay import cmd_replay
from poptune.cli.report import cmd_report
from poptune.cli.run import cmd_resume, cmd_run
from poptune.cli.status import cmd_status
from poptune.cli.worker import cmd_worker

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see `{self.prog} --help`)", USAGE)


class _IntermixedParser(_Parser):
    """Takes positionals among the options: ``poptune worker RUN --storage URL FILE.py``
    (plain argparse leaves an optional positional after an option unparsed)."""

    _inside = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inside:  # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="where runs are kept: sqlite:///FILE.db or a path ending in .db/.sqlite/.sqlite3, "
        f"or postgresql://USER@HOST/DB (default: ${STORAGE_ENV} if set, else "
        f"{DEFAULT_STORAGE} in the current folder)",
    )


def _add_max_retries(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-retries",
        type=int,
        default=None,
        metavar="K",
        help="retries of a failing step before its member is replaced (default 2)",
    )


def _add_execution(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="worker processes (default: as the run was last executed, else 1; more than one "
        "means --executor processes)",
    )
    p.add_argument(
        "--executor",
        choices=("serial", "processes", "ray"),
        default=None,
        help="train in this process (serial), in worker processes, or in Ray actors (ray: "
        "needs pip install 'poptune[ray]')",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="--executor ray: the Ray cluster to connect to (auto, HOST:PORT, ray://HOST:PORT; "
        "default: as the run was last executed, else a local Ray instance)",
    )
    p.add_argument(
        "--resources",
        default=None,
        metavar="LIST",
        help="--executor ray: what each actor asks Ray for, comma-separated (cpu=1,gpu=0.5; a "
        "GPU fraction lets members share a GPU; default: as last executed, else cpu=1)",
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="devices the workers train on, comma-separated (cuda:0,cuda:1 or cpu); worker i "
        "gets device i modulo their number (default: as the run was last executed, else every "
        "visible GPU, one worker each, when the members use torch)",
    )
    _add_max_retries(p)
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds without a heartbeat before a worker is presumed dead (default: the "
        "run's, when it has one; else 30)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="show no live progress, only the final summary",
    )
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="write each member's metrics and hyperparameters, and the best member's "
        "ancestry, as TensorBoard scalars in DIR/RUN (needs poptune[tensorboard])",
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
        help="checkpoint folder or fsspec URL (default: FILE-checkpoints/ beside a SQLite "
        "FILE.db, else ./poptune-checkpoints/HASH/ for the storage)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run of that name even if its configuration changed",
    )
    p.add_argument(
        "--baseline",
        choices=("random",),
        default=None,
        help="after the PBT run completes, run the same experiment as random search at equal "
        "compute (no exploit, no explore: every member keeps its initial hyperparameters; "
        "same population, steps and seed) as run RUN-random, with the same storage and "
        "execution options, then print both side by side (poptune compare); a run that "
        "exists already is resumed, or left as it is once completed",
    )
    p.add_argument(
        "--baseline-name",
        default=None,
        metavar="NAME",
        help="the baseline's run name (default: RUN-random)",
    )
    _add_execution(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a run started with `poptune run`")
    p.add_argument("run", metavar="RUN")
    _add_storage(p)
    _add_execution(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "worker",
        help="claim and train members of a stored run, from this or any other machine",
        description="Joins a run kept in a storage (PostgreSQL for several machines) and trains "
        "its members until the run is completed, then exits 0. The run's checkpoint folder "
        "must be reachable here at the same path (or be an fsspec URL). SIGINT or SIGTERM "
        "stop it after the current step and release its member (exit 130).",
    )
    p.__class__ = _IntermixedParser  # add_parser takes no parser class of its own
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "file",
        metavar="FILE.py[:NAME]",
        nargs="?",
        help="the file defining the run's experiment on this machine (default: the file the "
        "run was started from); its configuration must be the run's",
    )
    _add_storage(p)
    p.add_argument(
        "--device", default=None, metavar="DEVICE", help="the device members train on (cuda:1)"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="math-library threads of this worker (default: OMP_NUM_THREADS, else the cores "
        "divided among this worker and the processes of this machine training the run)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="S",
        help="only for a run started without one: seconds without a heartbeat before a worker "
        "is presumed dead (default: the run's, else 30)",
    )
    _add_max_retries(p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only the summary, not every stretch"
    )
    p.set_defaults(func=cmd_worker)

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
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="write the best member's latest state (its weights) to PATH instead: torch.save "
        "for a torch state (load it with torch.load), else pickle. A "
        "poptune.torch.TorchTrainable's state is {'parts': {ATTRIBUTE: state_dict} for each "
        "module, optimizer and scheduler attribute, 'rng': ..., 'extra': ...}: "
        "model.load_state_dict(torch.load(PATH)['parts']['model'])",
    )
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="with --checkpoint, for a poptune.torch.TorchTrainable: write only the model "
        "weights, as a plain state_dict on the CPU (torch.load(PATH, weights_only=True) "
        "reads it; model.load_state_dict takes it); with several module attributes, a dict "
        "of their state_dicts by attribute name",
    )
    p.add_argument(
        "--member", type=int, default=None, metavar="ID", help="with --checkpoint: this member"
    )
    _add_storage(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "replay",
        help="train one fresh member from scratch along a member's schedule, recorded as a run",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--member",
        type=int,
        default=None,
        metavar="ID",
        help="the member whose schedule to replay (default: the best member)",
    )
    p.add_argument("--name", metavar="NAME", help="the replay's run name (default: RUN-replay-mID)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="the replayed member's seed (default: that of the schedule's root ancestor, "
        "as in the run)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="where to train it (cpu, cuda:0; default: the member's own default)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="math-library threads it trains with (default: OMP_NUM_THREADS, else the share of "
        "the cores each of the run's workers had)",
    )
    _add_storage(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "report",
        help="write a run's report: one self-contained HTML file and PNG figures",
        description="Writes DIR/report.html (works offline: nothing is fetched) and "
        "curves.png, lineage.png, schedule.png, hparams.png (matplotlib: pip install "
        "'poptune[plot]') into --out, created if needed. Files of those names are replaced; "
        "nothing else in the folder is touched. Works on finished, running and crashed runs.",
    )
    p.add_argument("run", metavar="RUN")
    _add_storage(p)
    p.add_argument(
        "--out", metavar="DIR", default=None, help="folder to write (default RUN-report)"
    )
    p.add_argument("--no-png", action="store_true", help="write only the HTML file")
    p.add_argument(
        "--compare",
        metavar="OTHER",
        default=None,
        help="add a section comparing the run with run OTHER of the same storage (as "
        "poptune compare RUN OTHER: table and both runs' curves)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare",
        help="two runs side by side: a table on the terminal, both runs' curves in HTML",
        description="Prints a table of two runs (status, members, steps, best, median and "
        "worst final score of their members, the best member's hyperparameters, wall time, "
        "exploits) and which reached the better best score. --output also writes their "
        "curves side by side (best score so far and every member's score, against step) in "
        "one self-contained HTML file. Made for a run and its baseline from `poptune run "
        "FILE --baseline random`.",
    )
    p.add_argument("first", metavar="RUN_A")
    p.add_argument("second", metavar="RUN_B")
    _add_storage(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE.html",
        default=None,
        help="also write the comparison with both runs' curves to this HTML file",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "dashboard",
        help="serve live views of every run in a storage, in a browser",
        description="Serves the report's views for every run in the storage, refreshed while "
        "runs progress (pip install 'poptune[dashboard]'). Binds 127.0.0.1 unless --host says "
        "otherwise: anyone who can reach the port can read the runs. Answers only requests "
        "naming 127.0.0.1, localhost, [::1] or the --host (any name for 0.0.0.0).",
    )
    _add_storage(p)
    p.add_argument(
        "--port",
        type=int,
        default=8050,
        metavar="P",
        help="TCP port (default 8050; 0 picks a free one)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="H",
        help="address to bind (default 127.0.0.1, this machine only)",
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between the pages' checks for new results (default 2)",
    )
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser(
        "delete", help="delete a run: its records and its checkpoint folder (asks first)"
    )
    p.add_argument("run", metavar="RUN")
    _add_storage(p)
    p.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    p.add_argument(
        "--force",
        action="store_true",
        help="delete even while a live worker trains the run (its workers then fail)",
    )
    p.set_defaults(func=cmd_delete)
    return parser


def _storage_args(argv: Sequence[str]) -> list[str]:
    """Every storage URL in ``argv``, read before parsing so that errors can be scrubbed."""
    # Any argument that looks like a URL: argparse also accepts `--stor URL`, `--storage=URL`.
    return [a.partition("=")[2] if a.startswith("--") else a for a in argv if "://" in a]


#: Set (to anything but 0) to see the traceback of an expected failure too.
DEBUG_ENV = "POPTUNE_DEBUG"


def _fail(message: str, code: int, error: BaseException | None = None) -> int:
    if error is not None and os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
        print(_scrub(_traceback(error)), file=sys.stderr)
    print(_error_line(message), file=sys.stderr)
    return code


def _traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()


def _storage_of(args: argparse.Namespace | None) -> str | None:
    """The command's storage URL, if it has one that can be told."""
    if args is None or not hasattr(args, "storage"):
        return None
    try:
        return _storage_url(args)
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``poptune`` command; returns its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    for url in [*_storage_args(args_list), os.environ.get(STORAGE_ENV, "")]:
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
    args: argparse.Namespace | None = None
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
                return _fail(describe(e), e.code if isinstance(e, CLIError) else default, e)
        reason = _storage_failure(e)
        if reason is not None:  # the database, not poptune: no traceback unless asked
            return _fail(_storage_failed(_storage_of(args), reason), RUNTIME, e)
        # A bug, not an expected failure: its traceback helps, once the passwords are gone.
        print(_scrub(_traceback(e)), file=sys.stderr)
        return _fail(f"unexpected {type(e).__name__}: {e}", RUNTIME)
