"""Regression tests of the security review's findings, against real processes.

Every test starts a real API process (features.harness.Api) on its own database and talks to it as a
client, a worker or a forger would: raw gRPC stubs, worker processes, or an in-process Worker. Each
test names the finding it covers; each asserts something the unfixed server got wrong.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from psycopg import sql as pgsql
from ulid import ULID

from features.harness import (
    ROOT,
    Api,
    Client,
    Process,
    Worker,
    base_env,
    create_key,
    free_port,
    host_key,
    wait_until,
)
from services.run_api import db
from services.run_worker.tools import ToolContext
from services.run_worker.worker import Worker as InProcessWorker
from shared.channels import channel as open_channel
from shared.gen.runs.v1 import (
    key_service_pb2,
    key_service_pb2_grpc,
    ops_service_pb2,
    ops_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from shared.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)

Code = grpc.StatusCode
W = worker_service_pb2


# --- helpers -----------------------------------------------------------------------------------


def refused(code: grpc.StatusCode, call: Callable[[], object]) -> grpc.RpcError:
    """Run `call` (list() a stream inside it), which must fail with `code`; returns the error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def violations(err: grpc.RpcError) -> list[str]:
    """The fields of the google.rpc.BadRequest detail of an error."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {err.code()}: {err.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    raise AssertionError(f"no BadRequest detail in {status}")


def status_bytes(err: grpc.RpcError) -> int:
    """How big the error is on the wire: its message plus its serialized rich status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    return len((err.details() or "").encode()) + (status.ByteSize() if status is not None else 0)


def json_depth(value: Any) -> int:
    """How deep a JSON value nests (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


def nested(depth: int) -> dict[str, Any]:
    """A JSON object nesting `depth` levels deep (json_depth == depth)."""
    value: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        value = {"n": value}
    assert json_depth(value) == depth
    return value


def event(run_id: str, attempt: int, type_: str, payload: dict[str, Any] | None = None, **fields: Any) -> Any:
    """A ReportedEvent with a fresh event id."""
    out = W.ReportedEvent(run_id=run_id, attempt=attempt, event_id=fields.pop("event_id", str(ULID())),
                          type=type_, **fields)
    if payload:
        out.payload.update(payload)
    return out


@dataclass
class Session:
    """A worker as the API sees it: its id, its session token, what its claim stream's first message said."""

    worker_id: str
    token: str
    first: Any

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.first.runs]


class Forger:
    """Raw WorkerService calls with whatever worker id and token the test picks."""

    def __init__(self, addr: str, api_key: str | None = None) -> None:
        self.channel = open_channel(addr, api_key=api_key)
        self.stub = worker_service_pb2_grpc.WorkerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def claim(self, worker_id: str, token: str = "", capacity: int = 1, **fields: Any) -> Session:
        """A once=True claim stream: opens (or resumes) the worker's session and claims one batch."""
        request = W.ClaimQueuedRunsRequest(worker_id=worker_id, capacity=capacity, once=True, session_token=token,
                                           **fields)
        messages = list(self.stub.ClaimQueuedRuns(request, timeout=10))
        assert len(messages) == 1, messages
        assert messages[0].session_token, "the claim stream's first message carries no session token"
        return Session(worker_id, messages[0].session_token, messages[0])

    def report(self, worker_id: str, token: str, *events: Any) -> Any:
        request = W.ReportRunEventsRequest(worker_id=worker_id, session_token=token, events=list(events))
        return self.stub.ReportRunEvents(request, timeout=10)

    def heartbeat(self, worker_id: str, token: str, runs: list[tuple[str, int]]) -> Any:
        held = [W.HeldRun(run_id=r, attempt=a) for r, a in runs]
        return self.stub.Heartbeat(W.HeartbeatRequest(worker_id=worker_id, session_token=token, runs=held), timeout=10)


def event_count(sql: psycopg.Connection, run_id: str) -> int:
    row = sql.execute("SELECT count(*) FROM run_events WHERE run_id = %s", (run_id,)).fetchone()
    assert row is not None
    return int(row[0])


def count_runs(sql: psycopg.Connection, where: str = "true", params: tuple[Any, ...] = ()) -> int:
    row = sql.execute(f"SELECT count(*) FROM runs WHERE {where}", params).fetchone()
    assert row is not None
    return int(row[0])


