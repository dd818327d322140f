"""Partial rebuilds and explanations: the pure plan and RFC 7396 merge patch, then RebuildRun and ExplainStep
against a real PostgreSQL (runs made SUCCEEDED by reporting a worker's events through the handlers)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from google.protobuf import json_format
from sqlalchemy.ext.asyncio import AsyncEngine
from ulid import ULID

from services.run_api import db, handlers
from services.run_api.auth import Caller
from services.run_api.cache import keys_for
from services.run_api.errors import IllegalTransition, InvalidRequest, NotFound, RequestTooLarge, RunNotFound
from services.run_api.rebuild import RebuildRun, component_differences, explain_steps, rebuild_run
from services.run_api.store.uow import UnitOfWork
from shared.events import EventType
from shared.gen.runs.v1 import run_service_pb2
from shared.limits import MAX_JSON_DEPTH
from shared.merge_patch import merge_patch
from shared.workflow import load_spec_text, parse_spec
from shared.workflow.plan import PlanError, PlanStep, rebuild_plan

pytestmark = pytest.mark.timeout(60)

CAMPAIGN = Path(__file__).resolve().parents[1] / "workflows" / "campaign.build.v1.yaml"
KEYS = ["brief", "copy", "images", "landing_page", "bundle"]


# --- RFC 7396 merge patch ----------------------------------------------------------------------

# RFC 7396 Appendix A, every example: (original, patch, result).
RFC_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC_EXAMPLES)
def test_merge_patch_rfc7396_appendix_a(original: Any, patch: Any, result: Any) -> None:
    before_original, before_patch = copy.deepcopy(original), copy.deepcopy(patch)
    assert merge_patch(original, patch) == result
    assert (original, patch) == (before_original, before_patch)  # neither argument is changed


def test_merge_patch_rfc7396_section_3_example() -> None:
    target = {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    }
    patch = {"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": None}, "tags": ["example"]}
    assert merge_patch(target, patch) == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
    }


def test_merge_patch_result_shares_no_patch_objects() -> None:
    patch = {"a": {"b": [1, {"c": 2}]}}
    result = merge_patch({}, patch)
    result["a"]["b"][1]["c"] = 3
    assert patch == {"a": {"b": [1, {"c": 2}]}}


# --- the plan ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def campaign() -> Any:
    return load_spec_text(CAMPAIGN.read_text(), "yaml")


def test_plan_copy_update_reruns_copy_and_downstream_and_reuses_the_rest(campaign: Any) -> None:
    assert rebuild_plan(campaign, "copy_update", None) == [
        PlanStep("brief", "reuse", "unaffected"),
        PlanStep("copy", "rerun", "named by change request copy_update"),
        PlanStep("images", "reuse", "unaffected"),
        PlanStep("landing_page", "rerun", "downstream of copy"),
        PlanStep("bundle", "rerun", "downstream of copy"),
    ]


def test_plan_brief_update_reruns_everything(campaign: Any) -> None:
    plan = rebuild_plan(campaign, "brief_update", [])
    assert [p.step_key for p in plan] == KEYS
    assert {p.action for p in plan} == {"rerun"}
    assert plan[0].reason == "named by change request brief_update"
    assert {p.reason for p in plan[1:]} == {"downstream of brief"}


def test_plan_explicit_steps_and_several_origins(campaign: Any) -> None:
    plan = {p.step_key: (p.action, p.reason) for p in rebuild_plan(campaign, None, ["images", "copy", "copy"])}
    assert plan == {
        "brief": ("reuse", "unaffected"),
        "copy": ("rerun", "named"),
        "images": ("rerun", "named"),
        "landing_page": ("rerun", "downstream of copy, images"),
        "bundle": ("rerun", "downstream of copy, images"),
    }


def test_plan_type_and_steps_together(campaign: Any) -> None:
    plan = {p.step_key: p.reason for p in rebuild_plan(campaign, "image_update", ["copy", "images"])}
    assert plan["images"] == "named by change request image_update"
    assert plan["copy"] == "named"
    assert plan["brief"] == "unaffected"


def test_plan_a_sink_alone(campaign: Any) -> None:
    plan = rebuild_plan(campaign, None, ["bundle"])
    assert [(p.step_key, p.action) for p in plan if p.action == "rerun"] == [("bundle", "rerun")]


@pytest.mark.parametrize(
    ("change", "steps", "field", "fragment"),
    [
        ("nope", None, "change_request_type",
         "unknown change request type 'nope'; workflow campaign.build declares: brief_update, copy_update, "
         "image_update"),
        (None, ["copy", "nope"], "steps[1]", "unknown step 'nope'; workflow campaign.build has steps: brief, copy"),
        (None, None, "change_request_type", "give a change_request_type or the steps"),
        ("", [], "change_request_type", "give a change_request_type or the steps"),
    ],
)
def test_plan_errors_name_the_field(campaign: Any, change: str | None, steps: list[str] | None, field: str,
                                    fragment: str) -> None:
    with pytest.raises(PlanError) as exc:
        rebuild_plan(campaign, change, steps)
    assert isinstance(exc.value, ValueError)
    assert exc.value.field == field and fragment in str(exc.value)


def test_plan_of_a_workflow_without_change_requests_says_none() -> None:
    spec = parse_spec({"name": "one", "steps": [{"key": "a", "tool": "noop"}]})
    with pytest.raises(PlanError, match="declares: none"):
        rebuild_plan(spec, "x", None)
    assert rebuild_plan(spec, None, ["a"]) == [PlanStep("a", "rerun", "named")]


# --- component differences ---------------------------------------------------------------------


def test_component_differences_are_paths_with_both_values() -> None:
    before = {"workflow": "w", "tool_version": "1", "input": {"product": "A", "n": 1}, "spec": {"args": {"c": [1]}}}
    after = {"workflow": "w", "tool_version": "2", "input": {"product": "B", "n": 1.0, "new": True},
             "spec": {"args": {"c": [1, 2]}}}
    assert component_differences(before, after) == [
        {"path": "input.new", "before": None, "after": True},
        {"path": "input.product", "before": "A", "after": "B"},
        {"path": "spec.args.c", "before": [1], "after": [1, 2]},
        {"path": "tool_version", "before": "1", "after": "2"},
    ]
    assert component_differences(before, before) == []


# --- against PostgreSQL ------------------------------------------------------------------------

ANON = Caller.anonymous()
OTHER_TENANT = Caller(key_id="k2", role="client", tenant_id="other")
INPUT = {"product": "Acme Rockets", "audience": "coyotes"}


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = db.make_engine(database_url, pool_size=8)
    yield eng
    await eng.dispose()


class Worker:
    """Plays a worker through the handlers: claims a run and reports its events."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine, self.token, self.n = engine, "", 0
        self.worker_id = f"w-{ULID()}"

    async def claim(self, run_id: str) -> int:
        async with UnitOfWork(self.engine) as uow:
            self.token = await handlers.open_session(uow, self.worker_id, "default", self.token, 30)
        async with UnitOfWork(self.engine) as uow:
            result = await handlers.claim_runs(uow, handlers.Claim(self.worker_id, "default", 10, 10, 30))
        claimed = {r.run_id: r.attempt for r in result.runs}
        assert run_id in claimed, claimed
        return claimed[run_id]

    async def report(self, run_id: str, attempt: int, *events: tuple[str, dict[str, Any]]) -> None:
        reported = []
        for type_, payload in events:
            self.n += 1
            reported.append(handlers.ReportedEvent(run_id, attempt, f"e{self.n}", type_, None, payload))
        async with UnitOfWork(self.engine) as uow:
            await handlers.report_events(uow, self.worker_id, self.token, reported)


