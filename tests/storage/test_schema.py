"""The SQL schema's versioning, refusals and error messages (SQLite file and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from poptune.storage import StorageError, open_storage, redact_url
from poptune.storage import sql as sql_storage
from poptune.storage.base import SCHEMA_VERSION

TABLES = {
    "poptune_meta",
    "poptune_runs",
    "poptune_members",
    "poptune_results",
    "poptune_events",
    "poptune_checkpoints",
    "poptune_failures",
}
SECRET = "s3cr3tpw"


@pytest.fixture
def raw(sql_url: str) -> Iterator[sa.Engine]:
    """A plain SQLAlchemy engine on the test database, to look at or damage it directly."""
    engine = sa.create_engine(sql_url, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def schema_version(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT value FROM poptune_meta WHERE key = 'schema_version'")
            ).scalar_one()
        )


def set_schema_version(engine: sa.Engine, version: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE poptune_meta SET value = :v WHERE key = 'schema_version'"),
            {"v": str(version)},
        )


def created(url: str) -> None:
    """Opens the URL once, so it holds a current poptune schema and one run."""
    with open_storage(url) as storage:
        storage.create_run("old-run", {"lr": 0.1}, "fp")


def column_names(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def exception_texts(exc: BaseException) -> list[str]:
    """str and repr of the exception and of everything chained to it, and its traceback."""
    texts = ["".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e)]
        stack += [e.__cause__, e.__context__]
    return texts


# -- versions ---------------------------------------------------------------------------------


def test_fresh_database_gets_the_current_schema(sql_url: str, raw: sa.Engine) -> None:
    """Opening an empty database creates every poptune table and records SCHEMA_VERSION."""
    created(sql_url)
    assert set(sa.inspect(raw).get_table_names()) >= TABLES
    assert schema_version(raw) == SCHEMA_VERSION
    with open_storage(sql_url) as storage:  # reopening keeps the schema and the runs
        assert [r.name for r in storage.list_runs()] == ["old-run"]
    assert schema_version(raw) == SCHEMA_VERSION


def test_database_shared_with_other_tables_is_usable(sql_url: str, raw: sa.Engine) -> None:
    """poptune adds its tables next to another application's and leaves those alone."""
    with raw.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(sa.text("INSERT INTO users VALUES (1, 'ada')"))
    created(sql_url)
    with raw.connect() as conn:
        assert conn.execute(sa.text("SELECT id, name FROM users")).all() == [(1, "ada")]
    assert schema_version(raw) == SCHEMA_VERSION


def test_database_written_by_a_newer_poptune_is_refused(sql_url: str, raw: sa.Engine) -> None:
    """A schema version above SCHEMA_VERSION is refused with advice to upgrade poptune."""
    created(sql_url)
    set_schema_version(raw, SCHEMA_VERSION + 1)
    with pytest.raises(StorageError) as info:
        open_storage(sql_url)
    message = str(info.value)
    assert "newer poptune" in message
    assert "upgrade" in message.lower()
    assert str(SCHEMA_VERSION + 1) in message
    assert schema_version(raw) == SCHEMA_VERSION + 1


