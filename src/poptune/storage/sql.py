"""SQL storage on SQLAlchemy 2: SQLite (the embedded default, WAL mode) and PostgreSQL.

The schema is versioned in ``poptune_meta``. A database written by an older poptune is migrated
when a migration exists, and refused otherwise; one written by a newer poptune is refused. In
both cases the message says what to do. Versions: 1, the first; 2 adds the lineage ``segment``
and the ``device`` of each result and the ``execution`` record of each run (`MIGRATIONS` adds
the columns; older rows read as None); 3 adds the version of each member row and of each run's
population (`poptune.storage.base.Transaction.members_since`). Every table is
prefixed ``poptune_`` so a run may share a database with other applications.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.types import TypeDecorator

from poptune.storage import locks
from poptune.storage.base import (
    SCHEMA_VERSION,
    CheckpointRow,
    FailureRow,
    LockTimeout,
    MemberRow,
    ResultRow,
    RunExists,
    RunInfo,
    Storage,
    StorageError,
    StorageUnavailable,
    Transaction,
    TransactionLost,
)

__all__ = ["SQLStorage", "redact_url"]

_log = logging.getLogger("poptune")


class _JSON(TypeDecorator[Any]):
    """JSON as text, NaN and infinities included (scores may be NaN)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value, allow_nan=True)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


class _ExactFloat(TypeDecorator[float]):
    """A float kept exactly, NaN and infinities included (SQLite turns NaN into NULL)."""

    impl = sa.String(40)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else repr(float(value))

    def process_result_value(self, value: Any, dialect: Any) -> float | None:
        return None if value is None else float(value)


