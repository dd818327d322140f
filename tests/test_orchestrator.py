"""The worker's DAG orchestrator against a fake reporter: pure logic, no server.

Each test builds a ClaimedRun carrying a spec (and the steps earlier attempts left), runs
`execute` with tools the test controls, and checks the events reported, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from services.run_api.payloads import problems
from services.run_worker.artifacts import CHUNK_BYTES, ArtifactClient
from services.run_worker.executor import Result, RunHandle
from services.run_worker.orchestrator import EngineConfig, _parsed, execute
from services.run_worker.reporter import StaleAttempt
from services.run_worker.step_cache import StepCacheClient
from services.run_worker.tools import STOCK, ArtifactError, LocalArtifact, Tool, ToolContext, ToolError, as_tool
from shared.gen.runs.v1 import run_pb2, worker_service_pb2, workflow_service_pb2
from shared.limits import MAX_EVENT_PAYLOAD_BYTES, MAX_JSON_DEPTH
from shared.workflow import cache_components, cache_display, parse_spec, spec_to_dict, to_proto_dict

pytestmark = pytest.mark.timeout(30)
DEADLINE = 10.0


# --- fakes ---------------------------------------------------------------------------------------


class FakeReporter:
    """Records every report as a list of (type, payload) and answers RECORDED; hooks may act on a report."""

    def __init__(self) -> None:
        self.reports: list[list[tuple[str, dict[str, Any]]]] = []
        self.changed = asyncio.Condition()
        self.hooks: list[Callable[[list[tuple[str, dict[str, Any]]]], None]] = []
        self.stale_on: str | None = None  # an event type whose report comes back STALE
        self.worker_id, self.session_token = "w-1", "token-1"  # what fenced calls carry

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [e for report in self.reports for e in report]

    def types(self, step: str | None = None) -> list[str]:
        """Event types in order; with `step`, only those about that step (tool events by their call ids)."""
        calls = {p["tool_call_id"] for t, p in self.events if t == "tool.invoked" and p.get("step_key") == step}
        return [t for t, p in self.events if step is None or (
            not t.startswith("run.") and (p.get("step_key") == step or p.get("tool_call_id") in calls))]

    def of(self, type_: str, step: str | None = None) -> list[dict[str, Any]]:
        return [p for t, p in self.events if t == type_ and (step is None or p.get("step_key") == step)]

    async def report(self, events: list[Any]) -> list[Any]:
        await asyncio.sleep(0)  # a real report yields to the loop
        batch = [(e.type, json_format.MessageToDict(e.payload)) for e in events]
        assert len({e.attempt for e in events}) == 1
        for type_, payload in batch:  # every payload is one the API accepts
            assert not problems(type_, payload), (type_, problems(type_, payload))
        if self.stale_on is not None and any(t == self.stale_on for t, _ in batch):
            raise StaleAttempt("not current")
        self.reports.append(batch)
        for hook in self.hooks:
            hook(batch)
        async with self.changed:
            self.changed.notify_all()
        return [worker_service_pb2.ReportResult(event_id=e.event_id, outcome=worker_service_pb2.REPORT_OUTCOME_RECORDED)
                for e in events]

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), DEADLINE)
            except TimeoutError:
                raise AssertionError(f"timed out waiting for {what}; events: {self.types()}") from None


class FakeArtifacts:
    """Stands in for ArtifactClient: 'uploads' files into a dict by sha256 and 'fetches' them back."""

    def __init__(self, refuse: ArtifactError | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self.refuse = refuse
        self.uploaded: list[tuple[str, str]] = []

    async def upload(self, run_id: str, attempt: int, step_key: str, artifact: LocalArtifact) -> dict[str, Any]:
        if self.refuse is not None:
            raise self.refuse
        data = Path(artifact.path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        self.uploaded.append((step_key, artifact.name))
        return {"name": artifact.name, "uri": f"mem://{sha}", "sha256": sha, "size": len(data),
                "media_type": artifact.media_type}

    async def fetch(self, run_id: str, attempt: int, artifact: dict[str, Any], dest: str) -> None:
        Path(dest).write_bytes(self.blobs[artifact["sha256"]])


class Gate:
    """A tool that waits until the test opens its step's gate; tracks how many run at once."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}
        self.running = 0
        self.most = 0
        self.cancelled: list[str] = []

    def _event(self, table: dict[str, asyncio.Event], key: str) -> asyncio.Event:
        return table.setdefault(key, asyncio.Event())

    def open(self, key: str) -> None:
        self._event(self.gates, key).set()

    async def entered_by(self, *keys: str) -> None:
        await asyncio.wait_for(asyncio.gather(*(self._event(self.entered, k).wait() for k in keys)), DEADLINE)

    async def __call__(self, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        self.running += 1
        self.most = max(self.most, self.running)
        self._event(self.entered, ctx.step_key).set()
        try:
            await self._event(self.gates, ctx.step_key).wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.step_key)
            raise
        finally:
            self.running -= 1
        return {"step": ctx.step_key, "args": args}


def tools(**extra: Callable[[dict[str, Any], ToolContext], Awaitable[dict[str, Any]]]) -> dict[str, Tool]:
    out = dict(STOCK)
    out.update({name: as_tool(name, fn) for name, fn in extra.items()})
    return out


def _add_states(target: Any, states: list[dict[str, Any]]) -> None:
    for state in states:
        s = target.add(step_key=state["key"], tries=state.get("tries", 1),
                       status=run_pb2.StepStatus.Value(f"STEP_STATUS_{state['status']}"))
        s.output.update(state.get("output", {}))
        for a in state.get("artifacts", []):
            s.artifacts.add(**a)


def claim(spec: dict[str, Any], run_input: dict[str, Any] | None = None, *, attempt: int = 1,
          steps: list[dict[str, Any]] | None = None, workflow: str | None = None,
          rebuild: dict[str, Any] | None = None) -> Any:
    """A ClaimedRun of `spec` (file form) as the API sends it (`rebuild`: base_run_id, rerun, reuse states)."""
    proto = json_format.ParseDict(to_proto_dict(spec_to_dict(parse_spec(spec))), workflow_service_pb2.WorkflowSpec())
    claimed = worker_service_pb2.ClaimedRun(run_id="01RUN", workflow=workflow or spec["name"], attempt=attempt,
                                            max_attempts=3, spec=proto)
    claimed.input.update(run_input or {})
    _add_states(claimed.steps, steps or [])
    if rebuild is not None:
        claimed.rebuild.base_run_id = rebuild["base_run_id"]
        claimed.rebuild.rerun.extend(rebuild.get("rerun", []))
        _add_states(claimed.rebuild.reuse, rebuild.get("reuse", []))
    return claimed


