"""A `Report` as one self-contained HTML page: summary, figures (inline SVG), population table.

Nothing on the page is fetched: no script, style, font or image comes from the network, so the
file works offline and can be mailed or archived as it is. The dashboard serves the same page
with a small inline script that reloads its content while the run changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from html import escape
from typing import Any

from poptune.progress import format_duration
from poptune.report import svg
from poptune.report.data import Report

__all__ = ["CSS", "page", "report_html", "report_section"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#f6f6f4}
header{background:#20303c;color:#fff;padding:10px 24px}
header a{color:#cfe3f0}
main{padding:12px 24px;max-width:1000px}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:22px 0 6px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:6px;
margin:10px 0}
.fact{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px 10px}
.fact b{display:block;font-size:18px}.fact span{color:#666;font-size:12px}
.status-running b{color:#1f6fb4}.status-completed b{color:#2a7d2a}
.status-failed b,.status-interrupted b{color:#b42318}
figure{margin:8px 0 18px;background:#fff;border:1px solid #ddd;border-radius:4px;
padding:6px;overflow-x:auto}
svg.figure{display:block;max-width:100%;height:auto}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#eef1f3}td.l,th.l{text-align:left}
tr.best td{font-weight:bold;background:#eef8ee}tr.failed td{color:#b42318}
.note{color:#666;font-size:12px}.error{color:#b42318}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _fact(value: str, label: str, cls: str = "") -> str:
    return f'<div class="fact {cls}"><b>{escape(value)}</b><span>{escape(label)}</span></div>'


def _summary(report: Report) -> str:
    s = report.summary
    ratio = f" ({s.member_steps / s.budget:.2f}x)" if s.budget else ""
    best = (
        f"{_fmt(s.best_score)}" if s.best_score is not None and s.best_member is not None else "-"
    )
    wall = format_duration(s.wall_time, spaced=True) + (" so far" if s.status == "running" else "")
    facts = [
        _fact(s.status, "status", f"status-{s.status}"),
        _fact(
            best,
            f"best {s.metric} ({s.mode})"
            + (f", member {s.best_member}" if s.best_member is not None else ""),
        ),
        _fact(f"{s.member_steps} / {s.budget}", "member-steps trained / budget" + ratio),
        _fact(str(s.exploits), f"exploits ({s.explores} explores, {s.replacements} replaced)"),
        _fact(f"{s.failures}", f"failures recorded ({s.failed_members} members failed for good)"),
        _fact(wall, "wall time"),
        _fact(f"{s.population} x {s.steps}", "members x steps"),
        _fact(_when(s.created), "created"),
    ]
    out = '<div class="facts" id="summary">' + "".join(facts) + "</div>"
    if s.error:
        out += f'<p class="error">Run error: {escape(s.error)}</p>'
    return out


def _population(report: Report) -> str:
    names = [h.name for h in report.hparams]
    s = report.summary
    head = [
        "member",
        "rank",
        "status",
        "step",
        s.metric,
        *names,
        "copied",
        "donated",
        "failures",
        "replaces",
    ]
    cells = "".join(f'<th class="{"l" if h == "status" else ""}">{escape(h)}</th>' for h in head)
    rows = []
    for m in report.members:
        cls = "best" if m.id == s.best_member else ("failed" if m.status == "failed" else "")
        values = [
            m.id,
            m.rank,
            m.status,
            f"{m.step}/{s.steps}",
            m.score,
            *(m.hparams.get(n) for n in names),
            m.copies,
            m.donated,
            m.failures,
            m.replaces,
        ]
        tds = "".join(
            f'<td class="{"l" if i == 2 else ""}">{escape(_fmt(v))}</td>'
            for i, v in enumerate(values)
        )
        rows.append(f'<tr class="{cls}" data-member="{m.id}">{tds}</tr>')
    return (
        f'<table id="population"><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}'
        "</tbody></table>"
        '<p class="note">copied: exploits the member made (it copied a donor); donated: times '
        "others copied it; rank among members not failed, 1 = best.</p>"
    )


def _failures(report: Report, limit: int = 20) -> str:
    if not report.failures:
        return '<p class="note">No failures.</p>'
    shown = report.failures[-limit:]
    rows = "".join(
        f"<tr><td>{f.member}</td><td>{f.step}</td><td>{f.attempt}</td>"
        f'<td class="l">{"failed for good" if f.final else "retried"}</td>'
        f'<td class="l">{escape(f.message)}</td></tr>'
        for f in shown
    )
    more = (
        f'<p class="note">The last {limit} of {len(report.failures)}; '
        "<code>poptune status RUN</code> shows the tracebacks.</p>"
        if len(report.failures) > limit
        else ""
    )
    return (
        '<table id="failures"><thead><tr><th>member</th><th>step</th><th>attempt</th>'
        '<th class="l">outcome</th><th class="l">error</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>{more}"
    )


FIGURES: Sequence[tuple[str, str]] = (
    ("curves", "Score by step"),
    ("lineage", "Lineage"),
    ("schedule", "Best member's schedule"),
    ("hparams", "Hyperparameters of every member"),
)


def report_section(report: Report, *, extra: str = "") -> str:
    """The report's content (summary, figures, tables) as one ``<main>`` element; ``extra``
    (HTML: the comparison with another run, `poptune.report.compare`) goes after the tables."""
    s = report.summary
    parts = [
        f'<main id="report" data-version="{escape(report.version)}" '
        f'data-status="{escape(s.status)}" data-rows="{s.member_steps}">',
        f"<h1>Run {escape(s.name)}</h1>",
        _summary(report),
    ]
    for name, title in FIGURES:
        parts.append(f'<h2>{escape(title)}</h2><figure id="fig-{name}">')
        parts.append(getattr(svg, name)(report))
        parts.append("</figure>")
    parts.append("<h2>Final population</h2>" if s.status == "finished" else "<h2>Population</h2>")
    parts.append(_population(report))
    parts.append("<h2>Failures</h2>")
    parts.append(_failures(report))
    parts.append(extra)
    parts.append(
        '<p class="note">Hover over a line, bar or edge for its member, steps, score and '
        "hyperparameters.</p></main>"
    )
    return "".join(parts)


def page(title: str, body: str, *, header: str = "", script: str = "") -> str:
    """A complete HTML page with the report's style inline."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header>{header}</header>{body}"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>\n"
    )


def report_html(report: Report, *, source: str = "", extra: str = "") -> str:
    """The self-contained HTML report of a run (what ``poptune report`` writes); ``extra``:
    as for `report_section`."""
    s = report.summary
    note = escape(
        f"poptune report of run {s.name}"
        + (f" in {source}" if source else "")
        + f", written {_when(time.time())}"
        + ("; the run was still running" if s.status == "running" else "")
    )
    return page(f"poptune: {s.name}", report_section(report, extra=extra), header=note)
