"""Executes one claimed run as a DAG: decides which steps run next, retries them, reports every event.

The claim carries the run's pinned spec and what earlier attempts left of its steps; a step that
succeeded (or was skipped) is never run again, its output and artifacts feed the run context.
Ready steps run concurrently, at most `EngineConfig.step_parallelism` at once; each try is one
tool call (services/run_worker/executor.py) announced before it runs. A step that fails for good
stops the others and fails the run; cancel, release and a lost lease stop it too. The events of
one step are reported in order (each report awaited before the next); steps report concurrently.

A cacheable step (spec cache.scope global or run_only, and a deterministic tool) asks the step
cache before its first try in an attempt (services/run_worker/step_cache.py): a hit is recorded as
step.skipped with the cached output and artifacts and runs no tool; a miss rides on step.started
with its reason, and step.succeeded carries the key's components so the API stores the result. A
rebuild (ClaimedRun.rebuild) first records the base run's reused steps as step.skipped
(reused_from_base); the steps it re-runs skip the lookup (reason refresh) and refresh the cache.

`runtime.noop` and `runtime.tool` keep the run-level retries: their one step makes one try per
run attempt and a failure fails the run with the tool's `retryable`, so the API re-queues it.
The same code serves the standalone worker, `--once` and the API's embedded worker.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from opentelemetry import trace
from ulid import ULID

from services.run_worker.artifacts import ArtifactClient
from services.run_worker.executor import (
    Interrupted,
    Result,
    RunHandle,
    TryCall,
    TryResult,
    race,
    run_try,
    unavailable,
)
from services.run_worker.reporter import Reporter, ReporterClosed, ReportRefused, StaleAttempt, make_event, restamp
from services.run_worker.step_cache import CacheHit, CacheMiss, StepCache, StepCacheClient, artifact_dict
from services.run_worker.tools import Json, LocalArtifact, Tool
from shared.backoff import Uniform, backoff_seconds
from shared.events import STEP_DONE, EventType, StepErrorCode, StopReason
from shared.gen.runs.v1 import run_pb2
from shared.limits import MAX_EVENT_PAYLOAD_BYTES, MAX_JSON_DEPTH, json_depth
from shared.logs import log_context
from shared.telemetry import context_from_carrier
from shared.workflow import (
    SelectorError,
    SpecError,
    StepSpec,
    WorkflowSpec,
    cache_components,
    from_proto_dict,
    parse_spec,
    ready,
    resolve_input,
    run_context,
    sinks,
    upstream,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("runs.worker")

# Workflows whose one step's tries are the run's attempts (run-level max_attempts and backoff).
ONE_STEP_BUILTINS = frozenset({"runtime.noop", "runtime.tool"})
# The pseudo-tool of runtime.tool: the step invokes the tool its resolved `tool` names, with `args`.
DISPATCH = "runtime.dispatch"
# A step's output travels in tool.succeeded and in step.succeeded (with its artifacts): keep it well under the
# API's limit of one event's payload.
MAX_OUTPUT_BYTES = MAX_EVENT_PAYLOAD_BYTES - 64 * 1024
# ... and it nests two levels down in run.completed's payload ({"output": {sink: output}}).
MAX_OUTPUT_DEPTH = MAX_JSON_DEPTH - 1
RUNNER_CLEANUP_SECONDS = 10.0
CANCEL_REASON = "cancel requested"
RELEASED_ERROR = "worker shut down before the run finished"
SHUTTING_DOWN = "worker shutting down"


@dataclass(frozen=True)
class EngineConfig:
    """How the orchestrator runs steps; `sleep` and `jitter` are seams for tests."""

    step_parallelism: int = 8
    workdir: str = ""  # under which each try gets its fresh directory ("": the system's temporary folder)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Uniform = random.uniform
    # Told of each tool call that ran to its end: (tool, seconds, ok); the worker's metrics.
    on_tool: Callable[[str, float, bool], None] | None = None

    def __post_init__(self) -> None:
        if self.step_parallelism < 1:
            raise ValueError("step_parallelism must be at least 1")


async def execute(
    claimed: Any, handle: RunHandle, reporter: Reporter, tools: Mapping[str, Tool],
    artifacts: ArtifactClient | None = None, config: EngineConfig | None = None, cache: StepCache | None = None,
) -> Result:
    """Run one claimed run (a ClaimedRun message) to its end and report it.

    `cache` answers the step cache lookups; by default LookupStepCache over the reporter's stub (no
    cache at all, hence no lookups and no cache fields in events, for a reporter without one).
    """
    if cache is None and getattr(reporter, "stub", None) is not None:
        cache = _default_cache(reporter)
    run_id, attempt = claimed.run_id, handle.attempt
    parent = context_from_carrier(dict(claimed.trace_context))
    with log_context(run_id=run_id, attempt=attempt), tracer.start_as_current_span(
        "run.execute", context=parent, attributes={"run.id": run_id, "run.attempt": attempt}
    ):
        try:
            return await _Run(claimed, handle, reporter, tools, artifacts, config or EngineConfig(), cache).run()
        except StaleAttempt as err:
            log.warning("attempt is no longer current; stopping the run: %s", err)
            return Result.LOST
        except ReportRefused as err:
            return await _fail_refused(run_id, handle, reporter, err)


# Specs parsed from claims, by their encoding (frozen, so runs of one version share one): most claims
# carry a handful of versions, and parsing one is a good part of what a fast run costs the worker.
_SPECS: OrderedDict[bytes, WorkflowSpec] = OrderedDict()
_SPECS_KEPT = 256


def _parsed(message: Any) -> WorkflowSpec:
    """The claim's spec parsed (SpecError when it is invalid; those are never kept)."""
    key = message.SerializeToString(deterministic=True)
    spec = _SPECS.get(key)
    if spec is None:
        raw = json_format.MessageToDict(message, preserving_proto_field_name=True)
        spec = _SPECS[key] = parse_spec(from_proto_dict(raw))
        if len(_SPECS) > _SPECS_KEPT:
            _SPECS.popitem(last=False)
    else:
        _SPECS.move_to_end(key)
    return spec


