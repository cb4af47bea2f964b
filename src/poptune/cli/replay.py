"""``poptune replay``: train one fresh member along a run's schedule, beside the original."""

from __future__ import annotations

import argparse
import time

from poptune.cli._common import (
    CLIError,
    _check_name,
    _get_run,
    _open_existing,
    _redact,
    _scrub,
    _stdout,
    _storage_flag,
    _storage_url,
)


def cmd_replay(args: argparse.Namespace) -> int:
    from poptune.execution.session import load_result
    from poptune.execution.source import load_experiment
    from poptune.progress import format_duration, format_hparams, format_score
    from poptune.replay import replay, replay_name

    url = _storage_url(args)
    name = _check_name(args.run, "")
    with _open_existing(url) as store:
        info = _get_run(store, name)
        result = load_result(store, name, storage_ref=url)
    if not info.source:
        raise CLIError(
            f"Run {name!r} was not started with `poptune run`, so its experiment cannot be "
            "loaded again; replay it from Python: result.replay(experiment=...)."
        )
    if not result.history:
        raise CLIError(f"Run {name!r} has no history yet: nothing to replay.")
    member = result.best.id if args.member is None else args.member
    target = args.name or replay_name(name, member)
    _check_name(target, "Choose another with --name.")
    experiment, _ = load_experiment(info.source)
    started = time.monotonic()
    done = replay(
        result,
        member,
        experiment=experiment,
        name=target,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )
    seconds = time.monotonic() - started
    schedule = done.result.schedule()
    seed_note = (
        f"the seed of member {done.root}, its root ancestor"
        if args.seed is None
        else f"seed {done.seed}"
    )
    flag = _storage_flag(url)
    metric = f"{done.metric} ({done.mode})"
    width = max(len(name), len(done.name))
    lines = [
        f"Replayed member {done.member} of run {name} from scratch in "
        f"{format_duration(seconds)}: {done.steps} steps, {done.changes} changes of "
        f"hyperparameters, {seed_note}.",
        f"  original  {name:<{width}}  member {done.member}: {metric} = "
        f"{format_score(done.original)} at step {done.steps}",
        f"  replayed  {done.name:<{width}}  member {done.member}: {metric} = "
        f"{format_score(done.score)} at step {done.steps}  (difference {done.difference:+.3g})",
        f"  final     {format_hparams(schedule[-1].hparams) if schedule else '-'}",
        f"  storage   {_redact(url)}  (run {done.name})",
        f"See it:     poptune status {done.name}{flag}",
        f"            poptune export {done.name} --format csv{flag}",
    ]
    out = _stdout()
    for line in lines:
        out.print(_scrub(line), markup=False, highlight=False, overflow="ignore", crop=False)
    return 0
