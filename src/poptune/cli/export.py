"""``poptune export``: write a run's history, events and best schedule as CSV or JSON, or a
member's latest state (``--checkpoint``).

The writing itself is `poptune.export`; this is the command around it.

``--checkpoint PATH`` writes the state the member's ``state_dict`` returned. For a
`poptune.torch.TorchTrainable` that is ``{"parts": {ATTRIBUTE: state_dict}, "rng": ...,
"extra": ...}``, one entry of ``parts`` per module, optimizer and scheduler attribute of the
member (``self.model`` is ``["parts"]["model"]``). With ``--weights-only`` only the module
parts are written, their tensors on the CPU, as a file ``torch.load(PATH,
weights_only=True)`` reads: the one module's state_dict itself when the member has one module
(``model.load_state_dict(torch.load(PATH, weights_only=True))``), else a dict of each module's
state_dict by attribute name.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

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
    if args.weights_only and args.checkpoint is None:
        raise CLIError("--weights-only writes a state: add --checkpoint PATH.", USAGE)
    if args.checkpoint is not None:
        return _export_state(result, args.checkpoint, args.member, args.weights_only)
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


def _export_state(result: Result, path: str, member: int | None, weights_only: bool) -> int:
    """Writes a member's latest state (``weights_only``: its modules' weights) to ``path``
    (atomically)."""
    from pickle import UnpicklingError

    from poptune.export import write_state
    from poptune.storage.base import StorageError

    try:
        state = result.load_state(member)
    except (KeyError, ValueError, FileNotFoundError, UnpicklingError, StorageError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    record = result.best if member is None else result.member(member)
    what = "state"
    if weights_only:
        state, modules = _weights(state, record.id)
        what = f"weights ({', '.join(modules)})"
    kind = write_state(state, path)
    print(
        f"Wrote {path}: member {record.id}'s {what} at step {record.step} "
        f"({result.metric} = {record.score}), {kind}."
    )
    return 0


def _weights(state: object, member: int) -> tuple[dict[str, Any], list[str]]:
    """The module parts of a `poptune.torch.TorchTrainable` state on the CPU: the one module's
    state_dict, or a dict of them by attribute name; and the modules' names."""
    from collections import OrderedDict

    torch = sys.modules.get("torch")  # loading a torch state imported it
    parts = state.get("parts") if isinstance(state, dict) else None
    modules: dict[str, dict[str, Any]] = {}
    if torch is not None and isinstance(parts, dict):
        for name, part in parts.items():
            # A module's state_dict maps names to tensors; an optimizer's holds "state" and
            # "param_groups", a scheduler's plain values.
            if (
                isinstance(part, dict)
                and part
                and all(isinstance(v, torch.Tensor) for v in part.values())
            ):
                weights = OrderedDict((k, v.detach().cpu()) for k, v in part.items())
                # Kept: load_state_dict reads the modules' versions from it.
                weights._metadata = getattr(part, "_metadata", None)  # type: ignore[attr-defined]
                modules[name] = weights
    if not modules:
        kind = type(state).__name__
        keys = f" with keys {sorted(map(str, state))[:6]}" if isinstance(state, dict) else ""
        raise CLIError(
            "--weights-only needs a state written by poptune.torch.TorchTrainable (a dict whose "
            f"'parts' hold module state_dicts), but member {member}'s state is a {kind}{keys}. "
            "Export the whole state without --weights-only."
        )
    if len(modules) == 1:
        return next(iter(modules.values())), list(modules)
    return modules, list(modules)