def spec_of(*steps: dict[str, Any], name: str = "t") -> dict[str, Any]:
    return {"name": name, "steps": list(steps)}


async def start(claimed: Any, reporter: FakeReporter, tool_set: dict[str, Tool], *, artifacts: Any = None,
                config: EngineConfig | None = None, cache: Any = None) -> tuple[RunHandle, asyncio.Task[Result]]:
    handle = RunHandle(claimed.run_id, claimed.attempt)
    task = asyncio.create_task(execute(claimed, handle, reporter, tool_set, artifacts,  # type: ignore[arg-type]
                                       config or EngineConfig(step_parallelism=8), cache))
    return handle, task


async def run(claimed: Any, tool_set: dict[str, Tool] | None = None, **kw: Any) -> tuple[Result, FakeReporter]:
    reporter = FakeReporter()
    _, task = await start(claimed, reporter, tool_set or tools(), **kw)
    return await asyncio.wait_for(task, DEADLINE), reporter


# --- tests ---------------------------------------------------------------------------------------


async def test_a_chain_reports_every_event_in_order_with_selected_inputs() -> None:
    spec = spec_of(
        {"key": "a", "tool": "echo", "input": {"x": "input.x"}, "args": {"k": 1}},
        {"key": "b", "tool": "echo", "depends_on": ["a"], "input": {"x": "input.x", "up": "steps.a.output"}},
    )
    result, rep = await run(claim(spec, {"x": "hello"}))
    assert result is Result.SUCCEEDED
    assert rep.types() == [
        "run.started", "step.created", "step.created",
        "step.started", "tool.invoked", "tool.succeeded", "step.succeeded",
        "step.started", "tool.invoked", "tool.succeeded", "step.succeeded", "run.completed",
    ]
    # run.started and every step.created go in one report, before anything else happens
    assert [t for t, _ in rep.reports[0]][:3] == ["run.started", "step.created", "step.created"]
    assert rep.of("step.created") == [{"step_key": "a", "tool": "echo", "depends_on": []},
                                      {"step_key": "b", "tool": "echo", "depends_on": ["a"]}]
    # echo is instant: each try is announced in the same report as its result (the first with the prefix)
    assert [t for t, _ in rep.reports[0]] == ["run.started", "step.created", "step.created", "step.started",
                                              "tool.invoked", "tool.succeeded", "step.succeeded"]
    assert [[t for t, _ in r] for r in rep.reports[1:]] == [
        ["step.started", "tool.invoked", "tool.succeeded", "step.succeeded", "run.completed"]]
    a_call, b_call = rep.of("tool.invoked")
    assert a_call["input"] == {"x": "hello", "k": 1.0} and a_call["try"] == 1 and a_call["tool_version"] == "1"
    assert b_call["input"] == {"x": "hello", "up": {"x": "hello", "k": 1.0}}
    assert rep.of("step.succeeded", "b")[0] == {"step_key": "b", "output": b_call["input"], "artifacts": [], "try": 1}
    assert rep.of("run.completed") == [{"output": {"b": b_call["input"]}}]


