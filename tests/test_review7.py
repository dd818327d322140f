"""Review of issue 7 (workflows as DAGs): each test reproduces one finding against a real API and PostgreSQL.

Each failed before its fix (they were committed as strict xfails first): run.completed recorded before
a sibling's success, tenant '*' publishing to everyone, a later built-in taking over a tenant's workflow,
an artifact size taken from the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format

from features.harness import ROOT, Api, Client, base_env
from services.run_api import db, registry
from services.run_worker.executor import Result, RunHandle
from services.run_worker.orchestrator import EngineConfig, execute
from services.run_worker.reporter import Reporter
from services.run_worker.tools import STOCK, Tool, ToolContext, as_tool
from shared.channels import aio_channel
from shared.gen.runs.v1 import (
    key_service_pb2,
    key_service_pb2_grpc,
    run_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
    workflow_service_pb2,
)

# api and client are fixtures: a run API process with auth off, and a client of it.
from tests.test_artifacts import stack
from tests.test_security import api, auth_api, client, host_key

pytestmark = pytest.mark.timeout(90)
W = worker_service_pb2
BOUND = 5.0  # the longest any test waits for something that a correct implementation never sends


def _step_keys(request: Any, type_: str) -> set[str]:
    return {str(e.payload["step_key"]) for e in request.events if e.type == type_ and "step_key" in e.payload}


class HoldReportOf:
    """The real WorkerService stub, except that the report carrying step.succeeded of `step` is held on the
    wire until a run.completed report got its answer (or BOUND seconds): two calls in flight at once, the
    later one first, which is what the reporter's max_in_flight concurrent calls allow."""

    def __init__(self, real: worker_service_pb2_grpc.WorkerServiceStub, step: str) -> None:
        self.real, self.step = real, step
        self.held = asyncio.Event()  # the held report is on the wire
        self.completed = asyncio.Event()  # a run.completed report was answered

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def ReportRunEvents(self, request: Any, timeout: float | None = None) -> Any:
        if self.step in _step_keys(request, "step.succeeded"):
            self.held.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.completed.wait(), BOUND)
        response = await self.real.ReportRunEvents(request, timeout=timeout)
        if any(e.type == "run.completed" for e in request.events):
            self.completed.set()
        return response


async def _claim_one(stub: worker_service_pb2_grpc.WorkerServiceStub, worker: str) -> tuple[str, Any]:
    """A once=True claim: the session token and the one run claimed."""
    call = stub.ClaimQueuedRuns(W.ClaimQueuedRunsRequest(worker_id=worker, capacity=1, once=True), timeout=10)
    messages = [m async for m in call]
    assert len(messages) == 1 and len(messages[0].runs) == 1, messages
    return messages[0].session_token, messages[0].runs[0]


# --- Finding 1: run.completed can be recorded before a sibling step's step.succeeded --------------


