"""runs_client: the Python client of the Run API.

    from runs_client import Client

    with Client() as client:  # RUN_API_ADDR (default 127.0.0.1:50051), RUNS_API_KEY, RUNS_TLS_CA
        run = client.start_run("runtime.noop", {"greeting": "hello"})
        print(client.wait(run.run_id, timeout=60).status)  # SUCCEEDED

`Client` blocks; `AsyncClient` has the same methods for asyncio. Results are dataclasses
(runs_client.models) keeping their message as `.proto`; failures raise RunsError subclasses
(runs_client.errors) carrying the gRPC status code and field violations.
"""

from __future__ import annotations

from runs_client._common import Retry
from runs_client.aio import AsyncClient
from runs_client.client import Client, EventStream
from runs_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RunsError,
    RunTimeout,
    Unauthenticated,
    Unavailable,
)
from runs_client.models import (
    Attempt,
    Difference,
    Event,
    PlanStep,
    Rebuild,
    Run,
    RunExplanation,
    RunStatus,
    StartRun,
    Step,
    StepExplanation,
    StepStatus,
    ToolCall,
    Workflow,
)

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Attempt",
    "Client",
    "DeadlineExceeded",
    "Difference",
    "Event",
    "EventStream",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PlanStep",
    "Rebuild",
    "ResourceExhausted",
    "Retry",
    "Run",
    "RunExplanation",
    "RunStatus",
    "RunTimeout",
    "RunsError",
    "StartRun",
    "Step",
    "StepExplanation",
    "StepStatus",
    "ToolCall",
    "Unauthenticated",
    "Unavailable",
    "Workflow",
]
