"""Tests of poptune.storage.checkpoints: atomic checkpoint files, confined paths, retention."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import poptune
from poptune.storage.checkpoints import (
    CheckpointRef,
    CheckpointStore,
    DamagedCheckpoint,
    MissingCheckpoint,
    UnsafeCheckpoint,
    check_run_name,
    checkpoint_owner,
    select_for_deletion,
)

LOCATION = re.compile(r"[a-z0-9_.-]+/member-\d{5}/step-\d{9}-[0-9a-f]{12}-[0-9a-f]{32}\.ckpt")


def final_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*.ckpt") if not p.name.startswith(".tmp-"))


def temporary_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob(".tmp-*"))


# --- round trips -------------------------------------------------------------------------------


def test_pickle_round_trip(tmp_path: pathlib.Path) -> None:
    """Numpy arrays, nested dicts and a Generator's state come back equal, as format 'pickle'."""
    store = CheckpointStore(tmp_path)
    rng = np.random.default_rng(7)
    state: dict[str, Any] = {
        "weights": rng.normal(size=(3, 4)).astype(np.float32),
        "nested": {"lr": 0.1, "history": [1, 2, 3], "mask": np.array([True, False])},
        "rng": rng.bit_generator.state,
    }
    info = store.save("run-1", member=3, step=7, state=state)
    loaded = store.load(info.location)

    assert info.format == "pickle"
    assert LOCATION.fullmatch(info.location) and info.location.startswith("run-1/member-00003/")
    assert info.size == (tmp_path / info.location).stat().st_size
    assert isinstance(loaded, dict)
    np.testing.assert_array_equal(loaded["weights"], state["weights"])
    assert loaded["weights"].dtype == np.float32
    np.testing.assert_array_equal(loaded["nested"]["mask"], state["nested"]["mask"])
    assert loaded["nested"]["history"] == [1, 2, 3] and loaded["nested"]["lr"] == 0.1
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["rng"]
    assert restored.random() == rng.random()


def test_torch_round_trip(tmp_path: pathlib.Path) -> None:
    """A Linear state dict and an Adam state dict come back equal, as format 'torch'."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    store = CheckpointStore(tmp_path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}

    info = store.save("run", member=0, step=5, state=state)
    loaded = store.load(info.location)

    assert info.format == "torch"
    assert info.size == (tmp_path / info.location).stat().st_size
    assert isinstance(loaded, dict) and loaded["epoch"] == 2
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    fresh = torch.nn.Linear(4, 2)
    fresh.load_state_dict(loaded["model"])
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    for (_, a), (_, b) in zip(
        sorted(optimizer.state_dict()["state"].items()),
        sorted(fresh_optimizer.state_dict()["state"].items()),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01


def test_torch_imported_but_state_without_torch_objects_is_pickled(tmp_path: pathlib.Path) -> None:
    """Importing torch does not send plain states to torch.save; torch deep inside a state does."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    store = CheckpointStore(tmp_path)

    plain = store.save("run", 0, 1, {"a": np.arange(3), "b": [1.0]})
    deep = store.save("run", 0, 2, {"a": [{"b": (1, torch.zeros(2))}]})

    assert plain.format == "pickle" and deep.format == "torch"
    loaded = store.load(deep.location)
    assert isinstance(loaded, dict) and torch.equal(loaded["a"][0]["b"][1], torch.zeros(2))


