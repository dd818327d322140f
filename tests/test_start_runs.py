"""StartRuns through a real API process: many runs in one transaction, all validated first."""

from __future__ import annotations

from typing import Any

import grpc
import psycopg

from features.harness import Api, Client, worker_once
from shared.gen.runs.v1 import run_service_pb2

# api and client are fixtures: a run API process with auth off, and a client of it.
from tests.test_security import api, client, refused, violations

Code = grpc.StatusCode


def request(workflow: str = "", run_input: dict[str, Any] | None = None, **fields: Any) -> Any:
    out = run_service_pb2.StartRunRequest(workflow=workflow, **fields)
    out.input.update(run_input or {})
    return out


def start_runs(client: Client, *requests: Any) -> Any:
    return client.stub.StartRuns(run_service_pb2.StartRunsRequest(requests=requests), timeout=30)


def count(sql: psycopg.Connection) -> int:
    row = sql.execute("SELECT count(*) FROM runs").fetchone()
    assert row is not None
    return int(row[0])


def test_a_batch_is_queued_in_order_and_runs(api: Api, client: Client, sql: psycopg.Connection) -> None:
    got = start_runs(client, request(), request("runtime.tool", {"tool": "echo", "args": {"n": 1}}),
                     request("runtime.noop", {"i": 3}))
    assert [r.run.workflow for r in got.responses] == ["runtime.noop", "runtime.tool", "runtime.noop"]
    assert len({r.run.run_id for r in got.responses}) == 3 and not any(r.deduplicated for r in got.responses)
    assert count(sql) == 3
    assert worker_once(api.addr, RUN_WORKER_TOOLS="noop,echo")["succeeded"] == 3


def test_one_invalid_request_refuses_the_whole_call_naming_it(client: Client, sql: psycopg.Connection) -> None:
    err = refused(Code.INVALID_ARGUMENT, lambda: start_runs(
        client, request(), request("no.such.flow"), request("runtime.tool", {"tool": "nope"}), request()))
    assert violations(err) == ["requests[1].workflow", "requests[2].input.tool"], violations(err)
    assert count(sql) == 0
    too_big = request(run_input={"blob": "x" * (300 * 1024)})
    err = refused(Code.RESOURCE_EXHAUSTED, lambda: start_runs(client, request(), too_big))
    assert violations(err) == ["requests[1].input"]
    refused(Code.INVALID_ARGUMENT, lambda: start_runs(client))  # nothing to start
    assert count(sql) == 0


def test_idempotency_keys_are_honoured_per_request(client: Client, sql: psycopg.Connection) -> None:
    first = client.start("", {"a": 1}, idempotency_key="k1").run
    got = start_runs(client, request(run_input={"a": 1}, idempotency_key="k1"),
                     request(run_input={"b": 2}, idempotency_key="k2"),
                     request(run_input={"b": 2}, idempotency_key="k2"))
    assert [r.deduplicated for r in got.responses] == [True, False, True]
    assert got.responses[0].run.run_id == first.run_id
    assert got.responses[1].run.run_id == got.responses[2].run.run_id
    assert count(sql) == 2
    err = refused(Code.ALREADY_EXISTS, lambda: start_runs(
        client, request(run_input={"c": 3}), request(run_input={"different": True}, idempotency_key="k1")))
    assert "requests[1]" in (err.details() or "")
    assert count(sql) == 2  # the whole call was refused: the first request's run was not kept
