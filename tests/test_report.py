"""`poptune report` and its views (`poptune.report`): read from storage alone, for a finished,
a running and a crashed run; self-contained HTML; PNG figures; the command's errors."""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import poptune as pt
from poptune.cli import main
from poptune.report import svg
from poptune.report.data import MAX_POINTS, Report, build_report, read_report
from poptune.report.html import report_html
from poptune.result import Event, HistoryRecord, MemberRecord, Result
from poptune.storage import open_storage


def _init(hp: dict[str, Any], seed: int) -> float:
    return 0.0


def _step(x: float, hp: dict[str, Any]) -> tuple[float, float]:
    x = x + hp["lr"]
    return x, x


def experiment(**changes: Any) -> pt.Experiment:
    base = pt.Experiment(
        pt.trainable(_init, _step),
        {"lr": pt.Float(0.01, 1.0, log=True), "kind": pt.Choice(["a", "b"])},
        population_size=4,
        steps=20,
        interval=5,
        seed=0,
    )
    return base.replace(**changes) if changes else base


def network_loads(html: str) -> list[str]:
    """Everything the page would fetch from the network: src/href/url()/@import of http(s)."""
    remote = r"""["']?\s*(?:https?:)?//"""
    pattern = rf"(?:src|href|action)\s*=\s*{remote}|url\(\s*{remote}|@import"
    return re.findall(pattern, html, flags=re.IGNORECASE)


def marks(html: str, figure: str) -> int:
    found = re.search(rf'data-figure="{figure}" data-marks="(\d+)"', html)
    assert found is not None, f"figure {figure} missing"
    return int(found.group(1))


@pytest.fixture
def finished(tmp_path: Path) -> tuple[str, Report]:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    experiment().run(url, "done")
    with open_storage(url) as store:
        return url, read_report(store, "done")


def test_finished_run_report_shows_every_step_exploit_and_the_best_schedule(
    finished: tuple[str, Report],
) -> None:
    url, report = finished
    result = pt.load(url, "done")
    s = report.summary
    assert (s.status, s.population, s.steps, s.budget) == ("completed", 4, 20, 80)
    assert s.member_steps == len(result.history) == 80
    assert s.exploits == sum(ev.kind == "exploit" for ev in result.events) > 0
    assert (s.best_member, s.best_score) == (result.best.id, result.best.score)
    # Every trained step is in exactly one stretch.
    assert sum(len(st.steps) for st in report.stretches) == len(result.history)
    # A copy's stretch starts at the donor's point at the donor step: the jump.
    scores = {(r.member, r.step): r.score for r in result.history}
    copies = [st for st in report.stretches if st.kind == "exploit"]
    assert copies
    for st in copies:
        assert st.origin is not None and st.donor is not None
        ev = result.events[st.segment or 0]
        assert st.origin[0] == ev.donor_step == st.steps[0] - 1
        assert st.origin[1] == scores[(st.donor, ev.donor_step)]
    # The ancestry covers steps 1..final step exactly as Result.schedule says.
    schedule = result.schedule()
    covered = [
        (step, run.member, dict(run.hparams))
        for run in report.ancestry
        for step in range(run.start + 1, run.end + 1)
    ]
    assert covered == [(x.step, x.member, dict(x.hparams)) for x in schedule]
    assert {h.name: h.log for h in report.hparams} == {"lr": True, "kind": False}
    assert [m.id for m in report.members] == [0, 1, 2, 3]
    assert sorted(m.rank for m in report.members if m.rank is not None) == [1, 2, 3, 4]


def test_html_report_is_self_contained_and_draws_every_figure(
    finished: tuple[str, Report],
) -> None:
    _, report = finished
    html = report_html(report, source="sqlite:///x.db")
    assert network_loads(html) == []
    assert "<script" not in html  # the file is static; hover text is SVG <title>
    for figure in ("curves", "lineage", "schedule", "hparams"):
        assert marks(html, figure) > 0
    assert 'id="population"' in html and "Run done" in html
    assert "(log)" in html  # the log-scale lr's axes say so


def test_a_member_that_goes_back_in_steps_draws_a_branch_not_a_zigzag() -> None:
    # Member 1 trains to step 6, then copies member 0 at step 3 and trains steps 4..6 again.
    history = [HistoryRecord(0, s, {}, float(s)) for s in range(1, 7)]
    history += [HistoryRecord(1, s, {}, float(s) / 2) for s in range(1, 7)]
    history += [HistoryRecord(1, s, {}, 10.0 + s, segment=0) for s in range(4, 7)]
    event = Event(
        0, member=1, step=6, donor=0, donor_step=3, old_hparams={"x": 1}, new_hparams={"x": 2}
    )
    result = Result(
        name="r",
        mode="max",
        metric="score",
        initial_hparams={0: {"x": 1}, 1: {"x": 1}},
        members=[
            MemberRecord(0, {"x": 1}, 6, 6.0, "finished"),
            MemberRecord(1, {"x": 2}, 6, 16.0, "finished"),
        ],
        history=history,
        events=[event],
    )
    report = build_report(result)
    branch = [st for st in report.stretches if st.member == 1 and st.segment == 0]
    assert len(branch) == 1
    (st,) = branch
    assert st.branch and st.origin == (3, 3.0) and st.steps == (4, 5, 6)
    # Each stretch is drawn on its own: no stretch's steps ever decrease.
    for stretch in report.stretches:
        assert list(stretch.steps) == sorted(stretch.steps)
    assert [(r.member, r.start, r.end) for r in report.ancestry] == [(0, 0, 3), (1, 3, 6)]


