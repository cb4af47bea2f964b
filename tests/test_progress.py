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
