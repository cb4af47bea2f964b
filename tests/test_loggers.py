"""Loggers: fed from the storage in commit order; TensorBoard curves read back from the files."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import poptune as pt
from poptune.loggers import LoggedRun, LoggedStep, Logger, TensorBoardLogger
from poptune.result import Event, Result

pytest.importorskip("tensorboardX")  # the reference the files are compared with
pytest.importorskip("crc32c")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_quadratic.py"


def _toy() -> Any:
    """examples/toy_quadratic.py, imported by path as tests/test_examples.py does."""
    import importlib.util

    name = "poptune_example_toy_quadratic"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses need the module registered
        spec.loader.exec_module(module)
    return sys.modules[name]


class Recorder(Logger):
    """Keeps every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.run: LoggedRun | None = None
        self.result: Result | None = None

    def start(self, run: LoggedRun) -> None:
        self.run = run

    def on_result(self, step: LoggedStep) -> None:
        self.calls.append(("result", step))

    def on_event(self, event: Event, bridge: Sequence[LoggedStep]) -> None:
        self.calls.append(("event", (event, list(bridge))))

    def close(self, result: Result | None) -> None:
        self.result = result


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # TensorBoard keeps float32


def _slow_init(hp: dict[str, Any], seed: int) -> float:
    return 0.0


def _slow_step(x: float, hp: dict[str, Any]) -> tuple[float, float]:
    time.sleep(0.002)
    x = x + hp["lr"]
    return x, x


def check_commit_order(rec: Recorder, result: Result) -> None:
    """Every result once; an event after the member's steps up to ``event.step`` and the
    donor's up to ``donor_step``, and before the first step of the stretch it began.

    A donor may have reached ``donor_step`` without training it: by copying a donor ahead of
    it (its step became that donor's; asynchronous workers do this). Its state there is then
    the one its own exploit event, handed on before, names; the bridge has the donor's steps
    it did train."""
    seen: set[tuple[int, int]] = set()
    arrived: set[tuple[int, int]] = set()  # (member, step) reached by copying a donor ahead
    events_seen: set[int] = set()
    for kind, item in rec.calls:
        if kind == "result":
            step: LoggedStep = item
            assert (step.member, step.step) not in seen
            seen.add((step.member, step.step))
            if step.segment is not None:
                assert step.segment in events_seen, (step, sorted(events_seen))
                assert step.hparams == result.events[step.segment].new_hparams
            else:
                assert step.hparams == result.initial_hparams[step.member]
        else:
            event, bridge = item
            events_seen.add(event.index)
            if event.kind != "replace" and event.step > 0:
                assert (event.member, event.step) in seen
            if event.donor is not None and event.donor_step and event.donor != event.member:
                assert (event.donor, event.donor_step) in seen | arrived, event
                trained = range(event.step, event.donor_step + 1)
                assert [b.step for b in bridge] == [s for s in trained if (event.donor, s) in seen]
                assert all(b.member == event.donor for b in bridge)
                if event.donor_step > event.step:
                    arrived.add((event.member, event.donor_step))
    assert seen == {(h.member, h.step) for h in result.history}
    assert events_seen == {e.index for e in result.events}


def test_loggers_get_every_record_in_commit_order_serial() -> None:
    toy = _toy()
    rec = Recorder()
    result = toy.experiment("PBT", 0).run(loggers=[rec])
    assert rec.run is not None and rec.run.metric == "Q" and rec.run.population_size == 2
    assert rec.run.hparams == ("h0", "h1")
    check_commit_order(rec, result)
    assert rec.result == result


def test_a_feed_polling_while_the_run_commits_keeps_the_order(tmp_path: Path) -> None:
    """Read many times while the run commits (every 10 ms, from another thread, on its own
    connection), the feed still hands on every record once and in commit order."""
    from poptune.loggers import LogFeed
    from poptune.storage import open_storage

    toy = _toy()
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    rec = Recorder()
    polls: list[int] = []
    with open_storage(url) as store:
        feed = LogFeed(store, "quad", [rec], interval=0.01)
        original = feed.poll
        feed.poll = lambda **kw: polls.append(original(**kw)) or polls[-1]  # type: ignore[method-assign]
        with feed:
            result = (
                toy.experiment("PBT", 1)
                .replace(population_size=4, initial_hparams=None, steps=60)
                .run(url, "quad")
            )
    assert sum(1 for p in polls if p) >= 2  # records arrived over several reads
    check_commit_order(rec, result)
    assert rec.result == result


@pytest.mark.slow
def test_loggers_follow_a_run_of_worker_processes(tmp_path: Path) -> None:
    """The feed reads what worker processes commit, while they train."""
    exp = pt.Experiment(
        pt.trainable(_slow_init, _slow_step),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=4,
        steps=120,
        interval=5,
        exploit=pt.Truncation(0.5),
        seed=3,
    )
    rec = Recorder()
    result = exp.run(f"sqlite:///{tmp_path / 'runs.db'}", "procs", workers=2, loggers=[rec])
    # How many exploits happen depends on the workers' timing (3 to 28 measured here; none
    # is possible on a loaded machine): the order is checked for whatever was committed.
    check_commit_order(rec, result)