def test_a_copy_of_a_donor_that_reached_its_step_by_a_copy_starts_from_a_point() -> None:
    # Member 1 copies member 0 at step 8 when it is at 4 (a donor ahead: it skips 5-8), then
    # member 2 copies member 1 at step 8, where member 1 has no record of its own.
    history = [HistoryRecord(0, s, {}, float(s)) for s in range(1, 9)]
    history += [HistoryRecord(1, s, {}, s / 2) for s in range(1, 5)]
    history += [HistoryRecord(2, s, {}, s / 3) for s in range(1, 9)]
    history += [HistoryRecord(1, s, {}, float(s), segment=0) for s in (9, 10)]
    history += [HistoryRecord(2, s, {}, s + 0.5, segment=1) for s in (9, 10)]
    events = [
        Event(0, member=1, step=4, donor=0, donor_step=8, old_hparams={}, new_hparams={}),
        Event(1, member=2, step=8, donor=1, donor_step=8, old_hparams={}, new_hparams={}),
    ]
    result = Result(
        name="r",
        mode="max",
        metric="score",
        initial_hparams={m: {} for m in range(3)},
        members=[MemberRecord(m, {}, 10 if m else 8, 10.0, "finished") for m in range(3)],
        history=history,
        events=events,
    )
    report = build_report(result)
    origins = {st.member: st.origin for st in report.stretches if st.segment is not None}
    assert origins == {1: (8, 8.0), 2: (8, 8.0)}  # both from member 0's point at step 8


def test_large_population_stays_readable_and_light() -> None:
    population, steps = 64, 400
    history = [
        HistoryRecord(m, s, {}, math.sin(m + s / 50.0))
        for s in range(1, steps + 1)
        for m in range(population)
    ]
    events = [
        Event(
            i,
            member=(i * 7) % population,
            step=s,
            donor=(i * 3 + 1) % population,
            donor_step=s,
            old_hparams={"lr": 0.1},
            new_hparams={"lr": 0.12},
            kind="exploit",
        )
        for i, s in enumerate(range(10, 400, 10))
    ]
    result = Result(
        name="big",
        mode="max",
        metric="score",
        initial_hparams={m: {"lr": 0.1} for m in range(population)},
        members=[MemberRecord(m, {"lr": 0.1}, steps, 0.0, "finished") for m in range(population)],
        history=history,
        events=events,
    )
    report = build_report(result)
    assert sum(len(st.steps) for st in report.stretches) <= MAX_POINTS + len(report.stretches)
    lineage = svg.lineage(report)
    lane_height = (float(re.search(r'height="([\d.]+)"', lineage).group(1)) - 88) / 64  # type: ignore[union-attr]
    assert lane_height >= 7  # a lane a person can still point at
    assert all(f"m{m}" in lineage for m in range(0, 64, 2))  # labelled lanes
    html = report_html(report)
    assert len(html) < 6_000_000


def test_a_run_with_no_results_yet_renders(tmp_path: Path) -> None:
    result = Result(
        name="new",
        mode="min",
        metric="loss",
        initial_hparams={0: {"lr": 0.1}, 1: {"lr": 0.2}},
        members=[MemberRecord(m, {"lr": 0.1}, 0, None, "running") for m in (0, 1)],
        history=[],
        events=[],
    )
    report = build_report(result)
    assert report.summary.member_steps == 0 and report.score_range() is None
    html = report_html(report)
    assert "no scores yet" in html and network_loads(html) == []
    pytest.importorskip("matplotlib")
    from poptune.report.png import write_pngs

    assert len(write_pngs(report, tmp_path)) == 4