def status_name(run: Any) -> str:
    return str(run_pb2.RunStatus.Name(run.status)).removeprefix("RUN_STATUS_")


def stop_all(*processes: Process | None) -> None:
    """Stop processes; print their logs' tails (shown by pytest only when the test failed) and remove them."""
    for process in processes:
        if process is None:
            continue
        process.stop()
        print(f"--- {process.name} ---\n{process.output()[-6000:]}")
        process.log_path.unlink(missing_ok=True)


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    """A run API process with auth off (its default on 127.0.0.1)."""
    process = Api(database_url)
    process.start()
    yield process
    stop_all(process)


@pytest.fixture
def client(api: Api) -> Iterator[Client]:
    c = Client(api.addr)
    yield c
    c.close()


@pytest.fixture
def forger(api: Api) -> Iterator[Forger]:
    f = Forger(api.addr)
    yield f
    f.close()


# --- Finding 1: poison input -------------------------------------------------------------------


def test_finding1_input_nested_too_deep_is_refused_and_20_levels_run(
    api: Api, client: Client, sql: psycopg.Connection
) -> None:
    """Finding 1: a 21-level input used to be stored, and then every claim, report and watch of it failed to
    decode (protobuf's 100-level limit): the run poisoned the queue. It is refused at StartRun, naming
    "input", and nothing is stored; a 20-level input is accepted and a worker process runs it."""
    err = refused(Code.INVALID_ARGUMENT, lambda: client.start("", nested(21)))
    assert violations(err) == ["input"]
    assert count_runs(sql) == 0

    run = client.start("", nested(20)).run
    worker = Worker(api.addr, RUN_WORKER_POLL_MS="100", RUN_WORKER_ID="deep-worker")
    worker.start()
    try:
        assert client.wait_status(run.run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 30) == "SUCCEEDED"
        got = client.get(run.run_id).run
        assert json_depth(json_format.MessageToDict(got.input)) == 20
    finally:
        stop_all(worker)