def test_format_comes_from_the_header_not_the_name(tmp_path: pathlib.Path) -> None:
    """A torch checkpoint copied to a '.pkl' name still loads with torch.load."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    store = CheckpointStore(tmp_path)
    info = store.save("run", 0, 1, {"t": torch.arange(4)})
    (tmp_path / "copy.pkl").write_bytes((tmp_path / info.location).read_bytes())

    loaded = store.load("copy.pkl")

    assert isinstance(loaded, dict) and torch.equal(loaded["t"], torch.arange(4))


def test_file_without_header_is_rejected(tmp_path: pathlib.Path) -> None:
    """A file that CheckpointStore did not write is refused instead of unpickled."""
    store = CheckpointStore(tmp_path)
    (tmp_path / "foreign.ckpt").write_bytes(b"\x80\x05K\x01.")

    with pytest.raises(ValueError, match="must start with b'POPTUNE1'"):
        store.load("foreign.ckpt")


def test_save_of_numpy_state_does_not_import_torch(tmp_path: pathlib.Path) -> None:
    """Deciding pickle vs torch never imports torch when the caller has not."""
    script = (
        "import sys, numpy as np\n"
        "from poptune.storage.checkpoints import CheckpointStore\n"
        f"s = CheckpointStore({str(tmp_path)!r}, fsync=False)\n"
        "i = s.save('run', 0, 1, {'a': np.ones(2)})\n"
        "s.load(i.location)\n"
        "assert i.format == 'pickle', i\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=child_env(), timeout=60)


# --- names and sizes ---------------------------------------------------------------------------


def test_file_names_are_unique_and_sizes_match(tmp_path: pathlib.Path) -> None:
    """Saving the same (member, step) again makes a new file; each reported size is the file's."""
    store = CheckpointStore(tmp_path, fsync=False)

    infos = [store.save("run", 1, 10, {"i": i, "pad": b"x" * i}) for i in range(20)]

    assert len({info.location for info in infos}) == 20
    assert {pathlib.Path(info.location).parent.as_posix() for info in infos} == {"run/member-00001"}
    for i, info in enumerate(infos):
        assert info.size == (tmp_path / info.location).stat().st_size
        assert store.load(info.location) == {"i": i, "pad": b"x" * i}


def test_save_rejects_bad_run_member_and_step(tmp_path: pathlib.Path) -> None:
    """save() refuses run names that could leave the root, and negative or non-int ids."""
    store = CheckpointStore(tmp_path)

    with pytest.raises(ValueError, match="Run name must be"):
        store.save("../escape", 0, 0, {})
    with pytest.raises(ValueError, match="`member` must be an int >= 0"):
        store.save("run", -1, 0, {})
    with pytest.raises(ValueError, match="`step` must be an int >= 0"):
        store.save("run", 0, 1.5, {})  # type: ignore[arg-type]
    assert list(tmp_path.parent.glob("escape")) == []


@pytest.mark.parametrize("name", ["run", "r", "Run_1.v2-final", "0", "a" * 200, "a..b"])
def test_check_run_name_accepts_safe_names(name: str) -> None:
    """Letters, digits, '-', '_' and '.' (not leading), up to 200 characters, pass unchanged."""
    assert check_run_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "",
        ".hidden",
        ".",
        "..",
        "x" * 201,
        "a\\b",
        "run\n",
        "ü",
        "a b",
        "-rf",
        "--storage",
    ],
)
def test_check_run_name_rejects_unsafe_names(name: str) -> None:
    """Names with separators, a leading dot, no characters or too many are refused."""
    with pytest.raises(ValueError, match=r"Run name must be 1-200 characters.*; got "):
        check_run_name(name)


# --- interrupted writes ------------------------------------------------------------------------