# One lookup client per reporter, i.e. per worker (an outage is logged once per worker, not once per run).
_CACHES: weakref.WeakKeyDictionary[Reporter, StepCache] = weakref.WeakKeyDictionary()


def _default_cache(reporter: Reporter) -> StepCache:
    """LookupStepCache over the reporter's stub, with its worker id and session token."""
    cache = _CACHES.get(reporter)
    if cache is None:
        cache = _CACHES[reporter] = StepCacheClient(reporter.stub, reporter)
    return cache


async def _send(reporter: Reporter, handle: RunHandle, events: list[Any]) -> list[Any]:
    """Report events; if the run was re-adopted under a new attempt meanwhile, re-send them under it."""
    while True:
        try:
            return await reporter.report(events)
        except StaleAttempt:
            if not events or handle.lost.is_set() or handle.attempt == events[0].attempt:
                raise
            events = [restamp(e, handle.attempt) for e in events]


async def _fail_refused(run_id: str, handle: RunHandle, reporter: Reporter, err: ReportRefused) -> Result:
    """A report of the run was refused: end the run FAILED with a plain event that cannot be refused the same way."""
    if err.not_ours:
        # The reporter logged the API's answer ("report refused: ..."): not printed a second time here.
        log.error("the API does not accept this worker's reports for the run; stopping it", extra={"run_id": run_id})
        return Result.LOST  # its lease lapses and the reaper gives it to another worker
    error = f"the worker's report was refused: {str(err)[:500]}"
    log.error("report refused; failing the run", extra={"run_id": run_id})
    try:
        await _send(reporter, handle, [make_event(run_id, handle.attempt, EventType.RUN_FAILED,
                                                  {"error": error, "retryable": False})])
    except (StaleAttempt, ReportRefused, ReporterClosed):
        return Result.LOST  # not ours any more, or the API refuses even that: the lease reaper ends it
    return Result.FAILED


