"""The report's figures as PNG files, drawn with matplotlib (``pip install 'poptune[plot]'``).

The same four figures as the HTML report (`poptune.report.svg`), from the same `Report`, in the
same colours: ``curves.png``, ``lineage.png``, ``schedule.png`` and ``hparams.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from poptune.report.data import HparamInfo, Report, Stretch
from poptune.report.scales import member_colour, score_colour

__all__ = ["FIGURES", "write_pngs"]

ANCESTRY = "#111111"
HALO = "#f5b800"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            f"PNG figures need matplotlib ({e}); install it with: pip install 'poptune[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def _lines(segments: Any, **style: Any) -> Any:
    from matplotlib.collections import LineCollection

    return LineCollection(segments, **style)


def _pieces(report: Report) -> list[tuple[Stretch, int, int]]:
    by_key: dict[tuple[int, int | None], list[Stretch]] = {}
    for st in report.stretches:
        by_key.setdefault((st.member, st.segment), []).append(st)
    return [
        (st, run.start, run.end)
        for run in report.ancestry
        for st in by_key.get((run.member, run.segment), [])
    ]


def _xy(
    st: Stretch, first: int | None = None, last: int | None = None
) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    if st.origin is not None and (first is None or first <= st.origin[0]):
        xs.append(st.origin[0])
        ys.append(st.origin[1])
    for step, score in zip(st.steps, st.scores, strict=False):
        if (first is None or step > first) and (last is None or step <= last):
            xs.append(step)
            ys.append(score)
    return xs, ys


def _curves(report: Report, plt: Any) -> Any:
    s = report.summary
    n = max(len(report.lanes), s.population)
    fig, ax = plt.subplots(figsize=(10, 4.4))
    width = 1.3 if n <= 16 else 0.8
    best = [list(zip(*_xy(st, first, last), strict=False)) for st, first, last in _pieces(report)]
    ax.add_collection(
        _lines(best, colors=HALO, linewidths=6, alpha=0.55, capstyle="round", zorder=1)
    )
    lines, colours, jumps, jump_colours, origins = [], [], [], [], []
    for st in report.stretches:
        xs, ys = _xy(st)
        colour = member_colour(st.member, n)
        if st.origin is not None and len(xs) >= 2:
            jumps.append(list(zip(xs[:2], ys[:2], strict=False)))
            jump_colours.append(colour)
            origins.append((xs[0], ys[0], colour))
            xs, ys = xs[1:], ys[1:]
        lines.append(list(zip(xs, ys, strict=False)))
        colours.append(colour)
    ax.add_collection(_lines(lines, colors=colours, linewidths=width, alpha=0.85))
    ax.add_collection(_lines(jumps, colors=jump_colours, linewidths=width, linestyles=(0, (3, 2))))
    if origins:
        ox, oy, oc = zip(*origins, strict=False)
        ax.scatter(ox, oy, s=9, facecolors="none", edgecolors=oc, linewidths=0.7)
    ax.autoscale_view()
    better = "higher" if s.mode == "max" else "lower"
    ax.set_title(
        f"{s.metric} by step, every member ({better} is better): dashed, a copy from the "
        "donor's curve; gold band, the best's ancestry",
        fontsize=9,
        loc="left",
    )
    ax.set_xlabel("step")
    ax.set_ylabel(s.metric)
    ax.grid(alpha=0.3)
    return fig


def _lineage(report: Report, plt: Any) -> Any:
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path

    lanes = report.lanes
    row = {m: i for i, m in enumerate(lanes)}
    n = max(1, len(lanes))
    fig, ax = plt.subplots(figsize=(10, min(12.0, 1.2 + 0.16 * n)))
    bar = max(1.5, min(8.0, 160.0 / n))
    ax.add_collection(
        _lines(
            [[(st.start, row[st.member]), (st.end, row[st.member])] for st in report.stretches],
            colors=[score_colour(st.standing) for st in report.stretches],
            linewidths=bar,
            capstyle="butt",
        )
    )
    ax.add_collection(
        _lines(
            [
                [(max(first, st.start), row[st.member]), (min(last, st.end), row[st.member])]
                for st, first, last in _pieces(report)
            ],
            colors=ANCESTRY,
            linewidths=max(1.0, bar * 0.35),
        )
    )
    strong = {(r.member, r.segment) for r in report.ancestry}
    end = max([report.summary.steps, *(s.end for s in report.stretches)], default=1)
    dx = end / 120
    for ev in report.events:
        if ev.donor is None or ev.donor == ev.member or ev.donor_step is None:
            continue
        y0, y1, x0 = row.get(ev.donor, 0), row.get(ev.member, 0), ev.donor_step
        path = Path(
            [(x0, y0), (x0 + dx, y0), (x0, y1), (x0 + dx, y1)],
            [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4],
        )
        hot = (ev.member, ev.index) in strong
        ax.add_patch(
            PathPatch(
                path,
                fill=False,
                lw=1.4 if hot else 0.6,
                ec=ANCESTRY if hot else "#777777",
                alpha=0.9 if hot else 0.5,
            )
        )
    for f in report.failures:
        ax.plot([f.step], [row.get(f.member, 0)], "x", color="#d62728", ms=7 if f.final else 4)
    every = max(1, math.ceil(n / 32))
    ax.set_yticks(range(0, n, every), [f"m{m}" for m in lanes[::every]])
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, max(1, end))
    ax.set_xlabel("step")
    ax.set_title(
        "Lineage: a lane per member, a stretch coloured by its rank at its end (yellow best); "
        "an edge is a copy; black: the best's ancestry",
        fontsize=9,
        loc="left",
    )
    return fig


def _numeric(
    info: HparamInfo, values: list[Any]
) -> tuple[Callable[[Any], float], list[str] | None]:
    if info.numeric and all(isinstance(v, (int, float)) for v in values):
        return float, None
    cats = [str(v) for v in (info.values or sorted({str(v) for v in values}))]
    index = {c: i for i, c in enumerate(cats)}
    return (lambda v: float(index.get(str(v), 0))), cats


def _panels(report: Report, plt: Any, infos: list[HparamInfo], title: str) -> tuple[Any, Any]:
    fig, axes = plt.subplots(
        max(1, len(infos)),
        1,
        figsize=(10, 0.4 + 1.9 * max(1, len(infos))),
        sharex=True,
        squeeze=False,
    )
    axes[0][0].set_title(title, fontsize=9, loc="left")
    axes[-1][0].set_xlabel("step")
    return fig, [a[0] for a in axes]


def _schedule(report: Report, plt: Any) -> Any:
    s = report.summary
    infos = [h for h in report.hparams if any(h.name in r.hparams for r in report.ancestry)]
    fig, axes = _panels(
        report,
        plt,
        infos,
        f"Schedule of the best member (member {s.best_member}) along its ancestry",
    )
    n = max(len(report.lanes), s.population)
    for ax, info in zip(axes, infos, strict=False):
        values = [r.hparams[info.name] for r in report.ancestry if info.name in r.hparams]
        conv, cats = _numeric(info, values)
        prev = None
        for r in report.ancestry:
            if info.name not in r.hparams:
                continue
            v = conv(r.hparams[info.name])
            if prev is not None:
                ax.plot([r.start, r.start], [prev, v], color="#888888", lw=0.8, ls=":")
            ax.plot([r.start, r.end], [v, v], color=member_colour(r.member, n), lw=2.5)
            prev = v
        _value_axis(ax, info, cats, bounds=False)
    return fig


def _value_axis(ax: Any, info: HparamInfo, cats: list[str] | None, bounds: bool = True) -> None:
    if cats is not None:
        ax.set_yticks(range(len(cats)), cats)
    elif info.log:
        ax.set_yscale("log")
    elif bounds and info.low is not None and info.high is not None:
        lo, hi = ax.get_ylim()
        lo, hi = min(lo, float(info.low)), max(hi, float(info.high))
        pad = (hi - lo) * 0.04
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(info.name + (" (log)" if info.log else ""))
    ax.grid(alpha=0.3)


def _hparams(report: Report, plt: Any) -> Any:
    s = report.summary
    infos = list(report.hparams)
    fig, axes = _panels(
        report,
        plt,
        infos,
        "Every member's hyperparameters over time, coloured "
        f"by the stretch's rank by {s.metric} at its end (yellow best)",
    )
    for ax, info in zip(axes, infos, strict=False):
        values = [st.hparams[info.name] for st in report.stretches if info.name in st.hparams]
        conv, cats = _numeric(info, values)
        drawn = [st for st in report.stretches if info.name in st.hparams]
        ys = [conv(st.hparams[info.name]) for st in drawn]
        colours = [score_colour(st.standing) for st in drawn]
        ax.add_collection(
            _lines(
                [[(st.start, y), (st.end, y)] for st, y in zip(drawn, ys, strict=False)],
                colors=colours,
                linewidths=2.0,
            )
        )
        ax.scatter([st.end for st in drawn], ys, c=colours, s=5)
        ax.autoscale_view()
        _value_axis(ax, info, cats)
    return fig


FIGURES: dict[str, Callable[[Report, Any], Any]] = {
    "curves": _curves,
    "lineage": _lineage,
    "schedule": _schedule,
    "hparams": _hparams,
}


def write_pngs(report: Report, directory: str | os.PathLike[str], *, dpi: int = 110) -> list[str]:
    """Writes ``curves.png``, ``lineage.png``, ``schedule.png`` and ``hparams.png`` into
    ``directory`` (created if needed; files of those names are replaced). Returns the paths.

    Raises:
        ImportError: matplotlib is not installed (the message says what to install).
    """
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        fig = draw(report, plt)
        try:
            fig.tight_layout()
            path = os.path.join(os.fspath(directory), f"{name}.png")
            fig.savefig(path, dpi=dpi)
            paths.append(path)
        finally:
            plt.close(fig)
    return paths