def test_failed_rename_keeps_previous_checkpoint(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the final rename fails, the previous checkpoint loads, and no new file is left behind."""
    store = CheckpointStore(tmp_path)
    previous = store.save("run", 0, 1, {"v": np.arange(1000)})

    def interrupted(src: object, dst: object) -> None:
        raise OSError("interrupted")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        store.save("run", 0, 2, {"v": np.zeros(1000)})
    monkeypatch.undo()

    assert final_files(tmp_path) == [tmp_path / previous.location]
    assert temporary_files(tmp_path) == []
    loaded = store.load(previous.location)
    assert isinstance(loaded, dict)
    np.testing.assert_array_equal(loaded["v"], np.arange(1000))


def test_failed_serialisation_leaves_nothing(tmp_path: pathlib.Path) -> None:
    """A state that cannot be pickled raises, and leaves neither a final nor a temporary file."""
    store = CheckpointStore(tmp_path)

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        store.save("run", 0, 1, {"ok": np.ones(10), "bad": lambda: None})

    assert final_files(tmp_path) == [] and temporary_files(tmp_path) == []


def test_cleanup_temporary_removes_only_leftovers(tmp_path: pathlib.Path) -> None:
    """cleanup_temporary removes '.tmp-' files of its run, and no checkpoint or other run's file."""
    store = CheckpointStore(tmp_path)
    kept = store.save("run", 0, 1, {"x": 1})
    other = store.save("other", 0, 1, {"x": 2})
    for run, member in [("run", 0), ("run", 4), ("other", 0)]:
        folder = tmp_path / run / f"member-{member:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".tmp-step-000000002-aaaaaaaaaaaa.ckpt").write_bytes(b"POPTUNE1P\x80")

    assert store.cleanup_temporary("run") == 2
    assert store.cleanup_temporary("run") == 0
    assert store.cleanup_temporary("never-saved") == 0
    assert store.load(kept.location) == {"x": 1} and store.load(other.location) == {"x": 2}
    assert len(temporary_files(tmp_path / "other")) == 1


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_collect_unreferenced_removes_only_the_runs_unreferenced_checkpoints(
    kind: str, tmp_path: pathlib.Path
) -> None:
    """collect_unreferenced deletes the .ckpt files of the run's member folders that are not
    referenced, and nothing else: not referenced ones, temporary files, the run's marker, other
    files, other runs' checkpoints."""
    if kind == "memory":
        fsspec = pytest.importorskip("fsspec", reason="fsspec is not installed")
        root = f"memory://poptune-test-{uuid.uuid4().hex}"
    else:
        import fsspec

        root = str(tmp_path)
    store = CheckpointStore(root)
    kept = store.save("run", 0, 5, {"x": 1})
    stray = [store.save("run", 0, 10, {"x": 2}), store.save("run", 3, 5, {"x": 3})]
    other = store.save("other", 0, 5, {"x": 4})
    others = {
        "run/.poptune-run": b"{}",
        "run/notes.ckpt": b"not in a member folder",
        "run/member-00000/.tmp-step-000000015-aaaaaaaaaaaa.ckpt": b"POPTUNE1P",
        "run/member-00000/README.txt": b"a user's file",
    }
    for path, data in others.items():
        with fsspec.open(f"{root}/{path}", "wb") as f:
            f.write(data)

    assert store.collect_unreferenced("run", {kept.location, "run/member-00009/gone.ckpt"}) == 2
    assert store.collect_unreferenced("run", {kept.location}) == 0
    assert store.collect_unreferenced("never-saved", ()) == 0
    assert not any(store.exists(s.location) for s in stray)
    assert store.load(kept.location) == {"x": 1} and store.load(other.location) == {"x": 4}
    fs, top = fsspec.core.url_to_fs(root)
    for path in others:
        assert fs.isfile(f"{top}/{path}"), path


KILL_CHILD = """
import sys, zlib
import numpy as np
from poptune.storage.checkpoints import CheckpointStore

store = CheckpointStore(sys.argv[1])
data = np.random.default_rng(int(sys.argv[2])).random(6_000_000)  # 48 MB
crc = zlib.crc32(data)
saved = []
print("ready", flush=True)
for i in range(10_000):
    info = store.save("run", 0, i, {"i": i, "data": data, "crc": crc})
    print("saved", info.location, flush=True)
    saved.append(info.location)
    if len(saved) > 2:  # keep the last two, like a retention policy
        print("deleting", saved[0], flush=True)
        store.delete(saved.pop(0))
"""


def child_env() -> dict[str, str]:
    """The environment for a child process that imports this very poptune."""
    src = str(pathlib.Path(poptune.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src if not path else f"{src}{os.pathsep}{path}"}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_mid_save_never_leaves_a_broken_checkpoint(tmp_path: pathlib.Path) -> None:
    """After SIGKILL at any moment of a save loop, every final checkpoint loads complete.

    Five children in turn save a 48 MB state in a loop into the same run (each deleting its
    own older checkpoints) and are killed at different moments, most of them mid-write. The
    checkpoints of earlier children stay and must stay readable. The last three kills come
    only after their child has reported a finished save.
    """
    store = CheckpointStore(tmp_path)
    kills = [(False, 0.0), (False, 0.03), (True, 0.0), (True, 0.02), (True, 0.1)]
    for attempt, (after_a_save, delay) in enumerate(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(tmp_path), str(attempt)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n", "the child failed to start"
        lines = []
        if after_a_save:  # then the kill most likely hits the next save's write
            lines.append(child.stdout.readline().strip())
            assert lines[0].startswith("saved "), lines
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        lines += child.stdout.read().splitlines()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        saved = {line.split()[1] for line in lines if line.startswith("saved ")}
        deleting = {line.split()[1] for line in lines if line.startswith("deleting ")}
        files = final_files(tmp_path)
        present = {f.relative_to(tmp_path).as_posix() for f in files}
        assert saved - deleting <= present, "a save that returned is missing"
        for path in files:
            state = store.load(path.relative_to(tmp_path).as_posix())
            assert isinstance(state, dict)
            assert state["data"].shape == (6_000_000,)
            assert zlib.crc32(state["data"]) == state["crc"], f"{path} is corrupt"
        leftovers = len(temporary_files(tmp_path))
        assert store.cleanup_temporary("run") == leftovers
        assert temporary_files(tmp_path) == []
    assert len(final_files(tmp_path)) >= 3  # one from each child that had saved


# --- confinement -------------------------------------------------------------------------------


def outside_locations(tmp_path: pathlib.Path) -> list[str]:
    return [
        str(tmp_path / "outside.ckpt"),  # absolute
        "../outside.ckpt",
        "run/../../outside.ckpt",
        "run\\..\\..\\outside.ckpt",
        "",
        "run/link-to-outside.ckpt",  # a symlink to a file outside the root
        "run/linked-dir/outside.ckpt",  # through a symlinked directory
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_locations_outside_the_root_are_refused(tmp_path: pathlib.Path) -> None:
    """load, delete and exists refuse absolute paths, '..' and symlinks leading out of the root."""
    root = tmp_path / "root"
    store = CheckpointStore(root)
    outsider = CheckpointStore(tmp_path)
    info = outsider.save("run", 0, 1, {"secret": 1})
    (tmp_path / "outside.ckpt").write_bytes((tmp_path / info.location).read_bytes())
    store.save("run", 0, 1, {"inside": 1})
    (root / "run" / "link-to-outside.ckpt").symlink_to(tmp_path / "outside.ckpt")
    (root / "run" / "linked-dir").symlink_to(tmp_path, target_is_directory=True)

    for location in outside_locations(tmp_path):
        for method in (store.load, store.delete, store.exists):
            with pytest.raises(ValueError, match="outside it"):
                method(location)
    assert (tmp_path / "outside.ckpt").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlink_that_stays_inside_the_root_is_allowed(tmp_path: pathlib.Path) -> None:
    """A symlink whose target is inside the root is followed like any path."""
    store = CheckpointStore(tmp_path)
    info = store.save("run", 0, 1, {"x": 1})
    (tmp_path / "alias.ckpt").symlink_to(tmp_path / info.location)

    assert store.load("alias.ckpt") == {"x": 1}


def test_missing_checkpoint(tmp_path: pathlib.Path) -> None:
    """Loading a missing checkpoint raises FileNotFoundError; deleting it is not an error."""
    store = CheckpointStore(tmp_path)
    info = store.save("run", 0, 1, {"x": 1})

    store.delete(info.location)
    store.delete(info.location)

    assert not store.exists(info.location)
    with pytest.raises(FileNotFoundError):
        store.load(info.location)


# --- URLs --------------------------------------------------------------------------------------


def test_memory_url_round_trip_and_delete() -> None:
    """A memory:// store saves, loads, deletes and cleans up through fsspec."""
    pytest.importorskip("fsspec", reason="fsspec is not installed")
    store = CheckpointStore(f"memory://poptune-test-{uuid.uuid4().hex}")
    state = {"w": np.arange(5.0), "meta": {"k": "v"}}

    info = store.save("run", 2, 40, state)
    loaded = store.load(info.location)

    assert info.format == "pickle" and LOCATION.fullmatch(info.location)
    assert isinstance(loaded, dict) and loaded["meta"] == {"k": "v"}
    np.testing.assert_array_equal(loaded["w"], state["w"])
    assert store.exists(info.location)
    assert store.cleanup_temporary("run") == 0
    store.delete(info.location)
    store.delete(info.location)
    assert not store.exists(info.location)
    with pytest.raises(ValueError, match="outside it"):
        store.load("../elsewhere.ckpt")


def test_memory_url_torch_round_trip() -> None:
    """Torch states round-trip through an fsspec file system too."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("fsspec", reason="fsspec is not installed")
    store = CheckpointStore(f"memory://poptune-test-{uuid.uuid4().hex}")

    info = store.save("run", 0, 1, {"t": torch.arange(6.0)})

    loaded = store.load(info.location)
    assert info.format == "torch" and isinstance(loaded, dict)
    assert torch.equal(loaded["t"], torch.arange(6.0))


def test_file_url_is_the_local_directory(tmp_path: pathlib.Path) -> None:
    """A file:// URL stores into the directory it names."""
    store = CheckpointStore(tmp_path.as_uri())

    info = store.save("run", 0, 1, {"x": 1})

    assert (tmp_path / info.location).is_file()
    assert CheckpointStore(tmp_path).load(info.location) == {"x": 1}


def test_url_without_fsspec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fsspec, a URL root fails with the pip command that fixes it."""
    monkeypatch.setitem(sys.modules, "fsspec", None)

    with pytest.raises(ImportError, match=re.escape("pip install 'poptune[fsspec]'")):
        CheckpointStore("memory://anything")


# --- retention ---------------------------------------------------------------------------------


def refs(member: int, count: int, start: int = 0) -> list[CheckpointRef]:
    return [
        CheckpointRef(f"m{member}/c{start + i}", member=member, step=10 * i, created=start + i)
        for i in range(count)
    ]


def test_select_for_deletion_keeps_last_k_per_member() -> None:
    """Each member keeps its keep_last newest checkpoints; older ones come back in input order."""
    checkpoints = refs(0, 5)
    assert select_for_deletion(checkpoints, keep_last=2, protected=()) == [
        "m0/c0",
        "m0/c1",
        "m0/c2",
    ]
    assert select_for_deletion(checkpoints, keep_last=5, protected=()) == []
    assert select_for_deletion([], keep_last=1, protected=()) == []


def test_select_for_deletion_orders_by_created_not_step() -> None:
    """After an exploit a member's newest checkpoint may have a smaller step; it is still kept."""
    checkpoints = [
        CheckpointRef("old-high-step", member=0, step=50, created=1),
        CheckpointRef("new-low-step", member=0, step=30, created=2),
    ]
    assert select_for_deletion(checkpoints, keep_last=1, protected=()) == ["old-high-step"]


def test_select_for_deletion_never_returns_protected() -> None:
    """Protected locations survive however old they are, and take none of the keep_last places."""
    checkpoints = refs(0, 5)
    doomed = select_for_deletion(checkpoints, keep_last=1, protected={"m0/c0", "m0/c2"})
    assert doomed == ["m0/c1", "m0/c3"]


def test_select_for_deletion_members_are_independent() -> None:
    """A member with many new checkpoints does not make another member's few ones old."""
    checkpoints = refs(0, 2) + refs(1, 6, start=100)
    doomed = select_for_deletion(checkpoints, keep_last=2, protected=())
    assert doomed == ["m1/c100", "m1/c101", "m1/c102", "m1/c103"]


@pytest.mark.parametrize("keep_last", [0, -1, True, 1.5])
def test_select_for_deletion_requires_keep_last_at_least_one(keep_last: object) -> None:
    """keep_last must be an int >= 1; the error says so and shows the value."""
    with pytest.raises(ValueError, match=r"`keep_last >= 1` must hold, but got keep_last="):
        select_for_deletion(refs(0, 3), keep_last=keep_last, protected=())  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 10_000)),
        max_size=30,
        unique_by=lambda t: t[1],
    ),
    st.integers(1, 4),
    st.sets(st.integers(0, 40), max_size=10),
)
def test_select_for_deletion_properties(
    pairs: list[tuple[int, int]], keep_last: int, protected_ids: set[int]
) -> None:
    """Exactly the unprotected checkpoints outside each member's newest keep_last are deleted."""
    checkpoints = [
        CheckpointRef(f"c{i}", member=m, step=0, created=c) for i, (m, c) in enumerate(pairs)
    ]
    protected = {f"c{i}" for i in protected_ids}

    doomed = select_for_deletion(checkpoints, keep_last, protected)

    newest: set[str] = set()
    for member in {r.member for r in checkpoints}:
        mine = sorted((r for r in checkpoints if r.member == member), key=lambda r: -r.created)
        newest.update(r.location for r in mine[:keep_last])
    expected = [r.location for r in checkpoints if r.location not in newest | protected]
    assert doomed == expected


