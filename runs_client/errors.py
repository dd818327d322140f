"""The client's exceptions: one per gRPC status a caller may want to handle, all under RunsError.

Every failed call raises a RunsError subclass chosen by the call's status code; the original
grpc.RpcError is the exception's `__cause__`. INVALID_ARGUMENT (and RESOURCE_EXHAUSTED) carry the
google.rpc.BadRequest field violations the API attached, as (field, description) pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class RunsError(Exception):
    """A call to the Run API failed: its gRPC status code, message and field violations (if any)."""

    default_code: grpc.StatusCode | None = None

    def __init__(
        self,
        status_code: grpc.StatusCode | None,
        message: str,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`status_code` None: the class's own (INVALID_ARGUMENT for InvalidArgument, ...)."""
        self.status_code: grpc.StatusCode | None = status_code if status_code is not None else self.default_code
        self.message = message
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        text = message
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" if f else d for f, d in self.field_violations) + ")"
        if self.status_code is not None:
            text = f"{self.status_code.name}: {text}"
        super().__init__(text)

    @property
    def fields(self) -> list[str]:
        """The names of the fields the violations point at, in order."""
        return [field for field, _ in self.field_violations]


class InvalidArgument(RunsError):
    """The request is invalid (INVALID_ARGUMENT); `field_violations` says which fields and why."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RunsError):
    """No run, workflow, artifact or step by that name (NOT_FOUND)."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RunsError):
    """E.g. an idempotency key reused with a different request (ALREADY_EXISTS)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RunsError):
    """The run's state does not allow the call, e.g. cancel a finished run (FAILED_PRECONDITION)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(RunsError):
    """No API key, or one the API does not accept (UNAUTHENTICATED)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RunsError):
    """The key is valid but its role, tenant or project does not allow the call (PERMISSION_DENIED)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(RunsError):
    """The API cannot be reached, or is shutting down, even after the client's retries (UNAVAILABLE)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(RunsError):
    """A request too large, or too many (RESOURCE_EXHAUSTED); field violations name the field."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(RunsError):
    """The API did not answer within the call's timeout (DEADLINE_EXCEEDED)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class RunTimeout(RunsError):
    """`wait` gave up: the run had not ended within the timeout. `run` is the run as last seen."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str, run_id: str, run: Any = None) -> None:
        super().__init__(None, message)
        self.run_id = run_id
        self.run = run


_BY_CODE: dict[grpc.StatusCode, type[RunsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The status code of a failed gRPC call (UNKNOWN when it has none)."""
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details_of(error: BaseException) -> str:
    details_of = getattr(error, "details", None)
    details = details_of() if callable(details_of) else None
    return str(details or "")


def _trailing_metadata(error: BaseException) -> Iterable[Any]:
    trailing = getattr(error, "trailing_metadata", None)
    try:
        found = trailing() if callable(trailing) else None
    except Exception:  # a call that never got trailers
        return ()
    return found or ()


def field_violations_of(error: BaseException) -> list[tuple[str, str]]:
    """(field, description) of the google.rpc.BadRequest details in a failed call's trailers."""
    found: list[tuple[str, str]] = []
    for item in _trailing_metadata(error):
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            continue
        if status.code != status_code_of(error).value[0] or status.message != _details_of(error):
            continue  # details that disagree with the call's own status are not the call's (as grpc_status says)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                found.extend((v.field, v.description) for v in bad.field_violations)
    return found


def from_rpc_error(error: BaseException) -> RunsError:
    """The RunsError for a failed gRPC call (raise it `from error`)."""
    code = status_code_of(error)
    cls = _BY_CODE.get(code, RunsError)
    return cls(code, _details_of(error) or code.name.lower(), field_violations_of(error))