def components(key: str, run_input: dict[str, Any]) -> dict[str, Any]:
    return {"workflow": "campaign.build", "step": key, "tool": "shell", "tool_version": "1",
            "spec": {"tool": "shell", "args": {"command": ["true"]}, "input": {}}, "input": {"step": key, **run_input},
            "input_artifacts": []}


def succeeded(key: str, run_input: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A step.succeeded as the servicer records it: the worker's components, the API's keys."""
    parts = components(key, run_input)
    keys = keys_for(parts, "default")
    cache = {"components": parts, "scope": "global", "key": keys.key, "base_key": keys.base_key,
             "display": keys.display}
    return EventType.STEP_SUCCEEDED, {"step_key": key, "output": {"result": {"step": key}}, "cache": cache}


async def start(engine: AsyncEngine, run_input: dict[str, Any] | None = None) -> str:
    run_input = INPUT if run_input is None else run_input
    async with UnitOfWork(engine) as uow:
        row, _ = await handlers.start_run(
            uow, handlers.StartRun("campaign.build", run_input, 10, max_attempts=2, retry_backoff_seconds=0.25),
            handlers.RetryPolicy(), ANON,
        )
    return str(row.run_id)


async def execute(worker: Worker, run_id: str, run_input: dict[str, Any], hits: dict[str, str] | None = None) -> None:
    """Run every step of the campaign (a miss that executes, or a hit of `hits[key]`'s run) and complete the run."""
    attempt = await worker.claim(run_id)
    await worker.report(run_id, attempt, (EventType.RUN_STARTED, {}),
                        *[(EventType.STEP_CREATED, {"step_key": k, "tool": "shell"}) for k in KEYS])
    for key in KEYS:
        source = (hits or {}).get(key)
        if source:
            keys = keys_for(components(key, run_input), "default")
            await worker.report(run_id, attempt, (EventType.STEP_SKIPPED, {
                "step_key": key, "reason": "cache_hit", "output": {"result": {"step": key}},
                "cache": {"key": keys.key, "display": keys.display, "layer": "cold"},
                "source_run_id": source, "source_step_key": key}))
        else:
            await worker.report(run_id, attempt,
                                (EventType.STEP_STARTED, {"step_key": key, "try": 1, "cache": {"reason": "no_entry"}}),
                                succeeded(key, run_input))
    await worker.report(run_id, attempt, (EventType.RUN_COMPLETED, {"output": {}}))


async def succeeded_run(engine: AsyncEngine, run_input: dict[str, Any] | None = None) -> str:
    run_id = await start(engine, run_input)
    await execute(Worker(engine), run_id, INPUT if run_input is None else run_input)
    return run_id


async def rebuild(engine: AsyncEngine, caller: Caller = ANON, **fields: Any) -> tuple[Any, list[PlanStep]]:
    async with UnitOfWork(engine) as uow:
        return await rebuild_run(uow, RebuildRun(**fields), caller)


def counts(sql: psycopg.Connection) -> tuple[int, int]:
    row = sql.execute("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM run_events)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_rebuild_queues_a_run_with_the_rebuild_fields_and_the_patched_input(
    engine: AsyncEngine, sql: psycopg.Connection
) -> None:
    base_id = await succeeded_run(engine, {**INPUT, "color": "#d9480f"})
    row, plan = await rebuild(engine, base_run_id=base_id, change_request_type="copy_update",
                              input_patch={"audience": "roadrunners", "color": None, "extra": {"a": 1}})
    assert [(p.step_key, p.action) for p in plan] == [
        ("brief", "reuse"), ("copy", "rerun"), ("images", "reuse"), ("landing_page", "rerun"), ("bundle", "rerun")]
    base = sql.execute("SELECT workflow_version, spec_hash FROM runs WHERE run_id = %s", (base_id,)).fetchone()
    assert row.status == "QUEUED" and row.run_id != base_id
    assert row.trigger == "rebuild" and row.base_run_id == base_id and row.change_request == "copy_update"
    assert row.rebuild_rerun == ["bundle", "copy", "landing_page"]
    assert row.input == {"product": "Acme Rockets", "audience": "roadrunners", "extra": {"a": 1}}
    assert (row.workflow, row.workflow_version, row.spec_hash) == ("campaign.build", *base)
    assert (row.max_attempts, row.retry_backoff_seconds) == (2, 0.25)
    payload = sql.execute(
        "SELECT payload FROM run_events WHERE run_id = %s AND type = 'run.queued'", (row.run_id,)
    ).fetchone()
    assert payload is not None
    assert {k: payload[0][k] for k in ("trigger", "base_run_id", "change_request", "rebuild_rerun")} == {
        "trigger": "rebuild", "base_run_id": base_id, "change_request": "copy_update",
        "rebuild_rerun": ["bundle", "copy", "landing_page"]}
    # the plan and the run convert to the response
    response = run_service_pb2.RebuildRunResponse(plan=[run_service_pb2.RebuildPlanStep(**vars(p)) for p in plan])
    assert response.plan[1].reason == "named by change request copy_update"


async def test_rebuild_with_explicit_steps_keeps_no_change_request(engine: AsyncEngine) -> None:
    base_id = await succeeded_run(engine)
    row, _ = await rebuild(engine, base_run_id=base_id, steps=("bundle",))
    assert row.change_request is None and row.rebuild_rerun == ["bundle"] and row.input == INPUT


async def test_dry_run_stores_nothing(engine: AsyncEngine, sql: psycopg.Connection) -> None:
    base_id = await succeeded_run(engine)
    before = counts(sql)
    row, plan = await rebuild(engine, base_run_id=base_id, change_request_type="image_update", dry_run=True,
                              input_patch={"product": "X"})
    assert row is None
    assert [p.step_key for p in plan if p.action == "rerun"] == ["images", "landing_page", "bundle"]
    assert counts(sql) == before


async def test_a_base_that_did_not_succeed_is_refused_naming_its_status(engine: AsyncEngine) -> None:
    queued = await start(engine)
    with pytest.raises(IllegalTransition, match=f"run {queued} is QUEUED; only a SUCCEEDED run can be rebuilt"):
        await rebuild(engine, base_run_id=queued, change_request_type="copy_update")
    worker = Worker(engine)
    attempt = await worker.claim(queued)
    await worker.report(queued, attempt, (EventType.RUN_FAILED, {"error": "boom", "retryable": False}))
    with pytest.raises(IllegalTransition, match="is FAILED; only a SUCCEEDED run"):
        await rebuild(engine, base_run_id=queued, change_request_type="copy_update", dry_run=True)


async def test_bad_requests_name_their_field(engine: AsyncEngine, sql: psycopg.Connection) -> None:
    base_id = await succeeded_run(engine)
    before = counts(sql)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"change_request_type": "nope"}, "change_request_type",
         "declares: brief_update, copy_update, image_update"),
        ({"steps": ("copy", "nope")}, "steps[1]", "unknown step 'nope'"),
        ({}, "change_request_type", "give a change_request_type or the steps"),
        ({"steps": ("",)}, "steps[0]", "steps[0] is required"),
        ({"change_request_type": "copy_update", "input_patch": {"deep": nested(MAX_JSON_DEPTH + 1)}}, "input",
         "nests deeper"),
        ({"change_request_type": "copy_update", "input_patch": {"product": "a\x00b"}}, "input", "U+0000"),
    ]
    for fields, field, fragment in cases:
        with pytest.raises(InvalidRequest) as exc:
            await rebuild(engine, base_run_id=base_id, **fields)
        assert [f for f, _ in exc.value.violations] == [field], fields
        assert fragment in exc.value.message, (fields, exc.value.message)
    with pytest.raises(RequestTooLarge):
        await rebuild(engine, base_run_id=base_id, change_request_type="copy_update",
                      input_patch={"big": "x" * (handlers.MAX_INPUT_BYTES + 1)})
    with pytest.raises(InvalidRequest, match="base_run_id is required"):
        await rebuild(engine, base_run_id="", change_request_type="copy_update")
    with pytest.raises(RunNotFound):
        await rebuild(engine, base_run_id="01NOSUCHRUN", change_request_type="copy_update")
    with pytest.raises(RunNotFound):  # another tenant's run is not named
        await rebuild(engine, OTHER_TENANT, base_run_id=base_id, change_request_type="copy_update")
    assert counts(sql) == before


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# --- ExplainStep -------------------------------------------------------------------------------


