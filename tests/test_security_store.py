"""Store-level regression tests of the security review's findings, against a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api import db, handlers
from services.run_api.auth import Caller
from services.run_api.reaper import Reaper, ReaperConfig
from services.run_api.store.uow import UnitOfWork

pytestmark = pytest.mark.timeout(60)

POLICY = handlers.RetryPolicy(max_attempts=3, backoff_seconds=0, backoff_max_seconds=0)
ANON = Caller.anonymous()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = db.make_engine(database_url, pool_size=8)
    yield eng
    await eng.dispose()


async def session(engine: AsyncEngine, worker: str) -> str:
    """Open the worker's session, as its claim stream does; returns its token."""
    async with UnitOfWork(engine) as uow:
        return await handlers.open_session(uow, worker, "default", "", 30)


async def start(engine: AsyncEngine, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        async with UnitOfWork(engine) as uow:
            row, _ = await handlers.start_run(uow, handlers.StartRun("", {}, 2), POLICY, ANON)
            ids.append(row.run_id)
    return ids


async def claim(engine: AsyncEngine, worker: str, capacity: int = 10) -> list[str]:
    await session(engine, worker)
    async with UnitOfWork(engine) as uow:
        result = await handlers.claim_runs(uow, handlers.Claim(worker, "default", capacity, capacity, 30))
    return [r.run_id for r in result.runs]


def state(sql: psycopg.Connection, run_id: str) -> tuple[str, int, int]:
    """(status, attempt, number of events) of a run."""
    row = sql.execute(
        "SELECT status, attempt, (SELECT count(*) FROM run_events e WHERE e.run_id = r.run_id) FROM runs r "
        "WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), int(row[2])


async def test_finding4_reaper_sets_aside_a_run_it_cannot_reap(engine: AsyncEngine, sql: psycopg.Connection) -> None:
    """Finding 4 (reaper isolation): a run whose worker id was 9,000 characters long made the reaper's NOTIFY
    fail (PostgreSQL refuses payloads over 8,000 bytes), and since the reaper recorded every expired lease in
    one transaction, no lease expired anywhere again. Now the failing run is set aside, counted and reported
    to health, while the other runs are reaped; later cycles go on without failing as a whole."""
    good, bad = await start(engine, 2)
    assert sorted(await claim(engine, "w1")) == sorted([good, bad])
    sql.execute("UPDATE runs SET worker_id = repeat('x', 9000) WHERE run_id = %s", (bad,))
    bad_before = state(sql, bad)

    health: list[bool] = []

    async def record(ok: bool) -> None:
        health.append(ok)

    reaper = Reaper(engine, ReaperConfig(), on_health=record)
    later = handlers.utcnow() + timedelta(seconds=60)
    done = await reaper.run_once(now=later)

    assert done["requeued"] == 1, done
    assert state(sql, good)[:2] == ("QUEUED", 1)
    assert state(sql, bad) == bad_before  # nothing half-recorded about the bad run
    assert reaper.counters["failures"] >= 1
    assert health and health[-1] is False
    assert bad in reaper.quarantine

    failures = reaper.counters["failures"]
    again = await reaper.run_once(now=later)  # must not raise: the bad run is set aside
    assert again["requeued"] == 0, again
    assert reaper.counters["failures"] == failures
    assert state(sql, good)[:2] == ("QUEUED", 1)
    assert state(sql, bad) == bad_before
