"""``poptune export``: write a run's history, events and best schedule as CSV or JSON.

The writing itself is `poptune.export`; this is the command around it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from poptune.cli._common import (
    USAGE,
    CLIError,
    _check_name,
    _get_run,
    _open_existing,
    _storage_url,
)

if TYPE_CHECKING:
    from poptune.result import Result


def cmd_export(args: argparse.Namespace) -> int:
    from poptune.execution.session import load_result
    from poptune.export import write_csv, write_json

    url = _storage_url(args)
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
    if args.checkpoint is not None:
        return _export_state(result, args.checkpoint, args.member)
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


def _export_state(result: Result, path: str, member: int | None) -> int:
    """Writes a member's latest state to ``path`` (atomically)."""
    from pickle import UnpicklingError

    from poptune.export import write_state
    from poptune.storage.base import StorageError

    try:
        state = result.load_state(member)
    except (KeyError, ValueError, FileNotFoundError, UnpicklingError, StorageError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    record = result.best if member is None else result.member(member)
    kind = write_state(state, path)
    print(
        f"Wrote {path}: member {record.id}'s state at step {record.step} "
        f"({result.metric} = {record.score}), {kind}."
    )
    return 0
