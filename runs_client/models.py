"""Typed results (dataclasses built from the API's messages) and plain-Python request builders.

Every result keeps the message it came from as `.proto` (not part of equality or repr). Struct
fields come back as dicts with whole numbers as ints (a Struct number is a double: 3.0 reads 3).
Timestamps are timezone-aware UTC datetimes, or None when unset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from runs_client.errors import InvalidArgument
from shared.gen.runs.v1 import run_pb2, run_service_pb2, workflow_service_pb2
from shared.workflow import SpecError, from_proto_dict, load_spec_text, parse_spec, spec_to_dict, to_proto_dict


class RunStatus(StrEnum):
    """A run's state, named as in the API without its prefix (RUN_STATUS_SUCCEEDED -> SUCCEEDED)."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def done(self) -> bool:
        """Whether the run has ended (SUCCEEDED, FAILED or CANCELED)."""
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELED)


class StepStatus(StrEnum):
    """A step's state (CREATED: not started yet)."""

    UNSPECIFIED = "UNSPECIFIED"
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELED = "CANCELED"


TERMINAL_EVENT_TYPES = frozenset({"run.completed", "run.failed", "run.canceled"})


# --- conversions -------------------------------------------------------------------------------


def plain_numbers(value: Any) -> Any:
    """`value` with whole floats as ints, recursively (Struct numbers are doubles)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    return value


def struct_to_dict(message: Message, name: str) -> dict[str, Any]:
    """A Struct field of `message` as a dict ({} when unset)."""
    if not message.HasField(name):
        return {}
    return dict(plain_numbers(json_format.MessageToDict(getattr(message, name))))


def value_to_python(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as plain Python (None when unset)."""
    if value.WhichOneof("kind") is None:
        return None
    return plain_numbers(json_format.MessageToDict(value))


def to_struct(data: Mapping[str, Any] | None, name: str = "input") -> struct_pb2.Struct | None:
    """A dict as a Struct (None for None); InvalidArgument naming `name` when it cannot be one."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise InvalidArgument(None, f"{name} must be a dict", field_violations=[(name, "must be a dict")])
    struct = struct_pb2.Struct()
    try:
        struct.update(dict(data))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(None, f"{name} is not JSON-like: {error}", [(name, str(error))]) from None
    return struct


def timestamp(message: Message, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, or None when unset."""
    if not message.HasField(name):
        return None
    stamp: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return stamp


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return "UNSPECIFIED"


def run_status_value(status: RunStatus | str | None) -> run_pb2.RunStatus.ValueType:
    """The proto enum value of a status name ("SUCCEEDED", RunStatus.SUCCEEDED; None -> 0)."""
    if status is None or status == "":
        return run_pb2.RUN_STATUS_UNSPECIFIED
    name = str(status).upper().removeprefix("RUN_STATUS_")
    try:
        return run_pb2.RunStatus.Value(f"RUN_STATUS_{name}")
    except ValueError:
        raise InvalidArgument(
            None,
            f"unknown run status {status!r}", field_violations=[("status", f"one of {[s.value for s in RunStatus]}")]
        ) from None