async def test_run_completed_is_never_recorded_before_a_sibling_steps_success(
    api: Api, client: Client, sql: psycopg.Connection,
) -> None:
    client.register({"name": "review7.siblings", "steps": [{"key": "a", "tool": "once_b_runs"},
                                                           {"key": "b", "tool": "after_a"}]})
    run_id = client.start("review7.siblings").run.run_id
    channel = aio_channel(api.addr)
    try:
        stub = HoldReportOf(worker_service_pb2_grpc.WorkerServiceStub(channel), "a")
        token, claimed = await _claim_one(stub.real, "w-review7")
        reporter = Reporter(stub, "w-review7")  # type: ignore[arg-type]
        reporter.session_token = token
        stop = asyncio.Event()
        sender = asyncio.create_task(reporter.run(stop))

        b_runs = asyncio.Event()

        async def once_b_runs(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
            await asyncio.wait_for(b_runs.wait(), BOUND)
            return {"a": True}

        async def after_a(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
            # b finishes while a's success is on its way (a real tool just has to be a little slower)
            b_runs.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stub.held.wait(), BOUND)
            return {"b": True}

        tools: dict[str, Tool] = {**STOCK, "after_a": as_tool("after_a", after_a),
                                  "once_b_runs": as_tool("once_b_runs", once_b_runs)}
        handle = RunHandle(claimed.run_id, claimed.attempt)
        result = await asyncio.wait_for(execute(claimed, handle, reporter, tools, None, EngineConfig()), 30)
        stop.set()
        await asyncio.wait_for(sender, 10)
    finally:
        await channel.close()
    steps = dict(sql.execute("SELECT step_key, status FROM run_steps WHERE run_id = %s", (run_id,)).fetchall())
    status = sql.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    assert status is not None and status[0] == "SUCCEEDED"
    assert steps == {"a": "SUCCEEDED", "b": "SUCCEEDED"}, f"a SUCCEEDED run with steps {steps}"
    assert result is Result.SUCCEEDED


# --- Finding 2: the built-ins' tenant '*' is also a tenant id any key may have --------------------


def test_a_tenant_named_star_cannot_publish_workflows_to_every_tenant(auth_api: Any) -> None:
    """'*' owns the built-ins: no key can be made for a tenant of that name (host command or KeyService)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.run_api", "keys", "create", "--role", "client", "--tenant", "*",
         "--database-url", auth_api.url],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0 and "reserved" in done.stdout + done.stderr, (done.stdout, done.stderr)
    with auth_api.channel(auth_api.admin_key) as channel:
        stub = key_service_pb2_grpc.KeyServiceStub(channel)
        request = key_service_pb2.CreateKeyRequest(role=key_service_pb2.KEY_ROLE_CLIENT, tenant_id="*")
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateKey(request, timeout=10)
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
    _, acme_secret = host_key(auth_api.url, "client", tenant="acme")
    acme = Client(auth_api.api.addr, api_key=acme_secret)
    try:  # and the built-ins stay visible to a real tenant
        seen = acme.workflows.ListWorkflows(workflow_service_pb2.ListWorkflowsRequest(page_size=500), timeout=10)
        assert {"runtime.noop", "campaign.build"} <= {w.name for w in seen.workflows}
    finally:
        acme.close()


# --- Finding 3: a built-in loaded later silently takes over a tenant's workflow of the same name -----


async def test_a_later_builtin_does_not_take_over_a_tenants_workflow(
    database_url: str, api: Api, client: Client, tmp_path: Any,
) -> None:
    mine = client.register({"name": "review7.shadow", "steps": [{"key": "only", "tool": "echo", "args": {"v": 1}}]})
    for v in (10, 20):  # the operator ships two versions of a built-in with that name, and restarts the API
        (tmp_path / f"shadow{v}.yaml").write_text(
            f"name: review7.shadow\nsteps:\n  - key: only\n    tool: echo\n    args: {{v: {v}}}\n")
    engine = db.make_engine(database_url, 2)
    try:
        await registry.load_builtins(engine, str(tmp_path))
    finally:
        await engine.dispose()
    run = client.start("review7.shadow").run
    assert run.spec_hash == mine.workflow.spec_hash, "the tenant's run pinned the built-in, not its own workflow"


# --- Finding 4: step.succeeded's artifact size and media type are taken from the worker unchecked --------


async def test_a_recorded_artifact_size_is_the_stored_size(stack: Any) -> None:
    held = await stack.held_run("w1")
    uploaded = await stack.upload(held, "w1", "out.txt", b"hello")
    lie = run_pb2.Artifact()
    lie.CopyFrom(uploaded)
    lie.size = 10**12  # what a buggy or hostile worker says
    await stack.succeed(held, "w1", lie)
    described, chunks = await stack.download(held.run_id, "runtime", "out.txt")
    assert b"".join(chunks) == b"hello"
    assert described.size == 5, f"the API records size {described.size} for a 5-byte artifact"
