"""Regenerates the README's screenshots of ``poptune report`` and ``poptune dashboard``.

    python docs/screenshots.py                 # both examples (the GAN trains ~2 CPU-minutes)
    python docs/screenshots.py --only toy      # the toy problem only (seconds)

For the paper's toy problem (``examples/toy_quadratic.py``) and the PyTorch GAN
(``examples/gan_digits.py``, its default size: 8 members, 24 steps), each run with ``poptune
run`` into a fresh SQLite file, it writes ``docs/report-toy.png`` and ``docs/report-gan.png``
(the HTML report, whole page) and ``docs/dashboard-toy.png`` and ``docs/dashboard-gan.png``
(the dashboard's page of the run, taken once half of it is trained: the GAN is still
running). Screenshots come from Debian's headless Chromium (``/usr/bin/chromium``, or
``$POPTUNE_CHROMIUM``) driven by Playwright; it needs the ``[dashboard]``, ``[torch]`` and
``[examples]`` extras and ``pip install playwright`` (Playwright's own browsers are not used).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("POPTUNE_CHROMIUM", "/usr/bin/chromium")
WIDTH = 1050


def poptune(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "poptune", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], what: str) -> None:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{out}")


def progress(db: Path, name: str) -> float:
    """The fraction of the run's member-steps trained so far (0 before it exists)."""
    from poptune.progress import Snapshot
    from poptune.storage import open_storage

    if not db.exists():
        return 0.0
    with open_storage(f"sqlite:///{db}") as store:
        info = store.get_run(name)
        return 0.0 if info is None else Snapshot(info, tuple(store.members(name))).fraction


def start_dashboard(db: Path, cwd: Path) -> tuple[subprocess.Popen[str], str]:
    proc = poptune("dashboard", "--storage", str(db), "--port", "0", "--refresh", "1", cwd=cwd)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"(http://\S+/)", line)
    if not found:
        proc.terminate()
        raise SystemExit(f"the dashboard did not start: {line}")
    return proc, found.group(1)


def shoot(browser: Any, url: str, path: Path, *, full: bool, height: int = 1150) -> None:
    page = browser.new_page(viewport={"width": WIDTH, "height": height})
    page.goto(url)
    page.wait_for_selector("svg[data-figure='curves']")
    page.screenshot(path=str(path), full_page=full)
    page.close()
    print(f"wrote {path.relative_to(ROOT)}")


def example(browser: Any, label: str, name: str, work: Path, docs: Path, extra: list[str]) -> None:
    file = f"{name}.py"
    db = work / f"{name}.db"
    run = poptune(
        "run",
        str(ROOT / "examples" / file),
        "--storage",
        str(db),
        "--no-progress",
        *extra,
        cwd=work,
    )
    dashboard, url = None, ""
    try:
        while progress(db, name) < 0.5 and run.poll() is None:
            time.sleep(0.5)
        dashboard, url = start_dashboard(db, work)
        # The dashboard while the run trains (a fast run may have finished by now).
        shoot(browser, f"{url}runs/{name}", docs / f"dashboard-{label}.png", full=False)
        finish(run, f"poptune run {file}")
    finally:
        if run.poll() is None:
            run.terminate()
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(10)
    out = work / f"{name}-report"
    finish(
        poptune("report", name, "--storage", str(db), "--out", str(out), "--no-png", cwd=work),
        "poptune report",
    )
    shoot(browser, (out / "report.html").as_uri(), docs / f"report-{label}.png", full=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("toy", "gan"), default=None)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    docs = ROOT / "docs"
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        work = Path(tmp)
        if args.only in (None, "toy"):
            example(browser, "toy", "toy_quadratic", work, docs, [])
        if args.only in (None, "gan"):
            example(browser, "gan", "gan_digits", work, docs, ["--workers", "2"])
        browser.close()


if __name__ == "__main__":
    main()