def test_older_schema_without_a_migration_is_refused(
    sql_url: str, raw: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older schema that no migration covers is refused with a message saying what to do."""
    created(sql_url)
    set_schema_version(raw, 0)
    monkeypatch.setattr(sql_storage, "MIGRATIONS", {})
    with pytest.raises(StorageError) as info:
        open_storage(sql_url)
    message = str(info.value)
    assert "schema version 0" in message
    assert "cannot migrate" in message
    assert "new database" in message
    assert schema_version(raw) == 0


def _adding_column(calls: list[int]) -> Callable[[int], Callable[[Connection], None]]:
    def migration(version: int) -> Callable[[Connection], None]:
        def migrate(conn: Connection) -> None:
            calls.append(version)
            conn.execute(sa.text(f"ALTER TABLE poptune_runs ADD COLUMN migrated_{version} TEXT"))
            conn.execute(
                sa.text("INSERT INTO poptune_meta (key, value) VALUES (:k, 'yes')"),
                {"k": f"migrated_{version}"},
            )

        return migrate

    return migration


def test_registered_migrations_bring_an_older_schema_up_to_date(
    sql_url: str, raw: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening an older database runs each migration in order and records SCHEMA_VERSION."""
    created(sql_url)
    set_schema_version(raw, 0)
    calls: list[int] = []
    migration = _adding_column(calls)
    monkeypatch.setattr(sql_storage, "MIGRATIONS", {v: migration(v) for v in range(SCHEMA_VERSION)})
    with open_storage(sql_url) as storage:
        assert [r.name for r in storage.list_runs()] == ["old-run"]
        storage.create_run("new-run", {}, "fp")
    assert calls == list(range(SCHEMA_VERSION))
    assert schema_version(raw) == SCHEMA_VERSION
    assert {f"migrated_{v}" for v in calls} <= column_names(raw, "poptune_runs")
    with raw.connect() as conn:
        keys = set(conn.execute(sa.text("SELECT key FROM poptune_meta")).scalars())
    assert {f"migrated_{v}" for v in calls} <= keys
    with open_storage(sql_url):  # migrated once: the next open runs nothing
        pass
    assert calls == list(range(SCHEMA_VERSION))


def test_failed_migration_changes_nothing(
    sql_url: str, raw: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that raises rolls back everything it did, version included."""
    created(sql_url)
    set_schema_version(raw, 0)

    def broken(conn: Connection) -> None:
        conn.execute(sa.text("ALTER TABLE poptune_runs ADD COLUMN half_done TEXT"))
        raise RuntimeError("migration failed halfway")

    monkeypatch.setattr(sql_storage, "MIGRATIONS", {v: broken for v in range(SCHEMA_VERSION)})
    with pytest.raises(RuntimeError, match="halfway"):
        open_storage(sql_url)
    assert schema_version(raw) == 0
    assert "half_done" not in column_names(raw, "poptune_runs")


def test_poptune_tables_without_meta_are_refused(sql_url: str, raw: sa.Engine) -> None:
    """A database with a poptune_runs table but no poptune_meta was not written by poptune."""
    with raw.begin() as conn:
        conn.execute(sa.text("CREATE TABLE poptune_runs (id INTEGER PRIMARY KEY, name TEXT)"))
    with pytest.raises(StorageError, match="not written by poptune"):
        open_storage(sql_url)
    assert "poptune_meta" not in sa.inspect(raw).get_table_names()


def test_opening_without_create_refuses_an_empty_database(sql_url: str, raw: sa.Engine) -> None:
    """create=False on a database with no poptune schema raises instead of creating one."""
    with pytest.raises(StorageError, match="holds no poptune runs"):
        sql_storage.SQLStorage(sql_url, create=False)
    assert "poptune_meta" not in sa.inspect(raw).get_table_names()


# -- URLs and connection errors ---------------------------------------------------------------


def test_unreachable_postgres_raises_without_the_password() -> None:
    """An unreachable server raises "Cannot reach storage" promptly, and no text shows the
    password."""
    url = f"postgresql+psycopg://user:{SECRET}@127.0.0.1:1/db"
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_storage(url)
    # A guard against hanging or retrying, not a benchmark: port 1 refuses at once.
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("Cannot reach storage postgresql+psycopg://user:***@127.0.0.1:1/db")
    for text in exception_texts(info.value):
        assert SECRET not in text


def test_unreachable_sqlite_file_raises_storage_error(tmp_path: Path) -> None:
    """A SQLite file in a directory that does not exist raises "Cannot reach storage"."""
    with pytest.raises(StorageError, match="Cannot reach storage"):
        open_storage(f"sqlite:///{tmp_path}/missing/dir/p.db")


def test_redact_url_hides_the_password() -> None:
    """redact_url replaces the password with *** and keeps the rest of the URL."""
    url = f"postgresql+psycopg://user:{SECRET}@db.example:5432/runs?sslmode=require"
    assert redact_url(url) == "postgresql+psycopg://user:***@db.example:5432/runs?sslmode=require"
    assert redact_url("sqlite:///p.db") == "sqlite:///p.db"
    assert SECRET not in redact_url(f"user:{SECRET}@db.example/runs")  # no scheme


@pytest.mark.postgres
def test_display_url_of_opened_postgres_hides_the_password(pg_url: str) -> None:
    """An opened storage's display_url never shows the password (the test server trusts all)."""
    url = sa.make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    with open_storage(url) as storage:
        assert SECRET not in storage.display_url
        assert "***" in storage.display_url
        assert SECRET not in repr(storage)


def test_unsupported_backend_is_refused_with_what_is_supported() -> None:
    """A URL for another database names the supported ones, without the password."""
    with pytest.raises(StorageError) as info:
        open_storage("mysql://x")
    assert "SQLite" in str(info.value) and "PostgreSQL" in str(info.value)
    with pytest.raises(StorageError) as info:
        open_storage(f"mysql+pymysql://user:{SECRET}@host/db")
    for text in exception_texts(info.value):
        assert SECRET not in text


@pytest.mark.parametrize("url", ["not a url", "://", "sqlite", f"garbage:{SECRET}@@"])
def test_garbage_url_raises_storage_error(url: str) -> None:
    """Text that is not a storage URL raises StorageError, never a SQLAlchemy error."""
    with pytest.raises(StorageError) as info:
        open_storage(url)
    for text in exception_texts(info.value):
        assert SECRET not in text


def test_open_storage_rejects_other_types() -> None:
    """open_storage of something that is neither a URL nor a Storage raises ValueError."""
    with pytest.raises(ValueError, match="must be a URL or a poptune Storage"):
        open_storage(42)  # type: ignore[arg-type]


# -- SQLite ------------------------------------------------------------------------------------


def test_sqlite_file_is_in_wal_mode(tmp_path: Path) -> None:
    """An opened SQLite file uses write-ahead logging, so readers never block the writer."""
    path = tmp_path / "p.db"
    with open_storage(f"sqlite:///{path}") as storage:
        storage.create_run("r", {}, "fp")
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def _open_at(url: str, start: float) -> str:
    while time.time() < start:
        pass
    try:
        sql_storage.SQLStorage(url).close()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Six processes opening the same new SQLite file at the same instant all succeed (the
    switch to WAL mode once answered "database is locked" instead of waiting)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for round_ in range(8):
            url = f"sqlite:///{tmp_path}/new-{round_}.db"
            start = time.time() + 0.3
            outcomes = pool.starmap(_open_at, [(url, start)] * 6)
            assert outcomes == ["ok"] * 6, outcomes
