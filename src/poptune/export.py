"""A run's `Result` as plain rows and JSON: history, lineage events and the best schedule.

The functions here are what ``poptune export`` writes, usable from Python too::

    import poptune as pt
    from poptune.export import write_csv, write_json

    result = pt.load("sqlite:///poptune.db", "toy_quadratic")
    write_json(result, "toy.json")     # one JSON document
    write_csv(result, "toy-csv")       # history.csv, events.csv, schedule.csv

Non-finite numbers (NaN, infinities) become ``null`` in JSON, so the output is valid JSON for
every parser; CSV cells keep Python's spelling (``nan``, ``inf``), which pandas reads back.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import IO, Any

from poptune.result import Result

__all__ = [
    "event_rows",
    "history_rows",
    "jsonable",
    "result_to_json",
    "schedule_rows",
    "write_csv",
    "write_json",
    "write_state",
]

Table = tuple[list[str], list[list[Any]]]


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, tuples by lists, keys by strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _hparam_names(result: Result) -> list[str]:
    names: set[str] = set()
    for hp in result.initial_hparams.values():
        names.update(hp)
    for m in result.members:
        names.update(m.hparams)
    for ev in result.events:
        names.update(ev.old_hparams)
        names.update(ev.new_hparams)
    return sorted(names)


def history_rows(result: Result) -> Table:
    """Header and rows: ``member, step, segment, score``, one column per metric key (sorted),
    then one ``hp.NAME`` column per hyperparameter: the values in force at that step.

    Rows are in the order the steps were trained; a metric a step did not report is None.
    ``segment`` is the index of the lineage event that began the stretch of the member's life
    the step belongs to (empty for its initial stretch), so a plot can draw each stretch.
    """
    keys = sorted({k for r in result.history for k in r.metrics})
    names = _hparam_names(result)
    rows = []
    for r in result.history:
        hp = result.hparams_at(r)
        rows.append(
            [
                r.member,
                r.step,
                r.segment,
                r.score,
                *(r.metrics.get(k) for k in keys),
                *(hp.get(n) for n in names),
            ]
        )
    return ["member", "step", "segment", "score", *keys, *(f"hp.{n}" for n in names)], rows


def event_rows(result: Result) -> Table:
    """Header and rows, one per lineage event.

    Columns: ``index, kind, member, step, donor, donor_step, operations`` (a JSON object),
    then ``old_<name>`` and ``new_<name>`` for each hyperparameter.
    """
    names = _hparam_names(result)
    header = ["index", "kind", "member", "step", "donor", "donor_step", "operations"]
    header += [f"old_{n}" for n in names] + [f"new_{n}" for n in names]
    rows = [
        [
            ev.index,
            ev.kind,
            ev.member,
            ev.step,
            ev.donor,
            ev.donor_step,
            json.dumps(jsonable(ev.operations), sort_keys=True),
            *(ev.old_hparams.get(n) for n in names),
            *(ev.new_hparams.get(n) for n in names),
        ]
        for ev in result.events
    ]
    return header, rows


def schedule_rows(result: Result, member: int | None = None) -> Table:
    """Header and rows of `Result.schedule`: ``step, member``, then one column per hparam.

    Args:
        result: The run.
        member: Whose schedule; the best member's when None.
    """
    names = _hparam_names(result)
    if member is None and not result.members:
        return ["step", "member", *names], []
    rows = [[s.step, s.member, *(s.hparams.get(n) for n in names)] for s in result.schedule(member)]
    return ["step", "member", *names], rows


def result_to_json(
    result: Result,
    *,
    run: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole run as JSON-ready data (NaN and infinities as None).

    Keys: ``run`` (name, mode, metric, plus the fields of ``run``), ``config``, ``members``,
    ``history``, ``events``, ``best`` (the best member's record, None without members) and
    ``schedule`` (the best member's: ``{"step", "member", "hparams"}`` per step).

    Args:
        result: The run.
        run: Extra facts about the run to include (status, source, times...).
        config: The run's stored configuration, if known.
    """
    best = result.best if result.members else None
    data: dict[str, Any] = {
        "run": {"name": result.name, "mode": result.mode, "metric": result.metric, **(run or {})},
        "config": dict(config) if config is not None else None,
        "members": [asdict(m) for m in result.members],
        "history": [
            {
                "member": r.member,
                "step": r.step,
                "segment": r.segment,
                "score": r.score,
                "metrics": dict(r.metrics),
                "hparams": dict(result.hparams_at(r)),
            }
            for r in result.history
        ],
        "events": [ev.to_dict() for ev in result.events],
        "best": asdict(best) if best is not None else None,
        "schedule": [
            {"step": s.step, "member": s.member, "hparams": dict(s.hparams)}
            for s in (result.schedule(best.id) if best is not None else [])
        ],
    }
    out: dict[str, Any] = jsonable(data)
    return out


def write_json(
    result: Result,
    target: str | os.PathLike[str] | IO[str],
    *,
    run: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Writes `result_to_json` to a path or an open text file, as strict (valid) JSON."""
    data = result_to_json(result, run=run, config=config)
    if isinstance(target, (str, os.PathLike)):
        with open(target, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
    else:
        json.dump(data, target, indent=1, allow_nan=False)
        target.write("\n")


def _write_table(path: str, table: Table) -> None:
    header, rows = table
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def write_csv(result: Result, directory: str | os.PathLike[str]) -> list[str]:
    """Writes ``history.csv``, ``events.csv`` and ``schedule.csv`` (best member) into a directory.

    The directory is created if needed; existing files of those names are replaced.

    Returns:
        The paths written.
    """
    os.makedirs(directory, exist_ok=True)
    tables: Sequence[tuple[str, Table]] = [
        ("history.csv", history_rows(result)),
        ("events.csv", event_rows(result)),
        ("schedule.csv", schedule_rows(result)),
    ]
    paths = []
    for filename, table in tables:
        path = os.path.join(os.fspath(directory), filename)
        _write_table(path, table)
        paths.append(path)
    return paths


def write_state(state: object, path: str | os.PathLike[str]) -> str:
    """Writes a member's state to a file, atomically: with ``torch.save`` when it holds torch
    objects (load it with ``torch.load``), else with pickle. Returns which."""
    import pickle
    import sys
    import tempfile

    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".poptune-state-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch = sys.modules.get("torch")
            if torch is not None and _holds_tensors(state, torch.Tensor):
                torch.save(state, f)
                kind = "torch.save"
            else:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
                kind = "pickle"
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return kind


def _holds_tensors(value: object, tensor: type) -> bool:
    if isinstance(value, tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(v, tensor) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v, tensor) for v in value)
    return False