metadata = sa.MetaData()
meta_table = sa.Table(
    "poptune_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
runs_table = sa.Table(
    "poptune_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("config", _JSON, nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("source", sa.Text),
    sa.Column("checkpoint_root", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("generation", sa.Integer, nullable=False, default=0),
    sa.Column("pending", _JSON, nullable=False),
    sa.Column("execution", _JSON),
    sa.Column("event_count", sa.Integer, nullable=False, default=0),
    # Schema version 3: bumped by every transaction that writes member rows.
    sa.Column("member_version", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)
members_table = sa.Table(
    "poptune_members",
    metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), primary_key=True),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", _JSON, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("owner", sa.String(200)),
    sa.Column("heartbeat", sa.Float),
    sa.Column("checkpoint", sa.Text),
    sa.Column("checkpoint_step", sa.BigInteger),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # Schema version 3: the run's member version when the row was last written.
    sa.Column("version", sa.BigInteger, nullable=False, default=0, server_default="0"),
)
results_table = sa.Table(
    "poptune_results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), nullable=False),
    sa.Column("member", sa.Integer, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("score", _ExactFloat),
    sa.Column("metrics", _JSON, nullable=False),
    # Schema version 2: the lineage segment of the step (see `ResultRow.segment`).
    sa.Column("segment", sa.Integer),
    # Schema version 2: the device of the worker that trained the step (None: not said).
    sa.Column("device", sa.String(64)),
    sa.Index("ix_poptune_results_run", "run_id", "id"),
)
events_table = sa.Table(
    "poptune_events",
    metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("member", sa.Integer, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("donor", sa.Integer),
    sa.Column("donor_step", sa.BigInteger),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("old_hparams", _JSON, nullable=False),
    sa.Column("new_hparams", _JSON, nullable=False),
    sa.Column("operations", _JSON, nullable=False),
)
checkpoints_table = sa.Table(
    "poptune_checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), nullable=False),
    sa.Column("member", sa.Integer, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Index("ix_poptune_checkpoints_run", "run_id", "id"),
)
failures_table = sa.Table(
    "poptune_failures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("poptune_runs.id"), nullable=False),
    sa.Column("member", sa.Integer, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("traceback", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)


def _add_result_segments(conn: Connection) -> None:
    """1 -> 2: results record their lineage segment (those written before read as None);
    runs record how they were executed and the configuration changes accepted on resume."""
    conn.execute(sa.text("ALTER TABLE poptune_results ADD COLUMN segment INTEGER"))
    conn.execute(sa.text("ALTER TABLE poptune_results ADD COLUMN device VARCHAR(64)"))
    conn.execute(sa.text("ALTER TABLE poptune_runs ADD COLUMN execution TEXT"))


def _add_member_versions(conn: Connection) -> None:
    """2 -> 3: member rows carry the version of the run's population that last wrote them,
    so a worker reads only the rows changed since it last looked."""
    conn.execute(
        sa.text("ALTER TABLE poptune_runs ADD COLUMN member_version BIGINT NOT NULL DEFAULT 0")
    )
    conn.execute(
        sa.text("ALTER TABLE poptune_members ADD COLUMN version BIGINT NOT NULL DEFAULT 0")
    )


#: Migrations from schema version N to N + 1, applied in order inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _add_result_segments,
    2: _add_member_versions,
}


def _server_clock() -> sa.ColumnElement[float]:
    """PostgreSQL's clock now, in seconds since the epoch (not the transaction's start time)."""
    return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Float)


def _enable_wal(cursor: Any) -> None:
    """Switches a SQLite database to WAL mode, waiting while another process holds it.

    Switching a new database file's journal mode takes an exclusive lock and, unlike other
    statements, does not wait for it: several processes opening the same new file at once
    (workers, or ``poptune status`` during a run's first seconds) would fail with "database is
    locked". Retried for up to a minute.
    """
    deadline = time.monotonic() + 60
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as e:  # sqlite3.OperationalError
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def redact_url(url: str | sa.URL) -> str:
    """The URL with its password replaced by ``***``: safe to print and log."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def _scrub(text: str, url: sa.URL) -> str:
    """Removes the password from an error message that may quote a connection string."""
    if url.password:
        text = text.replace(str(url.password), "***")
    return text.splitlines()[0] if text else text


class _SQLTransaction(Transaction):
    def __init__(self, storage: SQLStorage, conn: Connection, run_id: int, row: Any) -> None:
        self._storage, self._conn, self._run_id, self._row = storage, conn, run_id, row
        self._info: RunInfo | None = None
        self._now: float | None = None
        self._version: int | None = None  # the member version this transaction writes
        self._events = int(row.event_count)
        self._run_values: dict[str, Any] = {}  # written by `flush`
        # Member rows written in this transaction, by id, not yet sent: a commit and the
        # claims that follow it go as one statement, before any read of the members.
        self._members: dict[int, MemberRow] = {}

    def run(self) -> RunInfo:
        if self._info is None:
            self._info = _run_info(self._row)
        return self._info

    def now(self) -> float:
        if self._now is None:
            self._now = self._storage._clock(self._conn)
        return self._now

    def members(self) -> list[MemberRow]:
        self._write_members()
        return _read_members(self._conn, self._run_id)

    def members_since(self, version: int | None) -> tuple[int, list[MemberRow]]:
        self._write_members()
        now = int(self._row.member_version)
        if version is None or version > now:  # the run was deleted and created again
            return now, _read_members(self._conn, self._run_id)
        if version == now:
            return now, []
        return now, _read_members(self._conn, self._run_id, since=version)

    def _next_version(self) -> int:
        """The member version of this transaction's writes (the run's is bumped once)."""
        if self._version is None:
            self._version = int(self._row.member_version) + 1
            self._run_values["member_version"] = self._version
        return self._version

    def flush(self) -> None:
        """Writes the member rows and the run row's changes, once per transaction, before it
        commits."""
        self._write_members()
        if self._run_values:
            self._conn.execute(
                sa.update(runs_table)
                .where(runs_table.c.id == self._run_id)
                .values(**self._run_values, updated=time.time())
            )
            self._run_values = {}

    def put_members(self, rows: Sequence[MemberRow]) -> None:
        if rows:
            self._next_version()
            self._members.update((row.id, row) for row in rows)

    def _write_members(self) -> None:
        """Sends the member rows written since the last read: one statement, each row
        inserted or updated (the last write of a member in the transaction wins)."""
        if self._members:
            version = self._next_version()
            values = [_member_values(self._run_id, r, version) for r in self._members.values()]
            self._members = {}
            self._conn.execute(self._storage._upsert_members(), values)

    def set_controller(self, generation: int, pending: Mapping[str, Any]) -> None:
        self._run_values.update(generation=generation, pending=dict(pending))

    def set_status(self, status: str, error: str | None = None) -> None:
        self._conn.execute(
            sa.update(runs_table)
            .where(runs_table.c.id == self._run_id)
            .values(status=status, error=error, updated=time.time())
        )

    def set_execution(self, execution: Mapping[str, Any]) -> None:
        self._conn.execute(
            sa.update(runs_table)
            .where(runs_table.c.id == self._run_id)
            .values(execution=dict(execution), updated=time.time())
        )
        self._info = replace(self.run(), execution=dict(execution))

    def add_results(self, rows: Sequence[ResultRow]) -> None:
        if rows:
            self._conn.execute(
                sa.insert(results_table),
                [
                    {
                        "run_id": self._run_id,
                        "member": r.member,
                        "step": r.step,
                        "score": r.score,
                        "metrics": dict(r.metrics),
                        "segment": r.segment,
                        "device": r.device,
                    }
                    for r in rows
                ],
            )

    def event_count(self) -> int:
        return self._events

    def add_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        if not events:
            return
        self._conn.execute(
            sa.insert(events_table),
            [
                {
                    "run_id": self._run_id,
                    "idx": e["index"],
                    "member": e["member"],
                    "step": e["step"],
                    "donor": e["donor"],
                    "donor_step": e["donor_step"],
                    "kind": e["kind"],
                    "old_hparams": dict(e["old_hparams"]),
                    "new_hparams": dict(e["new_hparams"]),
                    "operations": dict(e["operations"]),
                }
                for e in events
            ],
        )
        top = max(int(e["index"]) for e in events) + 1
        if top > self._events:
            self._events = self._run_values["event_count"] = top

    def _checkpoint_values(self, row: tuple[int, int, str, int], now: float) -> dict[str, Any]:
        member, step, location, size = row
        return {
            "run_id": self._run_id,
            "member": member,
            "step": step,
            "location": location,
            "size": size,
            "created": now,
        }

    def add_checkpoint(self, member: int, step: int, location: str, size: int) -> CheckpointRow:
        now = time.time()
        values = self._checkpoint_values((member, step, location, size), now)
        res = self._conn.execute(sa.insert(checkpoints_table).values(**values))
        pk = res.inserted_primary_key
        assert pk is not None
        return CheckpointRow(int(pk[0]), member, step, location, size, now)

    def add_checkpoints(self, rows: Sequence[tuple[int, int, str, int]]) -> None:
        if rows:
            now = time.time()
            values = [self._checkpoint_values(row, now) for row in rows]
            self._conn.execute(sa.insert(checkpoints_table), values)

    def checkpoints(
        self, members: Collection[int] | None = None, locations: Collection[str] = ()
    ) -> list[CheckpointRow]:
        return _read_checkpoints(self._conn, self._run_id, members, locations)

    def delete_checkpoints(self, locations: Sequence[str]) -> None:
        if locations:
            c = checkpoints_table
            self._conn.execute(
                sa.delete(c).where(c.c.run_id == self._run_id, c.c.location.in_(list(locations)))
            )

    def add_failure(self, failure: FailureRow) -> None:
        self._conn.execute(
            sa.insert(failures_table).values(
                run_id=self._run_id,
                member=failure.member,
                step=failure.step,
                attempt=failure.attempt,
                traceback=failure.traceback,
                time=failure.time,
            )
        )


def _member_values(run_id: int, row: MemberRow, version: int = 0) -> dict[str, Any]:
    return {
        "version": version,
        "run_id": run_id,
        "id": row.id,
        "state": dict(row.state),
        "step": int(row.state["step"]),
        "status": str(row.state["status"]),
        "owner": row.owner,
        "heartbeat": row.heartbeat,
        "checkpoint": row.checkpoint,
        "checkpoint_step": row.checkpoint_step,
        "attempts": row.attempts,
    }


def _read_members(conn: Connection, run_id: int, since: int | None = None) -> list[MemberRow]:
    m = members_table
    query = sa.select(m).where(m.c.run_id == run_id)
    if since is not None:
        query = query.where(m.c.version > since)
    rows = conn.execute(query.order_by(m.c.id))
    return [
        MemberRow(
            state=r.state,
            owner=r.owner,
            heartbeat=r.heartbeat,
            checkpoint=r.checkpoint,
            checkpoint_step=r.checkpoint_step,
            attempts=r.attempts,
        )
        for r in rows
    ]


def _read_checkpoints(
    conn: Connection,
    run_id: int,
    only: Collection[int] | None = None,
    at: Collection[str] = (),
) -> list[CheckpointRow]:
    """The run's checkpoint rows, oldest first; with ``only``, those of these members and
    those at the locations ``at``."""
    c = checkpoints_table
    query = sa.select(c).where(c.c.run_id == run_id)
    members, locations = (None, set()) if only is None else (set(only), set(at))
    if members is not None:
        if not members and not locations:
            return []
        if len(members) + len(locations) <= 500:  # SQLite allows 999 variables a statement
            query = query.where(
                sa.or_(c.c.member.in_(sorted(members)), c.c.location.in_(sorted(locations)))
            )
    rows = conn.execute(query.order_by(c.c.id))
    return [
        CheckpointRow(r.id, r.member, r.step, r.location, r.size, r.created)
        for r in rows
        if members is None or r.member in members or r.location in locations
    ]


def _set_bound(dbapi_conn: Any, bound: float) -> None:
    """Sets a PostgreSQL session's lock waits and idle-in-transaction time to ``bound`` seconds
    (`poptune.storage.locks`), outside any transaction, so the setting outlives it."""
    ms = str(max(1, round(bound * 1000)))
    cur = dbapi_conn.cursor()
    try:
        cur.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', %s, false)",
            (ms, ms),
        )
    finally:
        cur.close()
    dbapi_conn.commit()


#: The session holding a run's row lock (the transaction its ``xmax`` names) if it has been
#: waiting for its client for longer than the bound: ended, and its pid and name returned.
#: (Found first, then ended: the planner may evaluate a condition in any order.)
_END_FROZEN = """
WITH frozen AS MATERIALIZED (
  SELECT a.pid, a.application_name FROM poptune_runs r
  JOIN pg_locks l
    ON l.locktype = 'transactionid' AND l.transactionid = r.xmax AND l.granted
    AND l.mode = 'ExclusiveLock'
  JOIN pg_stat_activity a ON a.pid = l.pid
  WHERE r.name = :name AND a.pid <> pg_backend_pid() AND a.wait_event_type = 'Client'
    AND a.state_change < now() - make_interval(secs => :bound)
)
SELECT pid, application_name FROM frozen WHERE pg_terminate_backend(pid)
"""


def _lock_wait_ended(e: sa.exc.OperationalError) -> bool:
    """Whether a statement failed because it waited for a lock too long (and may be retried):
    PostgreSQL's ``lock_timeout``, SQLite's busy timeout."""
    if getattr(e.orig, "sqlstate", None) == "55P03":  # lock_not_available
        return True
    return "database is locked" in str(e.orig)


def _session_ended(e: sa.exc.DBAPIError) -> bool:
    """Whether PostgreSQL ended the session (idle in transaction too long, terminated by an
    administrator) or the connection is gone."""
    state = getattr(e.orig, "sqlstate", None) or ""
    return state in ("25P03", "57P01") or state.startswith("08")


def _run_info(r: Any) -> RunInfo:
    return RunInfo(
        name=r.name,
        config=r.config,
        fingerprint=r.fingerprint,
        status=r.status,
        source=r.source,
        checkpoint_root=r.checkpoint_root,
        created=r.created,
        updated=r.updated,
        error=r.error,
        generation=r.generation,
        pending=r.pending or {},
        execution=r.execution or {},
    )


class SQLStorage(Storage):
    """Runs in a SQL database.

    Args:
        url: A SQLAlchemy URL: ``sqlite:///path/to/poptune.db`` or
            ``postgresql+psycopg://user:password@host/db`` (``postgresql://`` means psycopg 3).
        create: Create the schema when the database has none (default True).
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            parsed = make_url(url)
        except Exception:
            raise StorageError(
                f"Not a storage URL: {redact_url(url)!r}. Expected sqlite:///FILE.db or "
                "postgresql+psycopg://USER@HOST/DB."
            ) from None
        self.url = parsed
        self.display_url = redact_url(parsed)
        backend = parsed.get_backend_name()
        if backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            try:
                import psycopg  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "PostgreSQL storage needs psycopg 3: pip install 'poptune[postgres]'"
                ) from e
        elif backend != "sqlite":
            raise StorageError(
                f"Unsupported storage {self.display_url!r}: poptune stores runs in SQLite "
                "(sqlite:///FILE.db) or PostgreSQL (postgresql+psycopg://...)."
            )
        self.dialect = backend
        self._member_upsert: Any = None
        db = parsed.database if backend == "sqlite" else None
        # Beside the file, as SQLite's own -wal and -shm files are (`locks.WritersQueue`).
        self._queue = locks.WritersQueue(f"{db}-poptune-lock" if db and db != ":memory:" else None)
        # Each run's bound (`locks.run_bound`), by name, as last read.
        self._bounds: dict[str, float] = {}
        self.engine = self._make_engine(parsed)
        self._local = threading.local()
        try:
            self._check_schema(create)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.ProgrammingError) as e:
            # Raised while connecting (unreachable server, bad credentials or options).
            self.engine.dispose()
            raise StorageError(
                f"Cannot reach storage {self.display_url}: {_scrub(str(e.orig), self.url)}"
            ) from None
        except Exception:
            self.engine.dispose()
            raise

    def _upsert_members(self) -> Any:
        """``INSERT ... ON CONFLICT (run_id, id) DO UPDATE`` for member rows (built once)."""
        if self._member_upsert is None:
            from sqlalchemy.dialects import postgresql, sqlite

            m = members_table
            dialect = postgresql if self.dialect == "postgresql" else sqlite
            stmt: Any = dialect.insert(m)
            self._member_upsert = stmt.on_conflict_do_update(
                index_elements=[m.c.run_id, m.c.id],
                set_={c.name: stmt.excluded[c.name] for c in m.c if c.name not in ("run_id", "id")},
            )
        return self._member_upsert

    def _make_engine(self, url: sa.URL) -> Engine:
        if self.dialect == "sqlite":
            engine = sa.create_engine(url, connect_args={"timeout": 60})

            @sa.event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                # Manage transactions ourselves: pysqlite's implicit BEGIN would defer locks.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA busy_timeout=60000")
                _enable_wal(cur)
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @sa.event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                # Writers take the write lock up front, so two never deadlock on upgrade;
                # readers start a deferred transaction and never block a writer (WAL).
                write = conn.get_execution_options().get("poptune_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        engine = sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=2,
            max_overflow=4,
            connect_args={"connect_timeout": 10},
        )
        named = "application_name" in url.query

        @sa.event.listens_for(engine, "do_connect")
        def _on_do_connect(_dialect: Any, _record: Any, _args: Any, params: Any) -> None:
            # Read at each connection (a forked process connects under its own PID), so that a
            # process's sessions can be found in pg_stat_activity; a URL's own name is kept.
            if not named:
                params["application_name"] = f"poptune-{os.getpid()}"

        @sa.event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn: Any, record: Any) -> None:
            _set_bound(dbapi_conn, locks.DEFAULT_BOUND)
            record.info["poptune_bound"] = locks.DEFAULT_BOUND

        return engine

    def _bound(self, run: str | None) -> float:
        """The run's bound (`locks.run_bound`): read once, then kept up to date by its
        transactions."""
        if run is None:
            return locks.DEFAULT_BOUND
        bound = self._bounds.get(run)
        if bound is None:
            try:
                info = self.get_run(run)
            except Exception:  # unreadable now: the transaction itself will say why
                info = None
            bound = self._bounds[run] = locks.run_bound(info.execution if info else None)
        return bound

    @contextlib.contextmanager
    def _write(
        self,
        run: str | None = None,
        first: sa.Executable | None = None,
        *,
        patience: float | None = None,
    ) -> Iterator[tuple[Connection, Any]]:
        """A connection in a write transaction (committed on success, rolled back on error),
        and the first row of ``first`` (the statement that takes the run's lock on
        PostgreSQL), executed before anything else.

        Waits are bounded (`poptune.storage.locks`): the writers' queue (SQLite) and ``first``
        are waited for in turns, with backoff, until ``patience`` seconds (default:
        `locks.patience` of the run's bound) have passed; then `LockTimeout`. A transaction
        ended from outside (its session ended by the server, its connection broken) raises
        `TransactionLost`.
        """
        bound = self._bound(run)
        waited = locks.patience(bound) if patience is None else patience
        deadline = time.monotonic() + waited
        delay = 0.01
        while True:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(self._queue.hold(run, bound, deadline))
                conn = stack.enter_context(
                    self.engine.connect().execution_options(poptune_write=True)
                )
                if self.dialect == "postgresql" and conn.info.get("poptune_bound") != bound:
                    _set_bound(conn.connection.dbapi_connection, bound)
                    conn.info["poptune_bound"] = bound
                stack.enter_context(conn.begin())
                row = None if first is None else conn.execute(first).first()
                break
            except BaseException as e:
                stack.__exit__(type(e), e, e.__traceback__)
                waited = isinstance(e, sa.exc.OperationalError) and _lock_wait_ended(e)
                if isinstance(e, (sa.exc.OperationalError, sa.exc.InterfaceError)) and not waited:
                    raise self._unavailable(e) from None  # no server, no room, no write access
                if not waited:
                    raise
                if run is not None and self.dialect == "postgresql":
                    self._end_frozen_session(run, bound)
                if time.monotonic() + delay > deadline:
                    raise LockTimeout(
                        f"{'Run ' + repr(run) if run else 'A write'} could not take its lock in "
                        f"{self.display_url} within {waited:g} s: another transaction held it "
                        "all along."
                    ) from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        try:
            with stack:
                yield conn, row
        except sa.exc.DBAPIError as e:
            if e.connection_invalidated or _session_ended(e):
                raise TransactionLost(
                    f"A transaction on {'run ' + repr(run) if run else 'the storage'} in "
                    f"{self.display_url} was ended from outside before it committed (its "
                    "session was ended after holding the lock past the run's heartbeat timeout, "
                    f"or its connection broke): {_scrub(str(e.orig), self.url)}"
                ) from None
            if isinstance(e, sa.exc.OperationalError) and not _lock_wait_ended(e):
                raise self._unavailable(e) from None  # rolled back: a full or read-only disk
            raise

    def _unavailable(self, e: sa.exc.DBAPIError) -> StorageUnavailable:
        first = (_scrub(str(e.orig), self.url).strip().splitlines() or [type(e).__name__])[0]
        return StorageUnavailable(f"{self.display_url} cannot be used now: {first}", first)

    def _end_frozen_session(self, run: str, bound: float) -> None:
        """Ends the PostgreSQL session holding ``run``'s lock if it has waited for its client
        for longer than ``bound`` (`poptune.storage.locks`).

        ``idle_in_transaction_session_timeout`` ends most frozen sessions, but not one whose
        client froze in the middle of a pipeline (psycopg sends ``executemany`` as one) or
        while the server was sending it a large result: the server is then not "idle". Such a
        session is found from the run row's locker (its ``xmax``) and ended with
        ``pg_terminate_backend``; where that is not allowed (another role), waiters only wait.
        """
        try:
            with self.engine.connect() as conn:
                ended = conn.execute(sa.text(_END_FROZEN), {"name": run, "bound": bound}).all()
                conn.commit()
        except sa.exc.DBAPIError:
            return
        for pid, name in ended:
            _log.warning(
                "Ended PostgreSQL session %s (%s): it held the lock of run %r while waiting for "
                "its client for longer than the run's heartbeat timeout (%g s), which stopped "
                "every other worker; its transaction is rolled back.",
                pid,
                name,
                run,
                bound,
            )

    def _check_schema(self, create: bool) -> None:
        # A database already at this version is only read: opening a storage never queues for
        # the write lock (a process frozen holding it must not stop new workers from starting).
        with self.engine.connect() as conn:
            if sa.inspect(conn).has_table(meta_table.name):
                row = conn.execute(
                    sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
                ).first()
                if row is not None and row[0] == str(SCHEMA_VERSION):
                    return
        # On PostgreSQL, an advisory lock serialises concurrent first-time set-up by workers.
        first = sa.select(sa.func.pg_advisory_xact_lock(740317))
        with self._write(first=first if self.dialect == "postgresql" else None) as (conn, _):
            tables = set(sa.inspect(conn).get_table_names())
            ours = {t.name for t in metadata.sorted_tables}
            if "poptune_meta" not in tables:
                if tables & ours:
                    raise StorageError(
                        f"{self.display_url} has poptune tables but no poptune_meta table: it "
                        "was not written by poptune, or is damaged. Use another database."
                    )
                if not create:
                    raise StorageError(f"{self.display_url} holds no poptune runs.")
                metadata.create_all(conn)
                conn.execute(
                    sa.insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION))
                )
                return
            row = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).first()
            version = int(row[0]) if row is not None else 0
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.display_url} was written by a newer poptune (schema version "
                    f"{version}; this poptune reads version {SCHEMA_VERSION}). Upgrade poptune: "
                    "pip install -U poptune."
                )
            while version < SCHEMA_VERSION:
                migrate = MIGRATIONS.get(version)
                if migrate is None:
                    raise StorageError(
                        f"{self.display_url} uses schema version {version}, which this poptune "
                        f"(schema {SCHEMA_VERSION}) cannot migrate. Export its runs with the "
                        "poptune that wrote them (`poptune export`), or use a new database."
                    )
                migrate(conn)
                version += 1
                conn.execute(
                    sa.update(meta_table)
                    .where(meta_table.c.key == "schema_version")
                    .values(value=str(version))
                )

    # -- runs ----------------------------------------------------------------------------------

    def _run_row(self, conn: Connection, name: str) -> Any:
        row = conn.execute(sa.select(runs_table).where(runs_table.c.name == name)).first()
        if row is None:
            raise StorageError(f"No run named {name!r} in {self.display_url}.")
        return row

    def create_run(
        self,
        name: str,
        config: Mapping[str, Any],
        fingerprint: str,
        *,
        source: str | None = None,
        checkpoint_root: str | None = None,
        members: Sequence[MemberRow] = (),
    ) -> RunInfo:
        now = time.time()
        try:
            with self._write(name) as (conn, _):
                res = conn.execute(
                    sa.insert(runs_table).values(
                        name=name,
                        config=dict(config),
                        fingerprint=fingerprint,
                        status="created",
                        source=source,
                        checkpoint_root=checkpoint_root,
                        generation=0,
                        pending={},
                        event_count=0,
                        created=now,
                        updated=now,
                    )
                )
                pk = res.inserted_primary_key
                assert pk is not None
                if members:
                    conn.execute(
                        sa.insert(members_table), [_member_values(int(pk[0]), m) for m in members]
                    )
                return _run_info(self._run_row(conn, name))
        except sa.exc.IntegrityError:
            raise RunExists(f"A run named {name!r} already exists in {self.display_url}.") from None

    def get_run(self, name: str) -> RunInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.name == name)).first()
            return None if row is None else _run_info(row)

    def list_runs(self) -> list[RunInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(runs_table).order_by(runs_table.c.id))
            return [_run_info(r) for r in rows]

    def update_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        fingerprint: str | None = None,
        source: str | None = None,
        status: str | None = None,
        error: str | None = None,
        execution: Mapping[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated": time.time()}
        if config is not None:
            values["config"] = dict(config)
        if fingerprint is not None:
            values["fingerprint"] = fingerprint
        if source is not None:
            values["source"] = source
        if execution is not None:
            values["execution"] = dict(execution)
        if status is not None:
            values["status"], values["error"] = status, error
        with self._write(name, self._lock_run(name)) as (conn, row):
            if row is None:
                raise StorageError(f"No run named {name!r} in {self.display_url}.")
            conn.execute(sa.update(runs_table).where(runs_table.c.name == name).values(**values))

    def _lock_run(self, name: str, *columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
        """Reads the run's row (these columns of it), locking it on PostgreSQL."""
        stmt = sa.select(*columns) if columns else sa.select(runs_table)
        stmt = stmt.where(runs_table.c.name == name)
        return stmt.with_for_update() if self.dialect == "postgresql" else stmt

    @contextlib.contextmanager
    def transaction(self, name: str) -> Iterator[Transaction]:
        with self._write(name, self._lock_run(name)) as (conn, row):
            if row is None:
                raise StorageError(f"No run named {name!r} in {self.display_url}.")
            self._bounds[name] = locks.run_bound(row.execution)
            tx = _SQLTransaction(self, conn, int(row.id), row)
            yield tx
            tx.flush()

    def _clock(self, conn: Connection) -> float:
        if self.dialect == "postgresql":
            return float(conn.execute(sa.select(_server_clock())).scalar_one())
        return time.time()  # SQLite: only this machine can open the file

    def now(self) -> float:
        if self.dialect != "postgresql":
            return time.time()
        with self.engine.connect() as conn:
            return self._clock(conn)

    def heartbeat(self, name: str, owner: str, now: float | None = None) -> int:
        m = members_table
        # The run row first, as every transaction does: rows are always locked in the same
        # order, so a heartbeat never deadlocks with a commit on PostgreSQL. A beat waits for
        # the lock at most the run's bound: a later beat is worth more than a late one.
        first = self._lock_run(name, runs_table.c.id, runs_table.c.member_version)
        with self._write(name, first, patience=self._bound(name)) as (conn, row):
            if row is None:
                return 0
            beat: float | sa.ColumnElement[float] = (
                now
                if now is not None
                else (_server_clock() if self.dialect == "postgresql" else time.time())
            )
            version = int(row[1]) + 1  # so that workers keeping rows read the new heartbeats
            res = conn.execute(
                sa.update(m)
                .where(m.c.run_id == row[0], m.c.owner == owner)
                .values(heartbeat=beat, version=version)
            )
            if res.rowcount:
                conn.execute(
                    sa.update(runs_table)
                    .where(runs_table.c.id == row[0])
                    .values(member_version=version)
                )
            return int(res.rowcount or 0)

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, name: str, fn: Callable[[Connection, int], Any]) -> Any:
        with self.engine.connect() as conn:
            return fn(conn, int(self._run_row(conn, name).id))

    def members(self, name: str) -> list[MemberRow]:
        return list(self._read(name, _read_members))

    def results(self, name: str, *, start: int = 0) -> list[ResultRow]:
        def read(conn: Connection, run_id: int) -> list[ResultRow]:
            r = results_table
            query = (
                sa.select(r.c.member, r.c.step, r.c.score, r.c.metrics, r.c.segment, r.c.device)
                .where(r.c.run_id == run_id)
                .order_by(r.c.id)
            )
            if start > 0:
                query = query.offset(start)
            rows = conn.execute(query)
            return [
                ResultRow(
                    x.member,
                    x.step,
                    math.nan if x.score is None else x.score,
                    x.metrics,
                    x.segment,
                    x.device,
                )
                for x in rows
            ]

        return list(self._read(name, read))

    def events(self, name: str, *, start: int = 0) -> list[dict[str, Any]]:
        def read(conn: Connection, run_id: int) -> list[dict[str, Any]]:
            e = events_table
            rows = conn.execute(
                sa.select(e).where(e.c.run_id == run_id, e.c.idx >= start).order_by(e.c.idx)
            )
            return [
                {
                    "index": x.idx,
                    "member": x.member,
                    "step": x.step,
                    "donor": x.donor,
                    "donor_step": x.donor_step,
                    "kind": x.kind,
                    "old_hparams": x.old_hparams,
                    "new_hparams": x.new_hparams,
                    "operations": x.operations,
                }
                for x in rows
            ]

        return list(self._read(name, read))

    def checkpoints(self, name: str) -> list[CheckpointRow]:
        return list(self._read(name, _read_checkpoints))

    def failures(self, name: str) -> list[FailureRow]:
        def read(conn: Connection, run_id: int) -> list[FailureRow]:
            f = failures_table
            rows = conn.execute(sa.select(f).where(f.c.run_id == run_id).order_by(f.c.id))
            return [FailureRow(x.member, x.step, x.attempt, x.traceback, x.time) for x in rows]

        return list(self._read(name, read))

    def close(self) -> None:
        self.engine.dispose()
