"""``poptune delete``: delete a run's records and its checkpoint folder, after asking."""

from __future__ import annotations

import argparse
import sys

from poptune.cli._common import (
    CLIError,
    _check_name,
    _checkpoint_folder,
    _get_run,
    _open_existing,
    _storage_url,
)


def _confirm(question: str) -> bool:
    """Asks on the terminal (or reads stdin); only ``y`` or ``yes`` means yes."""
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()  # "" at end of input: no
    if not sys.stdin.isatty():
        print(file=sys.stderr)  # no terminal echoed the answer's newline
    return answer.strip().lower() in ("y", "yes")


def cmd_delete(args: argparse.Namespace) -> int:
    from poptune.execution.session import RunOptions, owner_alive
    from poptune.storage.admin import delete_run
    from poptune.storage.folders import delete_checkpoint_folder

    url = _storage_url(args)
    name = _check_name(args.run, "")
    with _open_existing(url) as store:
        info = _get_run(store, name)
        members = store.members(name)
        if info.status == "running" and not args.force:
            # Judged as the run's workers judge each other: on the storage's clock, by the
            # heartbeat timeout the run records (workers on other hosts may use a long one).
            now = store.now()
            timeout = float(
                info.execution.get("heartbeat_timeout") or RunOptions().heartbeat_timeout
            )
            for row in members:
                if owner_alive(row.owner, row.heartbeat, timeout, now):
                    ago = (
                        ""
                        if row.heartbeat is None
                        else f", heartbeat {now - row.heartbeat:.0f} s ago"
                    )
                    raise CLIError(
                        f"Run {name!r} is running: member {row.id} is held by {row.owner}{ago}. "
                        "Stop it first, or pass --force (its workers then fail at their next "
                        "commit)."
                    )
        root = info.checkpoint_root
        folder = _checkpoint_folder(root, name) if root else None
        if not args.yes:
            results = len(store.results(name))
            where = f" and its checkpoints in {folder}" if folder else ""
            question = (
                f"Delete run {name} ({info.status}, {len(members)} members, {results} results) "
                f"from {store.display_url}{where}? [y/N] "
            )
            if not _confirm(question):
                print("Nothing deleted.", file=sys.stderr)
                return 1
        delete_run(store, name)
        display = store.display_url
    message = f"Deleted run {name} from {display}."
    if root and folder:
        outcome = delete_checkpoint_folder(root, name, url, info.created)
        message += {
            "deleted": f" Removed its checkpoints in {folder}.",
            "absent": "",
            "remote": f" Its checkpoints in {folder} (not a local folder) were left in place.",
            "foreign": f" Left {folder} in place: it does not carry this run's marker "
            "(.poptune-run), so it may hold another run's files; remove it yourself if not.",
        }[outcome]
    print(message)
    return 0
