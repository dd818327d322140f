"""The workflow registry through a real API process: versions, pinning, refusals, tenants."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest
from psycopg import sql as pgsql
from ulid import ULID

from features.harness import Api, Client, worker_once
from services.run_api import db
from shared.channels import channel as open_channel
from shared.gen.runs.v1 import workflow_service_pb2, workflow_service_pb2_grpc

# api and client are fixtures: a run API process with auth off, and a client of it.
from tests.test_security import api, client, host_key, refused, stop_all, violations

Code = grpc.StatusCode


def spec(name: str, value: int, **step: Any) -> dict[str, Any]:
    """A one-step echo workflow whose step returns {"v": value}."""
    return {"name": name, "steps": [{"key": "only", "tool": "echo", "args": {"v": value}, **step}]}


def get(client: Client, name: str, version: int = 0) -> Any:
    request = workflow_service_pb2.GetWorkflowRequest(name=name, version=version)
    return client.workflows.GetWorkflow(request, timeout=10).workflow


def list_all(client: Client, page_size: int) -> list[Any]:
    out, token = [], ""
    while True:
        request = workflow_service_pb2.ListWorkflowsRequest(page_size=page_size, page_token=token)
        page = client.workflows.ListWorkflows(request, timeout=10)
        out += list(page.workflows)
        token = page.next_page_token
        if not token:
            return out


def test_same_spec_same_version_changed_spec_next_version(client: Client) -> None:
    first = client.register(spec("reg", 1))
    assert first.created and first.workflow.version == 1 and len(first.workflow.spec_hash) == 64
    again = client.register(spec("reg", 1))
    assert not again.created and again.workflow.version == 1
    assert again.workflow.spec_hash == first.workflow.spec_hash
    changed = client.register(spec("reg", 2))
    assert changed.created and changed.workflow.version == 2 and changed.workflow.spec_hash != first.workflow.spec_hash
    assert get(client, "reg").version == 2
    old = get(client, "reg", 1)
    assert old.spec_hash == first.workflow.spec_hash and old.spec.steps[0].args["v"] == 1
    listed = {w.name: w for w in list_all(client, page_size=1)}  # one per page: the tokens walk every name
    assert listed["reg"].version == 2
    assert {"runtime.noop", "runtime.tool", "campaign.build"} <= set(listed)
    assert listed["runtime.noop"].builtin and not listed["reg"].builtin
    campaign = get(client, "campaign.build")  # change requests are stored and returned
    assert {k: list(v.step_keys) for k, v in campaign.spec.change_requests.items()} == {
        "brief_update": ["brief"], "copy_update": ["copy"], "image_update": ["images"]}
    with pytest.raises(grpc.RpcError) as missing:
        get(client, "reg", 3)
    assert missing.value.code() == Code.NOT_FOUND and "version 3" in (missing.value.details() or "")


def test_a_run_keeps_the_version_it_started_with(api: Api, client: Client, sql: psycopg.Connection) -> None:
    client.register(spec("pinned", 1))
    v1_run = client.start("pinned").run
    client.register(spec("pinned", 2))  # registered while the first run is queued
    v2_run = client.start("pinned").run
    older = client.start("pinned", workflow_version=1).run
    assert (v1_run.workflow_version, v2_run.workflow_version, older.workflow_version) == (1, 2, 1)
    assert v1_run.spec_hash == older.spec_hash != v2_run.spec_hash
    counters = worker_once(api.addr, RUN_WORKER_TOOLS="echo")
    assert counters["succeeded"] == 3, counters
    outputs = {
        run_id: json.loads(json.dumps(output))
        for run_id, output in sql.execute("SELECT run_id, output FROM runs").fetchall()
    }
    assert outputs[v1_run.run_id] == {"only": {"v": 1}}
    assert outputs[older.run_id] == {"only": {"v": 1}}
    assert outputs[v2_run.run_id] == {"only": {"v": 2}}


def test_unknown_workflows_and_versions_are_refused_and_nothing_is_stored(
    client: Client, sql: psycopg.Connection
) -> None:
    err = refused(Code.INVALID_ARGUMENT, lambda: client.start("no.such.flow"))
    assert violations(err) == ["workflow"]
    assert "known workflows:" in (err.details() or "") and "campaign.build" in (err.details() or "")
    err = refused(Code.INVALID_ARGUMENT, lambda: client.start("runtime.noop", workflow_version=9))
    assert violations(err) == ["workflow_version"]
    row = sql.execute("SELECT count(*) FROM runs").fetchone()
    assert row is not None and row[0] == 0


def test_every_problem_of_a_spec_is_named_and_nothing_is_stored(client: Client, sql: psycopg.Connection) -> None:
    before = sql.execute("SELECT count(*) FROM registry_events").fetchone()
    bad = {
        "name": "",
        "steps": [
            {"key": "a", "tool": "echo", "retry": {"max_attempts": 101}, "timeout_seconds": -1},
            {"key": "a", "tool": "echo"},
        ],
    }
    err = refused(Code.INVALID_ARGUMENT, lambda: client.register(bad))
    fields = violations(err)
    assert "spec.name" in fields and "spec.steps[0].retry.max_attempts" in fields, fields
    assert "spec.steps[0].timeout_seconds" in fields and any(f.startswith("spec.steps[1].key") for f in fields), fields
    assert sql.execute("SELECT count(*) FROM registry_events").fetchone() == before


def test_specs_the_database_or_the_hash_refused_are_invalid_arguments(client: Client, sql: psycopg.Connection) -> None:
    """Found by tests/test_fuzz.py: U+0000 (jsonb), a TTL past 2**53 - 1 (RFC 8785) and NaN in args (the proto's
    JSON form) were INTERNAL; a spec over a spec file's 1 MiB is refused before validation, whose time grows with it."""
    before = sql.execute("SELECT count(*) FROM registry_events").fetchone()
    for bad, field in (
        ({**spec("nul", 1), "description": "a\x00b"}, "spec.description"),
        (spec("nul", 1, args={"v\x00": "x"}), "spec.steps[0].args.v\x00"),
        (spec("ttl", 1, cache={"ttl_seconds": 2**60}), "spec.steps[0].cache.ttl_seconds"),
        (spec("nan", 1, args={"v": 1, "x": [{"y": float("nan")}]}), "spec.steps[0].args.x[0].y"),
        ({**spec("big", 1), "description": "d" * (1024 * 1024)}, "spec"),
    ):
        assert violations(refused(Code.INVALID_ARGUMENT, lambda bad=bad: client.register(bad))) == [field], field
    assert sql.execute("SELECT count(*) FROM registry_events").fetchone() == before
    assert client.register(spec("ttl", 1, cache={"ttl_seconds": 2**53 - 1})).created


