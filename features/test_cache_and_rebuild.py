"""Steps of cache_and_rebuild.feature: the step cache (a Redis the test starts itself, PostgreSQL) and rebuilds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest
import redis
from pytest_bdd import given, parsers, scenarios, then, when

from features.conftest import Context, Stack
from features.harness import Process, free_port, wait_until
from shared.gen.runs.v1 import ops_service_pb2, ops_service_pb2_grpc, run_service_pb2

scenarios("cache_and_rebuild.feature")

EVERY_TOOL = {"RUN_WORKER_TOOLS": "noop,echo,sleep,fail,shell"}
CAMPAIGN = "campaign.build"
CAMPAIGN_STEPS = ("brief", "copy", "images", "landing_page", "bundle")


class RedisServer(Process):
    """A redis-server of the scenario's own (no persistence), so a scenario can stop it."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], dict(os.environ), "redis")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        super().start()
        wait_until(self._answers, 10, "redis-server to answer")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if not any(os.access(os.path.join(d, "redis-server"), os.X_OK) for d in os.environ["PATH"].split(os.pathsep)):
        pytest.skip("redis-server is not installed: the Redis scenarios need a server of their own")
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    server.log_path.unlink(missing_ok=True)


def runs(ctx: Context) -> list[str]:
    return ctx.extra.setdefault("run_ids", [])


def steps(stack: Stack, run_id: str) -> dict[str, Any]:
    return stack.client.steps(run_id)


def executed(sql: psycopg.Connection, run_id: str) -> set[str]:
    """The steps of a run that invoked a tool."""
    return {r[0] for r in sql.execute("SELECT DISTINCT step_key FROM tool_calls WHERE run_id = %s", (run_id,))}


def status_name(step: Any) -> str:
    return {1: "CREATED", 2: "RUNNING", 3: "SUCCEEDED", 4: "FAILED", 5: "SKIPPED", 6: "CANCELED"}[step.status]


# --- Given -------------------------------------------------------------------------------------


@given("a running API with the step cache and a worker running every tool")
def api(stack: Stack, ctx: Context, redis_server: RedisServer) -> None:
    """The API with REDIS_URL pointing at the scenario's own Redis; one worker."""
    ctx.extra["redis"] = redis_server
    stack.start_api(REDIS_URL=redis_server.url, **EVERY_TOOL)
    stack.start_worker()


SPECS: dict[str, list[dict[str, Any]]] = {
    "split": [
        {"key": "a", "tool": "echo", "input": {"x": "input.x"}, "cache": {"scope": "global"}},
        {"key": "b", "tool": "echo", "input": {"y": "input.y"}, "cache": {"scope": "global"}},
        {"key": "c", "tool": "echo", "depends_on": ["a"], "input": {"a": "steps.a.output"},
         "cache": {"scope": "global"}},
    ],
    "private": [{"key": "only", "tool": "echo", "input": {"x": "input.x"}, "cache": {"scope": "run_only"}}],
}


@given(parsers.re(r'the workflow "(?P<name>[a-z]+)" is registered: .*'))
def registered(stack: Stack, name: str) -> None:
    assert stack.client.register({"name": name, "steps": SPECS[name]}).created


@given(parsers.parse('a run of tool "{tool}" with args {args} that failed'))
def failed_run(stack: Stack, ctx: Context, tool: str, args: str) -> None:
    run = stack.client.start_tool(tool, json.loads(args))
    assert stack.client.wait_status(run.run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 60) == "FAILED"
    ctx.extra["failed"] = run.run_id


# --- When --------------------------------------------------------------------------------------


def _run(stack: Stack, ctx: Context, workflow: str, data: str) -> str:
    run_id = stack.client.start(workflow, json.loads(data)).run.run_id
    status = stack.client.wait_status(run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 90)
    assert status == "SUCCEEDED", stack.client.get(run_id)
    runs(ctx).append(run_id)
    return run_id


