"""The report's figures as inline SVG: no script, no font or style fetched, hover text built in.

Each function draws one figure of a `Report` and returns an ``<svg>`` element as text:

* `curves`: score against step for every member, one line per stretch; a copy starts at the
  donor's point (a dashed jump), so a member that went back in steps branches off the donor's
  curve instead of zigzagging; the best member's ancestry is drawn over it, thick.
* `lineage`: the family tree over time, one lane per member, each stretch a bar coloured by its
  score, each copy an edge from the donor's lane at the donor's step.
* `schedule`: the hyperparameters along the best member's ancestry, one panel each.
* `hparams`: every member's hyperparameters over time, coloured by score, with parent links.

Every mark carries a ``<title>`` (the browser shows it on hover) and every figure carries
``data-figure`` and ``data-marks`` attributes (what it drew), for tests and scripts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from poptune.progress import format_value
from poptune.report.data import HparamInfo, Report, Stretch
from poptune.report.scales import Scale, format_tick, member_colour, score_colour
from poptune.result import Event

__all__ = ["curves", "hparams", "lineage", "schedule"]

WIDTH = 960
LEFT, RIGHT, TOP, BOTTOM = 70, 24, 30, 44
ANCESTRY = "#111111"
HALO = "#f5b800"  # the best ancestry under the curves: the members' colours stay visible


def _num(x: float) -> str:
    return f"{x:.1f}"


def _hp_text(hparams: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in hparams.items())


def _score_text(score: float) -> str:
    return f"{score:.6g}" if math.isfinite(score) else "nan"


class _Canvas:
    """Collects SVG elements; `finish` wraps them in one ``<svg>``."""

    def __init__(self, name: str, height: float, label: str) -> None:
        self.name, self.height, self.label = name, height, label
        self.parts: list[str] = []
        self.marks = 0

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, text: str, *, anchor: str = "start", **attrs: Any) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        self.add(
            f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'
        )

    def line(
        self, points: Sequence[tuple[float, float]], colour: str, width: float, title: str, **a: Any
    ) -> None:
        if len(points) < 2:
            x, y = points[0]
            self.add(
                f'<circle cx="{_num(x)}" cy="{_num(y)}" r="{max(1.5, width)}" fill="{colour}">'
                f"<title>{escape(title)}</title></circle>"
            )
        else:
            extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in a.items())
            coords = " ".join(f"{_num(x)},{_num(y)}" for x, y in points)
            self.add(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                f'stroke-width="{width}"{extra}><title>{escape(title)}</title></polyline>'
            )
        self.marks += 1

    def finish(self) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="figure" data-figure="{self.name}" '
            f'data-marks="{self.marks}" width="{WIDTH}" height="{_num(self.height)}" '
            f'viewBox="0 0 {WIDTH} {_num(self.height)}" role="img" '
            f'aria-label="{escape(self.label)}" font-family="sans-serif" font-size="12">'
            + "".join(self.parts)
            + "</svg>"
        )


def _axes(
    c: _Canvas,
    x: Scale,
    y: Scale,
    *,
    xlabel: str,
    ylabel: str,
    yticks: Iterable[tuple[float, str]] | None = None,
) -> None:
    top, bottom = min(y.start, y.stop), max(y.start, y.stop)
    c.add(
        f'<rect x="{_num(x.start)}" y="{_num(top)}" width="{_num(x.stop - x.start)}" '
        f'height="{_num(bottom - top)}" fill="#ffffff" stroke="#999999"/>'
    )
    for t in x.ticks(8):
        px = x(t)
        c.add(
            f'<line x1="{_num(px)}" x2="{_num(px)}" y1="{_num(top)}" y2="{_num(bottom)}" '
            'stroke="#eeeeee"/>'
        )
        c.text(px, bottom + 15, format_tick(t), anchor="middle", fill="#444444")
    ticks = list(yticks) if yticks is not None else [(t, format_tick(t)) for t in y.ticks(5)]
    for t, label in ticks:
        py = y(t)
        c.add(
            f'<line x1="{_num(x.start)}" x2="{_num(x.stop)}" y1="{_num(py)}" y2="{_num(py)}" '
            'stroke="#eeeeee"/>'
        )
        c.text(x.start - 6, py + 4, label, anchor="end", fill="#444444")
    if xlabel:
        c.text((x.start + x.stop) / 2, bottom + 32, xlabel, anchor="middle")
    c.text(
        12,
        (top + bottom) / 2,
        ylabel,
        anchor="middle",
        transform=f"rotate(-90 12 {_num((top + bottom) / 2)})",
    )


def _step_scale(report: Report, start: float, stop: float) -> Scale:
    end = max([report.summary.steps, *(s.end for s in report.stretches)], default=1)
    return Scale(0.0, float(max(1, end)), start, stop)


def _points(
    st: Stretch, first: int | None = None, last: int | None = None
) -> list[tuple[int, float]]:
    pts: list[tuple[int, float]] = []
    if (
        st.origin is not None
        and math.isfinite(st.origin[1])
        and (first is None or first <= st.origin[0])
    ):
        pts.append(st.origin)
    for step, score in zip(st.steps, st.scores, strict=False):
        if (first is None or step > first) and (last is None or step <= last):
            pts.append((step, score))
    return pts


def _finite_runs(points: Sequence[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """Consecutive finite points (a NaN score breaks the line)."""
    runs: list[list[tuple[int, float]]] = [[]]
    for p in points:
        if math.isfinite(p[1]):
            runs[-1].append(p)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _stretch_title(report: Report, st: Stretch) -> str:
    metric = report.summary.metric
    how = {
        "initial": "initial stretch",
        "explore": "after an explore",
        "exploit": f"copied member {st.donor} at step {st.start}",
        "replace": (
            f"replacement, copied member {st.donor} at step {st.start}"
            if st.donor is not None
            else "fresh replacement"
        ),
    }.get(st.kind, st.kind)
    branch = " (went back: a branch)" if st.branch else ""
    return (
        f"member {st.member}: steps {st.start + 1}-{st.end}, {how}{branch}; "
        f"{metric} {_score_text(st.last_score)} at step {st.end}{_rank_text(st.standing)}; "
        f"{_hp_text(st.hparams)}"
    )


def _rank_text(standing: float) -> str:
    if not math.isfinite(standing):
        return ""
    return f" (better than {standing:.0%} of the others then)"


def _event_title(ev: Event) -> str:
    return (
        f"{ev.kind} #{ev.index}: member {ev.member} (at step {ev.step}) copied member "
        f"{ev.donor} at step {ev.donor_step}; now {_hp_text(ev.new_hparams)}"
    )


def _ancestry_pieces(report: Report) -> list[tuple[Stretch, int, int]]:
    by_key: dict[tuple[int, int | None], list[Stretch]] = {}
    for st in report.stretches:
        by_key.setdefault((st.member, st.segment), []).append(st)
    out = []
    for run in report.ancestry:
        for st in by_key.get((run.member, run.segment), []):
            out.append((st, run.start, run.end))
    return out


def curves(report: Report) -> str:
    """Score against step for every member; jumps from donors; the best ancestry on top."""
    s = report.summary
    height = 420
    c = _Canvas("curves", height, f"{s.metric} against step for every member")
    x = _step_scale(report, LEFT, WIDTH - RIGHT)
    rng = report.score_range()
    y = Scale.fit(list(rng) if rng else [], height - BOTTOM, TOP)
    better = "higher" if s.mode == "max" else "lower"
    c.text(
        LEFT,
        18,
        f"{s.metric} by step, every member ({better} is better): a dashed jump is "
        "a copy from the donor's curve; gold band: the best member's ancestry",
        font_weight="bold",
    )
    _axes(c, x, y, xlabel="step", ylabel=s.metric)
    n = max(len(report.lanes), s.population)
    width = 1.6 if n <= 16 else 1.0
    for st, first, last in _ancestry_pieces(report):
        for run in _finite_runs(_points(st, first, last)):
            c.line(
                [(x(a), y(b)) for a, b in run],
                HALO,
                7,
                f"best member's ancestry: member {st.member}, steps {first + 1}-{last}",
                stroke_opacity="0.55",
                stroke_linecap="round",
            )
    for st in report.stretches:
        colour = member_colour(st.member, n)
        title = _stretch_title(report, st)
        pts = _points(st)
        if st.origin is not None and math.isfinite(st.origin[1]) and len(pts) >= 2:
            (x0, y0), (x1, y1) = pts[0], pts[1]
            if math.isfinite(y1):
                c.line(
                    [(x(x0), y(y0)), (x(x1), y(y1))], colour, width, title, stroke_dasharray="3 2"
                )
                c.add(
                    f'<circle cx="{_num(x(x0))}" cy="{_num(y(y0))}" r="2.2" fill="none" '
                    f'stroke="{colour}"/>'
                )
            pts = pts[1:]
        for run in _finite_runs(pts):
            c.line([(x(a), y(b)) for a, b in run], colour, width, title, stroke_opacity="0.85")
    if rng is None:
        c.text((LEFT + WIDTH) / 2, height / 2, "no scores yet", anchor="middle", fill="#888888")
    return c.finish()


def lineage(report: Report) -> str:
    """The family tree over time: members as lanes, stretches as bars, copies as edges."""
    lanes = report.lanes
    n = max(1, len(lanes))
    lane = max(7.0, min(26.0, 480.0 / n))
    height = TOP + 14 + lane * n + BOTTOM
    c = _Canvas("lineage", height, "lineage: who copied whom, when")
    x = _step_scale(report, LEFT, WIDTH - RIGHT)
    row = {m: i for i, m in enumerate(lanes)}

    def ly(member: int) -> float:
        return TOP + 14 + lane * (row.get(member, 0) + 0.5)

    y = Scale(-0.5, n - 0.5, TOP + 14, TOP + 14 + lane * n)
    c.text(
        LEFT,
        18,
        "Lineage: a lane per member, a stretch coloured by its rank at its end (yellow best); "
        "an edge is a copy from the donor; black: the best's ancestry",
        font_weight="bold",
    )
    every = max(1, math.ceil(11 / lane))
    ticks = [(float(i), f"m{m}") for i, m in enumerate(lanes) if i % every == 0]
    _axes(c, x, y, xlabel="step", ylabel="member", yticks=ticks)
    bar = max(2.0, lane * 0.45)
    for st in report.stretches:
        yy = ly(st.member)
        c.line(
            [(x(st.start), yy), (x(st.end), yy)],
            score_colour(st.standing),
            bar,
            _stretch_title(report, st),
        )
    for st, first, last in _ancestry_pieces(report):
        yy = ly(st.member)
        c.line(
            [(x(max(first, st.start)), yy), (x(min(last, st.end)), yy)],
            ANCESTRY,
            max(1.2, bar * 0.35),
            f"best member's ancestry: member {st.member}, steps {first + 1}-{last}",
        )
    in_ancestry = {(r.member, r.segment) for r in report.ancestry}
    thin = 1.2 if n <= 16 else 0.8
    for ev in report.events:
        if ev.donor is None or ev.donor == ev.member or ev.donor_step is None:
            if ev.kind == "replace" and ev.donor is None:
                px, py = x(ev.donor_step or ev.step), ly(ev.member)
                c.add(
                    f'<path d="M{_num(px)},{_num(py - 4)} l4,4 l-4,4 l-4,-4 z" fill="#555555">'
                    f"<title>member {ev.member}: fresh replacement at step {ev.step}</title>"
                    "</path>"
                )
            continue
        x0, y0, y1 = x(ev.donor_step), ly(ev.donor), ly(ev.member)
        dx = min(14.0, max(4.0, lane))
        strong = (ev.member, ev.index) in in_ancestry
        colour = ANCESTRY if strong else "#777777"
        c.add(
            f'<path d="M{_num(x0)},{_num(y0)} C{_num(x0 + dx)},{_num(y0)} {_num(x0)},{_num(y1)} '
            f'{_num(x0 + dx)},{_num(y1)}" fill="none" stroke="{colour}" '
            f'stroke-width="{1.6 if strong else thin}" stroke-opacity="{0.9 if strong else 0.6}">'
            f"<title>{escape(_event_title(ev))}</title></path>"
        )
        c.marks += 1
    for f in report.failures:
        px, py = x(f.step), ly(f.member)
        size = 5 if f.final else 3
        failed = f"member {f.member} failed at step {f.step} (attempt {f.attempt}): {f.message}"
        c.add(
            f'<path d="M{_num(px - size)},{_num(py - size)} l{2 * size},{2 * size} '
            f'M{_num(px - size)},{_num(py + size)} l{2 * size},{-2 * size}" stroke="#d62728" '
            f'stroke-width="{2 if f.final else 1.2}"><title>{escape(failed)}</title></path>'
        )
    return c.finish()


def _value_axis(
    info: HparamInfo, values: Sequence[Any], start: float, stop: float, *, bounds: bool = True
) -> tuple[Scale, Any, list[tuple[float, str]] | None]:
    """A scale for a hyperparameter (covering its declared bounds too when ``bounds``), a
    function value -> number, and category ticks if any."""
    if info.numeric and all(isinstance(v, (int, float)) for v in values):
        limits = (info.low, info.high) if bounds and info.low is not None else (None, None)
        scale = Scale.fit([float(v) for v in values], start, stop, log=info.log, bounds=limits)
        return scale, float, None
    categories = list(info.values) or sorted({str(v) for v in values})
    labels = [str(v) for v in categories]
    index = {str(v): i for i, v in enumerate(categories)}
    scale = Scale(-0.5, max(0.5, len(categories) - 0.5), start, stop)
    return (
        scale,
        (lambda v: float(index.get(str(v), 0))),
        [(float(i), t) for i, t in enumerate(labels)],
    )


def schedule(report: Report) -> str:
    """The best member's hyperparameter schedule along its ancestry, one panel each."""
    s = report.summary
    infos = [h for h in report.hparams if any(h.name in r.hparams for r in report.ancestry)]
    panel = 150
    height = TOP + max(1, len(infos)) * (panel + 24) + 20
    c = _Canvas("schedule", height, "the best member's hyperparameter schedule")
    x = _step_scale(report, LEFT, WIDTH - RIGHT)
    who = f"member {s.best_member}" if s.best_member is not None else "-"
    c.text(
        LEFT,
        18,
        f"Schedule of the best member ({who}) along its ancestry: the "
        "hyperparameters in force at every step (a label names the ancestor that trained it)",
        font_weight="bold",
    )
    if not infos:
        c.text((LEFT + WIDTH) / 2, TOP + 60, "no schedule yet", anchor="middle", fill="#888888")
    n = max(len(report.lanes), s.population)
    for k, info in enumerate(infos):
        top = TOP + k * (panel + 24) + 6
        values = [r.hparams[info.name] for r in report.ancestry if info.name in r.hparams]
        # Zoomed to the schedule's own values: a change from 4.7e-3 to 3.8e-3 must show.
        y, to_num, cat = _value_axis(info, values, top + panel - 20, top + 4, bounds=False)
        _axes(
            c,
            Scale(x.low, x.high, x.start, x.stop),
            y,
            xlabel="",
            yticks=cat,
            ylabel=info.name + (" (log)" if info.log else ""),
        )
        prev: tuple[float, float] | None = None
        for r in report.ancestry:
            if info.name not in r.hparams:
                continue
            v = to_num(r.hparams[info.name])
            pts = [(x(r.start), y(v)), (x(r.end), y(v))]
            if prev is not None:
                c.add(
                    f'<line x1="{_num(prev[0])}" y1="{_num(prev[1])}" x2="{_num(pts[0][0])}" '
                    f'y2="{_num(pts[0][1])}" stroke="#888888" stroke-dasharray="2 2"/>'
                )
            c.line(
                pts,
                member_colour(r.member, n),
                3.0,
                f"steps {r.start + 1}-{r.end}: {info.name}={format_value(r.hparams[info.name])} "
                f"(trained by member {r.member})",
            )
            if pts[1][0] - pts[0][0] > 26:
                c.text(
                    (pts[0][0] + pts[1][0]) / 2,
                    pts[0][1] - 5,
                    f"m{r.member}",
                    anchor="middle",
                    font_size="10",
                    fill="#555555",
                )
            prev = pts[1]
    c.text((x.start + x.stop) / 2, height - 8, "step", anchor="middle")
    return c.finish()