def list_runs_request(
    status: RunStatus | str | None, workflow: str | None, page_size: int, query: str, page_token: str
) -> run_service_pb2.ListRunsRequest:
    """A ListRunsRequest of plain arguments (status by name, see run_status_value)."""
    return run_service_pb2.ListRunsRequest(
        page_size=page_size, status=run_status_value(status), workflow=workflow or "", query=query,
        page_token=page_token,
    )


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a run."""

    step_key: str
    status: StepStatus
    tool: str
    attempt: int
    depends_on: tuple[str, ...]
    output: dict[str, Any]
    error: str
    error_code: str
    reason: str
    cache_result: str
    cache_reason: str
    source_run_id: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    proto: run_pb2.Step = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, step: run_pb2.Step) -> Step:
        """The Step of a runs.v1.Step."""
        return cls(
            step_key=step.step_key,
            status=StepStatus(_enum_name(run_pb2.StepStatus, step.status, "STEP_STATUS_")),
            tool=step.tool,
            attempt=step.attempt,
            depends_on=tuple(step.depends_on),
            output=struct_to_dict(step, "output"),
            error=step.error,
            error_code=step.step_error.code if step.HasField("step_error") else "",
            reason=step.reason,
            cache_result=step.cache_result,
            cache_reason=step.cache_reason,
            source_run_id=step.source_run_id,
            created_at=timestamp(step, "created_at"),
            started_at=timestamp(step, "started_at"),
            finished_at=timestamp(step, "finished_at"),
            proto=step,
        )


@dataclass(frozen=True)
class Attempt:
    """One claim of a run by a worker and how it ended (running, completed, failed, retried, ...)."""

    attempt: int
    worker_id: str
    outcome: str
    error: str
    claimed_at: datetime | None
    ended_at: datetime | None
    proto: run_service_pb2.Attempt = field(default_factory=run_service_pb2.Attempt, repr=False, compare=False)

    @classmethod
    def from_proto(cls, attempt: run_service_pb2.Attempt) -> Attempt:
        """The Attempt of a runs.v1.Attempt."""
        return cls(
            attempt=attempt.attempt,
            worker_id=attempt.worker_id,
            outcome=attempt.outcome,
            error=attempt.error,
            claimed_at=timestamp(attempt, "claimed_at"),
            ended_at=timestamp(attempt, "ended_at"),
            proto=attempt,
        )


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool by a step's try."""

    tool_call_id: str
    step_key: str
    tool: str
    status: str  # INVOKED, SUCCEEDED or FAILED
    step_attempt: int  # the step's try (1, 2, ...)
    attempt: int  # the run's attempt
    input: dict[str, Any]
    output: dict[str, Any]
    error: str
    invoked_at: datetime | None
    finished_at: datetime | None
    proto: run_pb2.ToolCall = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, call: run_pb2.ToolCall) -> ToolCall:
        """The ToolCall of a runs.v1.ToolCall."""
        return cls(
            tool_call_id=call.tool_call_id,
            step_key=call.step_key,
            tool=call.tool,
            status=_enum_name(run_pb2.ToolCallStatus, call.status, "TOOL_CALL_STATUS_"),
            step_attempt=call.step_attempt,
            attempt=call.attempt,
            input=struct_to_dict(call, "input"),
            output=struct_to_dict(call, "output"),
            error=call.error,
            invoked_at=timestamp(call, "invoked_at"),
            finished_at=timestamp(call, "finished_at"),
            proto=call,
        )


