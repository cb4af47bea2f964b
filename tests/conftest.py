"""Fixtures shared by every test package: a real PostgreSQL database for tests that need one.

PostgreSQL tests use the server named by ``POPTUNE_TEST_POSTGRES_URL`` (a SQLAlchemy URL of a
database from which the user may ``CREATE DATABASE``), or ``DEFAULT_POSTGRES_URL`` when it is
unset. Every test gets a fresh, empty database (creating one takes a few tens of milliseconds),
dropped afterwards. When no server answers, the tests are skipped, unless
``POPTUNE_REQUIRE_POSTGRES=1`` (set in CI), which makes them fail instead.

Ray tests share one local Ray instance (``ray.init(num_cpus=2)``, no dashboard, usage
statistics off), started by the first test that needs it. When Ray is not installed they are
skipped, unless ``POPTUNE_REQUIRE_RAY=1`` (set in CI), which makes them fail instead.

Fixtures:
    pg_server_url: (session) URL of the server's base database, checked reachable.
    postgres_url: (session) URL of a fresh database shared by the whole test session.
    pg_url: (function) URL of a fresh, empty database for one test.
    chromium: (session) a headless Chromium for browser tests (skipped without one, unless
        ``POPTUNE_REQUIRE_CHROMIUM=1``, set in CI).
    ray_local: (session) the ``ray`` module, connected to a local instance for the session.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_PG_FIXTURES = ("pg_server_url", "postgres_url", "pg_url")


def _normalise(url: str) -> str:
    """``postgresql://`` means psycopg 3 here, as in poptune itself."""
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _why_unreachable(url: str) -> str | None:
    """None when the server answers, else the first line of the reason."""
    try:
        import psycopg  # noqa: F401
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool
    except ImportError as e:
        return f"{e} (pip install 'poptune[postgres]')"
    try:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as e:
        lines = str(getattr(e, "orig", None) or e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    return None


@contextlib.contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """Creates an empty database on the server, yields its URL, and drops it afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    base = sa.make_url(server_url)
    name = f"poptune_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE ends connections a test left open (PostgreSQL 13+).
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the PostgreSQL server's base database; skips (or fails in CI) when unreachable."""
    url = _normalise(os.environ.get("POPTUNE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    problem = _why_unreachable(url)
    if problem is not None:
        from poptune.storage import redact_url

        message = (
            f"PostgreSQL not reachable at {redact_url(url)} ({problem}); "
            "set POPTUNE_TEST_POSTGRES_URL"
        )
        if os.environ.get("POPTUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message} (POPTUNE_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def postgres_url(pg_server_url: str) -> Iterator[str]:
    """URL of a fresh database for the whole session (tests sharing it use unique run names)."""
    with fresh_postgres_database(pg_server_url) as url:
        yield url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """URL of a fresh, empty database for one test, dropped after it."""
    with fresh_postgres_database(pg_server_url) as url:
        yield url


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """The ``ray`` module, connected to a local Ray instance shared by every Ray test."""
    try:
        import ray
    except ImportError as e:
        message = f"Ray is not installed ({e}); pip install 'poptune[ray]'"
        if os.environ.get("POPTUNE_REQUIRE_RAY") == "1":
            pytest.fail(f"{message} (POPTUNE_REQUIRE_RAY=1)", pytrace=False)
        pytest.skip(message)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that ask for a PostgreSQL fixture by name are PostgreSQL tests (`-m "not postgres"`).
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in _PG_FIXTURES):
            item.add_marker(pytest.mark.postgres)


#: The Chromium the browser tests drive (Debian's `chromium` package), through Playwright.
CHROMIUM = os.environ.get("POPTUNE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """A headless Chromium (a Playwright ``Browser``); skips when there is none, unless
    ``POPTUNE_REQUIRE_CHROMIUM=1`` (set in CI), which makes the tests fail instead."""
    problem = None
    if not os.path.exists(CHROMIUM):
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set POPTUNE_CHROMIUM)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as e:
            problem = f"{e} (pip install playwright; its own browsers are not needed)"
    if problem is not None:
        if os.environ.get("POPTUNE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{problem} (POPTUNE_REQUIRE_CHROMIUM=1)", pytrace=False)
        pytest.skip(problem)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()
