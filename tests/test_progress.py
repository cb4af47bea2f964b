"""The live view of `poptune run`: latest exploits, member-steps against the budget, and the
best member's schedule, rendered from a stored run."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any

import poptune as pt
from poptune.progress import RunProgress, compact_schedule, describe_event
from poptune.result import Event

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_quadratic.py"


def _toy() -> Any:
    import importlib.util

    name = "poptune_example_toy_quadratic"  # as tests/test_examples.py names it
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_an_exploit_line_names_both_members_the_step_and_what_explore_changed() -> None:
    event = Event(
        index=4,
        member=3,
        step=120,
        donor=7,
        donor_step=120,
        old_hparams={"lr": 0.05, "wd": 0.1},
        new_hparams={"lr": 0.0096, "wd": 0.1},
    )
    donor = {"lr": 0.012, "wd": 0.1}
    assert describe_event(event, donor) == "member 3 <- member 7 at step 120: lr 0.012 -> 0.0096"
    same = Event(5, 3, 120, 7, 124, {"lr": 0.05}, {"lr": 0.012})
    assert describe_event(same, {"lr": 0.012}) == (
        "member 3 <- member 7 at step 120 (member 7's step 124): no change"
    )
    explore = Event(6, 2, 40, 2, 40, {"lr": 0.01}, {"lr": 0.012}, kind="explore")
    assert describe_event(explore, None) == "member 2 explores at step 40: lr 0.01 -> 0.012"


def test_a_compact_schedule_merges_equal_stretches_and_shows_changes() -> None:
    segments = [
        (1, 8, 0, {"h0": 1.0, "h1": 0.0}),
        (9, 12, 1, {"h0": 1.0, "h1": 0.0}),  # copied as is: merged with the stretch before
        (13, 40, 1, {"h0": 0.93, "h1": 0.0}),
        (41, 40, 0, {"h0": 0.5, "h1": 0.5}),  # empty: copied before its first step
        (41, 200, 0, {"h0": 0.93, "h1": 0.12}),
    ]
    assert compact_schedule(segments) == "1-12 h0=1 h1=0 | 13-40 h0=0.93 | 41-200 h1=0.12"
    assert compact_schedule(segments, last=2) == "(1 earlier) 13-40 h0=0.93 h1=0 | 41-200 h1=0.12"
    assert compact_schedule([]) == ""


def test_the_view_of_a_stored_run_shows_budget_exploits_and_best_schedule(tmp_path: Path) -> None:
    from rich.console import Console

    toy = _toy()
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    result = toy.experiment("PBT", 0).run(url, "quad")
    view = RunProgress(url, "quad", recent=3)
    snap = view.poll()
    again = view.poll()  # read incrementally: nothing is counted twice
    assert snap.trained == again.trained == len(result.history) == 400 == snap.budget
    assert snap.exploits == again.exploits == len(result.events)
    # The latest exploits, each from the donor's hyperparameters at the time.
    hparams = {m: dict(h) for m, h in result.initial_hparams.items()}
    lines = []
    for e in result.events:
        assert e.donor is not None
        lines.append(describe_event(e, hparams[e.donor]))
        hparams[e.member] = dict(e.new_hparams)
    assert snap.recent == tuple(lines[-3:])
    pattern = r"member \d <- member \d at step \d+: (h[01] [0-9.]+ -> [0-9.]+(, )?)+|.*no change"
    assert all(re.fullmatch(pattern, line) for line in snap.recent), snap.recent
    best = result.best.id
    assert snap.schedule == f"member {best}: " + compact_schedule(result.schedule_segments())
    buffer = io.StringIO()
    Console(file=buffer, width=400).print(view.render())
    view.close()
    text = buffer.getvalue()
    assert "· 400/400 member-steps ·" in text
    assert f"best schedule {snap.schedule}" in text
    assert "latest exploits\n" in text
    for line in snap.recent:
        assert f"\n  {line}\n" in text
    assert "400/400 member-steps" in view.line()


def test_the_view_while_nothing_was_exploited_has_no_lineage_lines(tmp_path: Path) -> None:
    from rich.console import Console

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    pt.Experiment(
        pt.trainable(lambda hp, seed: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=2,
        steps=3,
        interval=5,
        exploit=None,
        explore=None,
    ).run(url, "flat")
    view = RunProgress(url, "flat")
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(view.render())
    view.close()
    text = buffer.getvalue()
    assert "6/6 member-steps" in text
    assert "latest exploits" not in text
    assert re.search(r"best schedule member \d: 1-3 lr=[0-9.]+\n", text)


# -- feedback before the first ready point, and an honest remaining time -------------------------


def _info(status: str = "running", **execution: Any) -> Any:
    from poptune.storage.base import RunInfo

    config = {"population_size": 4, "steps": 100}
    return RunInfo("r", config, "", status, None, None, 0.0, 0.0, execution=execution)


def _rows(steps: list[int], owner: str | None = None) -> tuple[Any, ...]:
    from poptune.storage.base import MemberRow

    return tuple(
        MemberRow({"id": i, "step": s, "status": "running"}, owner=owner)
        for i, s in enumerate(steps)
    )


def test_no_remaining_time_is_estimated_before_the_first_committed_ready_point() -> None:
    """Until this execution commits something, there is no rate to estimate from."""
    from poptune.progress import Snapshot, estimate_remaining

    waiting = Snapshot(_info(), _rows([0, 0, 0, 0], "w"), taken=400.0, trained=0)
    assert estimate_remaining(waiting, (100.0, 0)) is None
    assert estimate_remaining(waiting, None) is None
    # The first ready point: 4 members x 10 steps in 100 s, 360 member-steps to go.
    first = Snapshot(_info(), _rows([10, 10, 10, 10], "w"), taken=200.0, trained=40)
    assert estimate_remaining(first, (100.0, 0)) == 900.0
    # Once a stretch has passed since the first commit, the rate since that commit: steps
    # still in training when it was seen no longer make the estimate too long.
    later = Snapshot(_info(), _rows([30, 30, 30, 30], "w"), taken=300.0, trained=120)
    assert estimate_remaining(later, (100.0, 0), (200.0, 40)) == 350.0  # 280 left, 80 in 100 s
    early = Snapshot(_info(), _rows([20, 20, 20, 20], "w"), taken=250.0, trained=80)
    assert estimate_remaining(early, (100.0, 0), (200.0, 40)) == 600.0  # too early: 80 in 150 s
    done = Snapshot(_info("completed"), _rows([100] * 4), taken=300.0, trained=400)
    assert estimate_remaining(done, (100.0, 0)) == 0.0


def test_from_the_first_ready_point_the_rate_counts_every_worker_s_batch() -> None:
    """Two workers each hold 2 of 4 members, 10 steps from their ready points, when training
    begins at t=100. At t=200 one worker has committed its 20 member-steps; the other's 20 are
    trained but not committed yet. The work in flight (40) over the time the first batch took
    (100 s) is the rate: the 380 member-steps the rows have still to go take 950 s, not the
    1,900 s that the committed steps alone (20 in 100 s) would say."""
    from dataclasses import replace

    from poptune.progress import Snapshot, estimate_remaining, in_flight

    info = replace(_info(), config={"population_size": 4, "steps": 100, "interval": 10})
    begun = Snapshot(info, _rows([0, 0, 0, 0], "w"), taken=100.0, trained=0)
    assert in_flight(begun) == 40
    first = Snapshot(info, _rows([10, 10, 0, 0], "w"), taken=200.0, trained=20)
    assert estimate_remaining(first, (100.0, 0)) == 1900.0
    assert estimate_remaining(first, (100.0, 0), (200.0, 20), flight=40) == 950.0


def test_after_a_resume_the_rate_counts_only_this_executions_commits() -> None:
    """A resumed run committed 200 member-steps before (and was stopped for a while): the rate
    is what this execution committed since it started, not the run's whole history."""
    from poptune.progress import Snapshot, estimate_remaining

    origin = (1000.0, 200)  # this execution started at t=1000 with 200 member-steps committed
    resumed = Snapshot(_info(), _rows([50] * 4, "w"), taken=1030.0, trained=200)
    assert estimate_remaining(resumed, origin) is None  # its old commits are no rate
    later = Snapshot(_info(), _rows([60] * 4, "w"), taken=1040.0, trained=240)
    # 40 member-steps in 40 s: 160 left take 160 s (the run's whole 240 would say 26.7 s).
    assert estimate_remaining(later, origin) == 160.0


