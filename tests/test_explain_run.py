"""ExplainRun ("why isn't it running?"), its HTTP route and `runs explain RUN`, against a real API and
real workers.

One API with RUNS_AUTH=required is shared by the module's tests, with two workers: one serving the
workspace "default" with the stock tools, and one serving the workspace "busy" with only noop and
sleep at capacity 1 (a long sleep run keeps it full, so the runs queued behind it stay queued).
The workspace "nobody" has no worker; the tenant "other" has no worker at all. Each test makes its
own runs.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy

from features.harness import ROOT, Api, Client, Worker, base_env, create_key, host_key, wait_until
from runs_client.errors import field_violations_of as field_violations
from services.cli import __main__ as cli_main
from services.run_api.store import queries as Q
from shared.gen.runs.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from tests.test_cli import api_of

pytestmark = pytest.mark.timeout(90)

TOOLS = "noop,echo,sleep,fail,shell"


@dataclass
class Stack:
    """The module's API, its keys and clients."""

    api: Api
    url: str
    client_key: str
    other_key: str  # a client key of tenant "other" (which has no worker)
    worker_key_id: str
    default_worker: Worker  # serves workspace "default" with every tool of TOOLS

    @contextlib.contextmanager
    def client(self, key: str | None = None) -> Iterator[Client]:
        client = Client(self.api.addr, api_key=key or self.client_key)
        try:
            yield client
        finally:
            client.close()


