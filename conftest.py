"""Test databases: a real PostgreSQL for every test, never a mock.

Where the server comes from: TEST_DATABASE_URL when set; else a testcontainers PostgreSQL when a
Docker engine answers; else an embedded PostgreSQL in a temporary directory. Every test gets a
fresh database copied from a migrated template (CREATE DATABASE ... TEMPLATE).

Under pytest-xdist (make test) every worker process has its own session: its own embedded server
(in its own temporary directory) or container, its own template (a ULID name), its own databases.
`--auth-passes off,required` runs each acceptance scenario (features/) once per mode in the one
session, as RUNS_TEST_AUTH would, so both passes share the workers instead of running one after the other;
a scenario tagged @one_auth_pass runs in the last mode only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql
from ulid import ULID

from services.run_api import db, registry
from shared.settings import PROJECT_WORKFLOWS_DIR

log = logging.getLogger(__name__)


AUTH_MODES = ("off", "required")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--auth-passes",
        default="",
        help="run every scenario under features/ once per RUNS_TEST_AUTH mode listed (e.g. off,required); "
        "unset: once, as RUNS_TEST_AUTH says",
    )


def _auth_passes(config: pytest.Config) -> list[str]:
    modes = [m.strip() for m in str(config.getoption("--auth-passes")).split(",") if m.strip()]
    unknown = sorted(set(modes) - set(AUTH_MODES))
    if unknown:
        raise pytest.UsageError(f"--auth-passes takes {' and '.join(AUTH_MODES)}, not {', '.join(unknown)}")
    return modes


def pytest_configure(config: pytest.Config) -> None:
    _auth_passes(config)  # a wrong mode stops the run before collection


FEATURES = Path(__file__).resolve().parent / "features"


# A long scenario tagged @one_auth_pass (a load, fault or cache scenario whose subject is not auth) runs in
# one pass only, the last listed (keys required in `make test`): both passes in full would take minutes.
ONE_PASS_TAG = "one_auth_pass"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    modes = _auth_passes(metafunc.config)
    if modes and FEATURES in metafunc.definition.path.parents:
        if metafunc.definition.get_closest_marker(ONE_PASS_TAG) is not None:
            modes = modes[-1:]
        metafunc.parametrize("runs_test_auth", modes, indirect=True, ids=[f"auth-{m}" for m in modes])


@pytest.fixture(autouse=True)
def runs_test_auth(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The scenario's auth mode when --auth-passes gives one (RUNS_TEST_AUTH for this test only)."""
    mode: str | None = getattr(request, "param", None)
    if mode is not None:
        monkeypatch.setenv("RUNS_TEST_AUTH", mode)
    return mode


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a PostgreSQL server the tests may create databases on."""
    explicit = os.environ.get("TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
        return
    with tempfile.TemporaryDirectory(prefix="runs-test-pg-") as tmp:
        server = db.embedded_server(tmp, cleanup="delete")
        try:
            yield str(server.get_uri("postgres"))
        finally:
            server.cleanup()  # stop it before its directory goes


async def _load_builtins(url: str) -> None:
    """Register the project's built-in workflows, as the API does at start (store-level tests need them)."""
    engine = db.make_engine(url, 2)
    try:
        await registry.load_builtins(engine, PROJECT_WORKFLOWS_DIR)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    """A migrated database to copy for each test."""
    name = f"runs_tpl_{str(ULID()).lower()}"
    with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    db.migrate(db.with_database(pg_server, name))
    asyncio.run(_load_builtins(db.with_database(pg_server, name)))
    yield name
    with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@contextlib.contextmanager
def fresh_database(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database copied from the template (SQLAlchemy URL), dropped afterwards."""
    name = f"runs_t_{str(ULID()).lower()}"
    with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(pgsql.Identifier(name), pgsql.Identifier(template_db))
        )
    try:
        yield db.with_database(pg_server, name)
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@pytest.fixture(scope="session")
def make_database(pg_server: str, template_db: str) -> Callable[[], contextlib.AbstractContextManager[str]]:
    """`with make_database() as url:` a fresh, migrated database (for fixtures of a wider scope than a test)."""
    return lambda: fresh_database(pg_server, template_db)


@pytest.fixture
def database_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test (SQLAlchemy URL with the psycopg driver)."""
    with fresh_database(pg_server, template_db) as url:
        yield url


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection to the test's database, for assertions."""
    with psycopg.connect(db.libpq_url(database_url), autocommit=True) as conn:
        yield conn