def hparams(report: Report) -> str:
    """Every member's hyperparameters over time, coloured by score; copies as parent links."""
    s = report.summary
    infos = list(report.hparams)
    panel = 170
    height = TOP + max(1, len(infos)) * (panel + 24) + 20
    c = _Canvas("hparams", height, "every member's hyperparameters over time")
    x = _step_scale(report, LEFT, WIDTH - RIGHT - 70)
    c.text(
        LEFT,
        18,
        "Every member's hyperparameters over time, coloured by the stretch's rank "
        f"by {s.metric} at its last step; dotted: a copy, from the donor's value",
        font_weight="bold",
    )

    by_member: dict[int, list[Stretch]] = {}
    for st in report.stretches:
        by_member.setdefault(st.member, []).append(st)

    def donor_value(member: int, step: int, name: str) -> Any:
        found = None
        for st in by_member.get(member, []):
            if st.start <= step <= st.end and name in st.hparams:
                found = st.hparams[name]
        return found

    for k, info in enumerate(infos):
        top = TOP + k * (panel + 24) + 6
        values = [st.hparams[info.name] for st in report.stretches if info.name in st.hparams]
        y, to_num, cat = _value_axis(info, values, top + panel - 20, top + 4)
        _axes(c, x, y, xlabel="", ylabel=info.name + (" (log)" if info.log else ""), yticks=cat)
        for st in report.stretches:
            if info.name not in st.hparams:
                continue
            v = y(to_num(st.hparams[info.name]))
            if st.donor is not None and st.origin is not None:
                dv = donor_value(st.donor, st.start, info.name)
                if dv is not None:
                    c.add(
                        f'<line x1="{_num(x(st.start))}" y1="{_num(y(to_num(dv)))}" '
                        f'x2="{_num(x(st.start))}" y2="{_num(v)}" stroke="#666666" '
                        'stroke-width="0.8" stroke-dasharray="1 2"/>'
                    )
            colour = score_colour(st.standing)
            c.line([(x(st.start), v), (x(st.end), v)], colour, 2.4, _stretch_title(report, st))
            c.add(f'<circle cx="{_num(x(st.end))}" cy="{_num(v)}" r="2.2" fill="{colour}"/>')
    # Colour bar: worst at the bottom, best at the top.
    bx, by, bh = WIDTH - RIGHT - 44, TOP + 20, 140
    for i in range(20):
        f = 1.0 - i / 19
        c.add(
            f'<rect x="{bx}" y="{_num(by + i * bh / 20)}" width="12" '
            f'height="{_num(bh / 20 + 0.5)}" '
            f'fill="{score_colour(f)}"/>'
        )
    c.text(bx + 6, by - 6, "rank", anchor="middle", font_size="11")
    c.text(bx + 16, by + 8, "best", font_size="10")
    c.text(bx + 16, by + bh, "worst", font_size="10")
    c.text((x.start + x.stop) / 2, height - 8, "step", anchor="middle")
    return c.finish()
