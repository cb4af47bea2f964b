"""``poptune status``: the runs in a storage, or one run's population and failures.

A storage without runs, one whose SQLite file does not exist yet included, is listed as such
(exit 0): it is where everyone starts. Members recorded as running in a run that is not
(interrupted, failed) are shown as ``stopped``.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from poptune.cli._common import (
    _check_name,
    _checkpoint_folder,
    _first_line,
    _get_run,
    _missing_storage,
    _open_existing,
    _redact,
    _scrub,
    _stdout,
    _storage_url,
)

if TYPE_CHECKING:
    from poptune.storage.base import Storage


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_status(args: argparse.Namespace) -> int:
    from poptune.storage.base import StorageError

    url = _storage_url(args)
    if args.run is None:
        try:
            empty = _missing_storage(url) or _no_schema(url)
        except StorageError:
            empty = False  # opened again below, to fail as every command does
        if empty:
            _stdout().print(f"No runs in {_redact(url)} yet.", markup=False)
            return 0
    with _open_existing(url) as store:
        if args.run is None:
            _status_all(store)
        else:
            _status_run(store, _check_name(args.run, ""))
    return 0


def _no_schema(url: str) -> bool:
    """Whether the database at ``url`` exists but holds no poptune tables (nothing was ever run
    there); it is not created."""
    import sqlalchemy as sa

    from poptune.cli._common import _check_persistent

    _check_persistent(url)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return "poptune_meta" not in sa.inspect(conn).get_table_names()
    except sa.exc.SQLAlchemyError:
        return False  # opened again by the caller, to fail as every command does
    finally:
        engine.dispose()


def _status_all(store: Storage) -> None:
    from rich.table import Table

    from poptune.progress import Snapshot, best_member, format_score

    out = _stdout()
    runs = store.list_runs()
    if not runs:
        out.print(f"No runs in {store.display_url} yet.", markup=False)
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
    from poptune.report.data import member_status

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
    replay = cfg.get("replay")
    if isinstance(replay, dict):  # recorded by `poptune replay` (poptune.replay)
        facts.insert(
            -1,
            f"  replay of    run {replay.get('run')}, member {replay.get('member')} (seed "
            f"{replay.get('seed')}, root ancestor member {replay.get('root')})",
        )
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
            member_status(str(s.get("status", "?")), info.status),
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
            "failed" if member in failed else "damaged file" if _damaged(f) else "retried",
            _scrub(_last_line(f.traceback)),
        )
    out.print(ftable)
    damaged = [f for f in failures if _damaged(f)]
    if damaged:
        out.print(
            "Damaged checkpoints (never used again; the members on them went back to an "
            "earlier one; no member's fault):",
            markup=False,
        )
        for f in damaged:  # whole lines: a location is copied from here
            out.print(f"  {f.traceback.strip()}", markup=False, highlight=False, soft_wrap=True)
    last = failures[-1]
    out.print(
        f"Last failure: member {last.member}, step {last.step}, attempt {last.attempt}, "
        f"at {_when(last.time)}:",
        markup=False,
    )
    out.print(_scrub(last.traceback.rstrip()), markup=False, highlight=False, crop=False)


def _damaged(failure: Any) -> bool:
    """Whether a failure record is a damaged or missing checkpoint (`Lifecycle.record_damaged`)."""
    return bool(failure.traceback.startswith("Damaged checkpoint:"))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