def test_a_builtin_name_is_not_a_tenants_to_take(client: Client) -> None:
    noop = get(client, "runtime.noop")
    err = refused(Code.INVALID_ARGUMENT, lambda: client.register(spec("runtime.noop", 1)))
    assert violations(err) == ["spec.name"] and "built-in" in (err.details() or "")
    same = client.register({"name": "runtime.noop", "description": noop.spec.description,
                            "steps": [{"key": "runtime", "tool": "noop"}]})
    assert not same.created and same.workflow.builtin and same.workflow.version == noop.version


@pytest.fixture
def auth_api(pg_server: str, template_db: str) -> Iterator[tuple[Api, str]]:
    name = f"runs_t_{str(ULID()).lower()}"
    with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(pgsql.Identifier(name),
                                                                        pgsql.Identifier(template_db)))
    url = db.with_database(pg_server, name)
    api = Api(url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=f"test-admin-{secrets.token_urlsafe(24)}")
    api.start()
    try:
        yield api, url
    finally:
        stop_all(api)
        with psycopg.connect(db.admin_url(pg_server), autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


def test_workflows_are_scoped_by_tenant_and_builtins_are_everyones(auth_api: tuple[Api, str]) -> None:
    api, url = auth_api
    _, acme_key = host_key(url, "client", tenant="acme")
    _, globex_key = host_key(url, "client", tenant="globex")
    _, worker_key = host_key(url, "worker", tenant="acme")
    acme, globex = Client(api.addr, acme_key), Client(api.addr, globex_key)
    try:
        assert acme.register(spec("private", 1)).workflow.version == 1
        assert "private" not in {w.name for w in list_all(globex, page_size=50)}
        assert {"runtime.noop", "campaign.build"} <= {w.name for w in list_all(globex, page_size=50)}
        refused(Code.NOT_FOUND, lambda: get(globex, "private"))
        err = refused(Code.INVALID_ARGUMENT, lambda: globex.start("private"))
        assert "private" not in (err.details() or "").split("known workflows:")[1]
        # The same name in another tenant is that tenant's own workflow, numbered from 1.
        theirs = globex.register(spec("private", 7))
        assert theirs.created and theirs.workflow.version == 1
        assert get(acme, "private").spec.steps[0].args["v"] == 1
        assert acme.start("private").run.tenant_id == "acme"
        with open_channel(api.addr, api_key=worker_key) as channel:
            stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            refused(Code.PERMISSION_DENIED,
                    lambda: stub.ListWorkflows(workflow_service_pb2.ListWorkflowsRequest(), timeout=10))
    finally:
        acme.close()
        globex.close()