def test_the_view_says_what_happens_before_anything_is_committed() -> None:
    """Before the first ready point the view names its phase and says "estimating", and it
    moves on once a ready point is committed."""
    from poptune.storage.base import MemberRow, ResultRow
    from poptune.storage.memory import InMemoryStorage

    store = InMemoryStorage()
    view = RunProgress(store, "r")
    assert view.activity(view.poll()) == "starting"
    config = {"population_size": 2, "steps": 10}
    rows = [MemberRow({"id": i, "step": 0, "status": "running"}) for i in (0, 1)]
    store.create_run("r", config, "f", members=rows)
    store.update_run("r", status="running", execution={"executor": "processes", "workers": 2})
    assert view.activity(view.poll()) == "starting 2 workers"
    with store.transaction("r") as tx:
        tx.put_members([MemberRow(dict(r.state), owner="w1") for r in rows])
    snap = view.poll()
    assert view.activity(snap) == "training: 2 members claimed, no ready point yet"
    assert view.remaining(snap) is None
    assert "remaining estimating" in view.line(snap)
    assert "estimating" in view.header(snap).plain
    with store.transaction("r") as tx:
        tx.add_results([ResultRow(i, s, 1.0, {"score": 1.0}) for i in (0, 1) for s in (1, 2)])
    snap = view.poll()
    assert view.activity(snap) == "training: 2 members claimed"
    assert "remaining estimating" not in view.line(snap)
    view.close()
    assert store.get_run("r") is not None  # a storage it was given stays open


def test_experiment_run_with_progress_writes_plain_lines_to_the_given_console() -> None:
    """`Experiment.run(progress=console)` on a tiny in-memory run shows its progress as plain
    lines (no terminal control codes), the first at once and the last at the end."""
    from rich.console import Console

    buffer = io.StringIO()
    exp = pt.Experiment(
        pt.trainable(lambda hp, seed: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=3,
        steps=20,
        interval=5,
    )
    result = exp.run(name="tiny", progress=Console(file=buffer, force_terminal=False, width=300))
    lines = buffer.getvalue().splitlines()
    assert len(lines) >= 2
    assert all(re.match(r"\[[0-9.hms]+\] run tiny: ", line) for line in lines), lines
    assert "completed; 100%" in lines[-1]
    assert "60/60 member-steps" in lines[-1]
    assert f"(member {result.best.id})" in lines[-1]
    assert "\x1b[" not in buffer.getvalue()


def test_experiment_run_shows_no_progress_when_stdout_is_not_a_terminal(
    capsys: Any,
) -> None:
    """By default (stdout captured: no terminal, no notebook) nothing is printed; True prints."""
    exp = pt.Experiment(
        pt.trainable(lambda hp, seed: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=2,
        steps=4,
    )
    exp.run()
    assert capsys.readouterr().out == ""
    exp.run(progress=True)
    out = capsys.readouterr().out
    assert "run run: completed; 100%" in out