async def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until for a coroutine: polls without blocking the event loop the in-process worker runs on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_finding1_a_refused_report_fails_only_its_run(database_url: str) -> None:
    """Finding 1 (reporter): a tool output nested 40 levels cannot even be encoded into a report. The reporter
    used to fail the whole batch (every run in it) and retry forever; now only that run ends FAILED (the
    worker checks an output against the event limits first, issue 7: the error says what is wrong with it),
    the runs batched with it succeed, and the worker holds nothing after."""

    async def noop(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        return nested(40) if args.get("poison") else {"ok": True}

    api = Api(database_url)
    api.start()
    client = Client(api.addr)
    worker: InProcessWorker | None = None
    try:
        poison = client.start_tool("noop", {"poison": True})
        normal = [client.start_tool("noop", {"poison": False}) for _ in range(2)]
        settings = WorkerSettings(api_addr=api.addr, worker_id="reporter-test", concurrency=4,
                                  heartbeat_seconds=0.3, poll_ms=100)
        worker = InProcessWorker(settings, tools={"noop": noop})
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            ended = {"SUCCEEDED", "FAILED", "CANCELED"}
            final = await asyncio.gather(
                *(asyncio.to_thread(client.wait_status, r.run_id, ended, 30) for r in [poison, *normal])
            )
            assert final == ["FAILED", "SUCCEEDED", "SUCCEEDED"], final
            error = (await asyncio.to_thread(client.get, poison.run_id)).run.error
            assert "the tool's output nests deeper than" in error, error
            await _poll(lambda: not worker.held, 10, "the worker to hold no run")  # type: ignore[union-attr]
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert not worker.held
    finally:
        if worker is not None:
            await worker.close()
        client.close()
        stop_all(api)


# --- Finding 2: forged reports -----------------------------------------------------------------


def test_finding2_reports_must_come_from_the_holder_with_its_session(
    client: Client, forger: Forger, sql: psycopg.Connection
) -> None:
    """Finding 2: any caller could report run.completed / failed / canceled for any run by naming its worker
    id, and step or tool results for steps that never ran. Now a report needs the holder's session token,
    another worker's session is refused, and step/tool events must follow their step; nothing is recorded."""
    run_id = client.start().run.run_id
    a = forger.claim("A")
    assert a.run_ids == [run_id]
    b = forger.claim("B")
    assert b.run_ids == [] and b.token != a.token
    before = event_count(sql, run_id)

    for type_, payload in (("run.completed", None), ("run.failed", {"released": True}), ("run.canceled", None)):
        forged = event(run_id, 1, type_, payload)
        err = refused(Code.PERMISSION_DENIED, partial(forger.report, "B", b.token, forged))
        assert event_count(sql, run_id) == before, f"B's {type_} was recorded: {err.details()}"

    completed = event(run_id, 1, "run.completed")
    for token in ("", "not-the-token", b.token):
        refused(Code.PERMISSION_DENIED, partial(forger.report, "A", token, completed))
    assert event_count(sql, run_id) == before
    assert status_name(client.get(run_id).run) == "RUNNING"

    # The holder itself cannot record the end of a step that never started, nor a result of a call never made.
    never = event(run_id, 1, "step.succeeded", {"step_key": "never-created"})
    refused(Code.FAILED_PRECONDITION, lambda: forger.report("A", a.token, never))
    refused(Code.FAILED_PRECONDITION, lambda: forger.report("A", a.token, event(run_id, 1, "run.started"), never))
    unknown = event(run_id, 1, "tool.succeeded", {"tool_call_id": "no-such-call", "output": {"x": 1}})
    refused(Code.FAILED_PRECONDITION, lambda: forger.report("A", a.token, unknown))
    assert event_count(sql, run_id) == before

    legit = forger.report("A", a.token, event(run_id, 1, "run.started"), event(run_id, 1, "run.completed"))
    assert [r.outcome for r in legit.results] == [W.REPORT_OUTCOME_RECORDED] * 2
    assert status_name(client.get(run_id).run) == "SUCCEEDED"
    assert event_count(sql, run_id) == before + 2


# --- Finding 3: forged heartbeats --------------------------------------------------------------


def _worker_row(sql: psycopg.Connection, worker_id: str) -> tuple[Any, ...]:
    row = sql.execute(
        "SELECT held_run_ids, lease_expires_at, session_token_hash FROM workers WHERE worker_id = %s", (worker_id,)
    ).fetchone()
    assert row is not None, f"no workers row for {worker_id}"
    return tuple(row)


def test_finding3_heartbeats_and_claim_streams_need_the_workers_session(
    client: Client, forger: Forger, sql: psycopg.Connection
) -> None:
    """Finding 3: a heartbeat naming a worker id (with an empty run list) replaced that worker's held runs,
    so the reaper took its live runs away; and anyone could open a claim stream as a live worker. Both now
    need the worker's session token."""
    run_id = client.start().run.run_id
    a = forger.claim("A")
    assert a.run_ids == [run_id]
    b = forger.claim("B")
    beat = forger.heartbeat("A", a.token, [(run_id, 1)])
    assert list(beat.lost_run_ids) == []
    held = _worker_row(sql, "A")
    assert held[0] == [run_id]

    refused(Code.PERMISSION_DENIED, lambda: forger.heartbeat("A", "", []))
    refused(Code.PERMISSION_DENIED, lambda: forger.heartbeat("A", b.token, []))
    refused(Code.PERMISSION_DENIED, lambda: forger.heartbeat("A", "guess", []))
    assert _worker_row(sql, "A") == held

    # A's session is live: a new stream under its id without its token is refused, and A keeps its session.
    refused(Code.PERMISSION_DENIED, lambda: forger.claim("A"))
    refused(Code.PERMISSION_DENIED, lambda: forger.claim("A", token=b.token))
    assert _worker_row(sql, "A") == held
    assert list(forger.heartbeat("A", a.token, [(run_id, 1)]).lost_run_ids) == []
    assert status_name(client.get(run_id).run) == "RUNNING"


# --- Finding 4: identifier bounds --------------------------------------------------------------


def test_finding4_long_identifiers_are_refused_with_small_errors(client: Client, forger: Forger) -> None:
    """Finding 4: a 9,000-character worker id was stored and put in NOTIFY payloads (8,000 bytes at most),
    which broke every transaction touching its runs, and errors echoed it whole. Identifiers are now bounded
    and refused with INVALID_ARGUMENT naming the field, in an error under 1 KB."""
    huge = "w" * 9000
    run_id = client.start().run.run_id
    a = forger.claim("A")
    one = event(run_id, 1, "run.started")

    calls: dict[str, Callable[[], object]] = {
        "ClaimQueuedRuns": lambda: forger.claim(huge),
        "ReportRunEvents": lambda: forger.report(huge, a.token, one),
        "Heartbeat": lambda: forger.heartbeat(huge, a.token, []),
    }
    for name, call in calls.items():
        err = refused(Code.INVALID_ARGUMENT, call)
        assert violations(err) == ["worker_id"], name
        assert status_bytes(err) < 1024, f"{name}: a {status_bytes(err)}-byte error"

    err = refused(Code.INVALID_ARGUMENT, lambda: client.get("r" * 200))
    assert violations(err) == ["run_id"] and status_bytes(err) < 1024
    err = refused(Code.INVALID_ARGUMENT, lambda: forger.report("A", a.token, event(run_id, 1, "run.started",
                                                                                  event_id="e" * 200)))
    assert violations(err) == ["events[0].event_id"] and status_bytes(err) < 1024
    # The holder's normal report still works: nothing of the above was recorded or broke the run.
    assert forger.report("A", a.token, one).results[0].outcome == W.REPORT_OUTCOME_RECORDED


# --- Finding 5: malformed payloads -------------------------------------------------------------


def test_finding5_malformed_payloads_are_refused_before_anything_is_stored(
    client: Client, forger: Forger, sql: psycopg.Connection
) -> None:
    """Finding 5: a run.failed whose error was a number (or any event with fields of the wrong type) was
    stored, and every later GetRun of the run failed with INTERNAL. Payloads are now checked per event type."""
    run_id = client.start().run.run_id
    a = forger.claim("A")
    before = event_count(sql, run_id)
    for type_, payload in (("run.failed", {"error": 123}), ("run.completed", {"error": [1]})):
        malformed = event(run_id, 1, type_, payload)
        err = refused(Code.INVALID_ARGUMENT, partial(forger.report, "A", a.token, malformed))
        assert violations(err) == ["events[0].payload.error"], type_
    assert event_count(sql, run_id) == before
    run = client.get(run_id).run
    assert status_name(run) == "RUNNING" and run.error == ""


# --- Finding 6: timestamps ---------------------------------------------------------------------


def test_finding6_out_of_range_timestamps_are_invalid_argument(
    client: Client, forger: Forger, sql: psycopg.Connection
) -> None:
    """Finding 6: an occurred_at outside what a datetime holds crashed the report with INTERNAL (and a stack
    trace in the log). It is now INVALID_ARGUMENT naming events[0].occurred_at."""
    run_id = client.start().run.run_id
    a = forger.claim("A")
    before = event_count(sql, run_id)
    for seconds, nanos in ((2**62, 0), (-(2**62), 0), (0, -1)):
        stamped = event(run_id, 1, "run.started")
        stamped.occurred_at.seconds, stamped.occurred_at.nanos = seconds, nanos
        err = refused(Code.INVALID_ARGUMENT, partial(forger.report, "A", a.token, stamped))
        assert violations(err) == ["events[0].occurred_at"], (seconds, nanos)
    assert event_count(sql, run_id) == before
    assert status_name(client.get(run_id).run) == "RUNNING"


# --- Finding 7: oversized input ----------------------------------------------------------------


def test_finding7_oversized_inputs_are_refused_and_the_api_stays_up(
    api: Api, client: Client, sql: psycopg.Connection
) -> None:
    """Finding 7: the API accepted 16 MB messages and stored inputs of any size, so a few concurrent large
    StartRuns exhausted its memory (16 MB each were decoded before the input check). An input over 256 KiB is
    RESOURCE_EXHAUSTED naming "input"; a message over 4 MiB is refused by gRPC itself, undecoded; eight
    concurrent 3.9 MB requests are refused and the API serves on."""
    err = refused(Code.RESOURCE_EXHAUSTED, lambda: client.start("", {"blob": "x" * (1 << 20)}))
    assert violations(err) == ["input"]
    # Refused by gRPC's own 4 MiB receive limit, before any of it is decoded (no handler, no BadRequest).
    err = refused(Code.RESOURCE_EXHAUSTED, lambda: client.start("", {"blob": "x" * 14_000_000}))
    assert "larger than max" in (err.details() or "") and str(4 * 1024 * 1024) in (err.details() or ""), err.details()
    assert rpc_status.from_call(err) is None  # type: ignore[arg-type]

    big = {"blob": "y" * 3_900_000}

    def one(_: int) -> grpc.StatusCode | None:
        try:
            client.start("", big)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
        return None

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert codes == [Code.RESOURCE_EXHAUSTED] * 8, codes
    assert count_runs(sql) == 0
    assert api.health() == "SERVING"
    assert status_name(client.start("", {"small": True}).run) == "QUEUED"
    assert count_runs(sql) == 1


# --- Finding 8: clamps -------------------------------------------------------------------------


def test_finding8_claim_streams_are_clamped(api: Api, forger: Forger, sql: psycopg.Connection) -> None:
    """Finding 8: a worker could ask for capacity 2**31-1 and poll every millisecond, hoarding the whole queue
    in one batch and spinning the database. The stream now says what it applies (capacity 256, batch limit
    at most 100, poll 100 ms), sends at most 100 runs a message, and never lets the worker hold more than 256."""
    stub = run_service_pb2_grpc.RunServiceStub(forger.channel)
    futures = [stub.StartRun.future(run_service_pb2.StartRunRequest(), timeout=30) for _ in range(300)]
    for f in futures:
        f.result()
    assert count_runs(sql, "status = 'QUEUED'") == 300

    request = W.ClaimQueuedRunsRequest(worker_id="hoarder", capacity=2**31 - 1, poll_interval_ms=1)
    call = forger.stub.ClaimQueuedRuns(request, timeout=30)
    claimed: list[str] = []
    sizes: list[int] = []
    token = ""
    try:
        for message in call:
            if not token:
                token = message.session_token
                assert (message.capacity, message.poll_interval_ms) == (256, 100), message
                assert 1 <= message.batch_limit <= 100, message
            sizes.append(len(message.runs))
            claimed += [r.run_id for r in message.runs]
            if len(claimed) >= 256:
                break
    finally:
        call.cancel()
    assert all(size <= 100 for size in sizes), sizes
    assert len(claimed) == len(set(claimed)) == 256, sizes
    # Asked again (its session resumed) it gets nothing more: it holds its 256.
    again = forger.claim("hoarder", token=token, capacity=2**31 - 1)
    assert again.run_ids == [] and again.first.capacity == 256
    assert count_runs(sql, "status = 'RUNNING' AND worker_id = 'hoarder'") == 256
    assert count_runs(sql, "status = 'QUEUED'") == 44


# --- Finding 9: log amplification --------------------------------------------------------------


def test_finding9_a_flood_of_stale_events_logs_one_line(
    api: Api, client: Client, forger: Forger, sql: psycopg.Connection
) -> None:
    """Finding 9: every stale event of a report was logged on its own line, so one request of thousands of
    events wrote thousands of lines. A report's stale events now log one line."""
    run_id = client.start().run.run_id
    a = forger.claim("A")
    forger.report("A", a.token, event(run_id, 1, "run.started"), event(run_id, 1, "run.completed"))
    assert status_name(client.get(run_id).run) == "SUCCEEDED"
    before = event_count(sql, run_id)

    response = forger.report("A", a.token, *(event(run_id, 1, "run.started") for _ in range(2000)))
    assert len(response.results) == 2000
    assert {r.outcome for r in response.results} == {W.REPORT_OUTCOME_STALE}
    assert event_count(sql, run_id) == before
    lines = [line for line in api.output().splitlines() if "stale" in line.lower()]
    assert len(lines) <= 2, f"{len(lines)} log lines about stale events:\n" + "\n".join(lines[:5])


# --- Findings 11-14, 17: auth required ---------------------------------------------------------


@dataclass
class AuthApi:
    """An API that requires keys, on a database of this module's own."""

    api: Api
    url: str
    admin_key: str

    def channel(self, key: str | None) -> grpc.Channel:
        return open_channel(self.api.addr, api_key=key)


@pytest.fixture(scope="module")
def auth_api(pg_server: str, template_db: str) -> Iterator[AuthApi]:
    """One API with RUNS_AUTH=required for the auth tests (revocation seen within 0.2 s)."""
    name = f"runs_t_{str(ULID()).lower()}"
    with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(pgsql.Identifier(name),
                                                                        pgsql.Identifier(template_db)))
    url = db.with_database(pg_server, name)
    admin_key = f"test-admin-{secrets.token_urlsafe(24)}"
    api = Api(url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin_key, RUNS_AUTH_CACHE_SECONDS="0.2")
    api.start()
    try:
        yield AuthApi(api, url, admin_key)
    finally:
        stop_all(api)
        with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