class _Stop(enum.Enum):
    """Why the running steps are being stopped (the value is step.canceled's reason)."""

    RUN_FAILED = "run_failed"
    CANCELED = "canceled"
    RELEASED = "released"
    LOST = "lost"


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def _output_problem(output: Any) -> str | None:
    """Why a tool's output cannot be recorded (the API's event limits), or None."""
    if json_depth(output) > MAX_OUTPUT_DEPTH:
        return f"the tool's output nests deeper than {MAX_OUTPUT_DEPTH} levels"
    size = _json_size(output)
    if size > MAX_OUTPUT_BYTES:
        return f"the tool's output is {size} bytes of JSON; at most {MAX_OUTPUT_BYTES} are recorded"
    return None


def _input_problem(args: Any) -> str | None:
    """Why a step's resolved input cannot travel in its tool.invoked event, or None."""
    if json_depth(args) > MAX_JSON_DEPTH:
        return f"the step's resolved input nests deeper than {MAX_JSON_DEPTH} levels"
    if (size := _json_size(args)) > MAX_OUTPUT_BYTES:
        return f"the step's resolved input is {size} bytes of JSON; at most {MAX_OUTPUT_BYTES} are recorded"
    return None


def _step_status(value: run_pb2.StepStatus.ValueType) -> str:
    return str(run_pb2.StepStatus.Name(value)).removeprefix("STEP_STATUS_")


def _fits(payload: Mapping[str, Any]) -> bool:
    """Whether an event payload stays within what the API records (its size and nesting)."""
    return json_depth(payload, MAX_JSON_DEPTH + 2) <= MAX_JSON_DEPTH + 1 and _json_size(payload) <= MAX_OUTPUT_BYTES


@dataclass(frozen=True)
class _Cacheable:
    """A cacheable step's try: the components of its key (the API adds the tenant and hashes them)."""

    components: Json
    scope: str
    ttl_seconds: int | None

    def written(self) -> Json:
        """step.succeeded's `cache`: the API keys the result and stores it."""
        out: Json = {"components": self.components, "scope": self.scope}
        if self.ttl_seconds is not None:
            out["ttl_seconds"] = self.ttl_seconds
        return out


