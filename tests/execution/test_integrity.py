"""Checkpoints that cannot be trusted: damaged, missing or planted files, a full disk, a
checkpoint root that changes. None of them is a member's fault, none may kill a run."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import SOURCE, check_complete, check_exact, experiment

import poptune as pt
from poptune.execution import lifecycle
from poptune.storage import open_storage
from poptune.storage.base import StorageError
from poptune.storage.checkpoints import CheckpointStore

EXECUTORS = [pytest.param(1, id="serial"), pytest.param(2, id="processes", marks=pytest.mark.slow)]


def _damage(root: Path, location: str, how: str) -> None:
    path = root / location
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) - 5] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("workers", EXECUTORS)
def test_a_run_with_damaged_checkpoints_resumes_and_completes_with_no_member_failed(
    env: Any, tmp_path: Path, workers: int
) -> None:
    """Three members' current checkpoints truncated, bit-flipped and deleted, then the run
    extended: each member standing on a bad file goes back to its previous kept checkpoint
    (retraining the steps between), the failure is recorded against the file's member with its
    cause, no member fails, and every score is still what the lineage says. Before, one bad
    file failed member after member and stopped the run; resume burned more members."""
    env(noise=0, pop=4, steps=20, interval=5, delay=0.002 if workers > 1 else 0)
    url = f"sqlite:///{tmp_path}/runs.db"
    experiment().run(url, "r", workers=workers, source=SOURCE)
    with open_storage(url) as store:
        info = store.get_run("r")
        rows = store.members("r")
    assert info is not None and info.checkpoint_root is not None
    root = Path(info.checkpoint_root)
    standing = sorted({(r.checkpoint, r.id) for r in rows if r.checkpoint})
    assert len(standing) >= 3, standing
    damaged = {}
    for (location, member), how in zip(standing, ["truncate", "flip", "delete"], strict=False):
        _damage(root, location, how)
        damaged[location] = (member, how)

    env(steps=40)  # worker processes build the experiment from the environment
    result = experiment().run(url, "r", workers=workers, source=SOURCE, resume=True)

    check_complete(result, 40, 4)
    assert all(m.status == "finished" for m in result.members)  # none failed, none replaced
    with open_storage(url) as store:
        failures = store.failures("r")
        kept = {c.location for c in store.checkpoints("r")}
    found = {f.traceback.split("'")[1]: f for f in failures if "Damaged checkpoint" in f.traceback}
    assert set(found) == set(damaged)
    for location, (_, how) in damaged.items():
        f = found[location]
        assert f.member == int(location.split("member-")[1][:5]) and f.attempt == 0
        cause = "does not exist" if how == "delete" else "truncated, changed or replaced"
        assert cause in f.traceback
        assert location not in kept  # never a donor again
    rollbacks = [e for e in result.events if e.kind == "rollback"]
    assert {e.member for e in rollbacks} >= {m for m, _ in damaged.values()}
    assert all(e.donor_step is not None and e.donor_step < 20 for e in rollbacks)
    check_exact(result, synchronous=False)
    for r in result.members:  # every checkpoint the run ends on verifies
        assert result.load_state(r.id) is not None


def test_status_says_which_file_was_damaged_and_why(env: Any, tmp_path: Path) -> None:
    env(noise=0, pop=3, steps=10, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    exp = experiment()
    exp.run(url, "r", source=SOURCE)
    with open_storage(url) as store:
        info = store.get_run("r")
        location = store.members("r")[0].checkpoint
    assert info is not None and info.checkpoint_root is not None and location is not None
    _damage(Path(info.checkpoint_root), location, "truncate")
    exp.replace(steps=15).run(url, "r", source=SOURCE, resume=True)

    shown = subprocess.run(
        [sys.executable, "-m", "poptune", "status", "r", "--storage", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert location in shown.stdout and "truncated, changed or replaced" in shown.stdout


def test_a_full_checkpoint_disk_interrupts_the_run_without_failing_a_member(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write fails with ENOSPC: the write is retried, then the run ends as interrupted
    with one line naming the cause, and no member is failed; once there is room, resume
    completes it. Before, 4 members failed for good in 6 s."""
    env(noise=0, pop=4, steps=20, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    real = CheckpointStore._save_local
    saves = {"n": 0}

    def full(self: CheckpointStore, *args: Any) -> Any:
        saves["n"] += 1
        if saves["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(CheckpointStore, "_save_local", full)
    monkeypatch.setattr(lifecycle, "SAVE_BACKOFF", (0.01, 0.01))
    with pytest.raises(pt.RunInterrupted, match=r"No space left on device.*resume"):
        experiment().run(url, "r", source=SOURCE)
    with open_storage(url) as store:
        info = store.get_run("r")
        assert info is not None and info.status == "interrupted"
        assert store.failures("r") == []
        assert all(r.state["status"] == "running" for r in store.members("r"))

    monkeypatch.setattr(CheckpointStore, "_save_local", real)
    result = experiment().run(url, "r", source=SOURCE)
    check_complete(result, 20, 4)
    check_exact(result, synchronous=False)


def test_another_checkpoint_root_for_an_existing_run_is_refused(env: Any, tmp_path: Path) -> None:
    """Before, the run's checkpoints were split between two folders and members failed with
    FileNotFoundError; the completed run's best model could not be exported."""
    env(noise=0, pop=2, steps=10, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    exp = experiment()
    exp.replace(steps=5).run(url, "r", source=SOURCE, checkpoints=str(tmp_path / "a"))

    with pytest.raises(ValueError, match=r"keeps its checkpoints in .*a.*another folder"):
        exp.run(url, "r", source=SOURCE, resume=True, checkpoints=str(tmp_path / "b"))
    assert not (tmp_path / "b" / "r").exists()
    # The same folder, named another way, is the same folder.
    exp.run(url, "r", source=SOURCE, resume=True, checkpoints=str(tmp_path / "x" / ".." / "a"))


class _Evil:
    def __reduce__(self) -> Any:
        return (Path.touch, (Path(_Evil.target),))

    target = ""


def _plant(root: Path, location: str, victim: Path) -> None:
    """Replaces a checkpoint with a pickle that touches ``victim`` when loaded, checksum
    recomputed and file renamed to match (an attacker with write access can do that)."""
    import hashlib

    _Evil.target = str(victim)
    payload = b"POPTUNE1P" + pickle.dumps({"x": _Evil()})
    old = root / location
    digest = hashlib.sha256(payload).hexdigest()[:32]
    new = old.with_name(old.name.rsplit("-", 1)[0] + f"-{digest}.ckpt")
    old.unlink()
    new.write_bytes(payload)
    return str(new.relative_to(root))


def test_a_planted_checkpoint_runs_no_code_through_export_or_load_state(
    env: Any, tmp_path: Path
) -> None:
    """A checkpoint replaced by a pickle that runs code, its row pointed at it: neither
    ``poptune export --checkpoint`` nor ``Result.load_state()`` runs it, and both say how to
    opt in."""
    env(noise=0, pop=2, steps=10, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    experiment().run(url, "r", source=SOURCE)
    victim = tmp_path / "code-ran"
    with open_storage(url) as store:
        info = store.get_run("r")
        assert info is not None and info.checkpoint_root is not None
        best = max(store.members("r"), key=lambda r: r.state["score"])
        assert best.checkpoint is not None
        planted = _plant(Path(info.checkpoint_root), best.checkpoint, victim)
        with store.transaction("r") as tx:
            tx.put_members([type(best)(**{**best.__dict__, "checkpoint": planted})])

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "poptune",
            "export",
            "r",
            "--storage",
            url,
            "--checkpoint",
            str(tmp_path / "best.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "allow_pickle=True" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    with pytest.raises(pickle.UnpicklingError, match="allow_pickle=True"):
        pt.load(url, "r").load_state(best.id)
    assert not victim.exists()


def test_a_checkpoint_folder_without_its_marker_is_not_read(env: Any, tmp_path: Path) -> None:
    env(noise=0, pop=2, steps=10, interval=5)
    url = f"sqlite:///{tmp_path}/runs.db"
    experiment().run(url, "r", source=SOURCE)
    with open_storage(url) as store:
        info = store.get_run("r")
    assert info is not None and info.checkpoint_root is not None
    (Path(info.checkpoint_root) / "r" / ".poptune-run").unlink()

    with pytest.raises(StorageError, match=r"no \.poptune-run marker"):
        pt.load(url, "r").load_state()


def test_a_damaged_file_rolls_back_only_members_no_other_worker_holds(env: Any) -> None:
    """Two members stand on one damaged file; another worker holds one of them (it may be
    training it from its live state): only the finder's member and free members go back.
    Rewriting a row another worker trains mixed two lineages in its next commit."""
    from dataclasses import replace

    from poptune.execution.lifecycle import Lifecycle, committing
    from poptune.execution.session import controller_from, prepare_run
    from poptune.storage.checkpoints import DamagedCheckpoint
    from poptune.storage.memory import InMemoryStorage, MemoryCheckpointStore

    env(noise=0, pop=4, steps=20, interval=5)
    exp = experiment()
    store = InMemoryStorage()
    prepare_run(exp, store, "r")
    bad = "r/member-00002/step-000000010-0123456789ab.ckpt"
    old = "r/member-00002/step-000000005-ba9876543210.ckpt"
    with store.transaction("r") as tx:
        tx.add_checkpoints([(2, 5, old, 1), (2, 10, bad, 1)])
        rows = {r.id: r for r in tx.members()}
        holders = {0: "me", 1: "other", 2: None, 3: "other"}
        at = {0: bad, 1: bad, 2: bad, 3: old}
        tx.put_members(
            [
                replace(
                    rows[m],
                    owner=holders[m],
                    heartbeat=tx.now() if holders[m] else None,
                    checkpoint=at[m],
                    checkpoint_step=10 if at[m] == bad else 5,
                    state={**rows[m].state, "step": 10, "last_ready": 10},
                )
                for m in rows
            ]
        )
    life = Lifecycle(exp, store, "r", MemoryCheckpointStore(), pt.RunOptions(), "me")
    with committing(store, "r") as tx:
        stored = {r.id: r for r in tx.members()}
        pbt = controller_from(exp, tx.run(), stored.values())
        life.record_damaged(tx, pbt, 0, DamagedCheckpoint(bad, "test"), stored, keep_owner=False)

    after = {r.id: r for r in store.members("r")}
    assert after[0].checkpoint == old and after[0].state["step"] == 5  # the finder's
    assert after[2].checkpoint == old and after[2].state["step"] == 5  # a free member
    assert after[1] == stored[1]  # held by another worker: left to it
    assert after[3] == stored[3]  # not on the file
    assert [e["member"] for e in store.events("r")] == [0, 2]
    assert all(e["kind"] == "rollback" and e["donor"] == 2 for e in store.events("r"))
    assert bad not in {c.location for c in store.checkpoints("r")}
    (failure,) = store.failures("r")
    assert failure.member == 2 and failure.attempt == 0

    # The same worker's batch held member 2 with the row read before: it meets the file too,
    # after it was dealt with. Nothing more is recorded; member 2 is freed for a fresh claim.
    with store.transaction("r") as tx:
        tx.put_members([replace(after[2], owner="me", heartbeat=tx.now())])
    with committing(store, "r") as tx:
        stored = {r.id: r for r in tx.members()}
        pbt = controller_from(exp, tx.run(), stored.values())
        life.record_damaged(tx, pbt, 2, DamagedCheckpoint(bad, "test"), stored, keep_owner=False)
    assert len(store.failures("r")) == 1 and len(store.events("r")) == 2
    again = {r.id: r for r in store.members("r")}[2]
    assert again.owner is None and again.checkpoint == old
