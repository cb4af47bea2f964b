"""The SQL schema's versioning, refusals and error messages (SQLite file and PostgreSQL)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from poptune.storage import ResultRow, StorageError, locks, open_storage, redact_url
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


def version_1_metadata() -> sa.MetaData:
    """The tables of schema version 1, frozen here as poptune 0.1 created them (plain types:
    JSON and exact floats are text), so the migration is tested against the real old schema."""
    v1 = sa.MetaData()
    sa.Table(
        "poptune_meta",
        v1,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    sa.Table(
        "poptune_runs",
        v1,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("source", sa.Text),
        sa.Column("checkpoint_root", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("pending", sa.Text, nullable=False),
        sa.Column("event_count", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    sa.Table(
        "poptune_members",
        v1,
        sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), primary_key=True),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("owner", sa.String(200)),
        sa.Column("heartbeat", sa.Float),
        sa.Column("checkpoint", sa.Text),
        sa.Column("checkpoint_step", sa.BigInteger),
        sa.Column("attempts", sa.Integer, nullable=False),
    )
    sa.Table(
        "poptune_results",
        v1,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), nullable=False),
        sa.Column("member", sa.Integer, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("score", sa.String(40)),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Index("ix_poptune_results_run", "run_id", "id"),
    )
    sa.Table(
        "poptune_events",
        v1,
        sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("member", sa.Integer, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("donor", sa.Integer),
        sa.Column("donor_step", sa.BigInteger),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("old_hparams", sa.Text, nullable=False),
        sa.Column("new_hparams", sa.Text, nullable=False),
        sa.Column("operations", sa.Text, nullable=False),
    )
    sa.Table(
        "poptune_checkpoints",
        v1,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), nullable=False),
        sa.Column("member", sa.Integer, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("location", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Index("ix_poptune_checkpoints_run", "run_id", "id"),
    )
    sa.Table(
        "poptune_failures",
        v1,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), nullable=False),
        sa.Column("member", sa.Integer, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("traceback", sa.Text, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
    )
    return v1


def write_version_1_database(engine: sa.Engine) -> None:
    """A database as poptune 0.1 left it: one run with a member, results, an event, a
    checkpoint and a failure, schema_version 1."""
    v1 = version_1_metadata()
    state = {
        "id": 0,
        "hparams": {"lr": 0.01},
        "step": 4,
        "last_ready": 4,
        "score": 0.5,
        "score_step": 4,
        "window": [0.5],
        "status": "running",
        "decisions": 1,
        "replaces": None,
    }
    with engine.begin() as conn:
        v1.create_all(conn)
        t = v1.tables
        conn.execute(sa.insert(t["poptune_meta"]).values(key="schema_version", value="1"))
        inserted = conn.execute(
            sa.insert(t["poptune_runs"]).values(
                name="old-run",
                config='{"lr": 0.1}',
                fingerprint="fp",
                status="running",
                generation=0,
                pending="{}",
                event_count=1,
                created=1.0,
                updated=2.0,
            )
        )
        assert inserted.inserted_primary_key is not None
        run_id = int(inserted.inserted_primary_key[0])
        conn.execute(
            sa.insert(t["poptune_members"]).values(
                run_id=run_id,
                id=0,
                state=json.dumps(state),
                step=4,
                status="running",
                owner="host:1:abcd1234",
                heartbeat=3.0,
                checkpoint="ck/4",
                checkpoint_step=4,
                attempts=0,
            )
        )
        conn.execute(
            sa.insert(t["poptune_results"]).values(run_id=run_id),
            [
                {"member": 0, "step": 3, "score": "0.25", "metrics": '{"loss": 1.5}'},
                {"member": 0, "step": 4, "score": "nan", "metrics": "{}"},
            ],
        )
        conn.execute(
            sa.insert(t["poptune_events"]).values(
                run_id=run_id,
                idx=0,
                member=0,
                step=4,
                donor=1,
                donor_step=4,
                kind="exploit",
                old_hparams='{"lr": 0.02}',
                new_hparams='{"lr": 0.01}',
                operations="{}",
            )
        )
        conn.execute(
            sa.insert(t["poptune_checkpoints"]).values(
                run_id=run_id, member=0, step=4, location="ck/4", size=10, created=2.5
            )
        )
        conn.execute(
            sa.insert(t["poptune_failures"]).values(
                run_id=run_id, member=0, step=2, attempt=1, traceback="tb", time=1.5
            )
        )


def test_version_1_database_is_migrated_with_its_data_intact(sql_url: str, raw: sa.Engine) -> None:
    """A database written with schema version 1 opens: results gain a ``segment`` column (None
    for the old rows), member rows a version (0 for the old rows), everything already stored
    reads back unchanged, and new results keep their segment."""
    write_version_1_database(raw)
    assert "segment" not in column_names(raw, "poptune_results")
    with open_storage(sql_url) as storage:
        info = storage.get_run("old-run")
        assert info is not None
        assert (info.status, dict(info.config), info.created, info.updated) == (
            "running",
            {"lr": 0.1},
            1.0,
            2.0,
        )
        results = storage.results("old-run")
        assert [(r.member, r.step, r.metrics, r.segment) for r in results] == [
            (0, 3, {"loss": 1.5}, None),
            (0, 4, {}, None),
        ]
        assert results[0].score == 0.25 and math.isnan(results[1].score)
        [member] = storage.members("old-run")
        assert (member.state["step"], member.state["hparams"], member.owner) == (
            4,
            {"lr": 0.01},
            "host:1:abcd1234",
        )
        assert (member.heartbeat, member.checkpoint, member.checkpoint_step) == (3.0, "ck/4", 4)
        [ev] = storage.events("old-run")
        assert (ev["index"], ev["kind"], ev["donor"], ev["new_hparams"]) == (
            0,
            "exploit",
            1,
            {"lr": 0.01},
        )
        assert [(c.location, c.size) for c in storage.checkpoints("old-run")] == [("ck/4", 10)]
        assert [(f.step, f.traceback) for f in storage.failures("old-run")] == [(2, "tb")]
        with storage.transaction("old-run") as tx:
            assert tx.event_count() == 1
            tx.add_results([ResultRow(0, 5, 0.75, {}, segment=0)])
        assert [r.segment for r in storage.results("old-run")] == [None, None, 0]
    assert "segment" in column_names(raw, "poptune_results")
    assert "version" in column_names(raw, "poptune_members")
    assert schema_version(raw) == SCHEMA_VERSION == 3
    with open_storage(sql_url) as storage:  # migrated once: opening again changes nothing
        assert len(storage.results("old-run")) == 3
        with storage.transaction("old-run") as tx:  # old rows are at member version 0
            version, rows = tx.members_since(None)
            assert (version, [r.id for r in rows]) == (0, [0])
            assert tx.members_since(0) == (0, [])
        storage.create_run("new-run", {}, "fp")  # and the migrated database takes new runs
        assert [r.name for r in storage.list_runs()] == ["old-run", "new-run"]
    assert schema_version(raw) == 3


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


@pytest.mark.skipif(locks.fcntl is None, reason="no flock on this platform")
def test_sqlite_writers_queue_on_a_lock_file_beside_the_database(tmp_path: Path) -> None:
    """A write transaction holds an exclusive flock on ``FILE-poptune-lock`` (writers wait
    there, woken the moment it is free, instead of in SQLite's sleeping retries), and lets
    it go when it ends; readers never take it."""
    import fcntl
    import os

    path = tmp_path / "p.db"
    lock = tmp_path / "p.db-poptune-lock"

    def free() -> bool:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    with open_storage(f"sqlite:///{path}") as storage:
        storage.create_run("r", {}, "fp")
        assert lock.exists() and free()
        with storage.transaction("r") as tx:
            assert not free()
            tx.set_status("running")
        assert free()
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert storage.get_run("r") is not None  # a read while a writer holds the lock
            assert [r.name for r in storage.list_runs()] == ["r"]
        finally:
            os.close(fd)


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