# --- integrity: every load verifies the checksum the file's name records ---------------------


def _saved(tmp_path: pathlib.Path, state: object) -> tuple[CheckpointStore, str, pathlib.Path]:
    store = CheckpointStore(tmp_path)
    location = store.save("run", member=2, step=8, state=state).location
    return store, location, tmp_path / location


def test_a_truncated_file_is_refused_as_damaged(tmp_path: pathlib.Path) -> None:
    store, location, path = _saved(tmp_path, {"w": np.arange(100.0)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DamagedCheckpoint, match="truncated, changed or replaced") as caught:
        store.load(location)
    assert caught.value.location == location


def test_one_flipped_bit_in_a_weight_is_refused_not_loaded_as_another_value(
    tmp_path: pathlib.Path,
) -> None:
    """3.0 came back as 196608.0 before checksums: a bit flip in a float's exponent."""
    store, location, path = _saved(tmp_path, {"w": np.array([3.0], dtype=np.float32)})
    data = bytearray(path.read_bytes())
    at = data.index(np.array([3.0], dtype=np.float32).tobytes())
    data[at + 2] ^= 0x80  # flips the low bit of the exponent: 3.0 becomes another number
    path.write_bytes(bytes(data))

    with pytest.raises(DamagedCheckpoint):
        store.load(location)


def test_a_missing_file_is_a_missing_checkpoint_and_a_file_not_found_error(
    tmp_path: pathlib.Path,
) -> None:
    store, location, path = _saved(tmp_path, {"w": 1})
    path.unlink()

    with pytest.raises(MissingCheckpoint) as caught:
        store.load(location)
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, DamagedCheckpoint)


