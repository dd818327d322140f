"""Domain errors: one base class, each subclass knows its gRPC status. One interceptor maps them."""

from __future__ import annotations

import grpc

from shared.text import shorten as shorten  # re-exported: errors echo client values through it


class RunsError(Exception):
    """Base of every error the API turns into a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(RunsError):
    """Bad input: INVALID_ARGUMENT with one field violation per bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {desc}" for field, desc in violations))
        self.violations = violations

    @classmethod
    def field(cls, field: str, description: str) -> InvalidRequest:
        """One bad field."""
        return cls([(field, description)])


class RequestTooLarge(InvalidRequest):
    """Oversized input: RESOURCE_EXHAUSTED, still naming the field."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RunNotFound(RunsError):
    """No run has that id."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {shorten(run_id)!r} not found")


class NotFound(RunsError):
    """Something other than a run was not found (a workflow, an artifact); the message names it."""

    code = grpc.StatusCode.NOT_FOUND


class IllegalTransition(RunsError):
    """The run's state does not allow the request (e.g. cancel a succeeded run)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class IdempotencyConflict(RunsError):
    """An idempotency key reused with a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class StoreUnavailable(RunsError):
    """The database cannot be reached; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str = "the database is unavailable; retry later") -> None:
        super().__init__(message)


class Unauthenticated(RunsError):
    """No valid API key came with the call."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RunsError):
    """The caller's key may not do this (wrong role, another worker's run or session, a limit of the key)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class EventRejected(RunsError):
    """A reported event does not fit its run (a step or tool event for a step that never started)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