@when(parsers.parse("I run the campaign with {data}"))
def run_campaign(stack: Stack, ctx: Context, data: str) -> None:
    _run(stack, ctx, CAMPAIGN, data)


@when(parsers.parse('I start a run of "{workflow}" with {data} and it succeeds'))
def run_workflow(stack: Stack, ctx: Context, workflow: str, data: str) -> None:
    _run(stack, ctx, workflow, data)


@when(parsers.parse("the artifact {name} of that run is deleted from the artifact store"))
def delete_artifact(stack: Stack, ctx: Context, name: str) -> None:
    (artifact,) = [a for a in stack.client.artifacts(runs(ctx)[-1]) if a.name == name]
    path = artifact.uri.removeprefix("file://")
    assert os.path.exists(path), artifact.uri
    os.unlink(path)


@when("the test's Redis server is stopped")
def stop_redis(ctx: Context) -> None:
    ctx.extra["redis"].stop()


@when("the test's Redis server is flushed")
def flush_redis(ctx: Context) -> None:
    assert ctx.extra["redis"].client().flushall()


@when(parsers.parse("I invalidate the cache of workflow {workflow}"))
def invalidate(stack: Stack, ctx: Context, workflow: str) -> None:
    request = run_service_pb2.InvalidateCacheRequest(workflow=workflow)
    ctx.extra["removed"] = stack.client.stub.InvalidateCache(request, timeout=10).removed


def _rebuild(stack: Stack, ctx: Context, base: str, change: str, dry_run: bool = False) -> None:
    request = run_service_pb2.RebuildRunRequest(base_run_id=base, change_request_type=change, dry_run=dry_run)
    ctx.error = None
    try:
        ctx.extra["rebuild"] = stack.client.stub.RebuildRun(request, timeout=10)
    except grpc.RpcError as err:
        ctx.error = err


@when(parsers.parse("I rebuild that run with change request {change}"))
def rebuild(stack: Stack, ctx: Context, change: str) -> None:
    _rebuild(stack, ctx, runs(ctx)[-1], change)


@when(parsers.parse("I rebuild that failed run with change request {change}"))
def rebuild_failed(stack: Stack, ctx: Context, change: str) -> None:
    _rebuild(stack, ctx, ctx.extra["failed"], change)


@when(parsers.parse("I ask for a dry run of a {change} rebuild of that run"))
def dry_run(stack: Stack, ctx: Context, sql: psycopg.Connection, change: str) -> None:
    ctx.extra["runs_before"] = sql.execute("SELECT count(*) FROM runs").fetchone()
    _rebuild(stack, ctx, runs(ctx)[-1], change, dry_run=True)
    assert ctx.error is None, ctx.error


# --- Then --------------------------------------------------------------------------------------


@then("the second run invoked no tool")
def no_tool(sql: psycopg.Connection, ctx: Context) -> None:
    assert executed(sql, runs(ctx)[1]) == set()


@then("every step of the second run is SKIPPED with reason cache_hit from the first run")
def all_hits(stack: Stack, ctx: Context) -> None:
    first, second = runs(ctx)[:2]
    got = steps(stack, second)
    assert set(got) == set(CAMPAIGN_STEPS)
    for key, step in got.items():
        assert (status_name(step), step.reason, step.cache_result) == ("SKIPPED", "cache_hit", "hit"), step
        assert step.source_run_id == first and step.cache_display.startswith(f"{CAMPAIGN}:{key}:"), step
        assert len(step.cache_key) == 64


@then("the second run's artifacts have the first run's sha256")
def same_artifacts(stack: Stack, ctx: Context) -> None:
    first, second = (sorted((a.step_key, a.name, a.sha256) for a in stack.client.artifacts(r)) for r in runs(ctx)[:2])
    assert first == second and len(first) == 5