@dataclass(frozen=True)
class Run:
    """A run. `steps`, `tool_calls` and `attempts` are filled by `get_run` (and `wait`); empty elsewhere."""

    run_id: str
    status: RunStatus
    workflow: str
    workflow_version: int
    input: dict[str, Any]
    output: dict[str, Any]
    attempt: int
    max_attempts: int
    released_attempts: int  # attempts a stopping worker gave back: not counted against max_attempts
    error: str
    stop_reason: str
    idempotency_key: str
    workspace_id: str
    tenant_id: str
    project_id: str
    worker_id: str
    last_sequence: int
    trigger: str
    base_run_id: str
    cancel_reason: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    next_attempt_at: datetime | None
    steps: tuple[Step, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    # True when StartRun found an earlier run with the same idempotency key.
    deduplicated: bool = False
    proto: run_pb2.Run = field(default_factory=run_pb2.Run, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        return self.status.done

    def step(self, key: str) -> Step:
        """The step called `key` (KeyError when the run has none, or was not read with get_run)."""
        for step in self.steps:
            if step.step_key == key:
                return step
        raise KeyError(key)

    @classmethod
    def from_proto(
        cls,
        run: run_pb2.Run,
        steps: Sequence[run_pb2.Step] = (),
        attempts: Sequence[run_service_pb2.Attempt] = (),
        deduplicated: bool = False,
        tool_calls: Sequence[run_pb2.ToolCall] = (),
    ) -> Run:
        """The Run of a runs.v1.Run (with the steps and attempts GetRun returns)."""
        return cls(
            run_id=run.run_id,
            status=RunStatus(_enum_name(run_pb2.RunStatus, run.status, "RUN_STATUS_")),
            workflow=run.workflow,
            workflow_version=run.workflow_version,
            input=struct_to_dict(run, "input"),
            output=struct_to_dict(run, "output"),
            attempt=run.attempt,
            max_attempts=run.max_attempts,
            released_attempts=run.released_attempts,
            error=run.error,
            stop_reason=run.stop_reason,
            idempotency_key=run.idempotency_key,
            workspace_id=run.workspace_id,
            tenant_id=run.tenant_id,
            project_id=run.project_id,
            worker_id=run.worker_id,
            last_sequence=run.last_sequence,
            trigger=run.trigger,
            base_run_id=run.base_run_id,
            cancel_reason=run.cancel_reason,
            created_at=timestamp(run, "created_at"),
            started_at=timestamp(run, "started_at"),
            finished_at=timestamp(run, "finished_at"),
            cancel_requested_at=timestamp(run, "cancel_requested_at"),
            next_attempt_at=timestamp(run, "next_attempt_at"),
            steps=tuple(Step.from_proto(s) for s in steps),
            attempts=tuple(Attempt.from_proto(a) for a in attempts),
            tool_calls=tuple(ToolCall.from_proto(c) for c in tool_calls),
            deduplicated=deduplicated,
            proto=run,
        )


@dataclass(frozen=True)
class Event:
    """One entry of a run's event log (sequence 1, 2, 3 ... without gaps)."""

    run_id: str
    sequence: int
    type: str
    attempt: int
    worker_id: str
    event_id: str
    payload: dict[str, Any]
    occurred_at: datetime | None
    recorded_at: datetime | None
    proto: run_pb2.RunEvent = field(repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """Whether this event ends the run (run.completed, run.failed, run.canceled)."""
        return self.type in TERMINAL_EVENT_TYPES

    @classmethod
    def from_proto(cls, event: run_pb2.RunEvent) -> Event:
        """The Event of a runs.v1.RunEvent."""
        return cls(
            run_id=event.run_id,
            sequence=event.sequence,
            type=event.type,
            attempt=event.attempt,
            worker_id=event.worker_id,
            event_id=event.event_id,
            payload=struct_to_dict(event, "payload"),
            occurred_at=timestamp(event, "occurred_at"),
            recorded_at=timestamp(event, "recorded_at"),
            proto=event,
        )


@dataclass(frozen=True)
class PlanStep:
    """What a rebuild does with one step: action rerun or reuse, and why."""

    step_key: str
    action: str
    reason: str


@dataclass(frozen=True)
class Rebuild:
    """A rebuild's plan, and the new run (None on a dry run)."""

    run: Run | None
    plan: tuple[PlanStep, ...]
    proto: run_service_pb2.RebuildRunResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: run_service_pb2.RebuildRunResponse) -> Rebuild:
        """The Rebuild of a RebuildRunResponse."""
        return cls(
            run=Run.from_proto(response.run) if response.HasField("run") else None,
            plan=tuple(PlanStep(p.step_key, p.action, p.reason) for p in response.plan),
            proto=response,
        )


@dataclass(frozen=True)
class Difference:
    """One cache key component that differs from the nearest earlier cache entry."""

    path: str
    before: Any
    after: Any


@dataclass(frozen=True)
class RunExplanation:
    """Why a run is where it is (ExplainRun): `state` is queued, backing_off, running or finished, `summary`
    one line for people; `queue`, `holder` or `ending` (the generated messages, typed by their stubs) is
    set for a queued, running or finished run; `attempts` are every attempt so far, oldest first."""

    run: Run
    state: str
    summary: str
    queue: run_service_pb2.QueueExplanation | None
    holder: run_service_pb2.HolderExplanation | None
    ending: run_service_pb2.EndingExplanation | None
    attempts: tuple[Attempt, ...]
    proto: run_service_pb2.ExplainRunResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: run_service_pb2.ExplainRunResponse) -> RunExplanation:
        """The RunExplanation of an ExplainRun answer."""
        return cls(
            run=Run.from_proto(response.run, attempts=response.attempts),
            state=response.state,
            summary=response.summary,
            queue=response.queue if response.HasField("queue") else None,
            holder=response.holder if response.HasField("holder") else None,
            ending=response.ending if response.HasField("ending") else None,
            attempts=tuple(Attempt.from_proto(a) for a in response.attempts),
            proto=response,
        )


@dataclass(frozen=True)
class StepExplanation:
    """Why one step ran, hit the cache or was reused (decision: executed, cache_hit, reused_from_base, ...)."""

    step_key: str
    decision: str
    summary: str
    cache_key: str
    cache_display: str
    cache_reason: str
    components: dict[str, Any]
    source_run_id: str
    nearest_cache_key: str
    nearest_source_run_id: str
    differences: tuple[Difference, ...]
    proto: run_service_pb2.StepExplanation = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, step: run_service_pb2.StepExplanation) -> StepExplanation:
        """The StepExplanation of its message."""
        return cls(
            step_key=step.step_key,
            decision=step.decision,
            summary=step.summary,
            cache_key=step.cache_key,
            cache_display=step.cache_display,
            cache_reason=step.cache_reason,
            components=struct_to_dict(step, "components"),
            source_run_id=step.source_run_id,
            nearest_cache_key=step.nearest_cache_key,
            nearest_source_run_id=step.nearest_source_run_id,
            differences=tuple(
                Difference(d.path, value_to_python(d.before), value_to_python(d.after)) for d in step.differences
            ),
            proto=step,
        )