def _list_runs(channel: grpc.Channel) -> Any:
    return run_service_pb2_grpc.RunServiceStub(channel).ListRuns(run_service_pb2.ListRunsRequest(), timeout=10)


def _stats(channel: grpc.Channel) -> Any:
    return ops_service_pb2_grpc.OpsServiceStub(channel).GetStats(ops_service_pb2.GetStatsRequest(), timeout=10)


def _heartbeat(channel: grpc.Channel) -> Any:
    return worker_service_pb2_grpc.WorkerServiceStub(channel).Heartbeat(W.HeartbeatRequest(worker_id="x"), timeout=10)


def _list_keys(channel: grpc.Channel) -> Any:
    return key_service_pb2_grpc.KeyServiceStub(channel).ListKeys(key_service_pb2.ListKeysRequest(), timeout=10)


def test_finding11_13_keys_roles_revocation_and_expiry(auth_api: AuthApi) -> None:
    """Findings 11 and 13: the API had no authentication at all, so anyone reaching it could start, cancel,
    claim and report runs. Now every call but health and reflection needs a valid key of the right role; a
    revoked or expired key stops working at once (within the cache time); the host can make an admin key."""
    addr, admin = auth_api.api.addr, auth_api.admin_key
    assert auth_api.api.health() == "SERVING"  # health answers without a key
    with grpc.insecure_channel(addr) as bare:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = list(reflection_pb2_grpc.ServerReflectionStub(bare).ServerReflectionInfo(iter([request]), timeout=10))
        assert "runs.v1.RunService" in {s.name for s in answers[0].list_services_response.service}
        refused(Code.UNAUTHENTICATED, lambda: _list_runs(bare))
        refused(Code.UNAUTHENTICATED, lambda: _stats(bare))
    with auth_api.channel("runs_" + secrets.token_urlsafe(32)) as garbage:
        refused(Code.UNAUTHENTICATED, lambda: _list_runs(garbage))

    keys = {role: create_key(addr, admin, role) for role in ("client", "worker", "admin")}
    with auth_api.channel(keys["client"][1]) as c, auth_api.channel(keys["worker"][1]) as w, \
            auth_api.channel(keys["admin"][1]) as a:
        _list_runs(c)
        refused(Code.PERMISSION_DENIED, lambda: _heartbeat(c))
        refused(Code.PERMISSION_DENIED, lambda: list(worker_service_pb2_grpc.WorkerServiceStub(c).ClaimQueuedRuns(
            W.ClaimQueuedRunsRequest(worker_id="x", once=True), timeout=10)))
        refused(Code.PERMISSION_DENIED, lambda: _list_runs(w))
        refused(Code.PERMISSION_DENIED, lambda: _stats(c))
        refused(Code.PERMISSION_DENIED, lambda: _list_keys(c))
        refused(Code.PERMISSION_DENIED, lambda: key_service_pb2_grpc.KeyServiceStub(c).CreateKey(
            key_service_pb2.CreateKeyRequest(role=key_service_pb2.KEY_ROLE_ADMIN), timeout=10))
        assert _stats(a).tenant_id == "default"
        _list_keys(a)

    # Revoked: refused within a deadline (the cache holds a key for 0.2 s here).
    revoked_id, revoked = create_key(addr, admin, "client")
    with auth_api.channel(revoked) as c, auth_api.channel(admin) as a:
        _list_runs(c)
        key_service_pb2_grpc.KeyServiceStub(a).RevokeKey(key_service_pb2.RevokeKeyRequest(key_id=revoked_id),
                                                         timeout=10)
        wait_until(lambda: _code(lambda: _list_runs(c)) == Code.UNAUTHENTICATED, 5, "the revoked key to be refused")

    # Expiring: a one-second key stops working once it has expired.
    _, short = create_key(addr, admin, "client", ttl_seconds=1)
    with auth_api.channel(short) as c:
        wait_until(lambda: _code(lambda: _list_runs(c)) == Code.UNAUTHENTICATED, 5, "the expired key to be refused")

    # The host command makes an admin key that works.
    _, host_admin = host_key(auth_api.url, "admin")
    with auth_api.channel(host_admin) as a:
        assert _stats(a).tenant_id == "default"


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return None