def _miss(stack: Stack, ctx: Context, sql: psycopg.Connection, key: str, reason: str) -> Any:
    step = steps(stack, runs(ctx)[-1])[key]
    assert status_name(step) == "SUCCEEDED" and step.cache_result == "miss" and step.cache_reason == reason, step
    assert key in executed(sql, runs(ctx)[-1])
    return step


def _hit(stack: Stack, ctx: Context, key: str, run_index: int = -1, layer: str | None = None) -> None:
    step = steps(stack, runs(ctx)[run_index])[key]
    assert (status_name(step), step.reason, step.cache_result) == ("SKIPPED", "cache_hit", "hit"), step
    if layer is not None:
        assert step.cache_reason == layer, step


@then(parsers.parse("in the last run only step {key} executed, with cache miss reason {reason}"))
def only_executed(stack: Stack, ctx: Context, sql: psycopg.Connection, key: str, reason: str) -> None:
    assert executed(sql, runs(ctx)[-1]) == {key}
    _miss(stack, ctx, sql, key, reason)


@then(parsers.parse("steps {a} and {b} of the last run are cache hits"))
def two_hits(stack: Stack, ctx: Context, a: str, b: str) -> None:
    for key in (a, b):
        _hit(stack, ctx, key)


@then(parsers.parse("step {key} of the last run executed with cache miss reason {reason} naming {name}"))
def miss_naming(stack: Stack, ctx: Context, sql: psycopg.Connection, key: str, reason: str, name: str) -> None:
    _miss(stack, ctx, sql, key, reason)
    (event,) = [
        r[0] for r in sql.execute(
            "SELECT payload FROM run_events WHERE run_id = %s AND type = 'step.started' AND payload->>'step_key' = %s",
            (runs(ctx)[-1], key),
        )
    ]
    assert name in json.dumps(event["cache"]), event


@then(parsers.parse("every step of the {which} run is a cache hit from the {layer} layer"))
def every_hit(stack: Stack, ctx: Context, which: str, layer: str) -> None:
    index = {"second": 1, "last": -1}[which]
    for key in CAMPAIGN_STEPS:
        _hit(stack, ctx, key, index, layer)


@then("the API logged one warning about Redis being unavailable")
def one_warning(stack: Stack) -> None:
    assert stack.api is not None
    lines = [line for line in stack.api.output().splitlines() if "WARNING" in line and "redis" in line.lower()]
    assert len(lines) == 1, lines


@then("GetStats counts hits by layer and misses by reason")
def stats(stack: Stack) -> None:
    with stack.admin_channel() as channel:
        got = ops_service_pb2_grpc.OpsServiceStub(channel).GetStats(ops_service_pb2.GetStatsRequest(), timeout=10)
    assert got.cache_hits_by_layer["cold"] >= 5 and got.cache_hits_by_layer["hot"] >= 5, got
    assert got.cache_misses_by_reason["no_entry"] >= 5, got


@then(parsers.parse("the invalidation removed at least {count:d} entries"))
def removed(ctx: Context, count: int) -> None:
    assert ctx.extra["removed"] >= count, ctx.extra["removed"]


@then(parsers.parse("every step of the last run executed with cache miss reason {reason}"))
def every_miss(stack: Stack, ctx: Context, sql: psycopg.Connection, reason: str) -> None:
    for key in CAMPAIGN_STEPS:
        _miss(stack, ctx, sql, key, reason)


@then("the rebuild succeeds")
def rebuild_succeeds(stack: Stack, ctx: Context) -> None:
    assert ctx.error is None, ctx.error
    run = ctx.extra["rebuild"].run
    assert run.trigger == "rebuild" and run.base_run_id == runs(ctx)[-1] and run.change_request == "copy_update"
    assert stack.client.wait_status(run.run_id, {"SUCCEEDED", "FAILED", "CANCELED"}, 90) == "SUCCEEDED"


@then(parsers.parse("in the rebuild exactly {keys} executed"))
def rebuild_executed(sql: psycopg.Connection, ctx: Context, keys: str) -> None:
    expected = {k.strip() for k in keys.replace(" and ", ",").split(",") if k.strip()}
    assert executed(sql, ctx.extra["rebuild"].run.run_id) == expected


