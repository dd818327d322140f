"""Rows to proto messages and proto values to plain Python."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from shared.gen.runs.v1 import (
    key_service_pb2,
    ops_service_pb2,
    run_pb2,
    run_service_pb2,
    worker_service_pb2,
    workflow_service_pb2,
)


def ts(value: datetime | None) -> Timestamp | None:
    """A Timestamp, or None to leave the field unset."""
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value)
    return out


def struct(value: Any) -> Struct | None:
    """A Struct from a dict (non-dicts are wrapped as {"value": ...}); None leaves the field unset."""
    if value is None:
        return None
    out = Struct()
    out.update(value if isinstance(value, dict) else {"value": value})
    return out


def to_dict(value: Struct) -> dict[str, Any]:
    """A Struct as a plain dict: what json_format.MessageToDict gives (numbers as floats; ValueError for NaN
    or Infinity), walked directly (MessageToDict's generic printer was a tenth of the report path)."""
    return {key: _plain(item) for key, item in value.fields.items()}


def _plain(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if math.isnan(number) or math.isinf(number):
            raise ValueError("NaN and Infinity are not JSON")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: _plain(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None  # null_value, or no kind at all


def _set(message: Any, **fields: Any) -> Any:
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, Timestamp | Struct):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def run(row: Any) -> run_pb2.Run:
    """A runs row as a Run."""
    return _set(
        run_pb2.Run(),
        run_id=row.run_id,
        status=run_pb2.RunStatus.Value(f"RUN_STATUS_{row.status}"),
        workflow=row.workflow,
        input=struct(row.input),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        released_attempts=row.released_attempts or 0,
        idempotency_key=row.idempotency_key or "",
        workspace_id=row.workspace_id,
        created_at=ts(row.created_at),
        started_at=ts(row.started_at),
        finished_at=ts(row.finished_at),
        cancel_requested_at=ts(row.cancel_requested_at),
        next_attempt_at=ts(row.next_attempt_at) if row.status == "QUEUED" else None,
        stop_reason=row.stop_reason or "",
        error=row.error or "",
        worker_id=row.worker_id or "",
        lease_expires_at=ts(row.lease_expires_at),
        last_sequence=row.last_sequence,
        tenant_id=row.tenant_id,
        project_id=row.project_id,
        created_by=row.created_by or "",
        cancel_requested_by=row.cancel_requested_by or "",
        cancel_reason=row.cancel_reason or "",
        workflow_version=row.workflow_version,
        spec_hash=row.spec_hash or "",
        output=struct(row.output),
        trigger=row.trigger or "start",
        base_run_id=row.base_run_id or "",
        change_request=row.change_request or "",
    )


def steps_summary(counts: dict[str, int]) -> run_pb2.StepsSummary:
    """handlers.steps_summary's counts as a StepsSummary."""
    return run_pb2.StepsSummary(**counts)


def artifact(run_id: str, step_key: str, item: Any) -> run_pb2.Artifact:
    """A run_artifacts row, or one artifact of a step row's JSON list, as an Artifact."""
    get = item.get if isinstance(item, dict) else lambda name: getattr(item, name)
    created = get("created_at")
    if isinstance(created, str):
        created = datetime.fromisoformat(created)
    return _set(
        run_pb2.Artifact(),
        run_id=run_id,
        step_key=step_key,
        name=get("name"),
        uri=get("uri"),
        sha256=get("sha256"),
        size=int(get("size") or 0),
        media_type=get("media_type") or "",
        created_at=ts(created),
    )


def step_error(value: dict[str, Any] | None) -> run_pb2.StepError | None:
    """A run_steps.step_error object as a StepError."""
    if not value:
        return None
    return run_pb2.StepError(
        code=value.get("code", ""), message=value.get("message", ""), retryable=bool(value.get("retryable")),
        tool=value.get("tool", ""), attempt=int(value.get("attempt") or 0),
    )


def step(row: Any) -> run_pb2.Step:
    """A run_steps row (with its artifacts) as a Step; `attempt` is the step's tries so far."""
    out = _set(
        run_pb2.Step(),
        run_id=row.run_id,
        step_key=row.step_key,
        status=run_pb2.StepStatus.Value(f"STEP_STATUS_{row.status}"),
        attempt=row.tries,
        run_attempt=row.attempt,
        tool=row.tool,
        created_at=ts(row.created_at),
        started_at=ts(row.started_at),
        finished_at=ts(row.finished_at),
        error=row.error or "",
        output=struct(row.output),
        reason=row.reason or "",
        cache_key=row.cache_key or "",
        cache_display=row.cache_display or "",
        cache_result=row.cache_result or "",
        cache_reason=row.cache_reason or "",
        source_run_id=row.source_run_id or "",
    )
    out.depends_on.extend(row.depends_on or [])
    if (err := step_error(row.step_error)) is not None:
        out.step_error.CopyFrom(err)
    out.artifacts.extend(artifact(row.run_id, row.step_key, a) for a in row.artifacts or [])
    return out


def step_state(row: Any) -> worker_service_pb2.StepState:
    """What an earlier attempt left of a step, for a claim that resumes the run."""
    out = worker_service_pb2.StepState(
        step_key=row.step_key, status=run_pb2.StepStatus.Value(f"STEP_STATUS_{row.status}"), tries=row.tries
    )
    if (output := struct(row.output)) is not None:
        out.output.CopyFrom(output)
    out.artifacts.extend(artifact(row.run_id, row.step_key, a) for a in row.artifacts or [])
    return out


def tool_call(row: Any) -> run_pb2.ToolCall:
    """A tool_calls row as a ToolCall."""
    return _set(
        run_pb2.ToolCall(),
        run_id=row.run_id,
        tool_call_id=row.tool_call_id,
        step_key=row.step_key,
        tool=row.tool,
        status=run_pb2.ToolCallStatus.Value(f"TOOL_CALL_STATUS_{row.status}"),
        attempt=row.attempt,
        input=struct(row.input),
        output=struct(row.output),
        error=row.error or "",
        invoked_at=ts(row.invoked_at),
        finished_at=ts(row.finished_at),
        step_attempt=row.step_attempt,
    )


def event(row: Any) -> run_pb2.RunEvent:
    """A run_events row (or StoredEvent) as a RunEvent."""
    return _set(
        run_pb2.RunEvent(),
        run_id=row.run_id,
        sequence=row.sequence,
        type=row.type,
        attempt=row.attempt,
        worker_id=row.worker_id or "",
        event_id=row.event_id,
        occurred_at=ts(row.occurred_at),
        recorded_at=ts(row.recorded_at),
        payload=struct({k: v for k, v in (row.payload or {}).items() if k not in _INTERNAL_PAYLOAD_KEYS}),
    )


# Kept in the log for the server's own use (idempotency), not shown to clients.
_INTERNAL_PAYLOAD_KEYS = frozenset({"request_hash"})


def attempt(record: Any) -> run_service_pb2.Attempt:
    """An AttemptRecord as an Attempt."""
    return _set(
        run_service_pb2.Attempt(),
        attempt=record.attempt,
        worker_id=record.worker_id,
        claimed_at=ts(record.claimed_at),
        ended_at=ts(record.ended_at),
        outcome=record.outcome,
        error=record.error,
    )


# The range google.protobuf.Timestamp allows (0001-01-01 to 9999-12-31), per its definition.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def timestamp_problem(value: Timestamp) -> str | None:
    """Why a Timestamp is out of its valid range, or None."""
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS:
        return "seconds must be within 0001-01-01 and 9999-12-31"
    if not 0 <= value.nanos < 1_000_000_000:
        return "nanos must be between 0 and 999999999"
    return None


_KEY_ROLES = {"client": key_service_pb2.KEY_ROLE_CLIENT, "worker": key_service_pb2.KEY_ROLE_WORKER,
              "admin": key_service_pb2.KEY_ROLE_ADMIN}
ROLE_NAMES = {v: k for k, v in _KEY_ROLES.items()}


def api_key(row: Any) -> key_service_pb2.ApiKey:
    """An api_keys row as an ApiKey (never its secret)."""
    return _set(
        key_service_pb2.ApiKey(),
        key_id=row.key_id,
        role=_KEY_ROLES[row.role],
        tenant_id=row.tenant_id,
        project_id=row.project_id or "",
        workspace_id=row.workspace_id or "",
        created_at=ts(row.created_at),
        expires_at=ts(row.expires_at),
        revoked_at=ts(row.revoked_at),
        created_by=row.created_by or "",
        description=row.description or "",
    )


def workflow(row: Any, spec: workflow_service_pb2.WorkflowSpec) -> workflow_service_pb2.Workflow:
    """A workflows row (and its spec as the proto) as a Workflow."""
    out = _set(
        workflow_service_pb2.Workflow(),
        name=row.name,
        version=row.version,
        spec_hash=row.spec_hash,
        builtin=row.builtin,
        created_at=ts(row.created_at),
        created_by=row.created_by or "",
    )
    out.spec.CopyFrom(spec)
    return out


def worker_info(row: Any) -> ops_service_pb2.WorkerInfo:
    """A workers_list row as a WorkerInfo."""
    held = list(row.held_run_ids or [])
    return _set(
        ops_service_pb2.WorkerInfo(
            worker_id=row.worker_id, connected=bool(row.connected), held_run_ids=held, held_count=len(held),
            tools=list(row.tools or []), capacity=row.capacity or 0, workspace_id=row.workspace_id or "",
        ),
        started_at=ts(row.started_at), last_heartbeat_at=ts(row.last_heartbeat_at),
        lease_expires_at=ts(row.lease_expires_at),
    )


def throughput_bucket(bucket: Any) -> ops_service_pb2.ThroughputBucket:
    """A handlers.Bucket as a ThroughputBucket."""
    finished = bucket.finished
    return _set(
        ops_service_pb2.ThroughputBucket(
            succeeded=finished.get("SUCCEEDED", 0), failed=finished.get("FAILED", 0),
            canceled=finished.get("CANCELED", 0), queue_depth=bucket.queue_depth,
        ),
        start=ts(bucket.start),
    )