def test_finding13_a_worker_process_works_with_its_key(auth_api: AuthApi) -> None:
    """Finding 13: with keys required, a worker process authenticates with its worker key (RUNS_API_KEY) and
    the worker id recorded for it is the key's id and its instance name, so one key cannot pose as another."""
    addr = auth_api.api.addr
    _, client_key = create_key(addr, auth_api.admin_key, "client")
    worker_key_id, worker_key = create_key(addr, auth_api.admin_key, "worker")
    client = Client(addr, client_key)
    worker = Worker(addr, RUNS_API_KEY=worker_key, RUN_WORKER_ID="sec-worker", RUN_WORKER_POLL_MS="100",
                    RUN_HEARTBEAT_SECONDS="0.5")
    worker.start()
    try:
        run_id = client.start().run.run_id
        # Fail fast (with the worker's log) if the API turns the worker away instead of waiting out the deadline.
        wait_until(lambda: client.status(run_id) in {"SUCCEEDED", "FAILED", "CANCELED"}
                   or "UNAUTHENTICATED" in worker.output() or not worker.running, 30, "the run to end")
        assert "UNAUTHENTICATED" not in worker.output(), "the API refused the worker process's key"
        assert client.status(run_id) == "SUCCEEDED"
        claimed = [e for e in client.watch(run_id, timeout=10) if e.type == "run.claimed"]
        assert [e.worker_id for e in claimed] == [f"{worker_key_id}/sec-worker"]
    finally:
        client.close()
        stop_all(worker)