@pytest.fixture(scope="module")
def stack(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[Stack]:
    with make_database() as url:
        admin = f"test-admin-{secrets.token_urlsafe(24)}"
        api = Api(url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=admin)
        workers: list[Worker] = []
        try:
            api.start()
            _, client_key = create_key(api.addr, admin, "client")
            worker_key_id, worker_key = create_key(api.addr, admin, "worker")
            common = {"RUNS_API_KEY": worker_key, "RUN_WORKER_POLL_MS": "100", "RUN_WORKER_DRAIN_SECONDS": "1"}
            workers.append(Worker(api.addr, RUN_WORKER_ID="explain-default", RUN_WORKER_TOOLS=TOOLS,
                                  RUN_WORKER_CONCURRENCY="4", **common))
            workers.append(Worker(api.addr, RUN_WORKER_ID="explain-busy", RUN_WORKER_TOOLS="noop,sleep",
                                  RUN_WORKER_WORKSPACE_ID="busy", RUN_WORKER_CONCURRENCY="1", **common))
            for worker in workers:
                worker.start()
            _, other_admin = host_key(url, "admin", "other")
            _, other_key = create_key(api.addr, other_admin, "client")
            stack = Stack(api, url, client_key, other_key, worker_key_id, workers[0])
            with stack.client() as client:  # both workers are live before any test asks who serves what
                for workspace in ("default", "busy"):
                    client.wait_status(client.start("", workspace_id=workspace).run.run_id, {"SUCCEEDED"}, 30)
            yield stack
        finally:
            for process in [*workers, api]:
                process.stop()


def explain(client: Client, run_id: str) -> run_service_pb2.ExplainRunResponse:
    response: run_service_pb2.ExplainRunResponse = client.stub.ExplainRun(
        run_service_pb2.ExplainRunRequest(run_id=run_id), timeout=10
    )
    return response


# --- queued --------------------------------------------------------------------------------------


def test_queued_in_a_tenant_with_no_worker(stack: Stack) -> None:
    with stack.client(stack.other_key) as client:
        run = client.start("").run
        answer = explain(client, run.run_id)
        client.cancel(run.run_id)
    assert answer.run.run_id == run.run_id
    assert answer.state == "queued"
    q = answer.queue
    assert (q.workspace_id, q.runs_ahead, q.due, q.live_workers, q.live_workers_elsewhere) == ("default", 0, True, 0, 0)
    assert q.tools_needed == ["noop"]
    assert q.tools_available == "no"
    assert answer.summary == "waiting: 0 runs ahead in workspace default; no live worker serves workspace default"
    assert not answer.HasField("holder") and not answer.HasField("ending")
    assert list(answer.attempts) == []


def test_queued_for_a_workspace_no_worker_serves_counts_runs_ahead(stack: Stack) -> None:
    with stack.client() as client:
        ids = [client.start("", workspace_id="nobody").run.run_id for _ in range(3)]
        answers = [explain(client, run_id) for run_id in ids]
        for run_id in ids:
            client.cancel(run_id)
    assert [a.queue.runs_ahead for a in answers] == [0, 1, 2]
    assert [a.queue.due_ahead for a in answers] == [0, 1, 2]
    last = answers[-1]
    assert last.state == "queued" and last.queue.due
    assert last.queue.live_workers == 0
    assert last.queue.live_workers_elsewhere == 2  # the "default" and "busy" workers
    assert last.queue.tools_needed == ["noop"]
    assert last.summary == (
        "waiting: 2 runs ahead in workspace nobody; no live worker serves workspace nobody "
        "(2 live workers serve other workspaces)"
    )


def test_queued_behind_a_full_worker_with_and_without_its_tools(stack: Stack) -> None:
    with stack.client() as client:
        hog = client.start_tool("sleep", {"seconds": 60}, workspace_id="busy").run_id
        started = [hog]
        try:
            client.wait_status(hog, {"RUNNING"}, 30)
            noop = client.start("", workspace_id="busy").run.run_id
            shell = client.start_tool("shell", {"command": ["true"]}, workspace_id="busy").run_id
            sleep = client.start_tool("sleep", {"seconds": 0}, workspace_id="busy").run_id
            started += [noop, shell, sleep]
            answers = {name: explain(client, run_id) for name, run_id in
                       (("noop", noop), ("shell", shell), ("sleep", sleep))}
            assert {client.status(run_id) for run_id in (noop, shell, sleep)} == {"QUEUED"}
        finally:
            for run_id in started:
                with contextlib.suppress(grpc.RpcError):
                    client.cancel(run_id)
    for name, ahead in (("noop", 0), ("shell", 1), ("sleep", 2)):
        q = answers[name].queue
        assert (q.runs_ahead, q.live_workers, q.free_slots, q.live_workers_with_tools) == (
            ahead, 1, 0, 0 if name == "shell" else 1
        ), name
        assert q.worker_ids == [f"{stack.worker_key_id}/explain-busy"]
    assert answers["noop"].queue.tools_available == "yes"
    assert answers["shell"].queue.tools_available == "no"
    assert answers["shell"].queue.tools_needed == ["shell"]
    assert answers["sleep"].summary == (
        "waiting: 2 runs ahead in workspace busy; 1 live worker serves it; 1 of them has the tools it needs "
        "(sleep); all their slots are busy"
    )
    assert "none of them declared the tools it needs (shell)" in answers["shell"].summary


def test_backing_off_after_a_failed_attempt(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.start_tool("fail", {"message": "flaky printer"}, max_attempts=3,
                                   retry_backoff_seconds=600, retry_backoff_max_seconds=600).run_id
        def requeued() -> bool:
            run = client.get(run_id).run
            return run.attempt == 1 and run.status == run_pb2.RUN_STATUS_QUEUED

        wait_until(requeued, 30, "the first attempt to fail and the run to be requeued")
        answer = explain(client, run_id)
        client.cancel(run_id)
    assert answer.state == "backing_off"
    q = answer.queue
    assert not q.due
    assert 60 < q.backoff_seconds <= 600
    assert q.live_workers == 1 and q.tools_available == "yes" and q.tools_needed == ["fail"]
    assert [(a.attempt, a.outcome) for a in answer.attempts] == [(1, "retried")]
    assert "flaky printer" in answer.attempts[0].error
    assert answer.summary.startswith("backing off until ")
    assert "after attempt 1/3 failed: " in answer.summary and "flaky printer" in answer.summary
    assert "; then " in answer.summary and " ahead in workspace default; 1 live worker serves it; " in answer.summary


# --- running and finished ------------------------------------------------------------------------


def test_running_names_its_holder_heartbeat_and_step(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.start_tool("sleep", {"seconds": 60}).run_id
        client.wait_status(run_id, {"RUNNING"}, 30)
        wait_until(lambda: client.step_status(run_id, "runtime") == "RUNNING", 30, "the step to run")
        answer = explain(client, run_id)
        # The holder paused (SIGSTOP) cannot stop the run yet: the cancel is requested and says so.
        stack.default_worker.signal(signal.SIGSTOP)
        try:
            client.cancel(run_id, "enough")
            asked = explain(client, run_id)
        finally:
            stack.default_worker.signal(signal.SIGCONT)
        client.wait_status(run_id, {"CANCELED"}, 30)
        after = explain(client, run_id)
    assert answer.state == "running"
    h = answer.holder
    assert h.worker_id == f"{stack.worker_key_id}/explain-default"
    assert h.worker_live and h.running_steps == ["runtime"]
    assert h.HasField("claimed_at") and h.HasField("last_heartbeat_at") and h.HasField("lease_expires_at")
    assert h.lease_expires_at.ToDatetime() > h.last_heartbeat_at.ToDatetime()
    assert (h.attempt, h.max_attempts, h.cancel_requested) == (1, answer.run.max_attempts, False)
    assert answer.summary.startswith(f"running on worker {h.worker_id} since ")
    assert "on step runtime" in answer.summary
    assert not answer.HasField("queue") and not answer.HasField("ending")
    assert [a.outcome for a in answer.attempts] == ["running"]
    assert asked.state == "running" and (asked.holder.cancel_requested, asked.holder.cancel_reason) == (True, "enough")
    assert asked.summary.endswith("cancel requested: enough")
    assert after.state == "finished" and after.ending.HasField("finished_at")
    assert after.summary.startswith("canceled at ")
    assert [a.outcome for a in after.attempts] == ["canceled"]


def test_succeeded(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.start("").run.run_id
        client.wait_status(run_id, {"SUCCEEDED"}, 30)
        answer = explain(client, run_id)
    assert answer.state == "finished"
    assert answer.ending.failed_step == "" and answer.ending.error == ""
    assert [a.outcome for a in answer.attempts] == ["completed"]
    assert re.fullmatch(r"succeeded at \S+( \([^)]*\))?; 1 attempt", answer.summary), answer.summary


def test_failed_names_the_failing_step_and_attempts(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.start_tool("fail", {"message": "the printer is on fire", "retryable": False},
                                   max_attempts=2).run_id
        client.wait_status(run_id, {"FAILED"}, 30)
        answer = explain(client, run_id)
    e = answer.ending
    assert answer.state == "finished"
    assert e.failed_step == "runtime"
    assert "the printer is on fire" in e.failed_step_error
    assert "the printer is on fire" in e.error
    assert [(a.attempt, a.outcome) for a in answer.attempts] == [(1, "failed")]
    assert answer.summary.startswith("failed at ")
    assert "step runtime failed: " in answer.summary and answer.summary.endswith("; 1 attempt")


# --- refusals ------------------------------------------------------------------------------------


def test_another_tenants_run_is_not_found_and_a_bad_id_is_named(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.start("").run.run_id
    with stack.client(stack.other_key) as other:
        with pytest.raises(grpc.RpcError) as refused:
            explain(other, run_id)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            explain(other, "")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(bad.value)] == ["run_id"]
    with grpc.insecure_channel(stack.api.addr) as channel, pytest.raises(grpc.RpcError) as anonymous:
        run_service_pb2_grpc.RunServiceStub(channel).ExplainRun(
            run_service_pb2.ExplainRunRequest(run_id=run_id), timeout=10
        )
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- HTTP and CLI --------------------------------------------------------------------------------


def test_http_route(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.start("").run.run_id
        client.wait_status(run_id, {"SUCCEEDED"}, 30)
    with httpx.Client(base_url=stack.api.http_url, timeout=20) as http:
        mine = http.get(f"/v1/runs/{run_id}/why", headers={"Authorization": f"Bearer {stack.client_key}"})
        theirs = http.get(f"/v1/runs/{run_id}/why", headers={"Authorization": f"Bearer {stack.other_key}"})
        unknown = http.get(f"/v1/runs/{run_id}/why?verbose=1",
                           headers={"Authorization": f"Bearer {stack.client_key}"})
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["run"]["run_id"] == run_id and body["state"] == "finished"
    assert body["summary"].startswith("succeeded at ")
    assert [a["outcome"] for a in body["attempts"]] == ["completed"]
    assert theirs.status_code == 404
    assert unknown.status_code == 400


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "--addr", stack.api.addr, *args],
        cwd=ROOT, env=base_env(RUNS_API_KEY=stack.client_key), capture_output=True, text=True, timeout=60,
        check=False,
    )


def test_cli_explain_run(stack: Stack) -> None:
    with stack.client() as client:
        queued = client.start_tool("echo", workspace_id="nobody").run_id
        done = client.start("").run.run_id
        client.wait_status(done, {"SUCCEEDED"}, 30)
    try:
        human = cli(stack, "explain", queued)
        as_json = cli(stack, "--json", "explain", queued)
        finished = cli(stack, "explain", done)
        one_step = cli(stack, "--json", "explain", done, "runtime")
    finally:
        with stack.client() as client:
            client.cancel(queued)
    assert human.returncode == 0, human.stderr
    assert re.search(rf"^run +{queued} QUEUED \(workflow runtime.tool, workspace nobody\)$", human.stdout, re.M)
    assert re.search(r"^why +waiting: 0 runs ahead in workspace nobody; no live worker serves", human.stdout, re.M)
    assert re.search(r"^tools +echo: available no", human.stdout, re.M)
    assert "\n\nsteps:\n" in human.stdout
    document = json.loads(as_json.stdout)
    assert document["run"]["state"] == "queued"
    assert document["run"]["queue"]["workspace_id"] == "nobody" and "steps" in document
    assert finished.returncode == 0, finished.stderr
    assert re.search(r"^why +succeeded at ", finished.stdout, re.M)
    assert re.search(r"^attempts:\nATTEMPT +WORKER", finished.stdout, re.M)
    assert "\n\nsteps:\nruntime: " in finished.stdout
    step_only = json.loads(one_step.stdout)
    assert set(step_only) == {"steps"} and step_only["steps"][0]["step_key"] == "runtime"


class _Unimplemented(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED


class _OlderApi:
    """An API from before ExplainRun: `runs explain RUN` says so on stderr and explains the steps."""

    def ExplainRun(self, request: Any, timeout: float | None = None) -> Any:
        raise _Unimplemented()

    def ExplainStep(self, request: Any, timeout: float | None = None) -> Any:
        return run_service_pb2.ExplainStepResponse()


def test_cli_explain_against_an_api_without_explain_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.dispatch(api_of(_OlderApi()), cli_main.parse_args(["explain", "01RUN"], env={})) == 0
    printed = capsys.readouterr()
    assert printed.out == "no steps\n"
    assert "does not explain runs" in printed.err


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _nodes(child))]


def test_queue_position_reads_the_claim_index(stack: Stack) -> None:
    """The runs ahead are a range of runs_claim_idx (the row comparison is its key order), never a scan of runs."""
    engine = sqlalchemy.create_engine(stack.url, poolclass=sqlalchemy.pool.NullPool)
    params = {"tenant_id": "default", "workspace_id": "default", "run_id": "01" + "0" * 24, "now": "2030-01-01Z",
              "next_attempt_at": "2030-01-01Z", "tools": ["noop"]}
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SET enable_seqscan = off"))  # a tiny table: ask what the index can serve
            explain = sqlalchemy.text("EXPLAIN (FORMAT JSON) " + Q.runs_explain_queue.text)
            nodes = _nodes(conn.execute(explain, params).scalar_one()[0]["Plan"])
    finally:
        engine.dispose()
    on_runs = [n for n in nodes if n.get("Relation Name") == "runs"]
    # On this tiny table runs_claim_tools_idx (the same prefix, then the tool set) costs the same and
    # may be chosen; with a real queue the planner takes runs_claim_idx (measured with 21,000 queued runs).
    claim = [n for n in on_runs if n.get("Index Name") in ("runs_claim_idx", "runs_claim_tools_idx")]
    assert len(claim) == 2, on_runs  # runs ahead, and those of them due
    assert all("ROW(next_attempt_at, run_id) < ROW(" in n["Index Cond"] for n in claim), claim
    # The rest (each live worker's held runs) is served by a partial index of RUNNING runs (seq scans off).
    assert not [n for n in on_runs if n["Node Type"] == "Seq Scan"], on_runs
