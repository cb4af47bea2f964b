"""A PBT run beside its random-search baseline: `Experiment.baseline`, ``poptune run
--baseline random``, ``poptune compare`` and ``poptune report --compare``."""

from __future__ import annotations

import math
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_cli import assert_one_line_error, poptune, tiny
from test_report import network_loads

import poptune as pt
from poptune.progress import format_score
from poptune.report.compare import best_so_far
from poptune.result import HistoryRecord, MemberRecord, Result


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A folder where ``poptune run exp.py --baseline random`` trained runs exp and exp-random."""
    folder = tmp_path_factory.mktemp("pair")
    tiny(folder / "exp.py", steps=10, population=4)
    return folder, poptune("run", "exp.py", "--baseline", "random", "--no-progress", cwd=folder)


def url_of(folder: Path) -> str:
    return f"sqlite:///{folder / 'poptune.db'}"


def row(text: str, label: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip("│┃ ").startswith(label)]
    assert len(lines) == 1, text
    return lines[0]


def test_baseline_is_the_same_experiment_without_exploit_or_explore() -> None:
    """Same population, steps, seed and initial hyperparameters; no exploit, no explore."""
    exp = pt.Experiment(
        pt.trainable(lambda hp, s: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=3,
        steps=10,
        interval=5,
        seed=7,
    )
    base = exp.baseline()
    assert (base.exploit, base.explore) == (None, None)
    assert (base.population_size, base.steps, base.interval, base.seed) == (3, 10, 5, 7)
    assert base.describe()["initial_population"] == exp.describe()["initial_population"]
    result = base.run()
    assert result.events == []
    assert {m.id: dict(m.hparams) for m in result.members} == {
        k: dict(v) for k, v in result.initial_hparams.items()
    }
    with pytest.raises(ValueError, match="`kind` must be 'random'"):
        exp.baseline("grid")


def test_run_with_baseline_trains_both_runs_at_equal_compute(pair: Any) -> None:
    """The PBT run, then its baseline as RUN-random: the same initial population and budget,
    every baseline member on its initial hyperparameters; the end says how to compare."""
    folder, proc = pair
    assert proc.returncode == 0, proc.stderr
    pbt, base = pt.load(url_of(folder), "exp"), pt.load(url_of(folder), "exp-random")
    assert any(e.kind == "exploit" for e in pbt.events)
    assert base.events == []
    assert base.initial_hparams == pbt.initial_hparams
    assert len(base.history) == len(pbt.history) == 40
    for m in base.members:
        assert dict(m.hparams) == dict(base.initial_hparams[m.id])
    assert "poptune compare exp exp-random" in proc.stdout
    # The baseline's source builds the baseline again: resuming it finds it as it was.
    resumed = poptune("resume", "exp-random", "--no-progress", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    assert "already completed" in resumed.stdout


def test_compare_prints_both_runs_and_their_final_scores(pair: Any) -> None:
    """The table names both runs and gives each one's best and median final score."""
    folder, _ = pair
    proc = poptune("compare", "exp", "exp-random", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    results = [pt.load(url_of(folder), n) for n in ("exp", "exp-random")]
    header = [ln for ln in proc.stdout.splitlines() if "┃" in ln and "exp-random" in ln]
    assert len(header) == 1 and re.search(r"┃ exp +┃ exp-random +┃", header[0]), proc.stdout
    best = row(proc.stdout, "best final score")
    for r in results:
        assert f"{format_score(r.best.score)} (member {r.best.id})" in best
    median = row(proc.stdout, "median final score")
    for r in results:
        scores = [m.score for m in r.members if m.score is not None]
        assert len(scores) == 4
        assert format_score(statistics.median(scores)) in median
    winner = max(results, key=lambda r: r.best.score or -math.inf)
    assert f"{winner.name} reached the better best final score" in proc.stdout


def test_compare_output_holds_both_runs_curves(pair: Any) -> None:
    """--output writes one self-contained page with each run's best-so-far line and a panel of
    its members' curves."""
    folder, _ = pair
    proc = poptune("compare", "exp", "exp-random", "--output", "out/cmp.html", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    html = (folder / "out" / "cmp.html").read_text()
    assert network_loads(html) == []
    assert 'data-figure="compare-best"' in html and 'data-figure="compare-members"' in html
    for i, name in enumerate(("exp", "exp-random")):
        best = re.search(rf'<g id="best-{i}" data-run="{name}">(.*?)</g>', html)
        assert best is not None and "<polyline" in best.group(1)
        members = re.search(rf'<g id="members-{i}" data-run="{name}">(.*?)</g>', html)
        assert members is not None
        curves = re.findall(r"<title>[^<]*member (\d+):", members.group(1))
        assert set(curves) == {"0", "1", "2", "3"}


def test_report_with_compare_adds_the_comparison_section(pair: Any) -> None:
    folder, _ = pair
    proc = poptune("report", "exp", "--compare", "exp-random", "--no-png", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    html = (folder / "exp-report" / "report.html").read_text()
    assert 'data-figure="curves"' in html  # the run's own report
    assert '<section id="comparison">' in html
    assert 'data-run="exp-random"' in html and 'id="comparison-table"' in html


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["compare", "exp", "nope"], id="compare"),
        pytest.param(["compare", "nope", "exp"], id="compare-first"),
        pytest.param(["report", "exp", "--compare", "nope", "--no-png"], id="report"),
    ],
)
def test_a_missing_run_is_one_line_listing_the_runs(pair: Any, args: list[str]) -> None:
    folder, _ = pair
    line = assert_one_line_error(poptune(*args, cwd=folder))
    assert "No run named 'nope' in sqlite:///poptune.db. Runs there: exp, exp-random." in line


def test_best_so_far_never_gets_worse() -> None:
    """The best score any member reached at a step or before, in either mode."""

    def result(mode: str) -> Result:
        scores = [(0, 1, 3.0), (1, 1, 1.0), (0, 2, 2.0), (1, 2, math.nan), (1, 3, 5.0)]
        return Result(
            name="r",
            mode=mode,
            metric="score",
            initial_hparams={0: {}, 1: {}},
            members=[MemberRecord(0, {}, 2, 2.0, "finished"), MemberRecord(1, {}, 3, 5.0, "x")],
            history=[HistoryRecord(m, s, {"score": v}, v) for m, s, v in scores],
            events=[],
        )

    assert best_so_far(result("max")) == ((1, 3.0), (2, 3.0), (3, 5.0))
    assert best_so_far(result("min")) == ((1, 1.0), (2, 1.0), (3, 1.0))
