"""Issue 9, item 3, through a real API and a real worker: a fast run's events travel in one report that
carries other runs' events too, the worker keeps claiming while reports are in flight, and it never holds
more runs than its capacity.

Which report recorded an event is read from the database: a report is one transaction, so the events
it recorded share their row's xmin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import psycopg
import pytest

from services.run_api import db
from services.run_api.server import ApiServer
from services.run_worker.worker import Worker
from shared.gen.runs.v1 import run_service_pb2, run_service_pb2_grpc
from shared.settings import ApiSettings, WorkerSettings

pytestmark = pytest.mark.timeout(120)

RUNS = 300
CAPACITY = 40
BATCH = 20


async def test_noop_runs_report_in_one_call_each_coalesced_and_never_past_capacity(database_url: str) -> None:
    url = db.libpq_url(database_url)
    settings = dataclasses.replace(ApiSettings(), addr="127.0.0.1:0", database_url=database_url)
    server = ApiServer(settings, database_url)
    port = await server.start()
    worker = Worker(WorkerSettings(api_addr=f"127.0.0.1:{port}", worker_id="w-coalesce", concurrency=CAPACITY,
                                   batch_limit=BATCH))
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = run_service_pb2.StartRunsRequest(requests=[run_service_pb2.StartRunRequest()] * RUNS)
            await run_service_pb2_grpc.RunServiceStub(channel).StartRuns(request, timeout=30)
        running = asyncio.create_task(worker.run(stop))
        most_held, done = 0, 0
        deadline = time.monotonic() + 60
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while done < RUNS:
                assert time.monotonic() < deadline, f"{done} of {RUNS} runs succeeded in 60 s"
                assert not running.done(), running
                held, done = await (await conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'RUNNING' AND worker_id LIKE '%w-coalesce'),"
                    " count(*) FILTER (WHERE status = 'SUCCEEDED') FROM runs")).fetchone()  # type: ignore[misc]
                most_held = max(most_held, held)
                await asyncio.sleep(0.005)
            # every run's chain after its claim (run.started .. run.completed) was recorded by one report
            split = await (await conn.execute(
                "SELECT count(*) FROM (SELECT run_id FROM run_events WHERE type NOT IN ('run.queued', 'run.claimed')"
                " GROUP BY run_id HAVING count(DISTINCT xmin::text) > 1) AS s")).fetchone()
            chains = await (await conn.execute(
                "SELECT count(*) FROM run_events WHERE type NOT IN ('run.queued', 'run.claimed')")).fetchone()
            reports = await (await conn.execute(
                "SELECT count(DISTINCT xmin::text) FROM run_events WHERE type = 'run.completed'")).fetchone()
            claims = await (await conn.execute(
                "SELECT count(DISTINCT xmin::text) FROM run_events WHERE type = 'run.claimed'")).fetchone()
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        await worker.close()
        await server.stop()
    assert split == (0,), "a noop run's events after its claim took more than one report"
    assert chains == (RUNS * 7,)  # run.started, step.created/started/succeeded, tool.invoked/succeeded, run.completed
    # the worker never held more than its capacity; it did fill it (claims went on while reports were in flight)
    assert CAPACITY // 2 <= most_held <= CAPACITY, most_held
    # reports carried many runs each; claims came in batches of up to BATCH
    assert reports[0] <= RUNS // 4, f"{reports[0]} reports for {RUNS} runs"  # type: ignore[index]
    assert RUNS // BATCH <= claims[0] <= RUNS // 2, claims  # type: ignore[index]
    print(f"{RUNS} runs: {reports[0]} reports, {claims[0]} claims, at most {most_held} held")  # type: ignore[index]