async def explain(engine: AsyncEngine, run_id: str, step_key: str = "") -> list[dict[str, Any]]:
    async with UnitOfWork(engine) as uow:
        found = await explain_steps(uow, run_id, step_key, ANON)
    for item in found:  # every explanation converts to the proto the servicer returns
        json_format.ParseDict(item, run_service_pb2.StepExplanation())
    return found


async def test_explain_a_miss_names_the_nearest_entry_and_the_paths_that_differ(engine: AsyncEngine) -> None:
    first = await succeeded_run(engine)
    second = await succeeded_run(engine, {**INPUT, "product": "Acme Anvils"})
    (brief,) = await explain(engine, second, "brief")
    assert brief["decision"] == "executed" and brief["cache_reason"] == "no_entry"
    assert brief["cache_display"].startswith("campaign.build:brief:") and len(brief["cache_key"]) == 64
    assert brief["components"]["input"]["product"] == "Acme Anvils"
    assert brief["nearest_source_run_id"] == first
    assert brief["differences"] == [{"path": "input.product", "before": "Acme Rockets", "after": "Acme Anvils"}]
    assert "cache miss (no_entry)" in brief["summary"] and "differs in input.product" in brief["summary"]

    # the first run's miss had no earlier entry at all
    (first_brief,) = await explain(engine, first, "brief")
    assert first_brief["nearest_cache_key"] == "" and first_brief["differences"] == []


