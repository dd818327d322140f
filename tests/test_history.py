"""A large history (issue 9, item 6): the set-based loader, the hot statements' plans over it, retention.

The loader's runs must be indistinguishable in shape from a run a real worker executed (same events,
payload fields, projected columns), and replaying the log must rebuild the same projections.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

import grpc
import psycopg
import pytest
from psycopg.rows import dict_row

from services.run_api import db
from services.run_api.server import ApiServer
from services.run_api.store.history import fill_history
from services.run_worker.worker import Worker
from shared.gen.runs.v1 import run_service_pb2, run_service_pb2_grpc
from shared.settings import ApiSettings, WorkerSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every projected row, in a stable order (what a replay must rebuild).
SNAPSHOT = {
    "runs": "SELECT * FROM runs ORDER BY run_id",
    "run_steps": "SELECT * FROM run_steps ORDER BY run_id, step_key",
    "tool_calls": "SELECT * FROM tool_calls ORDER BY run_id, tool_call_id",
    "run_artifacts": "SELECT * FROM run_artifacts ORDER BY run_id, step_key, name",
    "step_cache": "SELECT * FROM step_cache ORDER BY tenant_id, cache_key",
}

# Columns that differ from run to run by nature (ids, times, who, the trace).
VARYING = {"run_id", "tool_call_id", "event_id", "worker_id", "trace_context", "created_at", "updated_at",
           "started_at", "finished_at", "next_attempt_at", "occurred_at", "recorded_at", "invoked_at"}


def snapshot(conn: psycopg.Connection) -> dict[str, list[Any]]:
    """Every projected row."""
    return {name: conn.execute(query).fetchall() for name, query in SNAPSHOT.items()}


def replay_command(database_url: str) -> None:
    """`python -m services.run_api replay` against the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUN_", "RUNS_", "DATABASE_URL", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "services.run_api", "replay", "--database-url", database_url],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "replayed" in done.stdout


async def live_noop_run(database_url: str) -> str:
    """One runtime.noop run through a real API and a real worker; its id."""
    settings = dataclasses.replace(ApiSettings(), addr="127.0.0.1:0", database_url=database_url)
    server = ApiServer(settings, database_url)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await run_service_pb2_grpc.RunServiceStub(channel).StartRun(run_service_pb2.StartRunRequest())
        worker = Worker(WorkerSettings(api_addr=f"127.0.0.1:{port}", worker_id="w-live"))
        try:
            assert (await worker.run_cycle())["succeeded"] == 1
        finally:
            await worker.close()
    finally:
        await server.stop()
    return str(response.run.run_id)


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    """A row without what varies by nature; a payload by its fields (and the constant ones' values)."""
    out = {k: v for k, v in row.items() if k not in VARYING}
    if isinstance(out.get("payload"), dict):
        payload = out["payload"]
        out["payload"] = {k: (v if k not in VARYING | {"tool_call_id", "lease_expires_at"} else type(v).__name__)
                          for k, v in payload.items()}
    return out


@pytest.mark.timeout(60)
async def test_filled_runs_look_like_a_live_run_and_replay_to_the_same_projections(database_url: str) -> None:
    live = await live_noop_run(database_url)
    url = db.libpq_url(database_url)
    fill_history(url, 300, chunk=120)  # three chunks, the last one short
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM run_events) AS events, "
            "(SELECT count(*) FROM run_steps) AS steps, (SELECT count(*) FROM tool_calls) AS calls"
        ).fetchone()
        assert counts == {"runs": 301, "events": 301 * 9, "steps": 301, "calls": 301}
        span = conn.execute(
            "SELECT min(created_at) AS first, max(created_at) AS last, count(DISTINCT run_id) AS ids, "
            "bool_and(status = 'SUCCEEDED') AS succeeded FROM runs WHERE run_id <> %s", (live,)
        ).fetchone()
        assert span["ids"] == 300 and span["succeeded"]
        assert 85 * 86400 < (span["last"] - span["first"]).total_seconds() < 90 * 86400
        # Oldest first: the ULIDs sort like their creation times, and the live run (made now) sorts last.
        ordered = [r["run_id"] for r in conn.execute("SELECT run_id FROM runs ORDER BY created_at")]
        assert ordered == sorted(ordered) and ordered[-1] == live
        filled = ordered[0]
        for table, order in (("runs", "run_id"), ("run_events", "sequence"), ("run_steps", "step_key"),
                             ("tool_calls", "tool_call_id")):
            query = f"SELECT * FROM {table} WHERE run_id = %s ORDER BY {order}"
            want = [_shape(r) for r in conn.execute(query, (live,))]
            got = [_shape(r) for r in conn.execute(query, (filled,))]
            assert got == want, table
        # Ids and times hang together: the tool call the events name is the projected one; times in order.
        run = conn.execute("SELECT * FROM runs WHERE run_id = %s", (filled,)).fetchone()
        events = conn.execute("SELECT * FROM run_events WHERE run_id = %s ORDER BY sequence", (filled,)).fetchall()
        call = conn.execute("SELECT * FROM tool_calls WHERE run_id = %s", (filled,)).fetchone()
        assert events[5]["payload"]["tool_call_id"] == call["tool_call_id"] == events[6]["payload"]["tool_call_id"]
        recorded = [e["recorded_at"] for e in events]
        assert recorded == sorted(recorded) and run["created_at"] == recorded[0]
        assert run["finished_at"] == run["updated_at"] == recorded[-1] and run["started_at"] == recorded[2]
        assert len({e["event_id"] for e in events}) == 9 and all(len(e["event_id"]) == 26 for e in events)
    with psycopg.connect(url, autocommit=True) as conn:
        before = snapshot(conn)
    started = time.monotonic()
    replay_command(database_url)
    with psycopg.connect(url, autocommit=True) as conn:
        after = snapshot(conn)
    for name in SNAPSHOT:
        assert after[name] == before[name], name
    assert time.monotonic() - started < 30