@then("brief and images are SKIPPED reused_from_base with byte-identical artifacts")
def reused(stack: Stack, ctx: Context) -> None:
    base, new = runs(ctx)[-1], ctx.extra["rebuild"].run.run_id
    got = steps(stack, new)
    base_artifacts = {(a.step_key, a.name): a.sha256 for a in stack.client.artifacts(base)}
    new_artifacts = {(a.step_key, a.name): a.sha256 for a in stack.client.artifacts(new)}
    for key in ("brief", "images"):
        assert (status_name(got[key]), got[key].reason, got[key].source_run_id) == ("SKIPPED", "reused_from_base", base)
        mine = {k: v for k, v in new_artifacts.items() if k[0] == key}
        assert mine and mine == {k: v for k, v in base_artifacts.items() if k[0] == key}
        for (step_key, name), sha in mine.items():
            _, data = stack.client.download(new, step_key, name)
            _, original = stack.client.download(base, step_key, name)
            assert data == original and len(data) > 0, (step_key, name, sha)


@then(parsers.parse("the plan reruns {rerun} and reuses {reuse}"))
def plan(ctx: Context, rerun: str, reuse: str) -> None:
    response = ctx.extra["rebuild"]
    assert not response.HasField("run")
    actions = {p.step_key: p.action for p in response.plan}
    assert {k for k, a in actions.items() if a == "rerun"} == {k.strip() for k in rerun.split(",")}
    assert {k for k, a in actions.items() if a == "reuse"} == {k.strip() for k in reuse.split(",")}
    assert all(p.reason for p in response.plan)


@then("no run was created by the dry run")
def nothing_created(sql: psycopg.Connection, ctx: Context) -> None:
    assert sql.execute("SELECT count(*) FROM runs").fetchone() == ctx.extra["runs_before"]


@then(parsers.parse("the rebuild is refused with {code} naming status {status}"))
def refused_status(ctx: Context, code: str, status: str) -> None:
    assert ctx.error is not None and ctx.error.code().name == code, ctx.error
    assert status in ctx.error.details()


@then(parsers.parse("the rebuild is refused with {code} listing {types}"))
def refused_listing(ctx: Context, code: str, types: str) -> None:
    assert ctx.error is not None and ctx.error.code().name == code, ctx.error
    for name in types.split(", "):
        assert name in ctx.error.details(), ctx.error.details()


def _explain(stack: Stack, run_id: str, key: str) -> Any:
    request = run_service_pb2.ExplainStepRequest(run_id=run_id, step_key=key)
    (explanation,) = stack.client.stub.ExplainStep(request, timeout=10).steps
    return explanation


@then(parsers.parse('explain says step {key} of the last run executed after a {reason} miss because {path} '
                    'changed from "{before}" to "{after}"'))
def explained_miss(stack: Stack, ctx: Context, key: str, reason: str, path: str, before: str, after: str) -> None:
    got = _explain(stack, runs(ctx)[-1], key)
    assert (got.decision, got.cache_reason) == ("executed", reason), got
    assert got.nearest_source_run_id == runs(ctx)[0] and got.summary, got
    diffs = {d.path: (d.before.string_value, d.after.string_value) for d in got.differences}
    assert diffs.get(path) == (before, after), got
    assert got.components["input"]["product"] == after and len(got.cache_key) == 64


@then(parsers.parse("explain says step {key} of the last run is a cache_hit from the second run"))
def explained_hit(stack: Stack, ctx: Context, key: str) -> None:
    got = _explain(stack, runs(ctx)[-1], key)
    assert (got.decision, got.source_run_id) == ("cache_hit", runs(ctx)[1]), got
    assert got.cache_reason in ("hot", "cold") and got.cache_display.startswith("campaign.build:brief:"), got
