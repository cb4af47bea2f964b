"""Ctrl-C, as a terminal sends it (SIGINT to the whole process group), ends a run cleanly."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import poptune as pt

SLOW = """\
import poptune as pt


def init(hp, seed):
    return 0.0


def step(x, hp):
    x = x + hp["lr"]
    return x, x


# Ready at every step: most of the time is spent committing, where an interrupt hurts most.
EXPERIMENT = pt.Experiment(
    pt.trainable(init, step), {"lr": pt.Float(0.1, 1.0)},
    population_size=4, steps=1500, interval=1, seed=0,
)
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _results(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM poptune_results").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "tries"), [("1", 3), ("2", 6)])
def test_ctrl_c_always_ends_cleanly_and_resume_completes(
    tmp_path: Path, workers: str, tries: int
) -> None:
    """Ctrl-C at several moments of a run (serial, and 2 worker processes, with the progress
    view on): exit 130, one line on stderr and no traceback, the run marked interrupted and
    no member held; then `poptune resume` completes it with every member. Before, a worker
    stopped inside a database call printed a SQLAlchemy traceback (here 1 in 6 tries)."""
    (tmp_path / "slow.py").write_text(SLOW)
    db = tmp_path / "poptune.db"
    rng = random.Random(int(workers))
    for attempt in range(tries):
        wait_for = rng.randrange(1, 400)
        proc = subprocess.Popen(
            [sys.executable, "-m", "poptune", "run", "slow.py", "--workers", workers]
            + (["--resume"] if attempt else []),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal job has
            # Ctrl-C reaches a foreground job; a shell starts background jobs with SIGINT
            # ignored, and the test may itself run in one (Python keeps an ignored SIGINT).
            preexec_fn=_default_sigint,
        )
        deadline = time.monotonic() + 90
        before = _results(db)
        while _results(db) < before + wait_for:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, (out, err)
        assert "Traceback" not in out + err, err
        assert err.strip().splitlines() == [err.strip().splitlines()[0]], err
        assert "poptune resume slow" in err
        info = pt.load(f"sqlite:///{db}", "slow")
        from poptune.storage import open_storage

        with open_storage(f"sqlite:///{db}") as store:
            run = store.get_run("slow")
            assert run is not None and run.status == "interrupted"
            assert all(r.owner is None for r in store.members("slow"))
        assert len(info.members) == 4
    done = subprocess.run(
        [sys.executable, "-m", "poptune", "resume", "slow", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    result = pt.load(f"sqlite:///{db}", "slow")
    assert [(m.step, m.status) for m in result.members] == [(1500, "finished")] * 4
