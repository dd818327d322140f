"""Event type and status names: the vocabulary both services share."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    """Dotted names of the events in a run's log."""

    RUN_QUEUED = "run.queued"
    RUN_CLAIMED = "run.claimed"
    RUN_STARTED = "run.started"
    STEP_CREATED = "step.created"
    STEP_STARTED = "step.started"
    STEP_SUCCEEDED = "step.succeeded"
    STEP_FAILED = "step.failed"
    STEP_SKIPPED = "step.skipped"
    STEP_CANCELED = "step.canceled"
    TOOL_INVOKED = "tool.invoked"
    TOOL_SUCCEEDED = "tool.succeeded"
    TOOL_FAILED = "tool.failed"
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_CANCEL_REQUESTED = "run.cancel_requested"
    RUN_CANCELED = "run.canceled"
    RUN_LEASE_EXPIRED = "run.lease_expired"
    RUN_REQUEUED = "run.requeued"


TERMINAL_EVENTS = frozenset({EventType.RUN_COMPLETED, EventType.RUN_FAILED, EventType.RUN_CANCELED})

# Events a worker may report about a run it holds; the rest are recorded by the API itself.
WORKER_EVENTS = frozenset(
    {
        EventType.RUN_STARTED,
        EventType.STEP_CREATED,
        EventType.STEP_STARTED,
        EventType.STEP_SUCCEEDED,
        EventType.STEP_FAILED,
        EventType.STEP_SKIPPED,
        EventType.STEP_CANCELED,
        EventType.TOOL_INVOKED,
        EventType.TOOL_SUCCEEDED,
        EventType.TOOL_FAILED,
        EventType.RUN_COMPLETED,
        EventType.RUN_FAILED,
        EventType.RUN_CANCELED,
    }
)


class RunStatus(StrEnum):
    """Run states as stored in the runs table."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


TERMINAL_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELED})


class StepStatus(StrEnum):
    """Step states as stored in the run_steps table (CREATED is the brief's PENDING)."""

    CREATED = "CREATED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELED = "CANCELED"


# A step in one of these states is done for the run: a later attempt never runs it again.
STEP_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})


class ToolCallStatus(StrEnum):
    """Tool call states as stored in the tool_calls table."""

    INVOKED = "INVOKED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class StopReason(StrEnum):
    """Why a run stopped."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    LEASE_EXPIRED = "lease_expired"
    STEP_FAILED = "step_failed"


class StepErrorCode(StrEnum):
    """Why a step's try failed (StepError.code)."""

    TOOL_FAILED = "tool_failed"
    TOOL_TIMEOUT = "tool_timeout"
    TOOL_UNAVAILABLE = "tool_unavailable"
    SELECTOR_FAILED = "selector_failed"
    ARTIFACT_FAILED = "artifact_failed"
    INTERRUPTED = "interrupted"


def attempt_text(attempt: int, max_attempts: int, released: int = 0) -> str:
    """A run's attempt for people: '2/3'; with attempts a stopping worker released, which do not count
    against max_attempts, '4 (3/3 counted, 1 released)' rather than '4/3'; without a maximum, '2'."""
    if not max_attempts:
        return str(attempt)
    if not released:
        return f"{attempt}/{max_attempts}"
    return f"{attempt} ({attempt - released}/{max_attempts} counted, {released} released)"
