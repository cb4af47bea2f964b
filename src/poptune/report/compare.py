"""Two runs side by side: a table of what they reached and their curves, for a PBT run and its
random-search baseline (`poptune.Experiment.baseline`) or any two runs of one storage.

`build_comparison` is pure (two `Result` objects and their stored records in, plain data out);
`read_comparison` reads both runs from a storage. The rows (`comparison_rows`) are what
``poptune compare`` prints on the terminal and what the HTML section (`comparison_section`)
shows above two figures drawn as inline SVG like the report's own:

* ``compare-best``: the best score reached so far against step, one line per run, on one axis;
* ``compare-members``: every member's score against step, one panel per run, sharing the axes
  (a copy's jump from its donor drawn as in the report's curves).

Each run's marks sit in a ``<g>`` with ``data-run="NAME"`` (``id="best-0"``, ``"members-1"``:
the first and the second run), for tests and scripts.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

from poptune.progress import format_duration, format_hparams, format_score
from poptune.report.data import Report, build_report
from poptune.report.scales import Scale, member_colour
from poptune.report.svg import WIDTH, _axes, _Canvas, _finite_runs, _num, _points, _stretch_title
from poptune.result import Result

if TYPE_CHECKING:
    from poptune.storage.base import FailureRow, RunInfo, Storage

__all__ = [
    "Comparison",
    "RunSide",
    "best_so_far",
    "build_comparison",
    "comparison_html",
    "comparison_rows",
    "comparison_section",
    "read_comparison",
    "verdict",
]

#: The two runs' colours in the figures (first run, second run).
RUN_COLOURS = ("#1f6fb4", "#d62728")


@dataclass(frozen=True)
class RunSide:
    """One run of a comparison.

    Attributes:
        report: The run's `Report` (summary, members, stretches).
        best_so_far: ``(step, score)``: the best score any member reached at that step or
            before, for every step some member trained.
        final_scores: The latest score of every member that did not fail for good (finite
            ones), best first.
    """

    report: Report
    best_so_far: tuple[tuple[int, float], ...]
    final_scores: tuple[float, ...]

    @property
    def name(self) -> str:
        return self.report.summary.name

    @property
    def best(self) -> float | None:
        return self.final_scores[0] if self.final_scores else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.final_scores) if self.final_scores else None

    @property
    def worst(self) -> float | None:
        return self.final_scores[-1] if self.final_scores else None


@dataclass(frozen=True)
class Comparison:
    """Two runs, in the order they were named."""

    runs: tuple[RunSide, RunSide]

    @property
    def same_metric(self) -> bool:
        a, b = (r.report.summary for r in self.runs)
        return (a.metric, a.mode) == (b.metric, b.mode)


def best_so_far(result: Result) -> tuple[tuple[int, float], ...]:
    """The best score any member of ``result`` reached at each step or before (NaN skipped)."""
    sign = 1.0 if result.mode == "max" else -1.0
    at: dict[int, float] = {}
    for r in result.history:
        if math.isfinite(r.score) and (r.step not in at or sign * r.score > sign * at[r.step]):
            at[r.step] = r.score
    out: list[tuple[int, float]] = []
    for step in sorted(at):
        score = at[step]
        if out and sign * out[-1][1] >= sign * score:
            score = out[-1][1]
        out.append((step, score))
    return tuple(out)


def _side(
    result: Result, info: RunInfo | None, failures: Sequence[FailureRow], now: float | None
) -> RunSide:
    report = build_report(result, info, failures, now=now)
    sign = -1.0 if result.mode == "max" else 1.0
    finals = [m.score for m in result.members if m.status != "failed" and m.score is not None]
    scores = sorted((s for s in finals if math.isfinite(s)), key=lambda s: sign * s)
    return RunSide(report, best_so_far(result), tuple(scores))


def build_comparison(
    first: tuple[Result, RunInfo | None, Sequence[FailureRow]],
    second: tuple[Result, RunInfo | None, Sequence[FailureRow]],
    *,
    now: float | None = None,
) -> Comparison:
    """The `Comparison` of two runs, each given as its result, stored record and failures."""
    return Comparison((_side(*first, now), _side(*second, now)))


def read_comparison(store: Storage, first: str, second: str) -> Comparison:
    """The `Comparison` of runs ``first`` and ``second`` of ``store``, read now.

    Raises:
        poptune.storage.base.StorageError: One of them is not there.
    """
    from poptune.execution.session import load_result
    from poptune.storage.base import StorageError

    parts = []
    for name in (first, second):
        info = store.get_run(name)
        if info is None:
            raise StorageError(f"No run named {name!r} in {store.display_url}.")
        parts.append((load_result(store, name), info, store.failures(name)))
    return build_comparison(parts[0], parts[1], now=time.time())


def comparison_rows(cmp: Comparison) -> list[tuple[str, str, str]]:
    """The comparison table: ``(what, first run's value, second run's value)`` rows."""

    def row(label: str, f: Callable[[RunSide], object]) -> tuple[str, str, str]:
        a, b = cmp.runs
        return (label, str(f(a)), str(f(b)))

    def best(r: RunSide) -> str:
        s = r.report.summary
        if r.best is None:
            return "-"
        return f"{format_score(r.best)} (member {s.best_member})"

    def hparams(r: RunSide) -> str:
        s = r.report.summary
        found = [m for m in r.report.members if m.id == s.best_member]
        return format_hparams(found[0].hparams) if found else "-"

    def wall(r: RunSide) -> str:
        s = r.report.summary
        if not s.created:
            return "-"
        return format_duration(s.wall_time) + (" so far" if s.status == "running" else "")

    def steps(r: RunSide) -> str:
        s = r.report.summary
        return f"{s.steps} each ({s.member_steps}/{s.budget} member-steps)"

    return [
        row("status", lambda r: r.report.summary.status),
        row("metric", lambda r: f"{r.report.summary.metric} ({r.report.summary.mode})"),
        row("members", lambda r: r.report.summary.population),
        row("steps", steps),
        row("best final score", best),
        row("median final score", lambda r: format_score(r.median)),
        row("worst final score", lambda r: format_score(r.worst)),
        row("best member's hparams", hparams),
        row("wall time", wall),
        row("exploits", lambda r: r.report.summary.exploits),
        row("failures", lambda r: r.report.summary.failures),
    ]


def verdict(cmp: Comparison) -> str:
    """One sentence: which run reached the better best final score, and by how much."""
    a, b = cmp.runs
    if not cmp.same_metric:
        sa, sb = a.report.summary, b.report.summary
        return (
            f"The runs are scored differently ({a.name}: {sa.metric} ({sa.mode}), {b.name}: "
            f"{sb.metric} ({sb.mode})): their scores do not compare."
        )
    if a.best is None or b.best is None:
        return "One of the runs has no score yet."
    mode = a.report.summary.mode
    if a.best == b.best:
        return f"Both runs reached the same best final score, {format_score(a.best)}."
    sign = 1.0 if mode == "max" else -1.0
    win, lose = (a, b) if sign * a.best > sign * b.best else (b, a)
    assert win.best is not None and lose.best is not None
    return (
        f"{win.name} reached the better best final score: {format_score(win.best)} against "
        f"{format_score(lose.best)} for {lose.name} ({'higher' if mode == 'max' else 'lower'} "
        f"is better; difference {format_score(abs(win.best - lose.best))})."
    )


# -- figures -------------------------------------------------------------------------------------

LEFT, RIGHT, TOP, BOTTOM = 70, 24, 30, 44


def _steps_end(cmp: Comparison) -> float:
    ends = [r.report.summary.steps for r in cmp.runs]
    ends += [st.end for r in cmp.runs for st in r.report.stretches]
    return float(max(1, *ends))


def _score_values(cmp: Comparison) -> list[float]:
    values: list[float] = []
    for r in cmp.runs:
        rng = r.report.score_range()
        if rng is not None:
            values += list(rng)
    return values


def best_svg(cmp: Comparison) -> str:
    """The best score so far against step, one line per run, on one axis."""
    height = 360
    metric = cmp.runs[0].report.summary.metric
    c = _Canvas("compare-best", height, f"best {metric} so far against step, both runs")
    x = Scale(0.0, _steps_end(cmp), LEFT, WIDTH - RIGHT)
    values = [s for r in cmp.runs for _, s in r.best_so_far]
    y = Scale.fit(values, height - BOTTOM, TOP)
    c.text(
        LEFT,
        18,
        f"Best {metric} reached so far by any member, by step: "
        + ", ".join(f"{r.name} ({'blue' if i == 0 else 'red'})" for i, r in enumerate(cmp.runs)),
        font_weight="bold",
    )
    _axes(c, x, y, xlabel="step", ylabel=metric)
    for i, r in enumerate(cmp.runs):
        c.add(f'<g id="best-{i}" data-run="{escape(r.name)}">')
        if r.best_so_far:
            last = r.best_so_far[-1]
            c.line(
                [(x(step), y(score)) for step, score in r.best_so_far],
                RUN_COLOURS[i],
                2.2,
                f"{r.name}: best {metric} so far, {format_score(last[1])} at step {last[0]}",
            )
        c.add("</g>")
        # The legend: a short line and the run's name, top right.
        ly = TOP + 14 + 16 * i
        lx = WIDTH - RIGHT - 200
        c.add(
            f'<line x1="{_num(lx)}" x2="{_num(lx + 22)}" y1="{_num(ly - 4)}" y2="{_num(ly - 4)}" '
            f'stroke="{RUN_COLOURS[i]}" stroke-width="2.2"/>'
        )
        c.text(lx + 28, ly, r.name)
    if not values:
        c.text((LEFT + WIDTH) / 2, height / 2, "no scores yet", anchor="middle", fill="#888888")
    return c.finish()


def members_svg(cmp: Comparison) -> str:
    """Every member's score against step, one panel per run side by side, shared axes."""
    height = 380
    metric = cmp.runs[0].report.summary.metric
    c = _Canvas("compare-members", height, f"{metric} against step for every member, both runs")
    gap = 40
    panel = (WIDTH - LEFT - RIGHT - gap) / 2
    y = Scale.fit(_score_values(cmp), height - BOTTOM, TOP + 14)
    end = _steps_end(cmp)
    c.text(
        LEFT,
        18,
        f"{metric} by step, every member, on the same axes (a dashed jump is a copy from a donor)",
        font_weight="bold",
    )
    for i, r in enumerate(cmp.runs):
        start = LEFT + i * (panel + gap)
        x = Scale(0.0, end, start, start + panel)
        _axes(c, x, y, xlabel=f"step ({r.name})", ylabel=metric if i == 0 else "")
        c.text(start + 6, TOP + 10, r.name, font_weight="bold", fill=RUN_COLOURS[i])
        report = r.report
        n = max(len(report.lanes), report.summary.population)
        c.add(f'<g id="members-{i}" data-run="{escape(r.name)}">')
        for st in report.stretches:
            colour = member_colour(st.member, n)
            title = f"{r.name}, " + _stretch_title(report, st)
            pts = _points(st)
            if st.origin is not None and math.isfinite(st.origin[1]) and len(pts) >= 2:
                (x0, y0), (x1, y1) = pts[0], pts[1]
                if math.isfinite(y1):
                    c.line(
                        [(x(x0), y(y0)), (x(x1), y(y1))],
                        colour,
                        1.2,
                        title,
                        stroke_dasharray="3 2",
                    )
                pts = pts[1:]
            for run in _finite_runs(pts):
                c.line([(x(a), y(b)) for a, b in run], colour, 1.2, title, stroke_opacity="0.85")
        c.add("</g>")
    return c.finish()


