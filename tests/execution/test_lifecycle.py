"""The shared member lifecycle: exactness, convergence and the regressions it fixed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import SOURCE, WORKLOADS, check_complete, check_exact, experiment

import poptune as pt
from poptune.controller import member_seed
from poptune.storage import open_storage

EXECUTORS = [pytest.param(1, id="serial"), pytest.param(2, id="processes", marks=pytest.mark.slow)]


@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("workers", EXECUTORS)
def test_every_score_is_what_the_lineage_says(
    env: Any, tmp_path: Path, workers: int, synchronous: bool
) -> None:
    """On a deterministic member (x += a, score x), with a retried failure and a member that
    fails for good and is replaced: each member's next score after an exploit is the donor's
    value at donor_step plus the new a, otherwise its own plus a; no step is trained twice.
    (The failures are injected before the first ready point, at 5: a member that copies a
    donor ahead of it skips steps, so a later failing step might never be trained.)"""
    env(
        noise=0,
        pop=5,
        steps=40,
        interval=5,
        sync=int(synchronous),
        delay=0.002 if workers > 1 else 0,
        fail=f"{member_seed(0, 1)}:2:once,{member_seed(0, 2)}:3:always",
    )
    url = f"sqlite:///{tmp_path}/runs.db"
    result = experiment().run(url, "r", workers=workers, source=SOURCE)
    assert result.member(2).status == "failed"
    assert result.member(1).status == "finished"
    with open_storage(url) as store:
        failed = {(f.member, f.step) for f in store.failures("r")}
    # Member 1's failure was retried; each is recorded at the step that raised, by every
    # executor (the serial one recorded the step before).
    assert (1, 2) in failed and (2, 3) in failed and len(failed) == 2
    check_complete(result, 40, 5)
    kinds = {e.kind for e in result.events}
    assert {"exploit", "replace"} <= kinds
    assert check_exact(result, synchronous) >= 3
    budget = 5 * 40
    assert len(result.history) <= budget * 1.10


@pytest.mark.slow
def test_saturating_score_with_workers_converges_within_budget(env: Any, tmp_path: Path) -> None:
    """Two workers on a score that saturates (rounded like an accuracy: ties near the top)
    finish, never copy a donor behind, and train at most 10 % more member-steps than the
    budget. Before, members copied donors an interval behind, rolled back and livelocked
    (3.6x the budget, or no end)."""
    env(pop=8, steps=100, interval=10, saturate=5, delay=0.002)
    url = f"sqlite:///{tmp_path}/runs.db"
    result = experiment().run(url, "r", workers=2, source=SOURCE)
    check_complete(result, 100, 8)
    assert all(e.donor_step is None or e.donor_step >= e.step for e in result.events)
    assert len(result.history) <= 8 * 100 * 1.10
    assert sum(e.kind == "exploit" for e in result.events) >= 5  # it still exploits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["load_state_dict", "set_hparams", "state_dict"])
def test_exceptions_outside_step_take_the_failure_path(
    env: Any, tmp_path: Path, method: str
) -> None:
    """An exception in load_state_dict, set_hparams or state_dict in a worker process is
    retried, then fails the member, which is replaced; the traceback is stored. Before, it
    crashed the worker process over and over, then stopped the run with no traceback."""
    always = member_seed(0, 1)
    once = member_seed(0, 2)
    env(fail_in=f"{always}:{method}:always,{once}:{method}:once", delay=0.001)
    url = f"sqlite:///{tmp_path}/runs.db"
    # cache_size=1: members are reloaded from checkpoints (load_state_dict) all the time.
    options = pt.RunOptions(cache_size=1, max_retries=2)
    result = experiment().run(url, "r", workers=2, source=SOURCE, options=options)
    check_complete(result, 40, 4)
    failures = open_storage(url).failures("r")
    by_member: dict[int, int] = {}
    for f in failures:
        assert f"in {method}" in f.traceback and "Traceback" in f.traceback
        by_member[f.member] = by_member.get(f.member, 0) + 1
    if method == "load_state_dict":
        # A member's first load is after its first ready point, unless it copied a donor.
        assert result.member(1).status in ("failed", "finished")
    else:
        assert result.member(1).status == "failed" and by_member[1] == 3
    assert by_member.get(2, 0) <= 1 and result.member(2).status == "finished"


@pytest.mark.slow
def test_a_worker_keeps_at_most_cache_size_trainables_and_closes_the_rest(
    env: Any, tmp_path: Path
) -> None:
    """With 2 workers and 10 members, no worker process ever holds more than cache_size (3)
    live trainables; those it lets go are closed. Before, one worker held 11."""
    env(pop=10, steps=30, interval=5, delay=0.001)
    url = f"sqlite:///{tmp_path}/runs.db"
    result = experiment().run(url, "r", workers=2, source=SOURCE)
    check_complete(result, 30, 10)
    assert max(h.metrics["live"] for h in result.history) <= 3
    assert max(h.metrics["live"] for h in result.history) >= 2  # it does keep some


@pytest.mark.slow
@pytest.mark.parametrize(
    ("threads", "expected"), [(None, max(1, len(os.sched_getaffinity(0)) // 2)), (3, 3)]
)
def test_workers_share_the_cores_among_math_libraries(
    env: Any, tmp_path: Path, threads: int | None, expected: int
) -> None:
    """Each of 2 workers sets its math libraries to its share of the cores (overridable):
    two PyTorch workers no longer each use every core."""
    env(pop=2, steps=10, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    options = pt.RunOptions(threads=threads)
    result = experiment().run(url, "r", workers=2, source=SOURCE, options=options)
    assert {h.metrics["omp"] for h in result.history} == {float(expected)}


def test_limit_threads_sets_torch_when_it_is_imported() -> None:
    """A worker's thread limit reaches torch as well as the OpenMP/BLAS variables."""
    torch = pytest.importorskip("torch")
    from poptune.execution.lifecycle import limit_threads

    before = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" == os.environ["MKL_NUM_THREADS"]
    finally:
        torch.set_num_threads(before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_run_at_top_level_without_main_guard_fails_and_says_why(tmp_path: Path) -> None:
    """A script that calls run(workers=2) at its top level (no __main__ guard) fails with a
    message naming the guard; it used to return a Result with no history and exit 0."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(WORKLOADS).parent)!r})
            from workloads import counter
            result = counter().run("sqlite:///{tmp_path}/runs.db", "r", workers=2)
            print("returned", len(result.history))
            """
        )
    )
    env = {**os.environ, "WL_LOCKS": "", "WL_STEPS": "10"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode != 0, done.stdout
    assert "returned" not in done.stdout
    assert 'if __name__ == "__main__":' in done.stderr
    assert open_storage(f"sqlite:///{tmp_path}/runs.db").get_run("r").status == "interrupted"


@pytest.mark.parametrize("workers", EXECUTORS)
def test_an_explore_strategy_returning_nan_stops_the_run_naming_it(
    env: Any, tmp_path: Path, workers: int
) -> None:
    """An explore strategy whose hyperparameters are not in the space (a NaN learning rate)
    is a configuration error: the run stops at once, marked failed, with a message naming
    the strategy, the hyperparameter and the value, under every executor. Before, the serial
    executor trained on with lr=NaN, and worker processes raised inside their commit, died
    and were restarted until the run was given up as interrupted."""
    env(explore="nan", steps=20, delay=0.001 if workers > 1 else 0)
    url = f"sqlite:///{tmp_path}/runs.db"
    with pytest.raises(pt.RunFailed, match=r"NaNExplore.*'lr'.*nan") as info:
        experiment().run(url, "r", workers=workers, source=SOURCE)
    assert "Traceback" not in str(info.value)
    with open_storage(url) as store:
        run = store.get_run("r")
        assert run is not None and run.status == "failed"
        assert run.error is not None and "NaNExplore" in run.error and "'lr'" in run.error
        # Nothing of the refused commit was kept: no member took the NaN.
        assert all(math.isfinite(m.state["hparams"]["lr"]) for m in store.members("r"))


def test_an_explore_function_out_of_the_space_stops_the_run_naming_it() -> None:
    """A plain explore function that moves a hyperparameter out of its range stops the run
    (failed) with a message naming the function, the hyperparameter and the value; it used to
    end the run as interrupted, as if Ctrl-C had been pressed."""

    def too_far(hparams: dict[str, Any], rng: Any) -> dict[str, Any]:
        return {**hparams, "lr": 5.0}

    exp = pt.Experiment(
        pt.trainable(lambda hp, seed: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=3,
        steps=8,
        interval=2,
        exploit=pt.Truncation(0.34),
        explore=too_far,
    )
    store = open_storage("memory://")
    with pytest.raises(pt.RunFailed, match=r"'too_far'.*'lr'.*5\.0"):
        exp.run(store, "r")
    run = store.get_run("r")
    assert run is not None and run.status == "failed" and "'too_far'" in (run.error or "")


@pytest.mark.parametrize(
    ("returned", "needle"),
    [
        ({"score": None}, r"metric 'score'.*'score': None \(NoneType\)"),
        ({"score": "0.5x"}, r"metric 'score'.*'score': '0\.5x' \(str\)"),
        ({"score": 1.0, "acc": "high"}, r"metric 'acc'.*'acc': 'high' \(str\)"),
        (None, r"a number or a dict of numbers, but returned None"),
    ],
)
def test_a_metric_that_is_not_a_number_stops_the_run_at_once_naming_it(
    returned: Any, needle: str
) -> None:
    """step() returning None or a string for a metric is a configuration error: the run
    stops at the first step, with one failure recorded and a message naming the metric and
    the value. Before, it was retried max_retries times per member and the message did not
    name the metric."""

    class Wordy(pt.Trainable):
        def step(self) -> Any:
            return returned

        def state_dict(self) -> object:
            return 0

        def load_state_dict(self, state: Any) -> None:
            pass

    exp = pt.Experiment(Wordy, {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=4, interval=2)
    store = open_storage("memory://")
    with pytest.raises(pt.RunFailed, match=needle):
        exp.run(store, "r", options=pt.RunOptions(max_retries=5))
    assert len(store.failures("r")) == 1
    run = store.get_run("r")
    assert run is not None and run.status == "failed"


def test_a_member_knows_its_context(env: Any) -> None:
    """The trainable is told its run, member id, worker and starting step before it trains."""
    seen: list[pt.MemberContext] = []

    class Probe(pt.Trainable):
        def step(self) -> float:
            assert self.context is not None
            seen.append(self.context)
            return 1.0

        def state_dict(self) -> object:
            return 0

        def load_state_dict(self, state: Any) -> None:
            pass

    exp = pt.Experiment(Probe, {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=4, interval=2)
    exp.run(name="ctx")
    assert {(c.run, c.member) for c in seen} == {("ctx", 0), ("ctx", 1)}
    assert {c.step for c in seen} == {0, 2} and all(":" in c.worker for c in seen)


def test_all_nan_scores_warn_that_no_member_could_be_compared() -> None:
    """A run whose every score is NaN completes but warns: it was random search."""

    class Blind(pt.Trainable):
        def step(self) -> float:
            return float("nan")

        def state_dict(self) -> object:
            return 0

        def load_state_dict(self, state: Any) -> None:
            pass

    exp = pt.Experiment(Blind, {"lr": pt.Float(0.1, 1.0)}, population_size=2, steps=4, interval=2)
    with pytest.warns(RuntimeWarning, match="every score .* NaN or infinite"):
        exp.run()


@pytest.mark.slow
def test_resume_reuses_how_the_run_was_executed(env: Any, tmp_path: Path) -> None:
    """A run started with 2 worker processes is resumed with 2 worker processes unless told
    otherwise (resume used to start 1 worker, whatever the run was started with)."""
    env(steps=20, delay=0.001)
    url = f"sqlite:///{tmp_path}/runs.db"
    experiment().run(url, "r", workers=2, source=SOURCE)
    env(steps=40)
    longer = experiment()
    result = longer.run(url, "r", resume=True, source=SOURCE)
    pids = {h.metrics["pid"] for h in result.history if h.step > 20}
    assert len(pids) == 2 and float(os.getpid()) not in pids
    info = open_storage(url).get_run("r")
    assert (info.execution["executor"], info.execution["workers"]) == ("processes", 2)
    # Told otherwise: serial from now on, and remembered.
    env(steps=50)
    result = experiment().run(url, "r", resume=True, workers=1, source=SOURCE)
    assert {h.metrics["pid"] for h in result.history if h.step > 40} == {float(os.getpid())}
    assert open_storage(url).get_run("r").execution["workers"] == 1


def test_resume_says_and_records_the_changes_it_accepts(
    env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resuming with an edited configuration logs what changed and keeps a record of it."""
    url = f"sqlite:///{tmp_path}/runs.db"
    env(steps=10)
    experiment().run(url, "r")
    env(steps=20, interval=4)
    with caplog.at_level("WARNING", logger="poptune"):
        experiment().run(url, "r", resume=True)
    assert "steps 10 -> 20" in caplog.text and "interval 5 -> 4" in caplog.text
    changes = open_storage(url).get_run("r").execution["changes"]
    assert [c["changed"] for c in changes] == [{"interval": [5, 4], "steps": [10, 20]}]


@pytest.mark.parametrize("change", [{"metric": "x"}, {"mode": "min"}, {"population_size": 5}])
def test_resume_refuses_changes_that_would_change_what_history_means(
    env: Any, tmp_path: Path, change: dict[str, Any]
) -> None:
    """The metric, the mode and the population size cannot change on resume."""
    url = f"sqlite:///{tmp_path}/runs.db"
    env(steps=10)
    experiment().run(url, "r")
    with pytest.raises(pt.ConfigMismatch, match=next(iter(change))):
        experiment().replace(**change).run(url, "r", resume=True)


def test_synchronous_replacement_delivers_every_decision_on_time(env: Any, tmp_path: Path) -> None:
    """Serial executor, synchronous, a member failing for good mid-interval: every member
    trains each step with the hyperparameters it holds (x grows by exactly its lr), so no
    decision is delivered late; and the replacement joins the generation clock. Before, a
    generation closed on a tick where only the replacement was judged and other members
    trained another interval with their old hyperparameters."""
    env(noise=0, pop=4, steps=40, interval=5, sync=1, fail=f"{member_seed(0, 1)}:13:always")
    url = f"sqlite:///{tmp_path}/runs.db"
    result = experiment().run(url, "r", options=pt.RunOptions(max_retries=0))
    assert result.member(1).status == "failed" and result.member(4).replaces == 1
    check_complete(result, 40, 4)
    events = {(e.member, e.step): e for e in result.events}
    for m in result.members:
        if m.status != "finished":
            continue
        steps = {h.step: h.metrics["x"] for h in result.history if h.member == m.id}
        initial = result.initial_hparams.get(m.id)
        lr = None if initial is None else initial["lr"]
        for t in sorted(steps):
            if (m.id, t - 1) in events:
                lr = events[(m.id, t - 1)].new_hparams["lr"]
            elif t - 1 in steps and lr is not None:
                assert steps[t] - steps[t - 1] == pytest.approx(lr, rel=1e-9), (m.id, t)
        assert lr is None or lr == m.hparams["lr"]
    # Every generation is judged at the same steps for every member, replacement included.
    judged = {e.step for e in result.events if e.kind != "replace"}
    assert judged <= {5, 10, 15, 20, 25, 30, 35}


def test_a_commit_writes_only_the_members_it_changed(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's commit stores the rows it changed and leaves the others alone: the stored
    population is the same as when every row was written (one commit of a member copying
    another, replayed both ways on two copies of one run), but a commit at 1,000 members no
    longer rewrites 1,000 rows under the run's lock."""
    import poptune.execution.lifecycle as lifecycle
    from poptune.execution.session import write_population

    env(pop=6, interval=1, noise=0)
    changed = _commit_twice(tmp_path / "changed.db")
    monkeypatch.setattr(
        lifecycle,
        "write_population",
        lambda tx, pbt, rows, stored=None: write_population(tx, pbt, rows),
    )
    every = _commit_twice(tmp_path / "all.db")
    assert changed[1] == every[1]
    assert changed[1][0][2] in ("c4", "c5")  # member 0, the worst, copied a top member
    assert every[0] == [0, 1, 2, 3, 4, 5]
    assert changed[0] == [0]


def _commit_twice(path: Path) -> tuple[list[int], list[tuple[Any, ...]]]:
    """Members 1-5 commit step 1 (scores 1-5), then member 0 (score -1): the rows the second
    commit wrote, and every member's row afterwards."""
    from poptune.execution.lifecycle import Lifecycle, Trained
    from poptune.execution.session import controller_from, prepare_run
    from poptune.storage.base import ResultRow

    def trained(mid: int, score: float) -> Trained:
        return Trained(mid, 1, [ResultRow(mid, 1, score, {"score": score})], f"c{mid}", 1)

    store = open_storage(f"sqlite:///{path}")
    prepare_run(experiment(), store, "r")
    life = Lifecycle(experiment(), store, "r", _NoFiles(), pt.RunOptions(), "w")
    with store.transaction("r") as tx:
        stored = {r.id: r for r in tx.members()}
        for mid in range(6):
            stored[mid] = tx.claim(mid, "w", 30.0, known=stored)
        pbt = controller_from(experiment(), tx.run(), stored.values())
        first = [trained(mid, float(mid)) for mid in range(1, 6)]
        life.commit(tx, pbt, first, stored, keep_owner=False)
    puts: list[int] = []
    with store.transaction("r") as tx:
        stored = {r.id: r for r in tx.members()}
        pbt = controller_from(experiment(), tx.run(), stored.values())
        put = tx.put_members

        def counted(rows: Any) -> None:
            puts.extend(r.id for r in rows)
            put(rows)

        tx.put_members = counted  # type: ignore[method-assign]
        life.commit(tx, pbt, [trained(0, -1.0)], stored, keep_owner=False)
    rows = [(r.state, r.owner, r.checkpoint, r.checkpoint_step) for r in store.members("r")]
    store.close()
    return sorted(puts), rows


class _NoFiles:
    def save(self, run: str, member: int, step: int, state: object) -> Any:
        raise AssertionError("not used")

    def load(self, location: str) -> object:
        raise AssertionError("not used")

    def delete(self, location: str) -> None:
        pass
