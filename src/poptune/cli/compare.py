"""``poptune compare RUN_A RUN_B``: two runs side by side, on the terminal and in HTML.

Made for a PBT run and its random-search baseline (``poptune run FILE --baseline random``
trains both and ends with this table), but any two runs of one storage compare. The table and
the figures are `poptune.report.compare`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from poptune.cli._common import (
    USAGE,
    CLIError,
    _check_name,
    _get_run,
    _open_existing,
    _scrub,
    _stdout,
    _storage_flag,
    _storage_url,
)

if TYPE_CHECKING:
    from poptune.report.compare import Comparison


def cmd_compare(args: argparse.Namespace) -> int:
    from poptune.report.compare import read_comparison

    url = _storage_url(args)
    first = _check_name(args.first, "")
    second = _check_name(args.second, "")
    if args.output is not None and os.path.isdir(args.output):
        raise CLIError(f"--output {args.output} is a folder; give the HTML file to write.", USAGE)
    with _open_existing(url) as store:
        for name in (first, second):
            _get_run(store, name)  # an unknown run's error lists the runs there
        cmp = read_comparison(store, first, second)
        display = store.display_url
    print_comparison(cmp)
    if args.output is not None:
        write_comparison(cmp, args.output, source=display)
        print(f"Wrote {args.output} (both runs' curves).")
    else:
        print(
            f"Curves: poptune compare {first} {second}{_storage_flag(url)} --output "
            "compare.html, or poptune report "
            f"{first} --compare {second}{_storage_flag(url)}"
        )
    return 0


def print_comparison(cmp: Comparison) -> None:
    """The comparison table and its verdict, on stdout."""
    from rich.table import Table

    from poptune.report.compare import comparison_rows, verdict

    a, b = cmp.runs
    out = _stdout()
    table = Table(
        title=f"Run {a.name} compared with run {b.name}", title_justify="left", header_style="bold"
    )
    table.add_column("")
    table.add_column(a.name, overflow="fold")
    table.add_column(b.name, overflow="fold")
    for label, va, vb in comparison_rows(cmp):
        table.add_row(label, va, vb)
    out.print(table)
    out.print(_scrub(verdict(cmp)), markup=False, highlight=False, crop=False)


def write_comparison(cmp: Comparison, path: str, *, source: str) -> None:
    """Writes the comparison's HTML page to ``path`` (a browser reloading it never sees half a
    file)."""
    from poptune.report.compare import comparison_html

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(comparison_html(cmp, source=source))
    os.replace(tmp, path)