@dataclass(frozen=True)
class Workflow:
    """A registered version of a workflow; `spec` is in the file form (as a YAML file would say it)."""

    name: str
    version: int
    spec_hash: str
    builtin: bool
    created: bool
    created_by: str
    created_at: datetime | None
    spec: dict[str, Any]
    proto: workflow_service_pb2.Workflow = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, workflow: workflow_service_pb2.Workflow, created: bool = False) -> Workflow:
        """The Workflow of its message (`created`: RegisterWorkflow stored a new version)."""
        plain = json_format.MessageToDict(workflow.spec, preserving_proto_field_name=True)
        spec = plain_numbers(from_proto_dict(plain))
        return cls(
            name=workflow.name,
            version=workflow.version,
            spec_hash=workflow.spec_hash,
            builtin=workflow.builtin,
            created=created,
            created_by=workflow.created_by,
            created_at=timestamp(workflow, "created_at"),
            spec=dict(spec),
            proto=workflow,
        )


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRun:
    """One run to start: the fields of StartRunRequest, with `input` as a dict (0 and "" mean the default)."""

    workflow: str = ""
    input: Mapping[str, Any] | None = None
    idempotency_key: str = ""
    max_attempts: int = 0
    workspace_id: str = ""
    project_id: str = ""
    workflow_version: int = 0
    retry_backoff_seconds: float = 0.0
    retry_backoff_max_seconds: float = 0.0

    def to_proto(self) -> run_service_pb2.StartRunRequest:
        """The StartRunRequest."""
        request = run_service_pb2.StartRunRequest(
            workflow=self.workflow,
            idempotency_key=self.idempotency_key,
            max_attempts=self.max_attempts,
            workspace_id=self.workspace_id,
            project_id=self.project_id,
            workflow_version=self.workflow_version,
            retry_backoff_seconds=self.retry_backoff_seconds,
            retry_backoff_max_seconds=self.retry_backoff_max_seconds,
        )
        struct = to_struct(self.input)
        if struct is not None:
            request.input.CopyFrom(struct)
        return request


_START_FIELDS = frozenset(f.name for f in dataclasses.fields(StartRun))


def start_spec(spec: StartRun | Mapping[str, Any]) -> StartRun:
    """A StartRun from itself or a dict of its fields; TypeError naming unknown fields."""
    if isinstance(spec, StartRun):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"a run to start is a StartRun or a dict, not {type(spec).__name__}")
    unknown = sorted(set(spec) - _START_FIELDS)
    if unknown:
        raise TypeError(f"unknown StartRun field(s) {', '.join(unknown)}; known: {', '.join(sorted(_START_FIELDS))}")
    return StartRun(**spec)


SpecSource = Mapping[str, Any] | str | os.PathLike[str]


def workflow_spec(spec: SpecSource) -> workflow_service_pb2.WorkflowSpec:
    """The WorkflowSpec message of a spec dict (the file form) or of a YAML/JSON file's path.

    The spec is validated here first, as the CLI does: InvalidArgument lists every violation.
    """
    try:
        if isinstance(spec, Mapping):
            parsed = parse_spec(spec)
        else:
            path = Path(spec)
            text = path.read_text(encoding="utf-8")
            parsed = load_spec_text(text, "json" if path.suffix.lower() == ".json" else "yaml")
    except SpecError as error:
        violations = [(v.field, v.description) for v in error.violations]
        raise InvalidArgument(None, "the workflow spec is invalid", field_violations=violations) from None
    message = workflow_service_pb2.WorkflowSpec()
    json_format.ParseDict(to_proto_dict(spec_to_dict(parsed)), message)
    return message


def rebuild_request(
    base_run_id: str,
    change: str | None,
    steps: Sequence[str],
    input_patch: Mapping[str, Any] | None,
    dry_run: bool,
) -> run_service_pb2.RebuildRunRequest:
    """The RebuildRunRequest for `rebuild`."""
    if isinstance(steps, str):
        steps = [steps]
    request = run_service_pb2.RebuildRunRequest(
        base_run_id=base_run_id, change_request_type=change or "", steps=list(steps), dry_run=dry_run
    )
    patch = to_struct(input_patch, "input_patch")
    if patch is not None:
        request.input_patch.CopyFrom(patch)
    return request