def test_finding13_a_worker_with_a_bad_key_exits_with_a_clear_error(auth_api: AuthApi) -> None:
    """A worker whose key is refused stops (the CLI's words and exit code 6) instead of retrying forever."""
    worker = Worker(auth_api.api.addr, RUNS_API_KEY="runs_not-a-real-key", RUN_WORKER_POLL_MS="100")
    worker.start()
    try:
        wait_until(lambda: not worker.running, 30, "the worker to exit")
        assert worker.proc is not None and worker.proc.returncode == 6
        assert f"error: UNAUTHENTICATED: the Run API at {auth_api.api.addr} did not accept the API key" \
            in worker.output(), worker.output()
        assert "Traceback" not in worker.output()
    finally:
        stop_all(worker)


def test_finding12_a_public_address_needs_auth_set(database_url: str) -> None:
    """Finding 12: the API listened on any address with no authentication and said nothing. On a non-loopback
    address without RUNS_AUTH it now refuses to start (exit 2, naming RUNS_AUTH); with RUNS_AUTH=off it starts
    and warns that auth is off."""
    port = free_port()
    args = [sys.executable, "-m", "services.run_api", "--addr", f"0.0.0.0:{port}", "--database-url", database_url]
    done = subprocess.run(args, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "RUNS_AUTH" in done.stderr + done.stdout

    open_api = Process(args, base_env(RUNS_AUTH="off"), "api-open")
    open_api.start()
    try:
        wait_until(lambda: "auth is OFF" in open_api.output() or not open_api.running, 30, "the auth-off warning")
        assert open_api.running, open_api.output()
        line = next(line for line in open_api.output().splitlines() if "auth is OFF" in line)
        assert "RUNS_AUTH" in line and "WARNING" in line, line
    finally:
        stop_all(open_api)


def test_finding14_tenants_do_not_see_each_others_runs(auth_api: AuthApi) -> None:
    """Finding 14: every caller saw, canceled, watched and claimed every run. Runs now belong to the tenant of
    the key that started them: another tenant's client gets NOT_FOUND (never "forbidden"), its workers claim
    nothing of it, its admin's stats leave it out, and its admin cannot make keys of another tenant."""
    addr = auth_api.api.addr
    _, default_client = create_key(addr, auth_api.admin_key, "client")
    with ThreadPoolExecutor(3) as pool:
        made = dict(zip(("client", "worker", "admin"),
                        pool.map(lambda role: host_key(auth_api.url, role, tenant="b"), ("client", "worker", "admin")),
                        strict=True))
    ours = Client(addr, default_client)
    theirs = Client(addr, made["client"][1])
    try:
        run_id = ours.start().run.run_id
        refused(Code.NOT_FOUND, lambda: theirs.get(run_id))
        refused(Code.NOT_FOUND, lambda: theirs.cancel(run_id))
        refused(Code.NOT_FOUND, lambda: list(theirs.watch(run_id, timeout=10)))
        assert run_id not in [r.run_id for r in _list_runs(theirs.channel).runs]
        assert run_id in [r.run_id for r in _list_runs(ours.channel).runs]

        b_worker = Forger(addr, made["worker"][1])
        try:
            session = b_worker.claim("b-worker", capacity=10)
            assert session.run_ids == [] and session.first.worker_id == f"{made['worker'][0]}/b-worker"
        finally:
            b_worker.close()
        assert ours.status(run_id) == "QUEUED"

        with auth_api.channel(made["admin"][1]) as b_admin, auth_api.channel(auth_api.admin_key) as admin:
            theirs_stats = _stats(b_admin)
            assert theirs_stats.tenant_id == "b"
            assert sum(theirs_stats.runs_by_status.values()) == 0, theirs_stats
            assert _stats(admin).runs_by_status["QUEUED"] >= 1
            refused(Code.PERMISSION_DENIED, lambda: key_service_pb2_grpc.KeyServiceStub(b_admin).CreateKey(
                key_service_pb2.CreateKeyRequest(role=key_service_pb2.KEY_ROLE_ADMIN, tenant_id="default"),
                timeout=10))
    finally:
        ours.close()
        theirs.close()


def test_finding17_runs_record_who_started_and_canceled_them(auth_api: AuthApi) -> None:
    """Finding 17: nothing recorded which caller started or canceled a run. GetRun now shows created_by and
    cancel_requested_by (the key ids) with the cancel reason, and the run.queued event carries created_by."""
    key_id, key = create_key(auth_api.api.addr, auth_api.admin_key, "client")
    client = Client(auth_api.api.addr, key)
    try:
        run_id = client.start().run.run_id
        assert client.get(run_id).run.created_by == key_id
        canceled = client.cancel(run_id, reason="audit: no longer needed")
        for run in (canceled, client.get(run_id).run):
            assert (run.created_by, run.cancel_requested_by, run.cancel_reason) == (
                key_id, key_id, "audit: no longer needed"), run
        queued = next(iter(client.watch(run_id, timeout=10)))
        assert queued.type == "run.queued"
        assert json_format.MessageToDict(queued.payload)["created_by"] == key_id
    finally:
        client.close()


def test_a_public_http_address_needs_auth_set(database_url: str) -> None:
    """Review of issue 10: auth was resolved from the gRPC address alone, so RUN_API_HTTP_ADDR=0.0.0.0:… with
    RUNS_AUTH unset served the JSON API and the dashboard to the network with no key. Now it refuses to start,
    naming RUN_API_HTTP_ADDR and RUNS_AUTH, like a public gRPC address."""
    http = f"0.0.0.0:{free_port()}"
    args = [sys.executable, "-m", "services.run_api", "--addr", f"127.0.0.1:{free_port()}", "--database-url",
            database_url]
    done = subprocess.run(args, cwd=ROOT, env=base_env(RUN_API_HTTP_ADDR=http), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert f"{http} (RUN_API_HTTP_ADDR)" in done.stderr and "RUNS_AUTH" in done.stderr, done.stderr
