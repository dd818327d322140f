"""The HTTP JSON API and the run event stream, against a real API process and a real worker.

One API with RUNS_AUTH=required (an admin key from RUNS_BOOTSTRAP_ADMIN_KEY, client and worker
keys made through KeyService, a second tenant's key made on the API host) and one worker are shared
by the module's tests; each test makes its own runs. The keepalive, disconnect, stream error and
loopback (auth off, Host check) tests serve the app in-process over an ApiServer's own servicers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import ASGIApp
from ulid import ULID

from features.harness import Api, Client, Worker, create_key, host_key, wait_until
from services.run_api import db, handlers
from services.run_api.http import routes
from services.run_api.http.app import HttpServer, create_app, host_name, loopback_hosts
from services.run_api.http.gateway import MAX_BODY_BYTES, Gateway
from services.run_api.server import ApiServer
from services.run_api.store.events import CHANNEL_EVENTS
from services.run_api.store.uow import UnitOfWork
from shared.channels import channel as open_channel
from shared.gen.runs.v1 import (
    ops_service_pb2,
    ops_service_pb2_grpc,
    run_service_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from shared.settings import ApiSettings, SettingsError

pytestmark = pytest.mark.timeout(60)

TOOLS = "noop,echo,sleep,fail,shell"


@dataclass
class Stack:
    """The module's API, its keys, a worker, and clients."""

    api: Api
    url: str
    admin: str
    client: str
    worker_key_id: str
    other_tenant: str  # a client key of tenant "other"
    other_admin: str  # an admin key of tenant "other"

    def http(self, key: str | None = None, csrf: bool = True, **kwargs: Any) -> httpx.Client:
        """A client with `key` as bearer, sending `X-Runs-Csrf: 1` (which every POST needs) unless `csrf` is False."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if csrf:
            headers["X-Runs-Csrf"] = "1"
        return httpx.Client(base_url=self.api.http_url, headers=headers, timeout=20, **kwargs)

    @contextlib.contextmanager
    def grpc_client(self) -> Iterator[Client]:
        client = Client(self.api.addr, api_key=self.client)
        try:
            yield client
        finally:
            client.close()


@pytest.fixture(scope="module")
def stack(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[Stack]:
    with make_database() as url:
        yield from _stack(url)


def _stack(url: str) -> Iterator[Stack]:
    admin = f"test-admin-{secrets.token_urlsafe(24)}"
    api = Api(url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin, RUN_WORKER_POLL_MS="100")
    worker: Worker | None = None
    try:
        api.start()
        _, client = create_key(api.addr, admin, "client")
        worker_key_id, worker_key = create_key(api.addr, admin, "worker")
        worker = Worker(api.addr, RUNS_API_KEY=worker_key, RUN_WORKER_ID="http-test", RUN_WORKER_TOOLS=TOOLS,
                        RUN_WORKER_CONCURRENCY="4", RUN_WORKER_POLL_MS="100")
        worker.start()
        _, other_admin = host_key(url, "admin", "other")
        _, other_client = create_key(api.addr, other_admin, "client")
        yield Stack(api, url, admin, client, worker_key_id, other_client, other_admin)
    finally:
        for process in (worker, api):
            if process is not None:
                process.stop()
                print(f"--- {process.name} ---\n{process.output()[-4000:]}")
                process.log_path.unlink(missing_ok=True)


def fields(response: httpx.Response) -> list[str]:
    """The field names of a 400's field violations."""
    assert response.status_code == 400, response.text
    return [v["field"] for v in response.json()["field_violations"]]


def fields_of(response: httpx.Response) -> list[str]:
    """The field names of an error's field violations, whatever its status."""
    return [v["field"] for v in response.json().get("field_violations", [])]


