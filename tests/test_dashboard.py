"""`poptune dashboard`: the application's pages (Starlette's test client), the command's errors,
and end to end in headless Chromium against a run that is training."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import experiment, marks, network_loads

from poptune.cli import build_parser, main
from poptune.storage import open_storage

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture
def stored(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    experiment().run(url, "done")
    return url


@pytest.fixture
def client(stored: str) -> Iterator[Any]:
    pytest.importorskip("httpx2")
    from starlette.testclient import TestClient

    from poptune.report.dashboard import create_app

    # Named as a browser on this machine names it (TestClient's own "testserver" is refused).
    with (
        open_storage(stored) as store,
        TestClient(create_app(store, refresh=1.0), base_url="http://localhost:8050") as c,
    ):
        yield c


def test_pages_show_every_run_and_its_report_offline(client: Any) -> None:
    index = client.get("/")
    assert index.status_code == 200 and 'href="/runs/done"' in index.text
    page = client.get("/runs/done")
    assert page.status_code == 200
    html = page.text
    assert network_loads(html) == []
    for figure in ("curves", "lineage", "schedule", "hparams"):
        assert marks(html, figure) > 0
    version = client.get("/runs/done/version").text
    assert re.search(rf'id="report" data-version="{version}"', html)
    assert client.get("/runs/done/section").text.startswith('<main id="report"')
    download = client.get("/runs/done/report.html").text
    assert "<script" not in download and network_loads(download) == []
    assert client.get("/runs/done/summary.json").json()["status"] == "completed"


def test_unknown_run_page_lists_the_runs(client: Any) -> None:
    missing = client.get("/runs/nope")
    assert missing.status_code == 404
    assert "No run named nope" in missing.text and 'href="/runs/done"' in missing.text


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("localhost:8050", True),
        ("LOCALHOST", True),
        ("127.0.0.1:80", True),
        ("[::1]:8050", True),
        ("evil.example", False),
        ("evil.example:8050", False),
        ("localhost.evil.example:8050", False),
        ("127.0.0.1.nip.io", False),
        ("localhost:evil", False),
        ("", False),
    ],
)
def test_only_loopback_host_names_are_served(client: Any, host: str, served: bool) -> None:
    """A request naming any host but this machine's loopback names is refused with 400, so a
    web page that renames its site to 127.0.0.1 (DNS rebinding) cannot read the runs through
    the user's browser. The dashboard used to answer any Host."""
    response = client.get("/runs/done/summary.json", headers={"Host": host})
    if served:
        assert response.status_code == 200 and response.json()["status"] == "completed"
    else:
        assert response.status_code == 400 and "completed" not in response.text


def test_the_names_a_dashboard_answers_follow_where_it_is_bound() -> None:
    """Bound to an address of a network, it answers that address too; bound to every
    address, any name (it is open to whoever reaches it, and says so)."""
    from poptune.report.dashboard import LOOPBACK_HOSTS, allowed_hosts

    assert allowed_hosts("127.0.0.1", "127.0.0.1") == LOOPBACK_HOSTS
    assert allowed_hosts("localhost", "::1") == LOOPBACK_HOSTS
    assert allowed_hosts("10.0.0.5", "10.0.0.5") == LOOPBACK_HOSTS | {"10.0.0.5"}
    assert allowed_hosts("fd00::5", "fd00::5") == LOOPBACK_HOSTS | {"[fd00::5]"}
    assert allowed_hosts("0.0.0.0", "0.0.0.0") is None


def test_the_served_dashboard_refuses_another_host(stored: str, tmp_path: Path) -> None:
    """End to end, `poptune dashboard` on a real socket: Host evil.example gets 400, Host
    localhost:PORT the page."""
    import http.client

    dashboard = _spawn(["dashboard", "--storage", stored, "--port", "0"], tmp_path)
    try:
        assert dashboard.stdout is not None
        line = dashboard.stdout.readline()
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        assert found, (line, dashboard.communicate())
        port = int(found.group(1))

        def get(host: str) -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.putrequest("GET", "/", skip_host=True)
                conn.putheader("Host", host)
                conn.endheaders()
                response = conn.getresponse()
                return response.status, response.read().decode()
            finally:
                conn.close()

        status, body = get("evil.example")
        assert status == 400 and 'href="/runs/done"' not in body
        status, body = get(f"localhost:{port}")
        assert status == 200 and 'href="/runs/done"' in body
    finally:
        _stop(dashboard)


def test_binds_this_machine_only_by_default() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1"