def test_a_file_replaced_by_another_valid_checkpoint_is_refused(tmp_path: pathlib.Path) -> None:
    """The checksum belongs to the location: another member's good file put there fails it."""
    store, location, path = _saved(tmp_path, {"w": 1})
    other = store.save("run", member=3, step=8, state={"w": 2}).location
    path.write_bytes((tmp_path / other).read_bytes())

    with pytest.raises(DamagedCheckpoint):
        store.load(location)
    assert store.load(other) == {"w": 2}


def test_damage_is_detected_in_torch_files_too(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    store, location, path = _saved(tmp_path, {"model": torch.nn.Linear(3, 2).state_dict()})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(DamagedCheckpoint):
        store.load(location)


def test_a_file_written_before_checksums_still_loads(tmp_path: pathlib.Path) -> None:
    """Runs started by an earlier poptune name their files without a checksum."""
    store, _, path = _saved(tmp_path, {"w": [1.0]})
    legacy = path.with_name(re.sub(r"-[0-9a-f]{32}\.ckpt$", ".ckpt", path.name))
    path.rename(legacy)

    assert store.load(str(legacy.relative_to(tmp_path))) == {"w": [1.0]}


def test_checkpoint_owner_reads_the_member_folder() -> None:
    assert checkpoint_owner("r/member-00012/step-000000004-0123456789ab.ckpt") == 12
    assert checkpoint_owner("nowhere.ckpt") is None


# --- safe loading: plain data and tensors only, unless the run opts in ------------------------


class Planted:
    """Unpickling this runs code: it touches the file named in its argument."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _plant(tmp_path: pathlib.Path, payload: bytes) -> tuple[CheckpointStore, str]:
    """Writes ``payload`` as a checkpoint with a correct header and checksum (an attacker who
    can write the folder can compute a checksum too)."""
    import hashlib

    folder = tmp_path / "run" / "member-00000"
    folder.mkdir(parents=True)
    digest = hashlib.sha256(payload).hexdigest()[:32]
    name = f"step-000000004-{uuid.uuid4().hex[:12]}-{digest}.ckpt"
    (folder / name).write_bytes(payload)
    return CheckpointStore(tmp_path), f"run/member-00000/{name}"


def test_a_planted_pickle_runs_no_code_and_the_error_names_the_opt_in(
    tmp_path: pathlib.Path,
) -> None:
    victim = tmp_path / "code-ran"
    store, location = _plant(tmp_path, b"POPTUNE1P" + pickle.dumps({"w": Planted(str(victim))}))

    with pytest.raises(UnsafeCheckpoint, match=r"allow_pickle=True"):
        store.load(location)
    assert not victim.exists()


def test_a_planted_torch_file_runs_no_code(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import io

    victim = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": Planted(str(victim))}, buffer)
    store, location = _plant(tmp_path, b"POPTUNE1T" + buffer.getvalue())

    with pytest.raises(UnsafeCheckpoint, match=r"allow_pickle=True"):
        store.load(location)
    assert not victim.exists()


def test_allow_pickle_is_the_explicit_opt_in_for_arbitrary_objects(
    tmp_path: pathlib.Path,
) -> None:
    victim = tmp_path / "code-ran"
    _, location = _plant(tmp_path, b"POPTUNE1P" + pickle.dumps({"w": Planted(str(victim))}))

    CheckpointStore(tmp_path, allow_pickle=True).load(location)

    assert victim.exists()


def test_safe_loading_reads_numpy_generators_and_standard_values(tmp_path: pathlib.Path) -> None:
    import collections
    import datetime
    import random

    rng = np.random.default_rng(3)
    state = {
        "rng": rng,
        "py": random.Random(5),
        "order": collections.OrderedDict(a=np.float64(1.5), b=np.int64(2)),
        "when": datetime.timedelta(seconds=3),
        "arrays": [np.zeros((2, 2), dtype=np.float16), np.array(["a", 1], dtype=object)],
        "mixed": {1, 2.5, "x", b"y", None, False, (1, 2), complex(1, 2), frozenset({1})},
    }
    store, location, _ = _saved(tmp_path, state)

    loaded = store.load(location)

    assert loaded["rng"].random() == rng.random()
    assert loaded["py"].random() == random.Random(5).random()
    assert loaded["order"] == state["order"] and loaded["when"] == state["when"]
    np.testing.assert_array_equal(loaded["arrays"][0], state["arrays"][0])
    assert list(loaded["arrays"][1]) == ["a", 1] and loaded["mixed"] == state["mixed"]


def test_a_state_safe_loading_refuses_fails_at_its_first_save_and_leaves_no_file(
    tmp_path: pathlib.Path,
) -> None:
    store = CheckpointStore(tmp_path)

    with pytest.raises(UnsafeCheckpoint, match=r"member 1 at step 4.*allow_pickle"):
        store.save("run", member=1, step=4, state={"obj": Planted(str(tmp_path / "x"))})
    assert final_files(tmp_path) == [] and temporary_files(tmp_path) == []
    assert not (tmp_path / "x").exists()


def test_torch_state_with_numpy_inside_loads_safely(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    state = {"w": torch.ones(2), "np": np.arange(3), "rng": np.random.default_rng(1)}
    store, location, _ = _saved(tmp_path, state)

    loaded = store.load(location)

    assert torch.equal(loaded["w"], state["w"])
    np.testing.assert_array_equal(loaded["np"], state["np"])
    assert loaded["rng"].random() == np.random.default_rng(1).random()