async def test_explain_a_hit_and_every_step_in_the_spec_order(engine: AsyncEngine) -> None:
    first = await succeeded_run(engine)
    run_id = await start(engine)
    await execute(Worker(engine), run_id, INPUT, hits=dict.fromkeys(["brief", "copy"], first))
    found = await explain(engine, run_id)
    assert [s["step_key"] for s in found] == KEYS
    brief = found[0]
    assert (brief["decision"], brief["cache_reason"], brief["source_run_id"]) == ("cache_hit", "cold", first)
    assert brief["components"] == components("brief", INPUT)  # from the entry it used
    assert "cache hit in the cold layer" in brief["summary"] and first in brief["summary"]
    assert found[2]["decision"] == "executed"


async def test_explain_a_rebuild_reused_and_refreshed_steps(engine: AsyncEngine) -> None:
    base_id = await succeeded_run(engine)
    row, _ = await rebuild(engine, base_run_id=base_id, change_request_type="copy_update")
    new = row.run_id
    pending = await explain(engine, new)
    assert {s["decision"] for s in pending} == {"pending"}
    assert pending[0]["summary"] == "pending: not created yet"

    worker = Worker(engine)
    attempt = await worker.claim(new)
    await worker.report(new, attempt, (EventType.RUN_STARTED, {}),
                        *[(EventType.STEP_CREATED, {"step_key": k, "tool": "shell"}) for k in KEYS])
    for key in ("brief", "images"):
        await worker.report(new, attempt, (EventType.STEP_SKIPPED, {
            "step_key": key, "reason": "reused_from_base", "output": {"result": {"step": key}},
            "source_run_id": base_id, "source_step_key": key}))
    await worker.report(new, attempt, (EventType.STEP_STARTED, {"step_key": "copy", "try": 1,
                                                                "cache": {"reason": "refresh"}}))
    found = {s["step_key"]: s for s in await explain(engine, new)}
    assert found["brief"]["decision"] == "reused_from_base" and found["brief"]["source_run_id"] == base_id
    assert found["brief"]["components"] == components("brief", INPUT)  # the base step's
    assert base_id in found["brief"]["summary"]
    copy_step = found["copy"]
    assert copy_step["decision"] == "executed" and copy_step["cache_reason"] == "refresh"
    assert "running now" in copy_step["summary"] and "rebuild re-executes it" in copy_step["summary"]
    assert copy_step["nearest_source_run_id"] == ""  # a refresh carries no components: nothing to compare
    assert found["landing_page"]["decision"] == "pending" and found["landing_page"]["summary"] == (
        "pending: not started yet")


async def test_explain_refuses_unknown_steps_and_runs(engine: AsyncEngine) -> None:
    run_id = await start(engine)
    with pytest.raises(NotFound, match="has no step 'nope'"):
        await explain(engine, run_id, "nope")
    with pytest.raises(RunNotFound):
        await explain(engine, "01NOSUCHRUN")
    with pytest.raises(RunNotFound):
        async with UnitOfWork(engine) as uow:
            await explain_steps(uow, run_id, "", OTHER_TENANT)
