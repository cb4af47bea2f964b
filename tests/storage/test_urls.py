"""Storage URLs: what `storage_url` accepts, how it normalises, and that errors hide passwords."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import poptune as pt
from poptune.storage import StorageError, open_storage, redact_url
from poptune.storage import storage_url as normalise

SECRET = "hunter2pw"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("poptune.db", "sqlite:///poptune.db"),
        ("runs/x.sqlite", "sqlite:///runs/x.sqlite"),
        ("/abs/p.db", "sqlite:////abs/p.db"),
        (".sqlite3", "sqlite:///.sqlite3"),
        ("RUNS.DB", "sqlite:///RUNS.DB"),
        ("sqlite:///runs.db", "sqlite:///runs.db"),
        ("sqlite://", "sqlite://"),
        ("memory://", "memory://"),
        ("postgres://me@db.example/pbt", "postgresql+psycopg://me@db.example/pbt"),
        (
            "postgresql://me:pw@db.example:5433/pbt",
            "postgresql+psycopg://me:pw@db.example:5433/pbt",
        ),
        ("postgresql+psycopg://me@db.example/pbt", "postgresql+psycopg://me@db.example/pbt"),
        ("postgresql://me@[::1]:5432/pbt", "postgresql+psycopg://me@[::1]:5432/pbt"),
    ],
)
def test_accepted_forms_are_normalised(given: str, expected: str) -> None:
    assert normalise(given) == expected


def test_a_home_relative_path_is_expanded() -> None:
    assert normalise("~/runs.db") == "sqlite:///" + os.path.expanduser("~/runs.db")


def test_a_path_with_url_characters_reads_back_as_the_same_file(tmp_path: Path) -> None:
    """'%', '?' and '#' in a file name survive the trip through a URL."""
    path = tmp_path / "odd 50%?#.db"
    with open_storage(str(path)) as store:
        store.create_run("r", {}, "fp")
    assert path.is_file()
    with open_storage(normalise(str(path))) as store:
        assert store.get_run("r") is not None


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        ("nonsense", "Not a storage URL: 'nonsense'"),
        ("runs/x", "Not a storage URL: 'runs/x'"),
        ("", "Not a storage URL: ''"),
        (f"mysql://u:{SECRET}@h/db", "Unsupported storage 'mysql://u:***@h/db'"),
        (f"redis://u:{SECRET}@h:6379", "Unsupported storage 'redis://u:***@h:6379'"),
        (f"postgresql://u:{SECRET}@h:notaport/db", "cannot be parsed"),
        (f"postgresql://u:{SECRET}@x@h/db", "Percent-encode"),
        (f"postgres://u:{SECRET[:4]}@{SECRET[4:]}@h/db", "Percent-encode"),
        (f"https://u:{SECRET}@h/x?password={SECRET}", "Unsupported storage"),
    ],
)
def test_anything_else_is_refused_quoting_the_input_without_its_password(
    given: str, needle: str
) -> None:
    """The message quotes what was given (password hidden) and lists the accepted forms."""
    with pytest.raises(StorageError) as caught:
        open_storage(given)
    message = str(caught.value)
    assert needle in message
    assert ("sqlite:///FILE.db" in message and "postgresql://" in message) or (
        needle == "Percent-encode" and repr(redact_url(given)) in message
    )
    for part in (SECRET, SECRET[:4], SECRET[4:]):
        assert part not in message


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"postgresql://me:{SECRET}@h/db", "postgresql://me:***@h/db"),
        (
            f"postgresql://me:{SECRET}@h/db?sslmode=require",
            "postgresql://me:***@h/db?sslmode=require",
        ),
        (f"postgresql://me:a@{SECRET}@h/db", "postgresql://me:***@h/db"),  # '@' not encoded
        (f"postgresql://me@h/db?password={SECRET}&x=1", "postgresql://me@h/db?password=***&x=1"),
        ("sqlite:///dir/with@sign.db", "sqlite:///dir/with@sign.db"),
        ("sqlite:///C:/x@y.db", "sqlite:///C:/x@y.db"),
        ("runs.db", "runs.db"),
        (f"me:{SECRET}@db.example/pbt", "me:***@db.example/pbt"),  # the scheme forgotten
        ("not a url at all", "not a url at all"),
    ],
)
def test_redact_url_hides_every_password_and_nothing_else(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_load_accepts_a_bare_path(tmp_path: Path) -> None:
    """A bare path works wherever a storage URL does: run, then load."""
    path = str(tmp_path / "runs.db")
    exp = pt.Experiment(
        pt.trainable(lambda hp, s: 0.0, lambda x, hp: (x + hp["lr"], x + hp["lr"])),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=2,
        steps=4,
        interval=2,
    )
    result = exp.run(path, "bare")
    assert pt.load(f"sqlite:///{path}", "bare").best == result.best
    assert (tmp_path / "runs-checkpoints" / "bare").is_dir()


def count_up(x: float, hp: dict[str, float]) -> tuple[float, float]:
    return x + hp["lr"], x + hp["lr"]


def start_at_zero(hp: dict[str, float], seed: int) -> float:
    return 0.0


def test_worker_processes_open_the_normalised_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers reopen the storage by URL: a bare relative path must reach them as a SQLite URL."""
    monkeypatch.chdir(tmp_path)
    exp = pt.Experiment(
        pt.trainable(start_at_zero, count_up),
        {"lr": pt.Float(0.1, 1.0)},
        population_size=2,
        steps=6,
        interval=2,
    )
    result = exp.run("runs.db", "spread", workers=2)
    assert {m.step for m in result.members} == {6}
    assert (tmp_path / "runs-checkpoints" / "spread").is_dir()