async def test_a_tool_that_is_not_instant_is_recorded_before_it_runs_in_a_workdir_of_its_own() -> None:
    seen: list[tuple[list[list[str]], str]] = []
    reporter = FakeReporter()

    async def careful(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        seen.append(([[t for t, _ in r] for r in reporter.reports], ctx.workdir))
        return {}

    _, task = await start(claim(spec_of({"key": "a", "tool": "careful"})), reporter, tools(careful=careful))
    assert await asyncio.wait_for(task, DEADLINE) is Result.SUCCEEDED
    (reports, workdir), = seen
    # step.started and tool.invoked were reported (with the prefix) before the tool ran
    assert reports == [["run.started", "step.created", "step.started", "tool.invoked"]]
    assert workdir and not os.path.exists(workdir)  # a fresh directory, removed after the try
    seen_dir: list[str] = []

    async def instant(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        seen_dir.append(ctx.workdir)
        return {}

    quick = {"quick": dataclasses.replace(as_tool("quick", instant), instant=True)}
    result, rep = await run(claim(spec_of({"key": "a", "tool": "quick"})), {**tools(), **quick})
    assert result is Result.SUCCEEDED and seen_dir == [""]  # no working directory made for an instant tool
    assert [[t for t, _ in r] for r in rep.reports] == [[
        "run.started", "step.created", "step.started", "tool.invoked", "tool.succeeded", "step.succeeded",
        "run.completed"]]


async def test_independent_steps_overlap_and_a_join_waits_for_both() -> None:
    gate = Gate()
    spec = spec_of(
        {"key": "a", "tool": "echo"},
        {"key": "b", "tool": "gate", "depends_on": ["a"]},
        {"key": "c", "tool": "gate", "depends_on": ["a"]},
        {"key": "d", "tool": "echo", "depends_on": ["b", "c"]},
    )
    reporter = FakeReporter()
    _, task = await start(claim(spec), reporter, tools(gate=gate))
    await gate.entered_by("b", "c")  # both running at once
    assert gate.running == 2 and not reporter.of("step.started", "d")
    gate.open("b")
    await reporter.wait_for(lambda: bool(reporter.of("step.succeeded", "b")), "b to succeed")
    assert not reporter.of("step.started", "d"), "d started before c finished"
    gate.open("c")
    assert await asyncio.wait_for(task, DEADLINE) is Result.SUCCEEDED
    types = reporter.types()
    started_d = next(i for i, (t, p) in enumerate(reporter.events) if t == "step.started" and p["step_key"] == "d")
    done = [i for i, (t, p) in enumerate(reporter.events) if t == "step.succeeded" and p["step_key"] in "bc"]
    assert len(done) == 2 and max(done) < started_d
    assert types[-1] == "run.completed" and reporter.of("run.completed")[0]["output"].keys() == {"d"}


async def test_at_most_step_parallelism_steps_run_at_once() -> None:
    gate = Gate()
    spec = spec_of(*({"key": f"s{i}", "tool": "gate"} for i in range(5)))
    reporter = FakeReporter()
    _, task = await start(claim(spec), reporter, tools(gate=gate), config=EngineConfig(step_parallelism=2))
    await gate.entered_by("s0", "s1")
    assert gate.running == 2
    # the others are created but not started while the two slots are taken
    assert {p["step_key"] for p in reporter.of("step.started")} == {"s0", "s1"}
    for i in range(5):
        gate.open(f"s{i}")
    assert await asyncio.wait_for(task, DEADLINE) is Result.SUCCEEDED
    assert gate.most == 2
    assert len(reporter.of("step.succeeded")) == 5


async def test_a_failing_step_is_retried_with_capped_exponential_backoff_and_jitter() -> None:
    waits: list[float] = []
    bounds: list[tuple[float, float]] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    def top(lo: float, hi: float) -> float:
        bounds.append((lo, hi))
        return hi

    spec = spec_of({"key": "flaky", "tool": "fail", "args": {"times": 3, "message": "flaky"},
                    "retry": {"max_attempts": 4, "backoff_seconds": 2, "backoff_max_seconds": 5}})
    result, rep = await run(claim(spec), config=EngineConfig(sleep=no_sleep, jitter=top))
    assert result is Result.SUCCEEDED
    assert bounds == [(1, 2), (2, 4), (2.5, 5)]  # c = min(5, 2 * 2**(k-1)), uniform(c/2, c)
    assert waits == [2, 4, 5]
    failed = rep.of("step.failed", "flaky")
    assert [(f["try"], f["will_retry"], f["code"], f["retryable"], f["tool"]) for f in failed] == [
        (1, True, "tool_failed", True, "fail"), (2, True, "tool_failed", True, "fail"),
        (3, True, "tool_failed", True, "fail")]
    assert [p["try"] for p in rep.of("tool.invoked")] == [1, 2, 3, 4]
    assert len({p["tool_call_id"] for p in rep.of("tool.invoked")}) == 4  # a new tool call per try
    assert rep.of("step.succeeded")[0]["try"] == 4
    assert rep.of("tool.failed")[0] == {"tool_call_id": rep.of("tool.invoked")[0]["tool_call_id"],
                                        "error": "flaky", "output": None}


async def test_a_step_out_of_tries_fails_the_run_and_cancels_the_others_keeping_outputs() -> None:
    gate = Gate()
    spec = spec_of(
        {"key": "ok", "tool": "echo", "args": {"v": 1}},
        {"key": "slow", "tool": "gate"},
        {"key": "bad", "tool": "fail", "depends_on": ["ok"], "args": {"message": "boom"},
         "retry": {"max_attempts": 2, "backoff_seconds": 0.001}},
        {"key": "after", "tool": "echo", "depends_on": ["bad"]},
    )
    reporter = FakeReporter()
    _, task = await start(claim(spec), reporter, tools(gate=gate))
    assert await asyncio.wait_for(task, DEADLINE) is Result.FAILED
    assert gate.cancelled == ["slow"]
    assert reporter.of("step.succeeded", "ok")[0]["output"] == {"v": 1.0}
    assert [f["will_retry"] for f in reporter.of("step.failed", "bad")] == [True, False]
    assert reporter.types("slow") == ["step.created", "step.started", "tool.invoked", "tool.failed", "step.canceled"]
    assert reporter.of("tool.failed")[-1]["error"] == "canceled: step 'bad' failed"
    assert reporter.of("step.canceled") == [{"step_key": "slow", "reason": "run_failed"},
                                            {"step_key": "after", "reason": "run_failed"}]
    assert reporter.types("after") == ["step.created", "step.canceled"]
    assert reporter.events[-1] == ("run.failed", {"error": "step 'bad' failed: boom", "stop_reason": "step_failed",
                                                  "step_key": "bad", "retryable": False})


async def test_a_non_retryable_failure_is_not_retried() -> None:
    spec = spec_of({"key": "x", "tool": "fail", "args": {"retryable": False},
                    "retry": {"max_attempts": 5, "backoff_seconds": 0.001}})
    result, rep = await run(claim(spec))
    assert result is Result.FAILED
    assert [(f["try"], f["retryable"], f["will_retry"]) for f in rep.of("step.failed")] == [(1, False, False)]


async def test_a_resumed_run_skips_done_steps_uses_their_outputs_and_continues_the_try_count() -> None:
    calls: list[str] = []

    async def record(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        calls.append(ctx.step_key)
        return {"got": args, "try": ctx.attempt}

    spec = spec_of(
        {"key": "a", "tool": "record"},
        {"key": "b", "tool": "record", "depends_on": ["a"],
         "input": {"prev": "steps.a.output.n", "file": "steps.a.artifacts[0].name"},
         "retry": {"max_attempts": 4, "backoff_seconds": 0.001}},
        {"key": "c", "tool": "record", "depends_on": ["b"]},
    )
    artifact = {"name": "f.txt", "uri": "mem://x", "sha256": "a" * 64, "size": 3, "media_type": "text/plain"}
    claimed = claim(spec, attempt=2, steps=[
        {"key": "a", "status": "SUCCEEDED", "tries": 1, "output": {"n": 7}, "artifacts": [artifact]},
        {"key": "b", "status": "FAILED", "tries": 2},
    ])
    result, rep = await run(claimed, tools(record=record))
    assert result is Result.SUCCEEDED
    assert calls == ["b", "c"]  # a is never run again
    assert [p["step_key"] for p in rep.of("step.created")] == ["b", "c"]
    assert rep.of("tool.invoked", "b")[0]["input"] == {"prev": 7.0, "file": "f.txt"}
    assert rep.of("step.started", "b") == [{"step_key": "b", "try": 3}]
    assert rep.of("step.succeeded", "b")[0]["output"]["try"] == 3  # ToolContext.attempt is the step's try
    assert rep.of("run.completed") == [{"output": {"c": rep.of("step.succeeded", "c")[0]["output"]}}]


async def test_a_resumed_step_out_of_tries_still_gets_one_try_and_all_done_just_completes() -> None:
    spec = spec_of({"key": "a", "tool": "fail", "retry": {"max_attempts": 2, "backoff_seconds": 0.001}})
    result, rep = await run(claim(spec, steps=[{"key": "a", "status": "FAILED", "tries": 2}]))
    assert result is Result.FAILED
    assert [(f["try"], f["will_retry"]) for f in rep.of("step.failed")] == [(3, False)]
    done = claim(spec, steps=[{"key": "a", "status": "SUCCEEDED", "output": {"z": 1}}])
    result, rep = await run(done)
    assert result is Result.SUCCEEDED
    assert rep.types() == ["run.started", "run.completed"]
    assert rep.of("run.completed") == [{"output": {"a": {"z": 1.0}}}]


async def test_a_selector_that_yields_nothing_fails_the_step_and_the_run() -> None:
    spec = spec_of({"key": "a", "tool": "echo", "input": {"x": "input.missing"}})
    result, rep = await run(claim(spec, {"y": 1}))
    assert result is Result.FAILED
    assert rep.types("a") == ["step.created", "step.started", "step.failed"]
    failed = rep.of("step.failed")[0]
    assert (failed["code"], failed["retryable"], failed["will_retry"], failed["try"]) == ("selector_failed", False,
                                                                                          False, 1)
    assert "input.missing" in failed["error"] and not rep.of("tool.invoked")
    assert rep.of("run.failed")[0]["stop_reason"] == "step_failed"


async def test_cancel_interrupts_running_steps_and_cancels_pending_ones() -> None:
    gate = Gate()
    spec = spec_of({"key": "a", "tool": "gate"}, {"key": "b", "tool": "echo", "depends_on": ["a"]})
    reporter = FakeReporter()
    handle, task = await start(claim(spec), reporter, tools(gate=gate))
    await gate.entered_by("a")
    handle.cancel.set()
    assert await asyncio.wait_for(task, DEADLINE) is Result.CANCELED
    assert gate.cancelled == ["a"]
    assert reporter.types()[-4:] == ["tool.failed", "step.canceled", "step.canceled", "run.canceled"]
    assert reporter.of("tool.failed")[0]["error"] == "canceled"
    assert reporter.of("step.canceled") == [{"step_key": "a", "reason": "canceled"},
                                            {"step_key": "b", "reason": "canceled"}]
    assert reporter.of("run.canceled") == [{"reason": "cancel requested"}]


async def test_cancel_during_backoff_cancels_the_failed_step() -> None:
    sleeping = asyncio.Event()

    async def long_sleep(seconds: float) -> None:
        sleeping.set()
        await asyncio.sleep(60)

    spec = spec_of({"key": "a", "tool": "fail", "retry": {"max_attempts": 3, "backoff_seconds": 1}})
    reporter = FakeReporter()
    handle, task = await start(claim(spec), reporter, tools(), config=EngineConfig(sleep=long_sleep))
    await asyncio.wait_for(sleeping.wait(), DEADLINE)
    handle.cancel.set()
    assert await asyncio.wait_for(task, DEADLINE) is Result.CANCELED
    assert reporter.types("a")[-2:] == ["step.failed", "step.canceled"]
    assert reporter.types()[-1] == "run.canceled"


async def test_release_fails_running_steps_as_interrupted_and_gives_the_run_back() -> None:
    gate = Gate()
    spec = spec_of({"key": "a", "tool": "gate"}, {"key": "b", "tool": "gate"}, {"key": "c", "tool": "echo",
                                                                                "depends_on": ["a"]})
    reporter = FakeReporter()
    handle, task = await start(claim(spec), reporter, tools(gate=gate))
    await gate.entered_by("a", "b")
    handle.release.set()
    assert await asyncio.wait_for(task, DEADLINE) is Result.RELEASED
    assert sorted(gate.cancelled) == ["a", "b"]
    for key in "ab":
        assert reporter.types(key)[-2:] == ["tool.failed", "step.failed"]
        failed = reporter.of("step.failed", key)[0]
        assert (failed["code"], failed["retryable"], failed["will_retry"], failed["error"]) == (
            "interrupted", True, False, "worker shutting down")
    assert reporter.types("c") == ["step.created"]  # pending: nothing
    assert reporter.events[-1] == ("run.failed", {"error": "worker shut down before the run finished",
                                                  "retryable": True, "released": True})


async def test_a_lost_run_stops_at_once_and_reports_nothing_more() -> None:
    gate = Gate()
    spec = spec_of({"key": "a", "tool": "gate"}, {"key": "b", "tool": "echo", "depends_on": ["a"]})
    reporter = FakeReporter()
    handle, task = await start(claim(spec), reporter, tools(gate=gate))
    await gate.entered_by("a")
    count = len(reporter.events)
    handle.lost.set()
    assert await asyncio.wait_for(task, DEADLINE) is Result.LOST
    assert gate.cancelled == ["a"] and len(reporter.events) == count


async def test_a_stale_report_stops_the_run() -> None:
    spec = spec_of({"key": "a", "tool": "echo"}, {"key": "b", "tool": "echo", "depends_on": ["a"]})
    reporter = FakeReporter()
    reporter.stale_on = "tool.succeeded"
    _, task = await start(claim(spec), reporter, tools())
    assert await asyncio.wait_for(task, DEADLINE) is Result.LOST
    # echo is instant: a's whole try rode in the refused report (nothing recorded), and b never started
    assert reporter.reports == []


async def test_a_step_timeout_fails_the_try_as_tool_timeout() -> None:
    spec = spec_of({"key": "a", "tool": "sleep", "args": {"seconds": 30}, "timeout_seconds": 0.05})
    started = time.monotonic()
    result, rep = await run(claim(spec))
    assert result is Result.FAILED and time.monotonic() - started < 5
    failed = rep.of("step.failed")[0]
    assert (failed["code"], failed["retryable"], failed["error"]) == ("tool_timeout", True,
                                                                      "step timed out after 0.05s")


async def test_a_tool_the_worker_lacks_fails_as_unavailable_without_retrying_here() -> None:
    spec = spec_of({"key": "a", "tool": "nope", "retry": {"max_attempts": 3}})
    result, rep = await run(claim(spec))
    assert result is Result.FAILED
    invoked = rep.of("tool.invoked")[0]
    assert invoked["tool"] == "nope" and "tool_version" not in invoked
    assert [(f["code"], f["will_retry"]) for f in rep.of("step.failed")] == [("tool_unavailable", False)]


async def test_runtime_tool_dispatches_names_the_real_tool_and_keeps_run_level_retries() -> None:
    spec = {"name": "runtime.tool", "steps": [{"key": "runtime", "tool": "runtime.dispatch",
                                               "input": {"tool": "input.tool", "args": "input.args || `{}`"}}]}
    result, rep = await run(claim(spec, {"tool": "echo", "args": {"a": 1}}))
    assert result is Result.SUCCEEDED
    assert rep.of("step.created") == [{"step_key": "runtime", "tool": "echo", "depends_on": []}]
    assert rep.of("tool.invoked")[0]["input"] == {"a": 1.0} and rep.of("tool.invoked")[0]["tool"] == "echo"
    assert rep.of("run.completed") == [{"output": {"runtime": {"a": 1.0}}}]
    assert len(rep.reports) == 1  # echo is instant: the whole run in one report, run.completed included

    # a failure ends the run with the tool's retryable and no stop_reason: the API re-queues it
    result, rep = await run(claim(spec, {"tool": "fail", "args": {"message": "flaky", "times": 1}}, attempt=1))
    assert result is Result.FAILED
    assert rep.of("step.failed")[0]["will_retry"] is False
    assert rep.events[-1] == ("run.failed", {"error": "flaky", "retryable": True})
    # the fail tool's `times` counts run attempts for the one-step built-ins
    result, rep = await run(claim(spec, {"tool": "fail", "args": {"message": "flaky", "times": 1}}, attempt=2,
                                  steps=[{"key": "runtime", "status": "FAILED", "tries": 1}]))
    assert result is Result.SUCCEEDED
    assert rep.of("step.started")[0]["try"] == 2


async def test_runtime_tool_without_the_tool_fails_like_before() -> None:
    spec = {"name": "runtime.tool", "steps": [{"key": "runtime", "tool": "runtime.dispatch",
                                               "input": {"tool": "input.tool", "args": "input.args || `{}`"}}]}
    no_shell = {name: tool for name, tool in tools().items() if name != "shell"}
    result, rep = await run(claim(spec, {"tool": "shell", "args": {"command": ["true"]}}), no_shell)
    assert result is Result.FAILED
    assert rep.events[-1] == ("run.failed", {"error": "tool 'shell' is not enabled on this worker (RUN_WORKER_TOOLS)",
                                             "retryable": True})


async def test_artifacts_are_uploaded_recorded_and_fetched_downstream(tmp_path: Path) -> None:
    async def make(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        (Path(ctx.workdir) / "out").mkdir()
        (Path(ctx.workdir) / "out" / "a.txt").write_text("hello")
        ctx.add_artifact("out/a.txt")
        return {}

    async def use(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        path = await ctx.fetch_artifact(args["file"], "in.txt")
        return {"read": Path(path).read_text(), "inside": Path(path).parent == Path(ctx.workdir)}

    spec = spec_of({"key": "a", "tool": "make"},
                   {"key": "b", "tool": "use", "depends_on": ["a"], "input": {"file": "steps.a.artifacts[0]"}})
    store = FakeArtifacts()
    result, rep = await run(claim(spec), tools(make=make, use=use), artifacts=store,
                            config=EngineConfig(workdir=str(tmp_path)))
    assert result is Result.SUCCEEDED
    (artifact,) = rep.of("step.succeeded", "a")[0]["artifacts"]
    assert (artifact["name"], artifact["size"], artifact["media_type"]) == ("out/a.txt", 3 + 2, "text/plain")
    assert rep.of("step.succeeded", "b")[0]["output"] == {"read": "hello", "inside": True}
    assert list(tmp_path.iterdir()) == []  # each try's directory is removed after it


async def test_a_refused_upload_fails_the_try_as_artifact_failed() -> None:
    async def make(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        (Path(ctx.workdir) / "big.bin").write_bytes(b"x")
        ctx.add_artifact("big.bin")
        return {"made": True}

    refused = ArtifactError("upload of artifact 'big.bin' refused: RESOURCE_EXHAUSTED: too big", retryable=False)
    spec = spec_of({"key": "a", "tool": "make", "retry": {"max_attempts": 3}})
    result, rep = await run(claim(spec), tools(make=make), artifacts=FakeArtifacts(refuse=refused))
    assert result is Result.FAILED
    failed = rep.of("step.failed")[0]
    assert (failed["code"], failed["retryable"], failed["will_retry"]) == ("artifact_failed", False, False)
    assert rep.of("tool.failed")[0]["output"] == {"made": True}


async def test_a_tool_returning_a_non_object_fails_not_retryable() -> None:
    async def bad(args: dict[str, Any], ctx: ToolContext) -> Any:
        return [1, 2]

    async def raises(args: dict[str, Any], ctx: ToolContext) -> Any:
        raise ToolError("nope", retryable=False, output={"partial": 1})

    result, rep = await run(claim(spec_of({"key": "a", "tool": "bad"})), tools(bad=bad))
    assert result is Result.FAILED and "returned list, not an object" in rep.of("step.failed")[0]["error"]
    result, rep = await run(claim(spec_of({"key": "a", "tool": "raises"})), tools(raises=raises))
    assert rep.of("tool.failed")[0]["output"] == {"partial": 1.0}


async def test_an_invalid_spec_fails_the_run() -> None:
    claimed = worker_service_pb2.ClaimedRun(run_id="01RUN", workflow="x", attempt=1)
    result, rep = await run(claimed)
    assert result is Result.FAILED
    assert rep.types() == ["run.started", "run.failed"]
    assert rep.of("run.failed")[0]["retryable"] is False


# --- the artifact client against a fake stub ----------------------------------------------------


class FakeStub:
    """UploadArtifact and FetchArtifact as the API answers them, recording what the worker sent."""

    def __init__(self, fetch_chunks: list[bytes] | None = None, error: Any = None) -> None:
        self.sent: list[Any] = []
        self.fetch_chunks = fetch_chunks or []
        self.error = error
        self.fetch_request: Any = None

    async def UploadArtifact(self, requests: Any, timeout: float) -> Any:
        async for r in requests:
            self.sent.append(r)
        if self.error is not None:
            raise self.error
        data = b"".join(r.chunk for r in self.sent[1:])
        sha = hashlib.sha256(data).hexdigest()
        return worker_service_pb2.UploadArtifactResponse(artifact=run_pb2.Artifact(
            name=self.sent[0].header.name, uri=f"file:///store/{sha}", sha256=sha, size=len(data),
            media_type=self.sent[0].header.media_type))

    def FetchArtifact(self, request: Any, timeout: float) -> Any:
        self.fetch_request = request
        chunks, error = self.fetch_chunks, self.error

        async def stream() -> Any:
            for c in chunks:
                yield worker_service_pb2.FetchArtifactResponse(chunk=c)
            if error is not None:
                raise error

        return stream()


def _rpc_error(code: Any, details: str) -> Any:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def test_the_artifact_client_streams_a_header_then_256_kib_chunks_and_checks_fetched_bytes(
    tmp_path: Path,
) -> None:
    class Session:
        worker_id, session_token = "w-1", "tok"

    data = bytes(range(256)) * 2049  # a little over two chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    stub = FakeStub()
    client = ArtifactClient(stub, Session())  # type: ignore[arg-type]
    stored = await client.upload("01RUN", 3, "a", LocalArtifact(str(path), "out/blob.bin", "application/x"))
    header = stub.sent[0].header
    assert (header.worker_id, header.session_token, header.run_id, header.attempt, header.step_key, header.name,
            header.media_type) == ("w-1", "tok", "01RUN", 3, "a", "out/blob.bin", "application/x")
    assert [len(r.chunk) for r in stub.sent[1:]] == [CHUNK_BYTES, CHUNK_BYTES, len(data) - 2 * CHUNK_BYTES]
    assert stored == {"name": "out/blob.bin", "uri": f"file:///store/{hashlib.sha256(data).hexdigest()}",
                      "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "media_type": "application/x"}

    refused = FakeStub(error=_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"))
    with pytest.raises(ArtifactError, match="RESOURCE_EXHAUSTED: too big") as info:
        await ArtifactClient(refused, Session()).upload("01RUN", 3, "a",  # type: ignore[arg-type]
                                                        LocalArtifact(str(path), "b", "x/y"))
    assert info.value.retryable is False
    flaky = FakeStub(error=_rpc_error(grpc.StatusCode.UNAVAILABLE, "down"))
    with pytest.raises(ArtifactError) as info:
        await ArtifactClient(flaky, Session()).upload("01RUN", 3, "a",  # type: ignore[arg-type]
                                                      LocalArtifact(str(path), "b", "x/y"))
    assert info.value.retryable is True

    good = {"name": "x", "sha256": hashlib.sha256(b"hello").hexdigest()}
    fetcher = FakeStub(fetch_chunks=[b"hel", b"lo"])
    await ArtifactClient(fetcher, Session()).fetch("01RUN", 3, good, str(tmp_path / "x"))  # type: ignore[arg-type]
    assert (tmp_path / "x").read_bytes() == b"hello" and fetcher.fetch_request.sha256 == good["sha256"]
    liar = FakeStub(fetch_chunks=[b"bye"])
    with pytest.raises(ArtifactError, match="arrived with sha256"):
        await ArtifactClient(liar, Session()).fetch("01RUN", 3, good, str(tmp_path / "y"))  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "x"]  # no partial file left behind


async def test_an_output_the_api_would_refuse_fails_its_step_not_the_report() -> None:
    """An output past the event limits (too deep, too large) is a step failure with a clear error; the other
    steps' outputs stay and the run fails by step_failed, never by a refused report."""
    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = {"d": deep}
    for output, words in ((deep, "nests deeper than"), ({"blob": "x" * MAX_EVENT_PAYLOAD_BYTES}, "bytes of JSON")):
        async def returns(args: dict[str, Any], ctx: ToolContext, value: Any = output) -> dict[str, Any]:
            return value  # type: ignore[no-any-return]

        spec = spec_of({"key": "ok", "tool": "echo", "args": {"kept": True}},
                       {"key": "big", "tool": "returns", "depends_on": ["ok"]})
        result, rep = await run(claim(spec), tools(returns=returns))
        assert result is Result.FAILED
        failed = rep.of("step.failed", "big")
        assert len(failed) == 1 and words in failed[0]["error"] and failed[0]["retryable"] is False, failed
        assert rep.of("step.succeeded", "ok")[0]["output"] == {"kept": True}
        assert rep.of("run.failed")[0]["stop_reason"] == "step_failed"
        assert [t for t, _ in rep.events].count("tool.succeeded") == 1  # ok's; big's call ended tool.failed


async def test_a_resolved_input_past_the_event_limits_fails_its_step_with_a_clear_error() -> None:
    """A selector can pull a large or deep part of the run input into a step: the step fails (selector_failed)
    before tool.invoked is sent, instead of a refused report failing the run."""
    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH):
        deep = {"d": deep}
    spec = spec_of({"key": "a", "tool": "echo", "input": {"x": "input.deep"}})
    result, rep = await run(claim(spec, {"deep": deep}))
    assert result is Result.FAILED
    (failed,) = rep.of("step.failed", "a")
    assert failed["code"] == "selector_failed" and "nests deeper than" in failed["error"], failed
    assert rep.of("tool.invoked") == []


# --- the step cache and rebuilds ------------------------------------------------------------------


SESSION = type("Session", (), {"worker_id": "w-1", "session_token": "token-1"})()
ART = {"name": "f.txt", "uri": "mem://f", "sha256": "f" * 64, "size": 3, "media_type": "text/plain"}


class FakeCacheStub:
    """LookupStepCache as the API answers it: a hit for the step keys in `hits`, else a miss; or errors first."""

    def __init__(self, hits: dict[str, dict[str, Any]] | None = None, errors: list[Any] | None = None,
                 miss: tuple[str, str] = ("no_entry", "")) -> None:
        self.hits = hits or {}
        self.errors = list(errors or [])
        self.miss = miss
        self.requests: list[Any] = []

    async def LookupStepCache(self, request: Any, timeout: float) -> Any:
        self.requests.append(request)
        if self.errors:
            raise self.errors.pop(0)
        components = json_format.MessageToDict(request.components)
        answer = worker_service_pb2.LookupStepCacheResponse(cache_key=f"key-{request.step_key}",
                                                            display=cache_display(components))
        if request.step_key in self.hits:
            hit = self.hits[request.step_key]
            answer.hit, answer.layer = True, hit.get("layer", "cold")
            answer.output.update(hit["output"])
            answer.source_run_id, answer.source_step_key = "01BASE", request.step_key
            for a in hit.get("artifacts", []):
                answer.artifacts.add(**a)
        else:
            answer.miss_reason, answer.detail = self.miss
        return answer

    @property
    def keys(self) -> list[str]:
        return [r.step_key for r in self.requests]


def cache_client(stub: FakeCacheStub) -> StepCacheClient:
    async def no_wait(_: float) -> None:
        return None

    return StepCacheClient(stub, SESSION, sleep=no_wait)


def counting(calls: list[str]) -> Tool:
    async def record(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        calls.append(ctx.step_key)
        return {"step": ctx.step_key, "got": args}

    return Tool("record", record, version="3")


CACHED_CHAIN = spec_of(
    {"key": "a", "tool": "record", "input": {"x": "input.x"}, "args": {"k": 1}, "cache": {"scope": "global"}},
    {"key": "b", "tool": "record", "depends_on": ["a"], "input": {"up": "steps.a.output", "f": "steps.a.artifacts"},
     "cache": {"scope": "run_only", "ttl_seconds": 60}},
)


async def test_a_cache_hit_skips_the_step_with_the_cached_result_and_runs_no_tool() -> None:
    calls: list[str] = []
    stub = FakeCacheStub(hits={"a": {"output": {"cached": "yes"}, "artifacts": [ART], "layer": "hot"}})
    result, rep = await run(claim(CACHED_CHAIN, {"x": "hi"}), {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED
    assert calls == ["b"]  # a's result came from the cache
    assert rep.types("a") == ["step.created", "step.skipped"]
    assert rep.of("step.skipped") == [{
        "step_key": "a", "reason": "cache_hit", "output": {"cached": "yes"}, "artifacts": [ART],
        "cache": {"key": "key-a", "layer": "hot",
                  "display": cache_display({"workflow": "t", "step": "a", "input": {"x": "hi", "k": 1}})},
        "source_run_id": "01BASE", "source_step_key": "a",
    }]
    # the fenced lookup: who asks, for which attempt, with the key's components (no run id for global)
    request = stub.requests[0]
    assert (request.worker_id, request.session_token, request.run_id, request.attempt, request.scope) == (
        "w-1", "token-1", "01RUN", 1, "global")
    assert json_format.MessageToDict(request.components) == cache_components(
        "t", parse_spec(CACHED_CHAIN).step("a"), "record", "3", {"x": "hi", "k": 1})
    # downstream steps see the cached output and artifacts
    assert rep.of("tool.invoked", "b")[0]["input"] == {"up": {"cached": "yes"}, "f": [ART]}
    assert rep.of("run.completed")[0]["output"]["b"]["got"] == {"up": {"cached": "yes"}, "f": [ART]}


async def test_a_miss_rides_on_step_started_and_step_succeeded_carries_the_components() -> None:
    calls: list[str] = []
    stub = FakeCacheStub(miss=("artifact_missing", "f.txt"))
    result, rep = await run(claim(CACHED_CHAIN, {"x": "hi"}), {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED and calls == ["a", "b"]
    assert stub.keys == ["a", "b"]
    started_a, = rep.of("step.started", "a")
    spec = parse_spec(CACHED_CHAIN)
    assert started_a == {"step_key": "a", "try": 1, "cache": {
        "key": "key-a", "display": cache_display({"workflow": "t", "step": "a", "input": {"x": "hi", "k": 1}}),
        "reason": "artifact_missing", "detail": "f.txt", "scope": "global",
        "components": cache_components("t", spec.step("a"), "record", "3", {"x": "hi", "k": 1})}}
    succeeded_a, succeeded_b = rep.of("step.succeeded", "a")[0], rep.of("step.succeeded", "b")[0]
    assert succeeded_a["cache"] == {"scope": "global", "components": cache_components(
        "t", spec.step("a"), "record", "3", {"x": "hi", "k": 1})}
    b_input = rep.of("tool.invoked", "b")[0]["input"]
    assert succeeded_b["cache"] == {"scope": "run_only", "ttl_seconds": 60, "components": cache_components(
        "t", spec.step("b"), "record", "3", b_input, "01RUN")}
    assert json_format.MessageToDict(stub.requests[1].components)["run_id"] == "01RUN"


async def test_only_the_first_try_asks_the_cache_and_every_success_writes_it() -> None:
    async def flaky(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise ToolError("flaky", retryable=True)
        return {"ok": True}

    spec = spec_of({"key": "a", "tool": "flaky", "cache": {"scope": "global"},
                    "retry": {"max_attempts": 2, "backoff_seconds": 0.001}})
    stub = FakeCacheStub()
    result, rep = await run(claim(spec), tools(flaky=flaky), cache=cache_client(stub))
    assert result is Result.SUCCEEDED and stub.keys == ["a"]
    first, second = rep.of("step.started", "a")
    assert first["cache"]["reason"] == "no_entry" and "cache" not in second
    assert rep.of("step.succeeded", "a")[0]["cache"]["scope"] == "global"


async def test_a_non_deterministic_tool_or_scope_none_never_asks_the_cache() -> None:
    spec = spec_of({"key": "a", "tool": "echo", "args": {"v": 1}},  # scope none
                   {"key": "b", "tool": "sleep", "args": {"seconds": 0}, "cache": {"scope": "global"}},
                   {"key": "c", "tool": "nope", "cache": {"scope": "global"}})  # not on this worker
    stub = FakeCacheStub(hits={"a": {"output": {}}, "b": {"output": {}}})
    result, rep = await run(claim(spec), cache=cache_client(stub))
    assert result is Result.FAILED  # c's tool is missing
    assert stub.requests == []
    assert not any("cache" in p for _, p in rep.events)
    assert rep.of("step.succeeded", "a")[0]["output"] == {"v": 1}


async def test_a_lookup_that_fails_runs_the_step_without_the_cache_and_logs_once(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    unavailable = [_rpc_error(grpc.StatusCode.UNAVAILABLE, "down")] * 3  # the short retry gives up after 3
    stub = FakeCacheStub(errors=[*unavailable, _rpc_error(grpc.StatusCode.UNIMPLEMENTED, "old API")])
    result, rep = await run(claim(CACHED_CHAIN, {"x": "hi"}), {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED and calls == ["a", "b"]
    assert stub.keys == ["a", "a", "a", "b"]
    assert not any("cache" in p for _, p in rep.events)  # no cache fields: an older API would refuse them
    warnings = [r.getMessage() for r in caplog.records if "step cache lookups fail" in r.getMessage()]
    assert len(warnings) == 2 and "UNAVAILABLE" in warnings[0] and "UNIMPLEMENTED" in warnings[1]

    # a short outage: the retry rides it out, and the lookup answers
    stub = FakeCacheStub(errors=[_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "slow")],
                         hits={"a": {"output": {"n": 1}}, "b": {"output": {"n": 2}}})
    calls.clear()
    result, rep = await run(claim(CACHED_CHAIN, {"x": "hi"}), {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED and calls == [] and stub.keys == ["a", "a", "b"]
    assert rep.of("run.completed") == [{"output": {"b": {"n": 2.0}}}]


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION])
async def test_a_lookup_refused_as_not_our_attempt_stops_the_run_like_a_stale_report(code: Any) -> None:
    calls: list[str] = []
    stub = FakeCacheStub(errors=[_rpc_error(code, "not yours")])
    result, rep = await run(claim(CACHED_CHAIN, {"x": "hi"}), {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.LOST and calls == []
    assert rep.types() == []  # nothing was reported: the lookup came first


async def test_a_hit_on_the_last_step_closes_the_run_in_the_same_report() -> None:
    stub = FakeCacheStub(hits={"b": {"output": {"from": "cache"}}})
    result, rep = await run(claim(CACHED_CHAIN, {"x": "hi"}), {"record": counting([])}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED
    assert [t for t, _ in rep.reports[-1]] == ["step.skipped", "run.completed"]
    assert rep.of("run.completed") == [{"output": {"b": {"from": "cache"}}}]


async def test_cancel_during_a_lookup_cancels_the_step_that_never_started() -> None:
    entered, never = asyncio.Event(), asyncio.Event()

    class Hanging(FakeCacheStub):
        async def LookupStepCache(self, request: Any, timeout: float) -> Any:
            entered.set()
            await never.wait()

    reporter = FakeReporter()
    handle, task = await start(claim(CACHED_CHAIN, {"x": "hi"}), reporter, {"record": counting([])},
                               cache=cache_client(Hanging()))
    await asyncio.wait_for(entered.wait(), DEADLINE)
    handle.cancel.set()
    assert await asyncio.wait_for(task, DEADLINE) is Result.CANCELED
    assert reporter.types("a") == ["step.created", "step.canceled"]
    assert reporter.events[-1][0] == "run.canceled"


REBUILD_SPEC = spec_of(
    {"key": "brief", "tool": "record", "cache": {"scope": "global"}},
    {"key": "copy", "tool": "record", "depends_on": ["brief"], "input": {"b": "steps.brief.output"},
     "cache": {"scope": "global"}},
    {"key": "images", "tool": "record", "depends_on": ["brief"], "input": {"b": "steps.brief.output"},
     "cache": {"scope": "global"}},
    {"key": "bundle", "tool": "record", "depends_on": ["copy", "images"],
     "input": {"copy": "steps.copy.output", "images": "steps.images.artifacts"}, "cache": {"scope": "global"}},
)


async def test_a_rebuild_records_reused_steps_first_and_reruns_the_rest_with_refresh() -> None:
    calls: list[str] = []
    stub = FakeCacheStub(hits={"copy": {"output": {"stale": True}}, "bundle": {"output": {"stale": True}}})
    reuse = [{"key": "brief", "status": "SUCCEEDED", "output": {"headline": "H"}},
             {"key": "images", "status": "SUCCEEDED", "output": {"svg": 1}, "artifacts": [ART]}]
    claimed = claim(REBUILD_SPEC, rebuild={"base_run_id": "01BASE", "rerun": ["copy", "bundle"], "reuse": reuse})
    result, rep = await run(claimed, {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED
    assert sorted(calls) == ["bundle", "copy"] and stub.requests == []  # rerun steps skip the lookup
    # the first report: run.started, every step.created, then the reused steps
    assert [t for t, _ in rep.reports[0]] == ["run.started", *["step.created"] * 4, "step.skipped", "step.skipped"]
    assert rep.of("step.skipped") == [
        {"step_key": "brief", "reason": "reused_from_base", "output": {"headline": "H"}, "artifacts": [],
         "source_run_id": "01BASE", "source_step_key": "brief"},
        {"step_key": "images", "reason": "reused_from_base", "output": {"svg": 1.0}, "artifacts": [ART],
         "source_run_id": "01BASE", "source_step_key": "images"},
    ]
    assert rep.of("step.started", "copy") == [{"step_key": "copy", "try": 1, "cache": {"reason": "refresh"}}]
    assert rep.of("tool.invoked", "copy")[0]["input"] == {"b": {"headline": "H"}}
    assert rep.of("tool.invoked", "bundle")[0]["input"]["images"] == [ART]  # the base's exact artifacts
    for key in ("copy", "bundle"):  # their new results refresh the cache
        assert rep.of("step.succeeded", key)[0]["cache"]["scope"] == "global"


async def test_a_resumed_rebuild_does_not_reuse_again_and_steps_in_neither_set_ask_the_cache() -> None:
    calls: list[str] = []
    stub = FakeCacheStub(hits={"images": {"output": {"svg": 2}}})
    reuse = [{"key": "brief", "status": "SUCCEEDED", "output": {"headline": "H"}}]
    claimed = claim(REBUILD_SPEC, attempt=2, rebuild={"base_run_id": "01BASE", "rerun": ["copy"], "reuse": reuse},
                    steps=[{"key": "brief", "status": "SKIPPED", "output": {"headline": "H"}},
                           {"key": "copy", "status": "FAILED", "tries": 1}])
    result, rep = await run(claimed, {"record": counting(calls)}, cache=cache_client(stub))
    assert result is Result.SUCCEEDED
    assert [p["step_key"] for p in rep.of("step.skipped")] == ["images"]  # brief was recorded by attempt 1
    assert rep.of("step.skipped", "images")[0]["reason"] == "cache_hit"
    assert sorted(stub.keys) == ["bundle", "images"]
    assert rep.of("step.started", "copy") == [{"step_key": "copy", "try": 2, "cache": {"reason": "refresh"}}]
    assert sorted(calls) == ["bundle", "copy"]


async def test_a_rebuild_reusing_every_step_just_completes() -> None:
    spec = spec_of({"key": "a", "tool": "echo", "args": {"v": 1}})
    claimed = claim(spec, rebuild={"base_run_id": "01BASE", "reuse": [
        {"key": "a", "status": "SUCCEEDED", "output": {"v": 1}}]})
    result, rep = await run(claimed)
    assert result is Result.SUCCEEDED
    assert rep.types() == ["run.started", "step.created", "step.skipped", "run.completed"]
    assert rep.of("run.completed") == [{"output": {"a": {"v": 1.0}}}]


def test_a_claimed_spec_is_parsed_once_per_version() -> None:
    one, two = claim(spec_of({"key": "a", "tool": "echo"})), claim(spec_of({"key": "a", "tool": "echo"}))
    assert _parsed(one.spec) is _parsed(two.spec)  # frozen: runs of one version share it
    other = claim(spec_of({"key": "b", "tool": "echo"}))
    assert _parsed(other.spec) is not _parsed(one.spec) and _parsed(other.spec).steps[0].key == "b"
