"""Store-level regression tests of the security review's findings, against a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api import auth, db, handlers
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


# --- regressions of the second review -----------------------------------------------------------


async def test_only_the_worker_that_claimed_an_attempt_can_readopt_it(
    engine: AsyncEngine, sql: psycopg.Connection
) -> None:
    """Heartbeat's adopt-first path once handed a lease-expired run to any worker naming its attempt
    (another tenant's too); now only the attempt's own worker gets it back."""
    (run_id,) = await start(engine, 1)
    assert await claim(engine, "w1") == [run_id]
    await Reaper(engine, ReaperConfig()).run_once(now=handlers.utcnow() + timedelta(seconds=60))
    assert state(sql, run_id)[:2] == ("QUEUED", 1)
    await session(engine, "thief")
    async with UnitOfWork(engine) as uow:
        beat = await handlers.heartbeat(uow, "thief", [(run_id, 1)], 30)
    assert (beat.readopted, beat.lost_run_ids) == ([], [run_id])
    assert state(sql, run_id)[:2] == ("QUEUED", 1)
    async with UnitOfWork(engine) as uow:
        beat = await handlers.heartbeat(uow, "w1", [(run_id, 1)], 30)
    assert beat.readopted == [(run_id, 2)]


async def test_two_streams_opening_one_new_worker_id_get_one_session(engine: AsyncEngine) -> None:
    """Two claim streams for a fresh worker id both got a session (one of them dead) before the
    session change was serialised."""
    import asyncio

    async def open_one() -> str | Exception:
        try:
            async with UnitOfWork(engine) as uow:
                return await handlers.open_session(uow, "fresh", "default", "", 30)
        except Exception as err:
            return err

    results = await asyncio.gather(*(open_one() for _ in range(6)))
    tokens = [r for r in results if isinstance(r, str)]
    assert len(tokens) == 1, results
    assert all(isinstance(r, handlers.PermissionDenied) for r in results if not isinstance(r, str))


async def test_a_stream_whose_session_was_replaced_claims_nothing(engine: AsyncEngine) -> None:
    """A claim stream kept claiming under a session that had been replaced; it now ends PERMISSION_DENIED."""
    await start(engine, 2)
    token = await session(engine, "w1")
    stale = handlers.Claim("w1", "default", 5, 5, 30, session_token_hash=auth.hash_secret(token + "x"))
    async with UnitOfWork(engine) as uow:
        with pytest.raises(handlers.PermissionDenied):
            await handlers.claim_runs(uow, stale)
    live = handlers.Claim("w1", "default", 5, 5, 30, session_token_hash=auth.hash_secret(token))
    async with UnitOfWork(engine) as uow:
        assert len((await handlers.claim_runs(uow, live)).runs) == 2


async def test_a_project_limited_worker_claims_only_its_project(engine: AsyncEngine) -> None:
    """Worker keys' project limits were ignored by the claim query."""
    async with UnitOfWork(engine) as uow:
        await handlers.start_run(uow, handlers.StartRun("", {}, 2, project_id="a"), POLICY, ANON)
    async with UnitOfWork(engine) as uow:
        b, _ = await handlers.start_run(uow, handlers.StartRun("", {}, 2, project_id="b"), POLICY, ANON)
    await session(engine, "wb")
    async with UnitOfWork(engine) as uow:
        result = await handlers.claim_runs(uow, handlers.Claim("wb", "default", 5, 5, 30, project_id="b"))
    assert [r.run_id for r in result.runs] == [b.run_id]


async def test_an_idempotency_key_never_reveals_another_projects_run(engine: AsyncEngine) -> None:
    """The conflict message named (and a same request returned) a run the caller may not see."""
    mine = Caller(key_id="k1", role="client", project_id="p1")
    other = Caller(key_id="k2", role="client", project_id="p2")
    async with UnitOfWork(engine) as uow:
        row, _ = await handlers.start_run(uow, handlers.StartRun("", {}, 2, idempotency_key="k"), POLICY, mine)
    same, different = handlers.StartRun("", {}, 2, idempotency_key="k"), handlers.StartRun("", {"x": 1}, 8, "k")
    for cmd in (same, different):
        async with UnitOfWork(engine) as uow:
            with pytest.raises(handlers.IdempotencyConflict) as refused:
                await handlers.start_run(uow, cmd, POLICY, other)
        assert row.run_id not in refused.value.message


async def test_limited_or_expiring_admin_keys_cannot_mint_broader_keys(engine: AsyncEngine) -> None:
    """A project-limited admin key could make a tenant-wide admin key; an expiring one a key that never expires."""
    now = handlers.utcnow()
    limited = Caller(key_id="a1", role="admin", project_id="p1")
    expiring = Caller(key_id="a2", role="admin", expires_at=now + timedelta(hours=1))
    async with UnitOfWork(engine) as uow:
        with pytest.raises(auth.PermissionDenied):
            await auth.create_key(uow, auth.CreateKey(role="admin"), limited, now)
    async with UnitOfWork(engine) as uow:
        with pytest.raises(auth.PermissionDenied):
            await auth.list_keys(uow, limited, 0, "", False)
    async with UnitOfWork(engine) as uow:
        with pytest.raises(auth.PermissionDenied):
            await auth.create_key(uow, auth.CreateKey(role="client"), expiring, now)
    async with UnitOfWork(engine) as uow:
        row, _ = await auth.create_key(uow, auth.CreateKey(role="client", ttl_seconds=600), expiring, now)
    assert row.expires_at is not None


async def test_a_non_ascii_bearer_key_is_unauthenticated_not_internal(engine: AsyncEngine) -> None:
    """`hmac.compare_digest` raised TypeError (INTERNAL, a traceback) for a non-ASCII key."""
    authenticator = auth.Authenticator(engine, "required")
    for bad in ("runs_é", "runs_\u2028x", "x" * 300):
        with pytest.raises(auth.Unauthenticated):
            metadata = [("authorization", f"Bearer {bad}")]
            await authenticator.caller("/runs.v1.RunService/GetRun", metadata, handlers.utcnow())


async def test_run_completed_is_refused_while_a_step_has_not_succeeded(
    engine: AsyncEngine, sql: psycopg.Connection
) -> None:
    """A run succeeds when every step has: a report closing the run while a step runs is refused whole."""
    from services.run_api.errors import EventRejected
    from shared.events import EventType

    (run_id,) = await start(engine, 1)
    token = await session(engine, "w1")
    async with UnitOfWork(engine) as uow:
        await handlers.claim_runs(uow, handlers.Claim("w1", "default", 1, 1, 30))

    def ev(i: int, type_: str, **payload: object) -> handlers.ReportedEvent:
        return handlers.ReportedEvent(run_id, 1, f"e{i}", type_, None, dict(payload))

    async with UnitOfWork(engine) as uow:
        await handlers.report_events(uow, "w1", token, [ev(1, EventType.RUN_STARTED),
                                                          ev(2, EventType.STEP_CREATED, step_key="runtime"),
                                                          ev(3, EventType.STEP_STARTED, step_key="runtime")])
    before = state(sql, run_id)
    with pytest.raises(EventRejected, match=r"run\.completed while step 'runtime' has not succeeded"):
        async with UnitOfWork(engine) as uow:
            await handlers.report_events(uow, "w1", token, [ev(4, EventType.RUN_COMPLETED)])
    assert state(sql, run_id) == before == ("RUNNING", 1, before[2])
    async with UnitOfWork(engine) as uow:  # after the step's success, the same close is recorded
        await handlers.report_events(uow, "w1", token, [ev(5, EventType.STEP_SUCCEEDED, step_key="runtime"),
                                                          ev(6, EventType.RUN_COMPLETED)])
    assert state(sql, run_id)[0] == "SUCCEEDED"