def test_port_in_use_is_one_clear_line(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["dashboard", "--storage", stored, "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"poptune: error: port {port} on 127.0.0.1 is in use; pick another with --port "
        "(0 picks a free one)"
    )


def test_missing_extra_says_what_to_install(
    stored: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["dashboard", "--storage", stored, "--port", "0"]) == 1
    assert "pip install 'poptune[dashboard]'" in capsys.readouterr().err


LIVE = """\
import time

import poptune as pt


def init(hp, seed):
    return 0.0


def step(x, hp):
    time.sleep(0.03)
    x = x + hp["lr"]
    return x, x


EXPERIMENT = pt.Experiment(
    pt.trainable(init, step), {"lr": pt.Float(0.1, 1.0, log=True)},
    population_size=4, steps=400, interval=5, seed=0,
)
"""


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "POPTUNE_STORAGE"}
    return subprocess.Popen(
        [sys.executable, "-m", "poptune", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_dashboard_follows_a_live_run_in_chromium(chromium: Any, tmp_path: Path) -> None:
    """Opens a run's page while the run trains: the figures render with data, then update."""
    (tmp_path / "live.py").write_text(LIVE)
    db = tmp_path / "live.db"
    run = _spawn(["run", "live.py", "--storage", str(db), "--no-progress"], tmp_path)
    dashboard = None
    try:
        deadline = time.monotonic() + 60
        while True:  # until the run has committed its first ready point
            assert run.poll() is None, run.communicate()
            if db.exists():
                with open_storage(f"sqlite:///{db}") as store:
                    if store.get_run("live") is not None and store.results("live"):
                        break
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        dashboard = _spawn(
            ["dashboard", "--storage", str(db), "--port", "0", "--refresh", "0.5"], tmp_path
        )
        assert dashboard.stdout is not None
        line = dashboard.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if not found:
            _stop(dashboard)
            pytest.fail(f"the dashboard did not start: {line}{dashboard.communicate()}")
        page = chromium.new_page()
        page.goto(found.group(1))
        page.click("a[href='/runs/live']")
        page.wait_for_selector("svg[data-figure='curves']")
        drawn = """() => {
            const svg = document.querySelector("svg[data-figure='curves']");
            const lines = svg.querySelectorAll('polyline');
            let width = 0;
            for (const l of lines) width = Math.max(width, l.getBBox().width);
            return {marks: Number(svg.dataset.marks), lines: lines.length, width: width,
                    rows: Number(document.getElementById('report').dataset.rows),
                    status: document.getElementById('report').dataset.status};
        }"""
        first = page.evaluate(drawn)
        assert first["status"] == "running"
        assert first["rows"] > 0 and first["lines"] > 0 and first["width"] > 0, first
        # The page reloads its report while the run goes on: more rows, more marks drawn.
        page.wait_for_function(
            f"() => Number(document.getElementById('report').dataset.rows) > {first['rows']}",
            timeout=30_000,
        )
        later = page.evaluate(drawn)
        assert later["rows"] > first["rows"] and later["marks"] >= first["marks"], (first, later)
        assert later["width"] > 0
        assert "live: checked" in page.inner_text("#live")
        for figure in ("lineage", "schedule", "hparams"):
            assert page.locator(f"svg[data-figure='{figure}'] polyline").count() > 0
        page.close()
    finally:
        _stop(run)
        if dashboard is not None:
            _stop(dashboard)


def test_a_run_is_read_again_only_when_it_changed(
    stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("httpx2")
    from starlette.testclient import TestClient

    import poptune.report.data as data
    from poptune.report.dashboard import create_app

    reads: list[str] = []
    real = data.read_report

    def counting(store: Any, name: str, **kw: Any) -> Any:
        reads.append(name)
        return real(store, name, **kw)

    monkeypatch.setattr(data, "read_report", counting)
    with (
        open_storage(stored) as store,
        TestClient(create_app(store), base_url="http://127.0.0.1:8050") as c,
    ):
        for _ in range(3):
            assert c.get("/runs/done/section").status_code == 200
        assert reads == ["done"]
        store.update_run("done", status="interrupted")  # any change to the run
        assert 'data-status="interrupted"' in c.get("/runs/done/section").text
        assert reads == ["done", "done"]


def test_a_run_slow_to_read_is_read_at_most_a_tenth_of_the_time(
    stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report that takes 2 s to read (a large run) is served as it is for 18 s after, even
    when the run changed, and its page is told that version, so it does not ask again; then
    the run is read again. A dashboard left open takes at most a tenth of a core."""
    pytest.importorskip("httpx2")
    from starlette.testclient import TestClient

    import poptune.report.data as data
    from poptune.report.dashboard import create_app

    now = [100.0]
    reads: list[str] = []
    real = data.read_report

    def slow(store: Any, name: str, **kw: Any) -> Any:
        reads.append(name)
        now[0] += 2.0  # the read took 2 s
        return real(store, name, **kw)

    monkeypatch.setattr(data, "read_report", slow)
    with (
        open_storage(stored) as store,
        TestClient(create_app(store, clock=lambda: now[0]), base_url="http://[::1]:8050") as c,
    ):
        first = c.get("/runs/done/section").text
        version = c.get("/runs/done/version").text
        assert f'data-version="{version}"' in first and reads == ["done"]
        store.update_run("done", status="interrupted")
        now[0] += 17.0
        assert c.get("/runs/done/version").text == version  # the page keeps what it has
        assert 'data-status="interrupted"' not in c.get("/runs/done/section").text
        assert reads == ["done"]
        now[0] += 1.5  # 18.5 s after the read ended
        changed = c.get("/runs/done/version").text
        assert changed != version
        assert 'data-status="interrupted"' in c.get("/runs/done/section").text
        assert reads == ["done", "done"]