@pytest.fixture
def blocked_run(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """A run training in a background thread, held at its first step after step 10."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    reached, release = threading.Event(), threading.Event()

    def step(x: float, hp: dict[str, Any]) -> tuple[float, float]:
        x = x + hp["lr"]
        if x > 10 * hp["lr"] + 1e-9 and not release.is_set():
            reached.set()
            release.wait(30)
        return x, x

    exp = pt.Experiment(
        pt.trainable(_init, step),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=3,
        steps=20,
        interval=5,
        seed=1,
    )
    thread = threading.Thread(target=exp.run, args=(url, "live"), daemon=True)
    thread.start()
    assert reached.wait(30), "the run never reached step 10"
    yield url, release
    release.set()
    thread.join(30)


def test_report_of_a_running_run(blocked_run: tuple[str, threading.Event], tmp_path: Path) -> None:
    url, release = blocked_run
    with open_storage(url) as store:
        report = read_report(store, "live", now=store.get_run("live").created + 5)  # type: ignore[union-attr]
    s = report.summary
    assert s.status == "running"
    assert 0 < s.member_steps < s.budget == 60
    assert s.wall_time == pytest.approx(5.0)
    html = report_html(report)
    assert "still running" in html and marks(html, "curves") > 0
    assert main(["report", "live", "--storage", url, "--out", str(tmp_path / "r"), "--no-png"]) == 0
    release.set()


def _crashing_step(x: float, hp: dict[str, Any]) -> tuple[float, float]:
    if hp["lr"] > 0.5 and x > 10 * hp["lr"]:  # a large learning rate diverges at step 11
        raise RuntimeError("diverged: loss is nan")
    x = x + hp["lr"]
    return x, x


def test_report_of_a_crashed_run(tmp_path: Path) -> None:
    # Member 1's lr diverges; member 2 copies it at step 5 and fails for good (replaced by
    # member 4); member 1 then fails too, and the run stops: more than max_failures=1.
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    exp = pt.Experiment(
        pt.trainable(_init, _crashing_step),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=4,
        steps=20,
        interval=5,
        seed=0,
        initial_hparams=[{"lr": 0.2}, {"lr": 0.9}, {"lr": 0.3}, {"lr": 0.4}],
    )
    with pytest.raises(pt.RunFailed):
        exp.run(url, "crash", options=pt.RunOptions(max_retries=1, max_failures=1))
    with open_storage(url) as store:
        report = read_report(store, "crash")
    s = report.summary
    assert s.status == "failed" and "diverged" in (s.error or "")
    assert (s.failed_members, s.failures, s.replacements) == (1, 4, 1)
    assert 0 < s.member_steps < s.budget
    assert [(f.member, f.final) for f in report.failures] == [(2, True)] * 2 + [(1, False)] * 2
    rows = {m.id: m for m in report.members}
    assert rows[2].status == "failed" and rows[2].failures == 2 and rows[2].rank is None
    assert rows[4].replaces == 2
    (replace,) = [ev for ev in report.events if ev.kind == "replace"]
    assert replace.member == 4 and 4 in report.lanes
    assert f"replace #{replace.index}: member 4" in svg.lineage(report)
    html = report_html(report)
    assert "diverged: loss is nan" in html and "failed for good" in html
    out = tmp_path / "nested" / "report"
    assert main(["report", "crash", "--storage", url, "--out", str(out), "--no-png"]) == 0
    assert (out / "report.html").read_text().count("diverged") >= 2


def test_report_command_writes_html_and_pngs_and_replaces_them(
    finished: tuple[str, Report], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    url, _ = finished
    out = tmp_path / "a" / "b"
    assert main(["report", "done", "--storage", url, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curves.png", "hparams.png", "lineage.png", "report.html", "schedule.png"]
    for name in names[:-1] if names[-1] != "report.html" else names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = out / "notes.txt"
    keep.write_text("mine")
    (out / "report.html").write_text("old")
    assert main(["report", "done", "--storage", url, "--out", str(out), "--no-png"]) == 0
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert keep.read_text() == "mine"
    printed = capsys.readouterr().out
    assert "report.html" in printed and "curves.png" in printed


def test_report_errors_are_one_clear_line(
    finished: tuple[str, Report], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = finished
    assert main(["report", "nope", "--storage", url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("poptune: error: No run named 'nope'") and "Runs there: done" in err
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["report", "done", "--storage", url, "--out", str(file)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"poptune: error: --out {file} is a file; give a folder (it is created if needed)."
    )


def test_png_without_matplotlib_says_what_to_install(
    finished: tuple[str, Report],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = finished
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r"
    assert main(["report", "done", "--storage", url, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'poptune[plot]'" in err and "--no-png" in err
    assert (out / "report.html").exists()  # the HTML needs nothing


def test_import_poptune_does_not_load_plotting_or_the_web_stack() -> None:
    import subprocess

    code = (
        "import sys, poptune, poptune.cli; "
        "print(sorted(m for m in ('matplotlib', 'starlette', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("low", "high", "log"),
    [(1e-5, 1e-2, True), (0.0036, 0.0048, True), (0.0009, 0.0013, True), (-0.4, 1.2, False)],
)
def test_every_axis_gets_at_least_two_labelled_ticks(low: float, high: float, log: bool) -> None:
    from poptune.report.scales import Scale

    scale = Scale.fit([low, high], 0, 100, log=log)
    ticks = scale.ticks()
    assert len(ticks) >= 2 and all(scale.low <= t <= scale.high for t in ticks)