class _Run:
    """One attempt of one run: the state of its steps and the tasks running them."""

    def __init__(self, claimed: Any, handle: RunHandle, reporter: Reporter, tools: Mapping[str, Tool],
                 artifacts: ArtifactClient | None, config: EngineConfig, cache: StepCache | None = None) -> None:
        self.claimed = claimed
        self.run_id = claimed.run_id
        self.handle = handle
        self.reporter = reporter
        self.tools = tools
        self.artifacts = artifacts
        self.config = config
        self.cache = cache
        self.rebuild = claimed.rebuild if claimed.HasField("rebuild") else None
        self.rerun = frozenset(self.rebuild.rerun) if self.rebuild is not None else frozenset()
        self.uncached: set[str] = set()  # steps whose lookup failed: they run without the cache in this attempt
        self.builtin = claimed.workflow in ONE_STEP_BUILTINS
        self.run_input = json_format.MessageToDict(claimed.input)
        self.spec: WorkflowSpec | None = None
        self.results: dict[str, Json] = {}  # done steps: {"output", "artifacts"}
        self.tries: dict[str, int] = {}  # tries so far, over every attempt
        self.started: set[str] = set()  # steps that reported step.started in this attempt
        self.runners: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(config.step_parallelism)
        self.stop = asyncio.Event()
        self.stop_reason: _Stop | None = None
        self.failure: tuple[str, str] | None = None  # (step key, error) of the step that failed the run
        self.closed: Result | None = None  # set when a step's report carried the run's closing event
        self.prefix: list[Any] | None = None  # run.started and step.created: sent with the first report
        self.prefix_sent: asyncio.Future[None] | None = None

    # --- reporting ------------------------------------------------------------------------------

    def ev(self, type_: str, payload: dict[str, Any] | None = None) -> Any:
        return make_event(self.run_id, self.handle.attempt, type_, payload)

    async def report(self, events: list[Any]) -> None:
        """Report events of one step (or of the run); the first report carries run.started and step.created."""
        if self.prefix is not None:
            events, self.prefix = [*self.prefix, *events], None
            self.prefix_sent = asyncio.get_running_loop().create_future()
            self.prefix_sent.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await _send(self.reporter, self.handle, events)
            except BaseException as err:
                self.prefix_sent.set_exception(err if isinstance(err, Exception) else ReporterClosed("stopped"))
                raise
            self.prefix_sent.set_result(None)
            return
        if self.prefix_sent is not None:
            # step.created must be recorded before a step's next event; if that report failed, so does this one
            await asyncio.shield(self.prefix_sent)
        await _send(self.reporter, self.handle, events)

    # --- the run --------------------------------------------------------------------------------

    async def run(self) -> Result:
        if self.handle.lost.is_set():
            return Result.LOST
        try:
            self.spec = spec = _parsed(self.claimed.spec)
        except SpecError as err:
            message = f"the run's workflow spec is invalid: {err}"[:4000]
            await self.report([self.ev(EventType.RUN_STARTED),
                               self.ev(EventType.RUN_FAILED, {"error": message, "retryable": False})])
            return Result.FAILED
        keys = {s.key for s in spec.steps}
        for state in self.claimed.steps:
            if state.step_key not in keys:
                continue
            self.tries[state.step_key] = state.tries
            if _step_status(state.status) in STEP_DONE:
                self.results[state.step_key] = {
                    "output": json_format.MessageToDict(state.output),
                    "artifacts": [artifact_dict(a) for a in state.artifacts],
                }
        self.prefix = [self.ev(EventType.RUN_STARTED)] + [
            self.ev(EventType.STEP_CREATED, {"step_key": s.key, "tool": self._created_tool(s),
                                             "depends_on": list(s.depends_on)})
            for s in spec.steps if s.key not in self.results
        ]
        await self._reuse_from_base(keys)
        if len(self.results) == len(spec.steps):
            await self.report([self._completed()])
            return Result.SUCCEEDED
        try:
            return await self._loop(spec)
        finally:
            for task in self.runners.values():
                task.cancel()
            if self.runners:  # a cancelled tool cleans up (shell kills its process group) before the slot frees
                await asyncio.wait(list(self.runners.values()), timeout=RUNNER_CLEANUP_SECONDS)

    async def _reuse_from_base(self, keys: set[str]) -> None:
        """A rebuild: record the base run's steps it reuses, with their exact outputs and artifacts, first."""
        if self.rebuild is None:
            return
        reused: dict[str, Json] = {}
        events = []
        for state in self.rebuild.reuse:
            key = state.step_key
            if key not in keys or key in self.results or key in self.rerun or key in reused:
                continue
            done = reused[key] = {"output": json_format.MessageToDict(state.output),
                                  "artifacts": [artifact_dict(a) for a in state.artifacts]}
            events.append(self.ev(EventType.STEP_SKIPPED, {
                "step_key": key, "reason": "reused_from_base", **done,
                "source_run_id": self.rebuild.base_run_id, "source_step_key": key,
            }))
        if events:
            await self.report(events)  # with run.started and step.created: the first report
            self.results.update(reused)  # done only once recorded

    def _created_tool(self, step: StepSpec) -> str:
        tool = self.run_input.get("tool") if step.tool == DISPATCH else step.tool
        return tool if isinstance(tool, str) and tool else step.tool

    def _completed(self, last: dict[str, Json] | None = None) -> Any:
        """run.completed with the sinks' outputs (`last`: a step whose success rides in the same report)."""
        assert self.spec is not None
        results = {**self.results, **(last or {})}
        output = {key: results[key]["output"] for key in sinks(self.spec)}
        if _json_size(output) > MAX_OUTPUT_BYTES:  # many large sinks: each keeps its output on its step
            output = {key: {"truncated": True, "bytes": _json_size(value)} for key, value in output.items()}
        return self.ev(EventType.RUN_COMPLETED, {"output": output})

    def _request_stop(self, reason: _Stop) -> bool:
        """Stop the running steps for `reason`, unless they are stopping already (a lost lease always wins)."""
        if self.stop_reason is not None and reason is not _Stop.LOST:
            return False
        self.stop_reason = reason
        self.stop.set()
        return True

    async def _loop(self, spec: WorkflowSpec) -> Result:
        launched: set[str] = set()
        signals = (self.handle.lost, self.handle.release, self.handle.cancel)
        while True:
            self._raise_runner_errors()
            if self.stop.is_set():
                return await self._finish()
            if self.closed is None:
                for key in ready(spec, set(self.results), launched):
                    launched.add(key)
                    self.runners[key] = asyncio.create_task(self._runner(spec.step(key)), name=f"step-{key}")
            live = [t for t in self.runners.values() if not t.done()]
            if not live:
                if self.closed is not None:  # a step's last report closed the run
                    return self.closed
                if len(self.results) == len(spec.steps):  # the last steps' successes came back together
                    await self.report([self._completed()])
                    return Result.SUCCEEDED
                raise RuntimeError("no step of the run can run and the run has not ended")
            waiters = [asyncio.ensure_future(s.wait()) for s in signals]
            try:
                await asyncio.wait([*live, *waiters], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            for signal, reason in zip(signals, (_Stop.LOST, _Stop.RELEASED, _Stop.CANCELED), strict=True):
                if signal.is_set():
                    self._request_stop(reason)
                    break

    def _raise_runner_errors(self) -> None:
        """A runner that raised (a stale attempt, a refused report): stop every step silently and raise it."""
        for task in self.runners.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._request_stop(_Stop.LOST)
                for other in self.runners.values():
                    other.cancel()
                raise task.exception()  # type: ignore[misc]

    async def _finish(self) -> Result:
        """The steps are stopping: let them report how they stopped, then close the run."""
        live = [t for t in self.runners.values() if not t.done()]
        if live and self.stop_reason is not _Stop.LOST:
            everything: asyncio.Future[Any] = asyncio.gather(*live, return_exceptions=True)
            lost: asyncio.Future[Any] = asyncio.ensure_future(self.handle.lost.wait())
            await asyncio.wait([everything, lost], return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            if self.handle.lost.is_set():
                self._request_stop(_Stop.LOST)
        if self.stop_reason is _Stop.LOST:
            for task in self.runners.values():
                task.cancel()
            await asyncio.gather(*self.runners.values(), return_exceptions=True)
            return Result.LOST
        self._raise_runner_errors()
        if self.closed is not None:
            return self.closed
        if self.stop_reason is _Stop.RELEASED:
            await self.report([self.ev(EventType.RUN_FAILED,
                                       {"error": RELEASED_ERROR, "retryable": True, "released": True})])
            return Result.RELEASED
        assert self.spec is not None and self.stop_reason is not None
        pending = [s.key for s in self.spec.steps if s.key not in self.results and s.key not in self.started]
        cancels = [self.ev(EventType.STEP_CANCELED, {"step_key": k, "reason": self.stop_reason.value})
                   for k in pending]
        if self.stop_reason is _Stop.CANCELED:
            await self.report([*cancels, self.ev(EventType.RUN_CANCELED, {"reason": CANCEL_REASON})])
            return Result.CANCELED
        assert self.failure is not None
        key, error = self.failure
        await self.report([*cancels, self.ev(EventType.RUN_FAILED, {
            "error": f"step {key!r} failed: {error}"[:8000], "stop_reason": StopReason.STEP_FAILED.value,
            "step_key": key, "retryable": False,
        })])
        return Result.FAILED

    # --- one step -------------------------------------------------------------------------------

    async def _runner(self, step: StepSpec) -> None:
        """Run a step's tries (bounded by its retry policy; one for the one-step built-ins) with backoff."""
        prior = self.tries.get(step.key, 0)
        limit = 1 if self.builtin else max(step.retry.max_attempts - prior, 1)
        for i in range(limit):
            try:
                if i:
                    delay = backoff_seconds(self.tries[step.key], step.retry.backoff_seconds,
                                            step.retry.backoff_max_seconds, self.config.jitter)
                    await race(asyncio.ensure_future(self.config.sleep(delay)), [self.stop])
                await race(asyncio.ensure_future(self.slots.acquire()), [self.stop])
            except Interrupted:
                if i:  # the step FAILED and was waiting to retry
                    await self._report_stopped_between_tries(step)
                return  # else it never started: the run's closing report cancels it
            try:
                if self.stop.is_set():
                    if i:
                        await self._report_stopped_between_tries(step)
                    return
                if await self._try(step, first=i == 0, last=i == limit - 1):
                    return
            finally:
                self.slots.release()

    async def _report_stopped_between_tries(self, step: StepSpec) -> None:
        if self.stop_reason in (_Stop.RUN_FAILED, _Stop.CANCELED):
            assert self.stop_reason is not None
            await self.report([self.ev(EventType.STEP_CANCELED,
                                       {"step_key": step.key, "reason": self.stop_reason.value})])

    async def _try(self, step: StepSpec, first: bool, last: bool) -> bool:
        """One try: announce it, run the tool, report how it ended; True when the step is finished.

        The first try of a cacheable step in this attempt asks the cache first: a hit finishes the
        step with the cached result (step.skipped, no tool call), a miss rides on step.started.
        """
        assert self.spec is not None
        key = step.key
        try:
            args = resolve_input(step, run_context(self.run_input, self.results, upstream(self.spec, key)))
            name, args = self._dispatch(step, args)
            if problem := _input_problem(args):
                raise SelectorError("", "", problem)
        except SelectorError as err:
            error = err.message
            n = self._next_try(key)
            await self.report([self.ev(EventType.STEP_STARTED, {"step_key": key, "try": n}),
                               self._step_failed(key, error, StepErrorCode.SELECTOR_FAILED, False, False,
                                                 self._created_tool(step), n),
                               *self._failed_for_good(key, error, False)])
            return True
        tool = self.tools.get(name)
        cacheable = self._cacheable(step, name, tool, args)
        started: Json = {"step_key": key}
        if cacheable is not None and first:
            if key in self.rerun:  # a rebuild re-executes it: no lookup, its new result refreshes the cache
                started["cache"] = {"reason": "refresh"}
            else:
                try:
                    found = await race(asyncio.ensure_future(self._lookup(key, cacheable)), [self.stop])
                except Interrupted:
                    return True  # never started: the run's closing report cancels it
                if isinstance(found, CacheHit):
                    await self._report_hit(key, found)
                    return True
                if isinstance(found, CacheMiss):
                    # The components ride along, so ExplainStep can compare a miss before the step ends.
                    started["cache"] = {**_miss(found), "components": cacheable.components, "scope": cacheable.scope}
                else:
                    self.uncached.add(key)
                    cacheable = None
        n = started["try"] = self._next_try(key)
        call_id = str(ULID())
        invoked = {"tool_call_id": call_id, "step_key": key, "tool": name, "input": args, "try": n}
        if tool is not None:
            invoked["tool_version"] = tool.version
        announce = [self.ev(EventType.STEP_STARTED, started), self.ev(EventType.TOOL_INVOKED, invoked)]
        if tool is None or not tool.instant:
            # Recorded before the tool runs: a stale attempt learns it here, before doing any work.
            await self.report(announce)
            announce = []
        # else an instant tool has nothing a stale attempt could harm: its try is announced with its result
        if tool is None:
            result = unavailable(name)
        else:
            call = TryCall(
                run_id=self.run_id, step_key=key, attempt=self.handle.attempt if self.builtin else n,
                timeout_seconds=step.timeout_seconds, workdir_base=self.config.workdir,
                fetcher=self._fetch if self.artifacts is not None else None,
                upload=self._uploader(key) if self.artifacts is not None else None,
            )
            began = time.perf_counter()
            try:
                result = await race(asyncio.ensure_future(run_try(tool, args, call)), [self.stop])
            except Interrupted:
                await self._report_interrupted(key, call_id, name, n, announce)
                return True
            if self.config.on_tool is not None:
                self.config.on_tool(name, time.perf_counter() - began, result.ok)
        return await self._report_result(key, call_id, name, n, result, last, cacheable, announce)

    def _next_try(self, key: str) -> int:
        """Number the step's next try (across attempts) and count the step as started in this attempt."""
        n = self.tries[key] = self.tries.get(key, 0) + 1
        self.started.add(key)
        return n

    def _cacheable(self, step: StepSpec, name: str, tool: Tool | None, args: Json) -> _Cacheable | None:
        """The key components of a try whose result may be cached, or None (scope none, no tool, not deterministic)."""
        if (self.cache is None or step.cache.scope not in ("global", "run_only") or tool is None
                or not tool.deterministic or step.key in self.uncached):
            return None
        run_only = step.cache.scope == "run_only"
        components = cache_components(self.claimed.workflow, step, name, tool.version, args,
                                      self.run_id if run_only else None)
        if not _fits({"cache": {"components": components}}):
            log.warning("step %s is not cached: its key's components are past the event limits", step.key)
            return None
        return _Cacheable(components, step.cache.scope, step.cache.ttl_seconds)

    async def _lookup(self, key: str, cacheable: _Cacheable) -> CacheHit | CacheMiss | None:
        """Ask the cache under the current attempt (again under a newer one, if the run was re-adopted meanwhile)."""
        assert self.cache is not None
        while True:
            attempt = self.handle.attempt
            try:
                return await self.cache.lookup(self.run_id, attempt, key, cacheable.components, cacheable.scope)
            except StaleAttempt:
                if self.handle.lost.is_set() or self.handle.attempt == attempt:
                    raise

    async def _report_hit(self, key: str, hit: CacheHit) -> None:
        """A valid cached result: the step is skipped with it, and counts as done once that is recorded."""
        log.info("step %s: cache hit %s (%s, %s layer) from run %s", key, hit.display, hit.key, hit.layer,
                 hit.source_run_id)
        done = {"output": hit.output, "artifacts": hit.artifacts}
        await self._report_done(key, done, [self.ev(EventType.STEP_SKIPPED, {
            "step_key": key, "reason": "cache_hit", **done,
            "cache": {"key": hit.key, "display": hit.display, "layer": hit.layer},
            "source_run_id": hit.source_run_id, "source_step_key": hit.source_step_key,
        })])

    async def _report_done(self, key: str, done: Json, events: list[Any]) -> None:
        """Report a step's success or skip; the step counts as done (downstream, run.completed) once recorded."""
        assert self.spec is not None
        # run.completed rides in this report only when every other step's success already is recorded:
        # else the loop sends it after the last report comes back, so it is never recorded first.
        if all(k in self.results for k in self.spec.keys if k != key):
            events.append(self._completed({key: done}))
            self.closed = Result.SUCCEEDED
        await self.report(events)
        self.results[key] = done

    def _dispatch(self, step: StepSpec, args: Json) -> tuple[str, Json]:
        """The tool a try invokes and its input (runtime.dispatch: the resolved `tool` with the resolved `args`)."""
        if step.tool != DISPATCH:
            return step.tool, args
        tool, tool_args = args.get("tool"), args.get("args", {})
        if not isinstance(tool, str) or not tool:
            raise SelectorError("tool", "tool", "input.tool must name a tool")
        if not isinstance(tool_args, dict):
            raise SelectorError("args", "args", "input.args must be an object")
        return tool, tool_args

    async def _fetch(self, artifact: Mapping[str, Any], dest: str) -> None:
        assert self.artifacts is not None
        await self.artifacts.fetch(self.run_id, self.handle.attempt, artifact, dest)

    def _uploader(self, key: str) -> Callable[[LocalArtifact], Awaitable[Json]]:
        async def upload(artifact: LocalArtifact) -> Json:
            assert self.artifacts is not None
            return await self.artifacts.upload(self.run_id, self.handle.attempt, key, artifact)

        return upload

    def _step_failed(self, key: str, error: str, code: str, retryable: bool, will_retry: bool, tool: str,
                     n: int) -> Any:
        return self.ev(EventType.STEP_FAILED, {"step_key": key, "error": error[:8000], "code": str(code),
                                               "retryable": retryable, "will_retry": will_retry, "tool": tool,
                                               "try": n})

    async def _report_result(self, key: str, call_id: str, tool: str, n: int, result: TryResult,
                             last: bool, cacheable: _Cacheable | None = None, announce: list[Any] | None = None
                             ) -> bool:
        """Report how a try ended (after `announce`, the try's start when it was not reported yet)."""
        first = list(announce or [])
        if result.ok and (too_big := _output_problem(result.output)):
            result = TryResult(output=None, error=too_big, code=StepErrorCode.TOOL_FAILED, retryable=False)
        if result.ok:
            done = {"output": result.output, "artifacts": result.artifacts}
            succeeded: Json = {"step_key": key, **done, "try": n}
            if cacheable is not None:
                if _fits({**succeeded, "cache": cacheable.written()}):
                    succeeded["cache"] = cacheable.written()
                else:
                    log.warning("step %s's result is not cached: with its key's components it is past the event "
                                "limits", key)
            await self._report_done(key, done, [
                *first,
                self.ev(EventType.TOOL_SUCCEEDED, {"tool_call_id": call_id, "output": result.output}),
                self.ev(EventType.STEP_SUCCEEDED, succeeded),
            ])
            return True
        assert result.error is not None and result.code is not None
        # The same worker would not find a missing tool on a second try: that is for another attempt.
        will_retry = result.retryable and not last and result.code != StepErrorCode.TOOL_UNAVAILABLE
        events = [
            *first,
            self.ev(EventType.TOOL_FAILED, {"tool_call_id": call_id, "error": result.error[:8000],
                                            "output": result.output}),
            self._step_failed(key, result.error, result.code, result.retryable, will_retry, tool, n),
        ]
        if not will_retry:
            events += self._failed_for_good(key, result.error, result.retryable)
        await self.report(events)
        return not will_retry

    def _failed_for_good(self, key: str, error: str, retryable: bool) -> list[Any]:
        """A step failed with no try left: the one-step built-ins close the run here; a DAG stops its steps."""
        if self.builtin:
            self.closed = Result.FAILED
            return [self.ev(EventType.RUN_FAILED, {"error": error[:8000], "retryable": retryable})]
        if self._request_stop(_Stop.RUN_FAILED):
            self.failure = (key, error)
        return []

    async def _report_interrupted(self, key: str, call_id: str, tool: str, n: int,
                                  announce: list[Any] | None = None) -> None:
        """The try was stopped mid-call: say how (after `announce`, its start if not reported yet), unless
        the run is no longer ours."""
        reason = self.stop_reason
        first = list(announce or [])
        if reason is _Stop.RELEASED:
            await self.report([
                *first,
                self.ev(EventType.TOOL_FAILED, {"tool_call_id": call_id, "error": SHUTTING_DOWN}),
                self._step_failed(key, SHUTTING_DOWN, StepErrorCode.INTERRUPTED, True, False, tool, n),
            ])
        elif reason is _Stop.RUN_FAILED or reason is _Stop.CANCELED:
            error = "canceled" if reason is _Stop.CANCELED else f"canceled: step {self._failed_key()!r} failed"
            await self.report([
                *first,
                self.ev(EventType.TOOL_FAILED, {"tool_call_id": call_id, "error": error}),
                self.ev(EventType.STEP_CANCELED, {"step_key": key, "reason": reason.value}),
            ])

    def _failed_key(self) -> str:
        return self.failure[0] if self.failure is not None else ""


def _miss(miss: CacheMiss) -> Json:
    """step.started's `cache` for a miss: the key the API computed and why nothing was reused."""
    out: Json = {"key": miss.key, "display": miss.display, "reason": miss.reason}
    if miss.detail:
        out["detail"] = miss.detail
    return out

