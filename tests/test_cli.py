"""The ``poptune`` command, run as a subprocess (``python -m poptune``) in a temporary folder."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import poptune as pt
from poptune.export import result_to_json
from poptune.result import HistoryRecord, MemberRecord, Result
from poptune.storage import open_storage

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_quadratic.py"

# A function-form experiment: x grows by lr each step (after an optional sleep); the score is x.
TINY = """\
import time

import poptune as pt


def init(hp, seed):
    return 0.0


def step(x, hp):
    time.sleep({delay})
    x = x + hp["lr"]
    return x, x


EXPERIMENT = pt.Experiment(
    pt.trainable(init, step), {{"lr": pt.Float(0.1, 1.0)}},
    population_size={population}, steps={steps}, interval=5, seed=0,
)
"""


def tiny(path: Path, *, steps: int = 10, population: int = 2, delay: float = 0.0) -> Path:
    path.write_text(TINY.format(steps=steps, population=population, delay=delay))
    return path


def poptune(
    *args: str,
    cwd: Path,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    stdin: str = "",
) -> subprocess.CompletedProcess[str]:
    """Runs the command; ``env`` adds variables (a POPTUNE_STORAGE of the caller's is dropped)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "POPTUNE_STORAGE")}
    return subprocess.run(
        [sys.executable, "-m", "poptune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **(env or {})},
        input=stdin,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exactly one ``poptune: error:`` line and no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("poptune: error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A folder where ``poptune run examples/toy_quadratic.py --no-progress`` has been run."""
    folder = tmp_path_factory.mktemp("toy")
    return folder, poptune("run", str(TOY), "--no-progress", cwd=folder)


# -- run, status, export ----------------------------------------------------------------------


def test_run_creates_storage_and_checkpoints_and_prints_summary(toy: Any) -> None:
    """`run FILE` stores the run in ./poptune.db, checkpoints beside it, and says where."""
    folder, proc = toy
    assert proc.returncode == 0, proc.stderr
    assert (folder / "poptune.db").is_file()
    assert (folder / "poptune-checkpoints" / "toy_quadratic").is_dir()
    best = pt.load(f"sqlite:///{folder / 'poptune.db'}", "toy_quadratic").best
    assert best.step == 200
    assert f"Q = {best.score:.6g} at step 200" in proc.stdout
    assert f"best member  {best.id}" in proc.stdout
    assert "sqlite:///poptune.db" in proc.stdout
    assert str(folder / "poptune-checkpoints" / "toy_quadratic") in proc.stdout
    assert "poptune status toy_quadratic" in proc.stdout
    assert "poptune export toy_quadratic --format csv" in proc.stdout


def test_status_lists_the_run_as_completed(toy: Any) -> None:
    """`status` without a run lists every run with its status and progress."""
    folder, _ = toy
    proc = poptune("status", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "toy_quadratic" in ln)
    assert "completed" in line
    assert "100%" in line


def test_status_of_a_run_shows_its_two_members(toy: Any) -> None:
    """`status RUN` shows the population: one row per member, each at 200/200."""
    folder, _ = toy
    proc = poptune("status", "toy_quadratic", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if "200/200" in ln and "finished" in ln]
    assert len(rows) == 2, proc.stdout
    assert "No failures." in proc.stdout


def test_export_json_is_strict_json_with_history_and_schedule(toy: Any) -> None:
    """`export --format json` writes valid JSON: 400 history rows, a 200-step best schedule."""
    folder, _ = toy
    proc = poptune("export", "toy_quadratic", "--format", "json", "-o", "out.json", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    data = strict_json((folder / "out.json").read_text())
    assert set(data) >= {"run", "config", "members", "history", "events", "best", "schedule"}
    assert data["run"]["name"] == "toy_quadratic"
    assert data["run"]["status"] == "completed"
    assert len(data["history"]) == 400
    assert len(data["schedule"]) == 200
    assert [s["step"] for s in data["schedule"]] == list(range(1, 201))
    best = pt.load(f"sqlite:///{folder / 'poptune.db'}", "toy_quadratic").best
    assert data["best"]["id"] == best.id
    assert data["schedule"][-1]["hparams"] == dict(best.hparams)


def test_export_json_to_stdout(toy: Any) -> None:
    """`export -o -` writes the JSON document itself to stdout."""
    folder, _ = toy
    proc = poptune("export", "toy_quadratic", "--format", "json", "-o", "-", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert len(strict_json(proc.stdout)["history"]) == 400


def test_export_csv_writes_three_tables(toy: Any) -> None:
    """`export --format csv` writes history, events and schedule with the documented columns."""
    folder, _ = toy
    proc = poptune("export", "toy_quadratic", "--format", "csv", "-o", "outdir", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    result = pt.load(f"sqlite:///{folder / 'poptune.db'}", "toy_quadratic")
    history = read_csv(folder / "outdir" / "history.csv")
    assert history[0] == [
        "member",
        "step",
        "segment",
        "score",
        "Q",
        "theta0",
        "theta1",
        "hp.h0",
        "hp.h1",
    ]
    assert len(history) == 1 + 400
    # Each row names its stretch of life and the hyperparameters it was trained with.
    for row, record in zip(history[1:], result.history, strict=True):
        assert row[2] == ("" if record.segment is None else str(record.segment))
        hp = result.hparams_at(record)
        assert [float(row[7]), float(row[8])] == [hp["h0"], hp["h1"]]
    assert any(r.segment is not None for r in result.history)
    events = read_csv(folder / "outdir" / "events.csv")
    assert events[0] == [
        "index",
        "kind",
        "member",
        "step",
        "donor",
        "donor_step",
        "operations",
        "old_h0",
        "old_h1",
        "new_h0",
        "new_h1",
    ]
    assert len(events) == 1 + len(result.events) > 1
    assert all(isinstance(json.loads(row[6]), dict) for row in events[1:])
    schedule = read_csv(folder / "outdir" / "schedule.csv")
    assert schedule[0] == ["step", "member", "h0", "h1"]
    assert len(schedule) == 1 + 200


def test_running_a_completed_run_again_returns_at_once(toy: Any) -> None:
    """The same `run` command again finds the run completed and reports the same best."""
    folder, first = toy
    proc = poptune("run", str(TOY), "--no-progress", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stdout
    best_line = next(ln for ln in first.stdout.splitlines() if "best member" in ln)
    assert best_line in proc.stdout


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    """Without --no-progress and without a terminal, a run still ends with its summary."""
    tiny(tmp_path / "quick.py")
    proc = poptune("run", "quick.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Run quick completed" in proc.stdout
    assert "\x1b[" not in proc.stdout  # no terminal control codes in piped output


def test_changed_configuration_is_refused_unless_resume(tmp_path: Path) -> None:
    """Another configuration under an existing name is refused, mentioning --resume."""
    tiny(tmp_path / "exp.py", steps=10)
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    tiny(tmp_path / "exp.py", steps=15)
    line = assert_one_line_error(poptune("run", "exp.py", "--no-progress", cwd=tmp_path))
    assert "different configuration" in line
    assert "--resume" in line
    proc = poptune("run", "exp.py", "--no-progress", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = pt.load(f"sqlite:///{tmp_path / 'poptune.db'}", "exp")
    assert [m.step for m in result.members] == [15, 15]


def test_run_failure_is_one_line_pointing_to_status(tmp_path: Path) -> None:
    """A run stopped by failures in user code exits 1 with one line that names `status`."""
    (tmp_path / "broken.py").write_text(
        TINY.format(steps=10, population=2, delay=0).replace(
            "x = x + hp", "raise ValueError('boom')\n    x = x + hp"
        )
    )
    proc = poptune("run", "broken.py", "--no-progress", "--max-retries", "0", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert proc.returncode == 1
    assert "see `poptune status broken`" in line
    status = poptune("status", "broken", cwd=tmp_path)
    assert "ValueError: boom" in status.stdout
    assert "Traceback (most recent call last)" in status.stdout  # the last one, in full


# -- errors ------------------------------------------------------------------------------------

PG_URL = "postgresql+psycopg://u:hunter2pw@127.0.0.1:1/db"
TWO = TINY.format(steps=10, population=2, delay=0) + "SECOND = EXPERIMENT\n"


@pytest.mark.parametrize(
    ("args", "files", "code", "needle"),
    # The commands run in a fresh folder holding exp.py; those with {"": ""} where a run exists.
    [
        pytest.param(["run", "missing.py"], {}, 2, "No such file", id="missing-file"),
        pytest.param(
            ["run", "empty.py"],
            {"empty.py": "x = 1\n"},
            1,
            "defines no poptune Experiment",
            id="no-experiment",
        ),
        pytest.param(
            ["run", "two.py"], {"two.py": TWO}, 1, "several Experiments", id="two-experiments"
        ),
        pytest.param(
            ["run", "bad.py"], {"bad.py": "1 / 0\n"}, 1, "ZeroDivisionError", id="import-error"
        ),
        pytest.param(
            ["run", "exp.py", "--storage", "mysql://u:hunter2pw@h/db"],
            {},
            1,
            "Unsupported",
            id="unsupported-scheme",
        ),
        pytest.param(
            ["run", "exp.py", "--storage", "nonsense"], {}, 1, "Not a storage URL", id="not-a-url"
        ),
        pytest.param(
            ["run", "exp.py", "--storage", "runs/x"],
            {},
            1,
            "Not a storage URL: 'runs/x'. Expected SQLite (sqlite:///FILE.db, or a path ending",
            id="path-without-suffix-quoted",
        ),
        pytest.param(
            ["status", "--storage", "weird://u:hunter2pw@h/db"],
            {},
            1,
            "Unsupported storage 'weird://u:***@h/db'",
            id="unknown-scheme-quoted-without-password",
        ),
        pytest.param(
            ["run", "exp.py", "--storage", "postgres://u:hunter2pw@127.0.0.1:1/db"],
            {},
            1,
            "Cannot reach storage postgresql+psycopg://u:***@127.0.0.1:1/db",
            id="postgres-scheme-means-psycopg",
        ),
        pytest.param(
            ["delete", "nosuchrun", "--yes"],
            {"": ""},
            1,
            "No run named 'nosuchrun'",
            id="delete-unknown-run",
        ),
        pytest.param(
            ["run", "exp.py", "--storage", PG_URL],
            {},
            1,
            "Cannot reach storage postgresql+psycopg://u:***@",
            id="run-unreachable-postgres",
        ),
        pytest.param(
            ["status", "--storage", PG_URL],
            {},
            1,
            "Cannot reach storage",
            id="status-unreachable-postgres",
        ),
        pytest.param(["run", "exp.py", "--name", "../evil"], {}, 2, "Run name", id="escaping-name"),
        pytest.param(["run", "exp.py", "--workers", "0"], {}, 2, "--workers", id="zero-workers"),
        pytest.param(
            ["status", "nosuchrun"],
            {"": ""},
            1,
            "No run named 'nosuchrun'",
            id="status-unknown-run",
        ),
        pytest.param(
            ["export", "nosuchrun"],
            {"": ""},
            1,
            "No run named 'nosuchrun'",
            id="export-unknown-run",
        ),
        pytest.param(
            ["resume", "nosuchrun"],
            {"": ""},
            1,
            "No run named 'nosuchrun'",
            id="resume-unknown-run",
        ),
        pytest.param(
            ["status", "somerun", "--storage", "sqlite:///absent.db"],
            {},
            1,
            "does not exist",
            id="status-no-storage-file",
        ),
        pytest.param(["frobnicate"], {}, 2, "invalid choice", id="unknown-command"),
    ],
)
def test_expected_failures_print_one_line(
    tmp_path: Path, args: list[str], files: Mapping[str, str], code: int, needle: str
) -> None:
    """Expected failures: one `poptune: error:` line, the right exit code, no password."""
    tiny(tmp_path / "exp.py")
    for name, text in files.items():
        if name:
            (tmp_path / name).write_text(text)
        else:
            assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    proc = poptune(*args, cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert proc.returncode == code, line
    assert needle in line
    assert "hunter2pw" not in proc.stdout + proc.stderr
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    assert not (tmp_path / "absent.db").exists()


def test_a_failing_storage_is_one_line_naming_it_and_how_to_resume(tmp_path: Path) -> None:
    """A storage that refuses writes (here a read-only SQLite database; a PostgreSQL server
    that went down or a full disk fail the same way) prints one line naming the storage,
    without its password, and the command that continues the run; no traceback unless
    POPTUNE_DEBUG is set. It used to print "unexpected OperationalError" after a traceback."""
    tiny(tmp_path / "exp.py")
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    read_only = "sqlite:///file:poptune.db?mode=ro&uri=true"
    args = ("run", "exp.py", "--name", "more", "--no-progress", "--storage", read_only)
    line = assert_one_line_error(poptune(*args, cwd=tmp_path))
    assert line.startswith(
        f"poptune: error: Storage {read_only} failed: attempt to write a readonly database."
    )
    assert line.endswith(f"`poptune resume more --storage '{read_only}'`.")
    debug = poptune(*args, cwd=tmp_path, env={"POPTUNE_DEBUG": "1"})
    assert "Traceback" in debug.stderr and debug.returncode == 1
    assert debug.stderr.strip().splitlines()[-1] == line


def test_resume_refuses_a_run_started_from_python(tmp_path: Path) -> None:
    """`resume` explains that a run started from Python has no file to load it from."""
    exp = pt.Experiment(
        pt.trainable(_init, _step), {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=5
    )
    exp.run(f"sqlite:///{tmp_path / 'poptune.db'}", "frompython")
    line = assert_one_line_error(poptune("resume", "frompython", cwd=tmp_path))
    assert "was not started with `poptune run`" in line


def test_resume_keeps_the_recorded_heartbeat_timeout_unless_given(tmp_path: Path) -> None:
    """`poptune resume RUN` without --heartbeat-timeout keeps the one the run was started
    with (it used to write the default 30 over it, and workers on other machines then
    judged each other by 30 s); --heartbeat-timeout replaces it."""
    tiny(tmp_path / "exp.py")
    url = f"sqlite:///{tmp_path / 'poptune.db'}"

    def recorded() -> float:
        with open_storage(url) as store:
            info = store.get_run("exp")
            assert info is not None
            return float(info.execution["heartbeat_timeout"])

    started = poptune("run", "exp.py", "--no-progress", "--heartbeat-timeout", "120", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert recorded() == 120.0
    resumed = poptune("resume", "exp", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert recorded() == 120.0
    told = poptune("resume", "exp", "--no-progress", "--heartbeat-timeout", "45", cwd=tmp_path)
    assert told.returncode == 0, told.stderr
    assert recorded() == 45.0


# -- resume after a crash ----------------------------------------------------------------------


def _count_results(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM poptune_results").fetchone()[0])
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def test_resume_completes_a_killed_run(tmp_path: Path) -> None:
    """A run killed with SIGKILL mid-way is finished by `poptune resume RUN`."""
    tiny(tmp_path / "slowish.py", steps=60, population=4, delay=0.005)
    proc = subprocess.Popen(
        [sys.executable, "-m", "poptune", "run", "slowish.py", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = tmp_path / "poptune.db"
    try:
        deadline = time.monotonic() + 60
        while _count_results(db) < 20:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run produced no results"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    url = f"sqlite:///{db}"
    from poptune.storage import open_storage

    with open_storage(url) as store:
        killed = store.get_run("slowish")
        assert killed is not None and killed.status != "completed"

    resumed = poptune("resume", "slowish", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Run slowish completed" in resumed.stdout
    with open_storage(url) as store:
        info = store.get_run("slowish")
        assert info is not None and info.status == "completed"
    result = pt.load(url, "slowish")
    assert [(m.step, m.status) for m in result.members] == [(60, "finished")] * 4
    last_step: dict[int, int] = {}
    for r in result.history:
        last_step[r.member] = r.step
    assert last_step == {0: 60, 1: 60, 2: 60, 3: 60}


# -- the progress view and export functions, in process ---------------------------------------


def _init(hp: dict[str, Any], seed: int) -> float:
    return 0.0


def _step(x: float, hp: dict[str, Any]) -> tuple[float, float]:
    return x + hp["lr"], x + hp["lr"]


def _small_run(tmp_path: Path, name: str) -> str:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    exp = pt.Experiment(
        pt.trainable(_init, _step), {"lr": pt.Float(0.1, 1.0)}, population_size=3, steps=12
    )
    exp.run(url, name)
    return url


def test_progress_renders_run_name_and_members(tmp_path: Path) -> None:
    """The renderer shows the run's name and one row per member, at its step."""
    from rich.console import Console

    from poptune.progress import RunProgress

    url = _small_run(tmp_path, "watched")
    view = RunProgress(url, "watched")
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(view.render())
    view.close()
    text = buffer.getvalue()
    assert "run watched" in text
    assert "completed 100%" in text
    rows = [ln.split() for ln in text.splitlines() if "12/12" in ln]
    assert sorted(r[0] for r in rows) == ["0", "1", "2"]


def test_progress_shows_starting_before_the_run_exists(tmp_path: Path) -> None:
    """A run not created yet renders as "starting", not as an error."""
    from rich.console import Console

    from poptune.progress import RunProgress

    url = _small_run(tmp_path, "other")
    view = RunProgress(url, "not-yet")
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(view.render())
    view.close()
    assert "run not-yet · starting" in buffer.getvalue()


def test_live_display_ends_showing_the_finished_population(tmp_path: Path) -> None:
    """The live view, drawn on a terminal while a run trains, ends on its final state."""
    from rich.console import Console

    from poptune.progress import ProgressDisplay

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    pt.Experiment(  # creates the schema, as `poptune run` does before the view starts
        pt.trainable(_init, _step), {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=4
    ).run(url, "warmup")
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    exp = pt.Experiment(
        pt.trainable(_init, _step), {"lr": pt.Float(0.1, 1.0)}, population_size=3, steps=30
    )
    with ProgressDisplay(url, "live", mode="live", console=console, interval=0.05):
        exp.run(url, "live")
    text = buffer.getvalue()
    assert "run live" in text
    assert text.count("30/30") >= 3
    assert "finished" in text


def test_export_json_writes_non_finite_numbers_as_null() -> None:
    """NaN and infinite scores become null, so the export is valid JSON."""
    result = Result(
        name="r",
        mode="max",
        metric="score",
        initial_hparams={0: {"lr": 0.1}},
        members=[MemberRecord(0, {"lr": 0.1}, 2, math.nan, "finished")],
        history=[
            HistoryRecord(0, 1, {"score": math.inf, "loss": 1.0}, math.inf),
            HistoryRecord(0, 2, {"score": math.nan}, math.nan),
        ],
        events=[],
    )
    data = strict_json(json.dumps(result_to_json(result), allow_nan=False))
    assert [h["score"] for h in data["history"]] == [None, None]
    assert data["history"][0]["metrics"] == {"score": None, "loss": 1.0}
    assert data["best"]["score"] is None
    assert len(data["schedule"]) == 2


def test_version() -> None:
    """`--version` prints the package version."""
    proc = subprocess.run(
        [sys.executable, "-m", "poptune", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == f"poptune {pt.__version__}"


# -- storages named by path or by POPTUNE_STORAGE; checkpoints of PostgreSQL runs --------------


def pt_storage(url: str) -> Any:
    from poptune.storage import open_storage

    return open_storage(url)


def test_a_bare_path_is_a_sqlite_storage(tmp_path: Path) -> None:
    """`--storage runs/x.sqlite` stores the run in that file, checkpoints beside it."""
    tiny(tmp_path / "exp.py")
    (tmp_path / "runs").mkdir()
    proc = poptune("run", "exp.py", "--no-progress", "--storage", "runs/x.sqlite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "x.sqlite").is_file()
    assert (tmp_path / "runs" / "x-checkpoints" / "exp").is_dir()
    assert "poptune status exp --storage sqlite:///runs/x.sqlite" in proc.stdout
    status = poptune("status", "exp", "--storage", "runs/x.sqlite", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert not (tmp_path / "poptune.db").exists()


def test_poptune_storage_is_every_commands_default(tmp_path: Path) -> None:
    """POPTUNE_STORAGE replaces sqlite:///poptune.db as the default; --storage still wins."""
    tiny(tmp_path / "exp.py")
    env = {"POPTUNE_STORAGE": "sqlite:///other.db"}
    proc = poptune("run", "exp.py", "--no-progress", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "other.db").is_file() and not (tmp_path / "poptune.db").exists()
    assert "poptune status exp\n" in proc.stdout  # no --storage needed while it is set
    listed = poptune("status", cwd=tmp_path, env=env)
    assert "exp" in listed.stdout and "completed" in listed.stdout
    exported = poptune("export", "exp", "--format", "json", "-o", "-", cwd=tmp_path, env=env)
    assert len(strict_json(exported.stdout)["history"]) == 20
    absent = poptune("status", "--storage", "sqlite:///poptune.db", cwd=tmp_path, env=env)
    assert absent.stdout.strip() == "No runs in sqlite:///poptune.db yet.", absent.stderr
    bare = poptune("status", cwd=tmp_path, env={"POPTUNE_STORAGE": "other.db"})
    assert "exp" in bare.stdout, bare.stderr


def test_a_bad_poptune_storage_is_named_and_its_password_hidden(tmp_path: Path) -> None:
    """An unusable POPTUNE_STORAGE fails in one line that says where it came from."""
    line = assert_one_line_error(
        poptune("status", cwd=tmp_path, env={"POPTUNE_STORAGE": "nonsense"})
    )
    assert "Not a storage URL: 'nonsense'" in line and "(from POPTUNE_STORAGE)" in line
    proc = poptune("status", cwd=tmp_path, env={"POPTUNE_STORAGE": PG_URL})
    assert "Cannot reach storage" in assert_one_line_error(proc)
    assert "hunter2pw" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "command", ["run", "resume", "worker", "status", "export", "delete", "compare"]
)
def test_every_command_documents_poptune_storage(command: str, tmp_path: Path) -> None:
    proc = poptune(command, "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "$POPTUNE_STORAGE" in proc.stdout and "sqlite:///poptune.db" in proc.stdout


def test_postgres_run_says_where_its_checkpoints_are(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL run's checkpoints get a folder of their own, and the command says so."""
    from poptune.execution import default_checkpoint_root

    tiny(tmp_path / "exp.py")
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0  # SQLite
    proc = poptune("run", "exp.py", "--no-progress", "--storage", pg_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with pt_storage(pg_url) as store:
        info = store.get_run("exp")
    assert info is not None and info.checkpoint_root is not None
    root = Path(info.checkpoint_root)
    assert root.parent == tmp_path / "poptune-checkpoints" and root.name != "exp"
    monkeypatch.chdir(tmp_path)
    assert str(root) == default_checkpoint_root(pg_url)
    assert (root / "exp").is_dir() and (tmp_path / "poptune-checkpoints" / "exp").is_dir()
    note = [ln for ln in proc.stderr.splitlines() if "every worker machine" in ln]
    assert note == [
        f"poptune: note: checkpoints are in {root / 'exp'}; every worker machine must reach "
        "that path (or pass --checkpoints with a shared path or an fsspec URL)."
    ]


# -- delete ------------------------------------------------------------------------------------


def test_delete_with_yes_removes_the_run_and_its_checkpoints(tmp_path: Path) -> None:
    """`delete RUN --yes`: the run leaves the storage and its checkpoint folder goes."""
    tiny(tmp_path / "exp.py")
    tiny(tmp_path / "other.py")
    for name in ("exp.py", "other.py"):
        assert poptune("run", name, "--no-progress", cwd=tmp_path).returncode == 0
    folder = tmp_path / "poptune-checkpoints" / "exp"
    assert folder.is_dir()
    proc = poptune("delete", "exp", "--yes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"Deleted run exp from sqlite:///poptune.db. Removed its checkpoints in {folder}." in (
        proc.stdout
    )
    assert not folder.exists()
    assert (tmp_path / "poptune-checkpoints" / "other").is_dir()
    listed = poptune("status", cwd=tmp_path).stdout
    assert "other" in listed and "exp " not in listed
    again = poptune("run", "exp.py", "--no-progress", cwd=tmp_path)  # the name is free again
    assert again.returncode == 0 and "Run exp completed" in again.stdout


@pytest.mark.parametrize(("answer", "deleted"), [("n\n", False), ("", False), ("yes\n", True)])
def test_delete_asks_first(tmp_path: Path, answer: str, deleted: bool) -> None:
    """Without --yes, only an answer of y or yes deletes; anything else deletes nothing."""
    tiny(tmp_path / "exp.py")
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    proc = poptune("delete", "exp", cwd=tmp_path, stdin=answer)
    assert "Delete run exp (completed, 2 members, 20 results) from sqlite:///poptune.db" in (
        proc.stderr
    )
    assert proc.returncode == (0 if deleted else 1), proc.stderr
    assert (tmp_path / "poptune-checkpoints" / "exp").exists() is not deleted
    with pt_storage(f"sqlite:///{tmp_path / 'poptune.db'}") as store:
        assert (store.get_run("exp") is None) is deleted


def test_delete_refuses_a_run_a_live_worker_holds_unless_forced(tmp_path: Path) -> None:
    """A running run whose member a live worker holds is kept, unless --force."""
    from dataclasses import replace

    from poptune.execution.session import new_worker_id

    tiny(tmp_path / "exp.py")
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    worker = new_worker_id()  # this test's process: alive
    store = pt_storage(f"sqlite:///{tmp_path / 'poptune.db'}")
    with store, store.transaction("exp") as tx:
        first = tx.members()[0]
        tx.put_members([replace(first, owner=worker, heartbeat=time.time())])
        tx.set_status("running")
    line = assert_one_line_error(poptune("delete", "exp", "--yes", cwd=tmp_path))
    assert f"member 0 is held by {worker}" in line and "--force" in line
    proc = poptune("delete", "exp", "--yes", "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "poptune-checkpoints" / "exp").exists()


def test_delete_judges_a_remote_worker_by_the_runs_heartbeat_timeout(tmp_path: Path) -> None:
    """A worker on another host, last heard 100 s ago, in a run whose workers record a 600 s
    heartbeat timeout, is alive: the run is kept (the default 30 s would call it dead)."""
    from dataclasses import replace

    tiny(tmp_path / "exp.py")
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    remote = "elsewhere.example:4242:4026531836:0123abcd"
    store = pt_storage(f"sqlite:///{tmp_path / 'poptune.db'}")
    with store, store.transaction("exp") as tx:
        first = tx.members()[0]
        tx.put_members([replace(first, owner=remote, heartbeat=time.time() - 100)])
        tx.set_execution({**tx.run().execution, "heartbeat_timeout": 600.0})
        tx.set_status("running")
    line = assert_one_line_error(poptune("delete", "exp", "--yes", cwd=tmp_path))
    # The age itself depends on how long the commands took: only its form is checked.
    assert re.search(rf"member 0 is held by {re.escape(remote)}, heartbeat \d+ s ago", line)
    with (
        pt_storage(f"sqlite:///{tmp_path / 'poptune.db'}") as store,
        store.transaction("exp") as tx,
    ):
        tx.set_execution({**tx.run().execution, "heartbeat_timeout": 30.0})
    proc = poptune("delete", "exp", "--yes", cwd=tmp_path)  # now presumed dead
    assert proc.returncode == 0, proc.stderr


def test_delete_leaves_a_folder_without_the_runs_marker(tmp_path: Path) -> None:
    """A checkpoint folder that does not carry the run's marker is not removed, and it says so."""
    tiny(tmp_path / "exp.py")
    assert poptune("run", "exp.py", "--no-progress", cwd=tmp_path).returncode == 0
    folder = tmp_path / "poptune-checkpoints" / "exp"
    (folder / ".poptune-run").unlink()
    proc = poptune("delete", "exp", "--yes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"Left {folder} in place" in proc.stdout
    assert folder.is_dir()


@pytest.mark.slow
def test_a_deleted_run_s_driver_never_trains_the_new_run_of_that_name(tmp_path: Path) -> None:
    """`poptune delete --force` while a driver with 2 workers trains the run, then a new run
    of the same name: the old driver and its workers stop without writing to the new run,
    which completes with its own configuration. Before, the old driver restarted its workers
    into the new run (members ended at steps 196 and 200 of a 30-step run)."""
    tiny(tmp_path / "exp.py", steps=400, population=4, delay=0.02)
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "POPTUNE_STORAGE")}
    old = subprocess.Popen(
        [sys.executable, "-m", "poptune", "run", "exp.py", "--no-progress", "--workers", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        url = f"sqlite:///{tmp_path / 'poptune.db'}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the old run has committed something
            if (tmp_path / "poptune.db").exists():
                with pt_storage(url) as store:
                    if store.get_run("exp") is not None and store.results("exp"):
                        break
            time.sleep(0.2)
        else:
            pytest.fail("the first run never committed")
        deleted = poptune("delete", "exp", "--yes", "--force", cwd=tmp_path)
        assert deleted.returncode == 0, deleted.stderr
        tiny(tmp_path / "exp.py", steps=6, population=2, delay=0.02)
        new = poptune("run", "exp.py", "--no-progress", cwd=tmp_path, timeout=240)
        assert new.returncode == 0, new.stderr
        out, err = old.communicate(timeout=240)
    finally:
        if old.poll() is None:
            old.kill()
    assert old.returncode != 0
    assert "was deleted" in out + err, (out, err)
    with pt_storage(url) as store:
        info = store.get_run("exp")
        rows = store.members("exp")
        results = store.results("exp")
    assert info is not None and info.status == "completed"
    assert len(rows) == 2 and all(r.state["step"] == 6 for r in rows)
    assert max(r.step for r in results) == 6


BOXED = """
import poptune as pt


class Box:
    def __init__(self, value):
        self.value = value


class Member(pt.Trainable):
    def __init__(self, hparams, seed):
        super().__init__(hparams, seed)
        self.box = Box(0.0)

    def step(self):
        self.box = Box(self.box.value + self.hparams["lr"])
        return {{"score": self.box.value}}

    def state_dict(self):
        return {{"box": self.box}}

    def load_state_dict(self, state):
        self.box = state["box"]


EXPERIMENT = pt.Experiment(
    Member, {{"lr": pt.Float(0.1, 1.0)}}, population_size=2, steps={steps}, interval=5,
    allow_pickle={allow},
)
"""


def test_a_state_holding_the_file_s_own_class_fails_fast_without_allow_pickle(
    tmp_path: Path,
) -> None:
    """Safe loading is the default: such a state stops the run at its first checkpoint with
    the opt-in named, before any member trains on (or fails for good)."""
    (tmp_path / "exp.py").write_text(BOXED.format(steps=10, allow=False))
    proc = poptune("run", "exp.py", "--no-progress", cwd=tmp_path)
    assert proc.returncode != 0
    assert "allow_pickle=True" in proc.stdout + proc.stderr
    with pt_storage(f"sqlite:///{tmp_path / 'poptune.db'}") as store:
        assert all(r.state["status"] != "failed" for r in store.members("exp"))


def test_states_of_the_file_s_own_classes_load_when_the_file_moved(tmp_path: Path) -> None:
    """With allow_pickle, a state holding a class of the experiment file loads wherever the
    file is: the run resumed from a copy in another folder, and its best state exported by a
    new process. Before, the file's module was named after its path, and both failed."""
    first, moved = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    moved.mkdir()
    (first / "exp.py").write_text(BOXED.format(steps=10, allow=True))
    storage = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = poptune("run", "exp.py", "--no-progress", "--storage", storage, cwd=first)
    assert proc.returncode == 0, proc.stderr
    (moved / "exp.py").write_text(BOXED.format(steps=20, allow=True))
    (first / "exp.py").unlink()
    proc = poptune("run", "exp.py", "--no-progress", "--storage", storage, "--resume", cwd=moved)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = poptune("export", "exp", "--storage", storage, "--checkpoint", "best.pkl", cwd=moved)
    assert out.returncode == 0, out.stderr
    assert (moved / "best.pkl").is_file()
    with pt_storage(storage) as store:
        assert all(r.state["step"] == 20 for r in store.members("exp"))
