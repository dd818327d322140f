"""Store and handler behaviour against a real PostgreSQL: fencing, idempotency, capacity, exclusivity."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api import db, handlers
from services.run_api.auth import Caller
from services.run_api.reaper import Reaper, ReaperConfig
from services.run_api.store.events import Outcome
from services.run_api.store.uow import UnitOfWork
from shared.backoff import backoff_seconds
from shared.events import attempt_text

pytestmark = pytest.mark.timeout(60)

POLICY = handlers.RetryPolicy(max_attempts=2, backoff_seconds=0, backoff_max_seconds=0)
ANON = Caller.anonymous()
_SESSIONS: dict[tuple[int, str], str] = {}


async def session(engine: AsyncEngine, worker: str) -> str:
    """Open (or resume) the worker's session, as its claim stream does; returns its token."""
    async with UnitOfWork(engine) as uow:
        token = await handlers.open_session(uow, worker, "default", _SESSIONS.get((id(engine), worker), ""), 30)
    _SESSIONS[(id(engine), worker)] = token
    return token


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = db.make_engine(database_url, pool_size=8)
    yield eng
    await eng.dispose()


async def start(engine: AsyncEngine, n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        async with UnitOfWork(engine) as uow:
            row, _ = await handlers.start_run(uow, handlers.StartRun("", {}, 2), POLICY, ANON)
            ids.append(row.run_id)
    return ids


async def claim(engine: AsyncEngine, worker: str, capacity: int = 10, batch: int = 10) -> list[str]:
    await session(engine, worker)  # the stream opens the worker's session (its first heartbeat) before it claims
    async with UnitOfWork(engine) as uow:
        result = await handlers.claim_runs(uow, handlers.Claim(worker, "default", capacity, batch, 30))
    return [r.run_id for r in result.runs]


async def report(engine: AsyncEngine, worker: str, *events: handlers.ReportedEvent) -> list[Outcome]:
    async with UnitOfWork(engine) as uow:
        token = _SESSIONS.get((id(engine), worker), "")
        results = await handlers.report_events(uow, worker, token, list(events))
    return [r.outcome for r in results]


def ev(run_id: str, attempt: int, type_: str, event_id: str, **payload: object) -> handlers.ReportedEvent:
    return handlers.ReportedEvent(run_id, attempt, event_id, type_, None, dict(payload))


async def test_claim_never_exceeds_free_capacity(engine: AsyncEngine) -> None:
    await start(engine, 5)
    assert len(await claim(engine, "w1", capacity=3)) == 3
    assert await claim(engine, "w1", capacity=3) == []
    assert len(await claim(engine, "w2", capacity=10)) == 2


async def test_concurrent_claimers_never_share_a_run(engine: AsyncEngine) -> None:
    await start(engine, 40)
    results = await asyncio.gather(*(claim(engine, f"w{i}", capacity=40, batch=7) for i in range(6)))
    claimed = [r for batch in results for r in batch]
    assert len(claimed) == len(set(claimed))
    while len(claimed) < 40:
        more = await claim(engine, "late", capacity=40)
        assert more, "runs left unclaimed"
        claimed += more
    assert len(set(claimed)) == 40


async def test_reports_are_idempotent_by_event_id(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    first = await report(engine, "w1", ev(run_id, 1, "run.started", "e1"))
    again = await report(engine, "w1", ev(run_id, 1, "run.started", "e1"))
    assert (first, again) == ([Outcome.RECORDED], [Outcome.DUPLICATE])


async def test_stale_attempt_and_terminal_runs_refuse_reports(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    assert await report(engine, "w1", ev(run_id, 2, "run.started", "x1")) == [Outcome.STALE]
    assert await report(engine, "w1", ev(run_id, 1, "run.completed", "x2")) == [Outcome.RECORDED]
    # Terminal is final: a late report, even with the right attempt, is refused and not recorded.
    assert await report(engine, "w1", ev(run_id, 1, "run.failed", "x3", error="late")) == [Outcome.STALE]
    async with UnitOfWork(engine) as uow:
        events = await handlers.events_after(uow, run_id, 0)
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert [e.type for e in events] == ["run.queued", "run.claimed", "run.completed"]
    assert row.status == "SUCCEEDED"


async def test_a_failed_attempt_with_attempts_left_is_requeued(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    assert await report(engine, "w1", ev(run_id, 1, "run.failed", "f1", error="boom")) == [Outcome.RECORDED]
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert (row.status, row.attempt, row.error) == ("QUEUED", 1, "boom")
    assert await claim(engine, "w2") == [run_id]
    assert await report(engine, "w2", ev(run_id, 2, "run.failed", "f2", error="again")) == [Outcome.RECORDED]
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert (row.status, row.attempt, row.error, row.stop_reason) == ("FAILED", 2, "again", "failed")


async def test_a_released_attempt_does_not_count_and_a_new_attempt_clears_the_error(engine: AsyncEngine) -> None:
    """max_attempts 2 (start()): attempt 1 is released by a stopping worker, so attempt 2's failure is retried
    (1 of 2 counted) and attempt 3's ends the run; the claim of a new attempt clears the error of the one before."""
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    assert await report(engine, "w1", ev(run_id, 1, "run.failed", "r1", error="bye", released=True)) == [
        Outcome.RECORDED]
    assert await claim(engine, "w2") == [run_id]
    assert await report(engine, "w2", ev(run_id, 2, "run.failed", "f2", error="boom")) == [Outcome.RECORDED]
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert (row.status, row.attempt, row.released_attempts, row.error) == ("QUEUED", 2, 1, "boom")
    assert await claim(engine, "w3") == [run_id]
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert (row.status, row.attempt, row.error) == ("RUNNING", 3, None)  # no stale error while running
    assert await report(engine, "w3", ev(run_id, 3, "run.failed", "f3", error="boom again")) == [Outcome.RECORDED]
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert (row.status, row.attempt, row.released_attempts, row.error) == ("FAILED", 3, 1, "boom again")
    assert attempt_text(row.attempt, row.max_attempts, row.released_attempts) == "3 (2/2 counted, 1 released)"
    assert attempt_text(2, 3) == "2/3" and attempt_text(1, 0) == "1"


async def test_migration_0009_counts_the_releases_recorded_before_it(engine: AsyncEngine, database_url: str) -> None:
    """Projections equal a replay after the upgrade too: a run released before migration 0009 (made here, then
    the schema taken back to 0008) gets released_attempts from its log, and a running run loses its stale error."""
    (released, running) = await start(engine, 2)
    await claim(engine, "w1", batch=1)
    assert await report(engine, "w1", ev(released, 1, "run.failed", "r1", released=True)) == [Outcome.RECORDED]
    assert set(await claim(engine, "w2", batch=2)) == {released, running}
    await engine.dispose()

    def downgrade_then_upgrade() -> None:
        config = Config(str(db.ALEMBIC_INI))
        config.set_main_option("sqlalchemy.url", db.sqlalchemy_url(database_url).replace("%", "%%"))
        command.downgrade(config, "0008")
        with psycopg.connect(db.libpq_url(database_url), autocommit=True) as conn:
            conn.execute("UPDATE runs SET error = 'from the attempt before' WHERE run_id = %s", (running,))
        db.migrate(database_url)

    await asyncio.to_thread(downgrade_then_upgrade)
    async with UnitOfWork(engine) as uow:
        rows = {r: (await handlers.get_run(uow, r, ANON))[0] for r in (released, running)}
    assert (rows[released].released_attempts, rows[released].attempt) == (1, 2)
    assert (rows[running].released_attempts, rows[running].error) == (0, None)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_seconds(a, 1.0, 10.0, rng.uniform) for a in range(1, 8)]
    assert 0.5 <= delays[0] <= 1.0
    assert 2.0 <= delays[2] <= 4.0
    assert all(d <= 10.0 for d in delays)
    assert delays[-1] >= 5.0


async def cancel(engine: AsyncEngine, run_id: str) -> None:
    async with UnitOfWork(engine) as uow:
        await handlers.cancel_run(uow, run_id, "stop", ANON)


async def status_of(engine: AsyncEngine, run_id: str) -> tuple[str, int]:
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    return row.status, row.attempt


async def test_a_failure_after_a_cancel_request_ends_canceled_not_retried(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    await cancel(engine, run_id)
    assert await report(engine, "w1", ev(run_id, 1, "run.failed", "f1", error="x")) == [Outcome.RECORDED]
    assert await status_of(engine, run_id) == ("CANCELED", 1)
    assert await claim(engine, "w2") == []


async def test_a_worker_cannot_cancel_a_queued_run(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    await report(engine, "w1", ev(run_id, 1, "run.failed", "f1", error="retry me"))
    assert await status_of(engine, run_id) == ("QUEUED", 1)
    assert await report(engine, "w1", ev(run_id, 1, "run.canceled", "c1")) == [Outcome.STALE]


async def test_heartbeat_adopts_only_runs_requeued_for_an_expired_lease(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    await report(engine, "w1", ev(run_id, 1, "run.failed", "f1", error="retry me"))
    async with UnitOfWork(engine) as uow:
        beat = await handlers.heartbeat(uow, "w1", [(run_id, 1)], 30)
    assert (beat.readopted, beat.lost_run_ids) == ([], [run_id])


async def test_nul_characters_in_worker_payloads_are_stored_replaced(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    outcome = await report(engine, "w1", ev(run_id, 1, "run.failed", "f1", error="bad\x00byte", retryable=False))
    assert outcome == [Outcome.RECORDED]
    async with UnitOfWork(engine) as uow:
        row, _, _ = await handlers.get_run(uow, run_id, ANON)
    assert (row.status, row.error) == ("FAILED", "bad\ufffdbyte")
    async with UnitOfWork(engine) as uow:
        logged = await handlers.events_after(uow, run_id, 0)
    assert logged[-1].payload["error"] == "bad\ufffdbyte"  # the log holds what the projection holds


def test_the_claim_query_can_use_the_partial_index(sql: psycopg.Connection) -> None:
    with sql.transaction():
        sql.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in sql.execute(
                "EXPLAIN SELECT run_id FROM runs WHERE tenant_id = 'default' AND workspace_id = 'default' "
                "AND status = 'QUEUED' "
                "AND next_attempt_at <= now() ORDER BY next_attempt_at, run_id LIMIT 10 FOR UPDATE SKIP LOCKED"
            )
        )
    assert "runs_claim_idx" in plan, plan


async def test_only_one_reaper_works_at_a_time(engine: AsyncEngine, sql: psycopg.Connection) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "gone")
    later = handlers.utcnow() + timedelta(seconds=60)
    reaper = Reaper(engine, ReaperConfig())
    with sql.transaction():
        sql.execute("SELECT pg_advisory_xact_lock(7206157372)")  # another replica's reaper holds it
        assert await reaper.run_once(now=later) == Counter()
    assert await reaper.run_once(now=later) == Counter({"lease_expired": 1, "requeued": 1})
    assert await status_of(engine, run_id) == ("QUEUED", 1)


async def test_a_worker_without_a_live_heartbeat_lease_is_given_nothing(engine: AsyncEngine) -> None:
    await start(engine, 2)
    async with UnitOfWork(engine) as uow:
        result = await handlers.claim_runs(uow, handlers.Claim("never-beat", "default", 5, 5, 30))
    assert (result.runs, result.full) == ([], True)
    assert len(await claim(engine, "w1")) == 2  # heartbeats first, then claims
    much_later = handlers.utcnow() + timedelta(hours=2)
    await Reaper(engine, ReaperConfig()).run_once(now=much_later)  # also forgets silent workers
    async with UnitOfWork(engine) as uow:
        result = await handlers.claim_runs(uow, handlers.Claim("w1", "default", 5, 5, 30), now=much_later)
    assert result.runs == [] and result.full


async def test_heartbeat_says_lost_for_a_run_the_reaper_ended(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    await cancel(engine, run_id)
    await Reaper(engine, ReaperConfig()).run_once(now=handlers.utcnow() + timedelta(seconds=60))
    assert await status_of(engine, run_id) == ("CANCELED", 1)
    async with UnitOfWork(engine) as uow:
        beat = await handlers.heartbeat(uow, "w1", [(run_id, 1)], 30)
    assert beat.lost_run_ids == [run_id]


async def test_a_canceled_run_keeps_the_clients_reason(engine: AsyncEngine) -> None:
    (run_id,) = await start(engine)
    await claim(engine, "w1")
    await cancel(engine, run_id)
    assert await report(engine, "w1", ev(run_id, 1, "run.canceled", "c1", reason="cancel requested")) == [
        Outcome.RECORDED
    ]
    async with UnitOfWork(engine) as uow:
        events = await handlers.events_after(uow, run_id, 0)
    assert events[-1].type == "run.canceled" and events[-1].payload["reason"] == "stop"