# -- HTML ----------------------------------------------------------------------------------------


def comparison_section(cmp: Comparison) -> str:
    """The comparison as one ``<section id="comparison">``: table, verdict, two figures."""
    a, b = cmp.runs
    head = (
        '<tr><th class="l"></th>'
        f'<th class="l" style="color:{RUN_COLOURS[0]}">{escape(a.name)}</th>'
        f'<th class="l" style="color:{RUN_COLOURS[1]}">{escape(b.name)}</th></tr>'
    )
    rows = "".join(
        f'<tr><th class="l">{escape(label)}</th><td class="l">{escape(va)}</td>'
        f'<td class="l">{escape(vb)}</td></tr>'
        for label, va, vb in comparison_rows(cmp)
    )
    return (
        f'<section id="comparison"><h2>{escape(a.name)} compared with {escape(b.name)}</h2>'
        f'<table id="comparison-table"><thead>{head}</thead><tbody>{rows}</tbody></table>'
        f'<p class="note">{escape(verdict(cmp))} Final scores: each member\'s latest, members '
        "failed for good left out.</p>"
        f'<h2>Best score so far</h2><figure id="fig-compare-best">{best_svg(cmp)}</figure>'
        "<h2>Every member's score</h2>"
        f'<figure id="fig-compare-members">{members_svg(cmp)}</figure></section>'
    )


def comparison_html(cmp: Comparison, *, source: str = "") -> str:
    """A self-contained HTML page comparing two runs (what ``poptune compare --output``
    writes)."""
    from poptune.report.html import page

    a, b = cmp.runs
    note = escape(
        f"poptune comparison of runs {a.name} and {b.name}"
        + (f" in {source}" if source else "")
        + f", written {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    body = f'<main id="compare">{comparison_section(cmp)}</main>'
    return page(f"poptune: {a.name} vs {b.name}", body, header=note)
