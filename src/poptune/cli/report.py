"""``poptune report``: a run's report as one self-contained HTML file and PNG figures.

The report is read from the storage alone, so it works for a finished run, a running one (it
shows the run as far as it has gone) and one that crashed. The views are `poptune.report`.
"""

from __future__ import annotations

import argparse
import os

from poptune.cli._common import (
    USAGE,
    CLIError,
    _check_name,
    _get_run,
    _open_existing,
    _storage_url,
)

#: The HTML file's name inside ``--out``.
HTML_NAME = "report.html"


def cmd_report(args: argparse.Namespace) -> int:
    from poptune.report.data import read_report
    from poptune.report.html import report_html

    url = _storage_url(args)
    name = _check_name(args.run, "")
    other = None if args.compare is None else _check_name(args.compare, "")
    extra = ""
    with _open_existing(url) as store:
        _get_run(store, name)  # an unknown run's error lists the runs there
        if other is not None:
            from poptune.report.compare import comparison_section, read_comparison

            _get_run(store, other)
            extra = comparison_section(read_comparison(store, name, other))
        report = read_report(store, name)
        source = store.display_url
    out = args.out or f"{name}-report"
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} is a file; give a folder (it is created if needed).", USAGE)
    os.makedirs(out, exist_ok=True)
    html_path = os.path.join(out, HTML_NAME)
    tmp = html_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(report_html(report, source=source, extra=extra))
    os.replace(tmp, html_path)  # a browser reloading it never sees half a file
    s = report.summary
    state = (
        "; the run is still running: run the command again to refresh it"
        if s.status == "running"
        else ""
    )
    compared = f", compared with run {other}" if other is not None else ""
    print(
        f"Wrote {html_path} (run {name}: {s.status}, {s.member_steps} member-steps{compared}"
        f"{state})."
    )
    if args.no_png:
        return 0
    from poptune.report.png import write_pngs

    try:
        paths = write_pngs(report, out)
    except ImportError as e:
        raise ImportError(f"{e} (or pass --no-png; the HTML report is written)") from None
    print(f"Wrote {', '.join(os.path.basename(p) for p in paths)} in {out}.")
    return 0