class Broken(Logger):
    def on_result(self, step: LoggedStep) -> None:
        raise RuntimeError("disk full")


def test_a_failing_logger_is_dropped_and_the_run_goes_on(caplog: Any) -> None:
    toy = _toy()
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="poptune"):
        result = toy.experiment("PBT", 0).run(loggers=[Broken(), rec])
    assert result.best.step == toy.STEPS
    assert "raised in on_result() and is dropped" in caplog.text
    assert sum(1 for k, _ in rec.calls if k == "result") == len(result.history)


def test_tensorboard_curves_continue_from_the_donor_and_never_go_back(tmp_path: Path) -> None:
    """Read back from the event files: each member's steps never decrease; at each exploit its
    curve meets the donor's value at the donor's step and continues with its own; the
    hyperparameters are the step function the member trained with; ``best`` is the final
    best member's ancestry with its schedule."""
    toy = _toy()
    result = toy.experiment("PBT", 0).run(loggers=[TensorBoardLogger(tmp_path / "tb")])
    root = tmp_path / "tb" / "run"
    assert sorted(os.listdir(root)) == ["best", "member_00", "member_01"]
    q = {m: {h.step: h.metrics["Q"] for h in result.history if h.member == m} for m in (0, 1)}
    for member in (0, 1):
        folder = root / f"member_{member:02d}"
        curve = scalars(folder, "Q")
        steps = [s for s, _ in curve]
        assert steps == sorted(steps)  # no sawtooth: steps never go back
        # Every step the member trained is on its curve.
        for s, value in q[member].items():
            assert any(t == s and _close(v, value) for t, v in curve), (member, s)
        # At each exploit the curve continues from the donor's value at the donor's step.
        for e in result.events:
            if e.member != member or e.kind != "exploit" or e.donor == member:
                continue
            assert e.donor is not None and e.donor_step is not None
            donor_value = q[e.donor][e.donor_step]
            at = [v for s, v in curve if s == e.donor_step]
            assert any(_close(v, donor_value) for v in at), (e, at)
            after = [v for s, v in curve if s == e.donor_step + 1]
            if e.donor_step + 1 in q[member]:
                assert after and _close(after[-1], q[member][e.donor_step + 1])
        # Hyperparameters: what each recorded step was trained with.
        h0 = scalars(folder, "hparams/h0")
        for h in (h for h in result.history if h.member == member):
            values = [v for s, v in h0 if s == h.step]
            assert any(_close(v, result.hparams_at(h)["h0"]) for v in values)
    # The best member's ancestry, step by step, with its schedule.
    schedule = result.schedule()
    by_key = {(h.member, h.step): h for h in result.history}
    best_q = scalars(root / "best", "Q")
    assert [s for s, _ in best_q] == [s.step for s in schedule]
    for (_, v), sched in zip(best_q, schedule, strict=True):
        assert _close(v, by_key[(sched.member, sched.step)].metrics["Q"])
    assert [v for _, v in scalars(root / "best", "ancestor")] == [s.member for s in schedule]
    assert [v for _, v in scalars(root / "best", "hparams/h1")] == pytest.approx(
        [s.hparams["h1"] for s in schedule], rel=1e-6, abs=1e-7
    )


def test_events_are_encoded_as_tensorboardx_serialises_them() -> None:
    from tensorboardX.proto import event_pb2, summary_pb2

    from poptune.loggers.tensorboard import EventEncoder

    encoder = EventEncoder()
    for wall, step, values in [
        (1.5, 0, []),
        (1795631092.98, 7, [("Q", 0.5), ("hparams/lr", 1e-3)]),
        (2.0, 2**40, [("t" * 200, -math.inf), ("nan", math.nan), ("ü/x", 3.0)]),
    ]:
        summary = summary_pb2.Summary()
        for tag, value in values:
            summary.value.add(tag=tag, simple_value=value)
        expected = event_pb2.Event(wall_time=wall, step=step, summary=summary)
        assert encoder.scalars(wall, step, values) == expected.SerializeToString()
    header = event_pb2.Event(wall_time=3.0, file_version="brain.Event:2")
    assert EventEncoder.file_version(3.0) == header.SerializeToString()


def test_event_files_are_framed_as_tensorboardx_frames_them(tmp_path: Path) -> None:
    from tensorboardX.record_writer import RecordWriter

    from poptune.loggers.tensorboard import EventFile

    records = [b"", b"x", bytes(range(256)) * 3]
    ours = EventFile(str(tmp_path / "ours"), __import__("crc32c").crc32c)
    theirs = RecordWriter(str(tmp_path / "theirs"))
    for data in records:
        ours.write(data)
        theirs.write(data)
    ours.close()
    theirs.close()
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


def test_tensorboard_logger_without_crc32c_says_what_to_install(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "crc32c", None)
    with pytest.raises(ImportError, match=r"pip install 'poptune\[tensorboard\]'"):
        TensorBoardLogger("tb")


def test_cli_run_tensorboard_writes_event_files(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "poptune", "run", str(TOY), "--no-progress", "--tensorboard", "tb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "tb" / "toy_quadratic"
    assert sorted(os.listdir(root)) == ["best", "member_00", "member_01"]
    assert len(scalars(root / "best", "Q")) == 200
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in proc.stdout