def start(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/runs", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json()["run"])


def wait_status(http: httpx.Client, run_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        run: dict[str, Any] = http.get(f"/v1/runs/{run_id}").json()["run"]
        return run if run["status"].removeprefix("RUN_STATUS_") in statuses else {}

    return wait_until(check, timeout, f"run {run_id} in {statuses}", interval=0.05)


def read_sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Server-Sent Events of a streaming response: each as {"event", "id", "data"} (comments as {"comment"})."""
    message: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if message:
                yield message
            message = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(": ")
            message[name] = json.loads(value) if name == "data" else value


# --- runs: list, get, start, cancel, errors ----------------------------------------------------


def test_start_get_list_cancel(stack: Stack) -> None:
    with stack.http(stack.client) as http:
        done = start(http, workflow="runtime.noop", idempotency_key=f"http-{ULID()}")
        got = wait_status(http, done["run_id"], {"SUCCEEDED"})
        assert got["workflow"] == "runtime.noop"
        listed = http.get("/v1/runs", params={"page_size": 500, "status": "SUCCEEDED"}).json()["runs"]
        assert done["run_id"] in [r["run_id"] for r in listed]
        assert all(r["status"] == "RUN_STATUS_SUCCEEDED" for r in listed)
        queued = start(http, workflow="runtime.noop", workspace_id="nobody-claims")
        canceled = http.post(f"/v1/runs/{queued['run_id']}/cancel", json={"reason": "test"})
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["run"]["status"] == "RUN_STATUS_CANCELED"
        # An ended run cannot be canceled: FAILED_PRECONDITION is a 400 with its code.
        again = http.post(f"/v1/runs/{done['run_id']}/cancel", json={})
        assert (again.status_code, again.json()["code"]) == (400, "FAILED_PRECONDITION")


def test_bad_requests_name_the_field_and_store_nothing(stack: Stack) -> None:
    key = f"bad-{ULID()}"
    with stack.http(stack.client) as http:
        assert fields(http.post("/v1/runs", json={"idempotency_key": key, "bogus": 1})) == ["bogus"]
        assert fields(http.post("/v1/runs", json={"idempotency_key": key, "max_attempts": "many"})) == ["max_attempts"]
        assert fields(http.post("/v1/runs", json={"idempotency_key": key, "max_attempts": 1000})) == ["max_attempts"]
        assert fields(http.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"})) == [
            "body"]
        assert fields(http.post("/v1/runs", params={"x": 1}, json={})) == ["x"]
        assert fields(http.get("/v1/runs", params={"bogus": "1", "page_size": "2"})) == ["bogus"]
        assert fields(http.get("/v1/runs", params={"page_size": "many"})) == ["page_size"]
        assert fields(http.get("/v1/runs", params={"status": "NOPE"})) == ["status"]
        assert fields(http.get("/v1/runs", params={"query": "q" * 256})) == ["query"]
        with stack.http(stack.admin) as admin:
            assert fields(admin.get("/v1/throughput", params={"minutes": "1441"})) == ["minutes"]
            assert fields(admin.get("/v1/stats", params={"x": "1"})) == ["x"]
        assert fields(http.get("/v1/workflows/runtime.noop", params={"version": "-1"})) == ["version"]
        assert http.get("/v1/runs", params={"query": key}).json().get("runs", []) == []  # nothing was stored
        missing = http.get(f"/v1/runs/{ULID()}")
        assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND")
        assert http.get(f"/v1/runs/{ULID()}/steps").status_code == 404
        assert http.get(f"/v1/runs/{ULID()}/events").status_code == 404


def test_search_by_run_id_and_idempotency_key(stack: Stack) -> None:
    tag = str(ULID()).lower()
    with stack.http(stack.client) as http, stack.grpc_client() as client:
        a = start(http, workflow="runtime.noop", workspace_id="search", idempotency_key=f"order-{tag}-1")
        b = start(http, workflow="runtime.noop", workspace_id="search", idempotency_key=f"order-{tag}-2")
        start(http, workflow="runtime.noop", workspace_id="search", idempotency_key=f"other-{tag}")

        def found(query: str, **params: Any) -> list[str]:
            response = http.get("/v1/runs", params={"query": query, **params})
            assert response.status_code == 200, response.text
            return [r["run_id"] for r in response.json().get("runs", [])]

        assert found(f"order-{tag}") == [b["run_id"], a["run_id"]]  # a prefix, newest first
        assert found(f"order-{tag}-1") == [a["run_id"]]  # the exact key
        assert found(a["run_id"].lower()) == [a["run_id"]]  # a whole run id, any case
        assert a["run_id"] in found(a["run_id"][:20])  # a run id prefix
        assert found(f"order-{tag}", page_size=1) == [b["run_id"]]
        assert found(f"order-{tag}", status="SUCCEEDED") == []
        # The same through gRPC.
        response = client.stub.ListRuns(run_service_pb2.ListRunsRequest(query=f"order-{tag}"), timeout=10)
        assert [r.run_id for r in response.runs] == [b["run_id"], a["run_id"]]
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.ListRuns(run_service_pb2.ListRunsRequest(query="\x00"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in (caught.value.details() or "")
    with stack.http(stack.other_tenant) as other:  # another tenant finds nothing of these
        assert other.get("/v1/runs", params={"query": f"order-{tag}"}).json().get("runs", []) == []


# --- the event stream --------------------------------------------------------------------------


def test_events_of_a_finished_run_and_resume(stack: Stack) -> None:
    with stack.http(stack.client) as http:
        run = start(http, workflow="runtime.noop")
        wait_status(http, run["run_id"], {"SUCCEEDED"})
        with http.stream("GET", f"/v1/runs/{run['run_id']}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [m for m in read_sse(response) if "comment" not in m]
        assert events[0]["event"] == "run.queued" and events[-1]["event"] == "run.completed"
        assert [int(m["id"]) for m in events] == list(range(1, len(events) + 1))
        assert all(m["data"]["type"] == m["event"] and int(m["data"]["sequence"]) == int(m["id"]) for m in events)
        middle = len(events) // 2
        headers = {"Last-Event-ID": str(middle)}
        with http.stream("GET", f"/v1/runs/{run['run_id']}/events", headers=headers) as response:
            resumed = [m for m in read_sse(response) if "comment" not in m]
        assert [int(m["id"]) for m in resumed] == list(range(middle + 1, len(events) + 1))
        assert fields(http.get(f"/v1/runs/{run['run_id']}/events", headers={"Last-Event-ID": "x"})) == [
            "Last-Event-ID"]
        # Review of issue 10 (finding 12): "²" is a digit to str.isdigit, not to int(): a 400, not a 500.
        assert fields(http.get(f"/v1/runs/{run['run_id']}/events", headers={b"Last-Event-ID": b"\xb2"})) == [
            "Last-Event-ID"]  # the header's byte 0xB2 is "²" in ISO-8859-1
        assert fields(http.get(f"/v1/runs/{run['run_id']}/events", params={"after_sequence": "²"})) == [
            "Last-Event-ID"]
        # Resumed after the terminal event: nothing more, the stream ends.
        with http.stream("GET", f"/v1/runs/{run['run_id']}/events", headers={"Last-Event-ID": str(len(events))}) as r:
            assert r.status_code == 200 and [m for m in read_sse(r) if "comment" not in m] == []


def get_run_calls(stack: Stack) -> float:
    """How many GetRun calls the API has served (its /metrics, any code)."""
    text = httpx.get(f"{stack.api.http_url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "runs_grpc_requests_total" and sample.labels.get("method") == "GetRun")


def test_the_event_stream_checks_the_run_without_get_run(stack: Stack) -> None:
    """Review of issue 10 (finding 13): the stream's own first pass checks the run (no full GetRun per connect);
    an unknown run and another tenant's are still refused with a status before the stream starts."""
    with stack.http(stack.client) as http:
        run = start(http, workflow="runtime.noop", workspace_id="nobody-claims")  # stays queued: 1 event
        before = get_run_calls(stack)
        with http.stream("GET", f"/v1/runs/{run['run_id']}/events", headers={"Last-Event-ID": "1"}) as response:
            assert response.status_code == 200  # open at once, though nothing after event 1 is there yet
        with http.stream("GET", f"/v1/runs/{run['run_id']}/events") as response:
            first = next(m for m in read_sse(response) if "comment" not in m)
            assert (first["event"], first["id"]) == ("run.queued", "1")
        missing = http.get(f"/v1/runs/{ULID()}/events")
        assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND")
        assert get_run_calls(stack) == before
    with stack.http(stack.other_tenant) as other:
        assert other.get(f"/v1/runs/{run['run_id']}/events").status_code == 404


def test_live_stream_receives_the_terminal_event(stack: Stack) -> None:
    with stack.http(stack.client) as http:
        run = start(http, workflow="runtime.tool", input={"tool": "sleep", "args": {"seconds": 1}})
        with http.stream("GET", f"/v1/runs/{run['run_id']}/events") as response:
            seen = []
            for message in read_sse(response):
                if "event" in message:
                    seen.append(message["event"])
        assert seen[0] == "run.queued" and "run.started" in seen and seen[-1] == "run.completed"


# --- auth ----------------------------------------------------------------------------------------


def test_keys_tenants_cookie_and_csrf(stack: Stack) -> None:
    with stack.http() as anonymous:
        response = anonymous.get("/v1/runs")
        assert (response.status_code, response.json()["code"]) == (401, "UNAUTHENTICATED")
        assert anonymous.get("/v1/runs", headers={"Authorization": "Bearer runs_wrong"}).status_code == 401
    with stack.http(stack.client) as http:
        mine = start(http, workflow="runtime.noop", workspace_id="nobody-claims")
        assert http.get("/v1/stats").status_code == 403  # OpsService is for admin keys
    with stack.http(stack.other_tenant) as other:
        for path in ("", "/steps", "/artifacts", "/events"):
            response = other.get(f"/v1/runs/{mine['run_id']}{path}")
            assert response.status_code == 404, (path, response.text)
        assert other.post(f"/v1/runs/{mine['run_id']}/cancel", json={}).status_code == 404
    with stack.http(csrf=False, cookies={"runs_key": stack.client}) as browser:
        assert browser.get(f"/v1/runs/{mine['run_id']}").json()["run"]["run_id"] == mine["run_id"]
        refused = browser.post(f"/v1/runs/{mine['run_id']}/cancel", json={})
        assert (refused.status_code, refused.json()["code"]) == (403, "PERMISSION_DENIED")
        assert "x-runs-csrf" in refused.json()["message"]
        assert browser.get(f"/v1/runs/{mine['run_id']}").json()["run"]["status"] == "RUN_STATUS_QUEUED"
        allowed = browser.post(f"/v1/runs/{mine['run_id']}/cancel", json={}, headers={"X-Runs-Csrf": "1"})
        assert allowed.status_code == 200 and allowed.json()["run"]["status"] == "RUN_STATUS_CANCELED"


def test_changes_need_the_csrf_header_a_json_body_and_this_origin(stack: Stack) -> None:
    """Review of issue 10 (findings 2, 16): whatever the credential, a POST needs X-Runs-Csrf: 1 (else 403),
    a JSON Content-Type (else 415), and no other Origin or cross-site Sec-Fetch-Site (else 403)."""
    with stack.http(stack.client) as http:
        run = start(http, workflow="runtime.noop", workspace_id="nobody-claims")
    cancel = f"/v1/runs/{run['run_id']}/cancel"
    own = stack.api.http_url  # http://127.0.0.1:<port>: the request's own origin
    with stack.http(stack.client, csrf=False) as bearer:
        refused = bearer.post(cancel, json={})
        assert (refused.status_code, refused.json()["code"]) == (403, "PERMISSION_DENIED"), refused.text
        csrf = {"X-Runs-Csrf": "1"}
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}, {"Origin": own.replace("127.0.0.1", "localhost")}):
            response = bearer.post(cancel, json={}, headers={**csrf, **headers})
            assert (response.status_code, response.json()["code"]) == (403, "PERMISSION_DENIED"), headers
        plain = bearer.post(cancel, content=b"{}", headers={**csrf, "Content-Type": "text/plain"})
        assert plain.status_code == 415 and fields_of(plain) == ["Content-Type"], plain.text
        assert bearer.post(cancel, content=b"", headers=csrf).status_code == 415  # no Content-Type at all
        assert bearer.get(f"/v1/runs/{run['run_id']}").json()["run"]["status"] == "RUN_STATUS_QUEUED"
        allowed = bearer.post(cancel, json={}, headers={**csrf, "Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["run"]["status"] == "RUN_STATUS_CANCELED"


def test_the_caller_is_checked_before_the_request_is_read(stack: Stack) -> None:
    """Review of issue 10 (finding 11): no key: 401, not a 400 listing the fields or parameters."""
    with stack.http() as anonymous:
        for response in (
            anonymous.post("/v1/runs", json={"bogus": 1}),
            anonymous.post("/v1/runs", content=b"{not json", headers={"Content-Type": "application/json"}),
            anonymous.post("/v1/runs", content=b" " * (MAX_BODY_BYTES + 1),
                           headers={"Content-Type": "application/json"}),
            anonymous.get("/v1/runs", params={"bogus": "1"}),
            anonymous.get(f"/v1/runs/{ULID()}/events", headers={"Last-Event-ID": "x"}),
            anonymous.get(f"/v1/runs/{ULID()}/artifacts/s/n", params={"bogus": "1"}),
        ):
            assert (response.status_code, response.json()["code"]) == (401, "UNAUTHENTICATED"), response.text
            assert "field_violations" not in response.json()


def test_a_body_too_large_is_413(stack: Stack) -> None:
    """Review of issue 10 (finding 16): past MAX_BODY_BYTES, declared or streamed (chunked), is 413."""
    body = b'{"input": "' + b"x" * MAX_BODY_BYTES + b'"}'
    with stack.http(stack.client) as http:
        declared = http.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
        assert (declared.status_code, declared.json()["code"]) == (413, "RESOURCE_EXHAUSTED"), declared.text
        chunked = http.post("/v1/runs", content=iter([body[:1024], body[1024:]]),
                            headers={"Content-Type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413, chunked.text


def test_traceparent_is_the_started_runs_trace(stack: Stack) -> None:
    """Review of issue 10 (finding 18): POST /v1/runs continues the caller's W3C trace (a SERVER span), so the
    run's stored trace context (what the worker continues) carries the caller's trace id."""
    trace_id = secrets.token_hex(16)
    with stack.http(stack.client) as http:
        response = http.post("/v1/runs", json={"workflow": "runtime.noop", "workspace_id": "nobody-claims"},
                             headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        assert response.status_code == 200, response.text
        run_id = response.json()["run"]["run_id"]
        untraced = start(http, workflow="runtime.noop", workspace_id="nobody-claims")["run_id"]
    with psycopg.connect(db.libpq_url(stack.url)) as conn:
        rows = conn.execute("SELECT run_id, trace_context FROM runs WHERE run_id = ANY(%s)", ([run_id, untraced],))
        stored: dict[str, dict[str, str]] = dict(rows.fetchall())
    parent = stored[run_id]["traceparent"]
    assert parent.split("-")[1] == trace_id, stored
    # Without one the gateway's span starts a trace of its own (not an empty context).
    assert stored[untraced]["traceparent"].split("-")[1] not in (trace_id, "0" * 32), stored


# --- steps, artifacts, rebuild, explain, workflows --------------------------------------------


SCRIPT = "from pathlib import Path; Path('report.txt').write_bytes(bytes(range(256)) * 3)"


def test_steps_artifacts_download_rebuild_explain(stack: Stack) -> None:
    args = {"command": ["python3", "-c", SCRIPT], "artifacts": ["report.txt"]}
    with stack.http(stack.client) as http:
        run = start(http, workflow="runtime.tool", input={"tool": "shell", "args": args})
        run_id = run["run_id"]
        wait_status(http, run_id, {"SUCCEEDED", "FAILED"})
        steps = http.get(f"/v1/runs/{run_id}/steps", params={"status": "SUCCEEDED"}).json()["steps"]
        assert [s["step_key"] for s in steps] == ["runtime"]
        assert http.get(f"/v1/runs/{run_id}/steps", params={"status": "FAILED"}).json().get("steps", []) == []
        (artifact,) = http.get(f"/v1/runs/{run_id}/artifacts").json()["artifacts"]
        assert (artifact["step_key"], artifact["name"], artifact["media_type"]) == ("runtime", "report.txt",
                                                                                   "text/plain")
        download = http.get(f"/v1/runs/{run_id}/artifacts/runtime/report.txt")
        assert download.status_code == 200, download.text
        assert download.content == bytes(range(256)) * 3
        assert download.headers["content-type"].startswith("text/plain")
        assert download.headers["content-disposition"].startswith('attachment; filename="report.txt"')
        assert download.headers["content-security-policy"] == "sandbox"
        assert download.headers["cache-control"] == "no-store"  # never kept by a shared machine's browser
        assert http.get(f"/v1/runs/{run_id}/artifacts/runtime/missing.txt").status_code == 404
        with stack.http(stack.other_tenant) as other:
            assert other.get(f"/v1/runs/{run_id}/artifacts/runtime/report.txt").status_code == 404

        explained = http.get(f"/v1/runs/{run_id}/steps/runtime/explain").json()["steps"]
        assert [(s["step_key"], s["decision"]) for s in explained] == [("runtime", "executed")]
        assert [s["step_key"] for s in http.get(f"/v1/runs/{run_id}/explain").json()["steps"]] == ["runtime"]

        plan = http.post(f"/v1/runs/{run_id}/rebuild", json={"steps": ["runtime"], "dry_run": True})
        assert plan.status_code == 200, plan.text
        assert "run" not in plan.json() and plan.json()["plan"][0]["action"] == "rerun"
        assert fields(http.post(f"/v1/runs/{run_id}/rebuild", json={"dry_run": "maybe"})) == ["dry_run"]

        workflows = http.get("/v1/workflows").json()["workflows"]
        assert {"runtime.noop", "runtime.tool"} <= {w["name"] for w in workflows}
        one = http.get("/v1/workflows/runtime.tool", params={"version": 1}).json()["workflow"]
        assert (one["name"], one["version"], one["spec"]["steps"][0]["key"]) == ("runtime.tool", 1, "runtime")
        assert http.get("/v1/workflows/no.such.workflow").status_code == 404


# --- operators: stats, workers, throughput ---------------------------------------------------


def test_stats_workers_and_throughput(stack: Stack) -> None:
    with stack.http(stack.client) as http:
        run = start(http, workflow="runtime.noop")
        wait_status(http, run["run_id"], {"SUCCEEDED"})
        start(http, workflow="runtime.noop", workspace_id="nobody-claims")  # waits in the queue
    # A worker that says which tools it runs (the stock worker does not yet): through gRPC.
    _, worker_key = create_key(stack.api.addr, stack.admin, "worker")
    with open_channel(stack.api.addr, api_key=worker_key) as channel:
        request = worker_service_pb2.ClaimQueuedRunsRequest(
            worker_id="declared", workspace_id="tools-ws", capacity=3, once=True, tools=["shell", "echo", "echo"])
        list(worker_service_pb2_grpc.WorkerServiceStub(channel).ClaimQueuedRuns(request, timeout=10))
        bad = worker_service_pb2.ClaimQueuedRunsRequest(worker_id="bad", once=True, tools=["ok", ""])
        with pytest.raises(grpc.RpcError) as caught:
            list(worker_service_pb2_grpc.WorkerServiceStub(channel).ClaimQueuedRuns(bad, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools[1]" in (caught.value.details() or "")

    with stack.http(stack.admin) as admin:
        stats = admin.get("/v1/stats").json()
        assert int(stats["completed"]) >= 1 and stats["tenant_id"] == "default"

        listed = admin.get("/v1/workers").json()
        workers = {w["worker_id"]: w for w in listed["workers"]}
        ours = workers[f"{stack.worker_key_id}/http-test"]
        assert ours["connected"] is True and ours["capacity"] == 4 and ours["workspace_id"] == "default"
        assert {"started_at", "last_heartbeat_at", "lease_expires_at"} <= set(ours)
        declared = next(w for w in listed["workers"] if w["worker_id"].endswith("/declared"))
        assert (declared["tools"], declared["capacity"], declared["workspace_id"]) == (["echo", "shell"], 3, "tools-ws")
        assert listed["connected"] >= 2
        page = admin.get("/v1/workers", params={"page_size": 1}).json()
        assert len(page["workers"]) == 1 and page["next_page_token"] == page["workers"][0]["worker_id"]

        throughput = admin.get("/v1/throughput", params={"minutes": 5}).json()
        buckets = throughput["buckets"]
        assert len(buckets) == 5
        assert sum(b.get("succeeded", 0) for b in buckets) >= 1
        assert buckets[-1].get("queue_depth", 0) >= 1  # the run nobody claims
        assert len(admin.get("/v1/throughput").json()["buckets"]) == 60
        # The same through gRPC.
        with open_channel(stack.api.addr, api_key=stack.admin) as channel:
            ops = ops_service_pb2_grpc.OpsServiceStub(channel)
            answer = ops.GetThroughput(ops_service_pb2.GetThroughputRequest(minutes=2), timeout=10)
            assert len(answer.buckets) == 2 and answer.tenant_id == "default"
            assert any(w.worker_id.endswith("/http-test") for w in
                       ops.ListWorkers(ops_service_pb2.ListWorkersRequest(), timeout=10).workers)
    with stack.http(stack.other_tenant) as other:  # a client key may not ask; another tenant's admin sees none
        assert other.get("/v1/workers").status_code == 403
    with stack.http(stack.other_admin) as admin:
        assert admin.get("/v1/workers").json().get("workers", []) == []
        assert sum(b.get("succeeded", 0) for b in admin.get("/v1/throughput").json()["buckets"]) == 0


# --- in-process: keepalive and disconnect ------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process(database_url: str, app_of: Callable[[ApiServer, Gateway], ASGIApp]) -> AsyncIterator[
        tuple[ApiServer, str]]:
    """An ApiServer on loopback with auth unset (so off) and no worker, its app (`app_of`) served over HTTP on
    127.0.0.1; (the server, the HTTP base URL)."""
    settings = dataclasses.replace(ApiSettings(), addr="127.0.0.1:0", http_addr="", database_url=database_url)
    server = ApiServer(settings, database_url)
    await server.start()
    http = HttpServer(app_of(server, Gateway(server.authenticator, server.servicers)), "127.0.0.1:0")
    port = http.bind()
    serving = asyncio.create_task(http.run())
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        http.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await server.stop()


CSRF = {"X-Runs-Csrf": "1"}


async def test_keepalive_while_idle_and_disconnect_unsubscribes(database_url: str) -> None:
    def app(server: ApiServer, gateway: Gateway) -> ASGIApp:
        return Starlette(routes=routes.routes(gateway, keepalive_seconds=0.2))

    async with in_process(database_url, app) as (server, url), \
            httpx.AsyncClient(base_url=url, headers=CSRF, timeout=10) as client:
        response = await client.post("/v1/runs", json={"workflow": "runtime.noop"})  # no worker: stays queued
        run_id = response.json()["run"]["run_id"]
        key = (CHANNEL_EVENTS, run_id)
        async with client.stream("GET", f"/v1/runs/{run_id}/events") as stream:
            lines = aiter(stream.aiter_lines())
            assert await anext(lines) == "id: 1"
            assert (await anext(lines)) == "event: run.queued"
            comments = 0
            while comments < 2:
                line = await anext(lines)
                comments += line == ": keepalive"
            # The hub has no public count of its subscribers: its private map is read.
            assert key in server.hub._waiters  # the stream is subscribed while open
        # The client went away: the server-side stream ends and unsubscribes.
        deadline = time.monotonic() + 10
        while key in server.hub._waiters:
            assert time.monotonic() < deadline, "the event stream kept its hub subscription"
            await asyncio.sleep(0.02)


async def test_an_error_in_an_open_stream_is_a_runs_error_event(database_url: str) -> None:
    """Review of issue 10 (finding 14): not `event: error`, which fires a browser EventSource's onerror."""
    def app(server: ApiServer, gateway: Gateway) -> ASGIApp:
        return Starlette(routes=routes.routes(gateway, keepalive_seconds=0.2))

    async with in_process(database_url, app) as (server, url), \
            httpx.AsyncClient(base_url=url, headers=CSRF, timeout=10) as client:
        run_id = (await client.post("/v1/runs", json={"workflow": "runtime.noop"})).json()["run"]["run_id"]
        async with client.stream("GET", f"/v1/runs/{run_id}/events") as stream:
            lines = aiter(stream.aiter_lines())
            assert await anext(lines) == "id: 1"
            server.stopping.set()  # what the API's shutdown does first: open streams end, to be resumed
            server.hub.wake_all()
            rest = [line async for line in lines]
        assert "event: error" not in rest
        at = rest.index("event: runs.error")
        error = json.loads(rest[at + 1].removeprefix("data: "))
        assert error["code"] == "UNAVAILABLE" and "after_sequence" in error["message"], rest


async def test_a_loopback_api_without_auth_refuses_cross_site_posts_and_foreign_hosts(database_url: str) -> None:
    """Review of issue 10 (finding 2): auth off on loopback: a web page's cross-site form (text/plain, its own
    Origin) may not start a run (a shell tool on this machine); a page whose name points at 127.0.0.1 (DNS
    rebinding: its Host is its own name) gets nothing, on any route."""
    def app(server: ApiServer, gateway: Gateway) -> ASGIApp:
        return create_app(gateway, ready=lambda: True, http_addr="127.0.0.1:8080")  # as the API makes it

    body = json.dumps({"workflow": "runtime.tool", "input": {"tool": "shell", "args": {"command": ["true"]}}})
    async with in_process(database_url, app) as (_, url), httpx.AsyncClient(base_url=url, timeout=10) as client:
        port = url.rsplit(":", 1)[1]
        form = {"Content-Type": "text/plain", "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        for headers in (form, {"Content-Type": "text/plain"}, {"Content-Type": "text/plain", **CSRF}):
            refused = await client.post("/v1/runs", content=body, headers=headers)
            assert refused.status_code in (403, 415), (headers, refused.text)
        assert (await client.get("/v1/runs")).json().get("runs", []) == []  # nothing was started
        for path in ("/v1/runs", "/healthz", "/", "/static/app.js"):
            foreign = await client.get(path, headers={"Host": f"evil.example:{port}"})
            assert (foreign.status_code, foreign.json()["code"]) == (400, "INVALID_ARGUMENT"), path
        refused = await client.post("/v1/runs", content=body, headers={
            "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}", "Content-Type": "application/json",
            **CSRF})
        assert refused.status_code == 400
        for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", f"LOCALHOST:{port}"):
            assert (await client.get("/v1/runs", headers={"Host": host})).status_code == 200, host
        started = await client.post("/v1/runs", content=json.dumps({"workflow": "runtime.noop"}),
                                    headers={"Content-Type": "application/json", "Origin": url, **CSRF})
        assert started.status_code == 200, started.text


def test_loopback_hosts_and_host_names() -> None:
    assert loopback_hosts("127.0.0.1:8080") == ["localhost", "127.0.0.1", "::1"]
    assert loopback_hosts("[::1]:0") == ["localhost", "127.0.0.1", "::1"]
    assert loopback_hosts("127.0.0.2:8080") == ["localhost", "127.0.0.1", "::1", "127.0.0.2"]
    assert loopback_hosts("localhost:8080") == ["localhost", "127.0.0.1", "::1"]
    for public in ("0.0.0.0:8080", ":8080", "10.0.0.1:8080", "[::]:8080", "runs.example:443"):
        assert loopback_hosts(public) is None, public
    assert [host_name(h) for h in ("LocalHost:80", "[::1]:8080", "[::1]", "a:b", "[::1]x", "", "h:²")] == [
        "localhost", "::1", "::1", None, None, None, None]


def test_the_http_address_needs_a_port() -> None:
    """Review of issue 10 (finding 17): RUN_API_HTTP_ADDR's port is checked when read, like the worker's."""
    for bad in ("localhost", "localhost:abc", "localhost:", "localhost:70000", "localhost:²"):
        with pytest.raises(SettingsError, match="RUN_API_HTTP_ADDR"):
            ApiSettings.from_env({"RUN_API_HTTP_ADDR": bad})
    assert ApiSettings.from_env({"RUN_API_HTTP_ADDR": "[::1]:0"}).http_addr == "[::1]:0"
    assert ApiSettings.from_env({"RUN_API_HTTP_ADDR": ""}).http_addr == ""


# --- the statements behind them, with a fixed clock -------------------------------------------


def test_search_ranges() -> None:
    ranges = handlers.search_ranges("01abc")
    assert (ranges["run_low"], ranges["run_high"]) == ("01ABC", "01ABC" + "Z" * 21)
    assert (ranges["key_low"], ranges["key_high"]) == ("01abc", "01abd")
    assert handlers.search_ranges("order-1")["run_low"] is None  # "-", "O" cannot be in a ULID
    assert handlers.search_ranges("a\ud7ff")["key_high"] == "a\ue000"  # past the surrogates
    assert handlers.search_ranges("a\U0010ffff")["key_high"] == "b"


def _at(hh_mm_ss: str) -> datetime:
    return datetime.fromisoformat(f"2026-01-01T{hh_mm_ss}+00:00")


async def test_throughput_buckets_with_a_fixed_clock(database_url: str, sql: psycopg.Connection) -> None:
    # (tenant, status, created, started, finished) in a window of three minutes 12:28-12:31 at 12:30:30.
    runs = [
        ("default", "SUCCEEDED", "12:00:00", "12:28:30", "12:29:10"),  # waited until minute 0
        ("default", "QUEUED", "12:28:10", None, None),  # waits from minute 0 on
        ("default", "CANCELED", "12:29:30", None, "12:30:05"),  # canceled while queued in minute 2
        ("default", "RUNNING", "11:00:00", "11:01:00", None),  # started before the window
        ("default", "FAILED", "12:29:50", "12:30:10", "12:30:20"),  # waited over minute 1's end
        ("other", "QUEUED", "12:28:05", None, None),  # another tenant's
        ("default", "SUCCEEDED", "10:00:00", "10:01:00", "10:05:00"),  # long over
        ("default", "QUEUED", "12:27:00", None, None),  # waiting since before the window
    ]
    for tenant, status, created, started, finished in runs:
        at = _at(created)
        run_id = str(ULID.from_timestamp(at.timestamp()))
        sql.execute(
            """
            INSERT INTO runs (run_id, workspace_id, workflow, input, status, attempt, max_attempts,
                retry_backoff_seconds, retry_backoff_max_seconds, request_hash, created_at, updated_at, started_at,
                finished_at, next_attempt_at, tenant_id)
            VALUES (%s, 'default', 'runtime.noop', '{}', %s, 1, 3, 1, 60, 'h', %s, %s, %s, %s, %s, %s)
            """,
            (run_id, status, at, at, started and _at(started), finished and _at(finished), at, tenant),
        )
    engine = db.make_engine(database_url, 2)
    try:
        async with UnitOfWork(engine) as uow:
            buckets = await handlers.throughput(uow, "default", 3, now=_at("12:30:30"))
    finally:
        await engine.dispose()
    assert [b.start for b in buckets] == [_at("12:28:00"), _at("12:29:00"), _at("12:30:00")]
    assert [b.finished for b in buckets] == [{}, {"SUCCEEDED": 1}, {"CANCELED": 1, "FAILED": 1}]
    assert [b.queue_depth for b in buckets] == [2, 4, 2]
