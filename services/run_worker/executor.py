"""One try of one step: the tool call in a fresh working directory, its timeout, its artifacts' upload.

Also the pieces a held run is made of: its RunHandle (attempt and stop signals), how its execution
ended (Result), and `race`, which awaits work unless a stop signal comes first. What runs next and
what is reported is the orchestrator's business (services/run_worker/orchestrator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from services.run_worker.tools import ArtifactError, Fetcher, Json, LocalArtifact, Tool, ToolContext, ToolError
from shared.events import StepErrorCode

log = logging.getLogger(__name__)
tracer = trace.get_tracer("runs.worker")


class Result(enum.Enum):
    """How an execution ended, from the worker's side."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # run.failed reported (the API may turn it into a retry)
    CANCELED = "canceled"
    LOST = "lost"  # the attempt is no longer ours: nothing more was reported
    RELEASED = "released"  # given back on shutdown


@dataclass
class RunHandle:
    """A run the worker holds: its attempt (fencing token) and the signals that stop it."""

    run_id: str
    attempt: int
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class Interrupted(Exception):
    """A stop signal came before the work finished (the work was cancelled and awaited)."""


async def race(work: asyncio.Future[Any], signals: Iterable[asyncio.Event]) -> Any:
    """Await `work` unless one of `signals` is set first; then cancel it, await it and raise Interrupted."""
    waiters = {asyncio.ensure_future(s.wait()) for s in signals}
    try:
        done, _ = await asyncio.wait({work, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Our own task is being cancelled: the work (a subprocess, say) goes too, and is cleaned up first.
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise
    finally:
        for w in waiters:
            w.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError()
    raise Interrupted()


@dataclass(frozen=True)
class TryResult:
    """What one try gave: the output and uploaded artifacts, or why it failed."""

    output: Json | None
    artifacts: list[Json] = field(default_factory=list)
    error: str | None = None
    code: StepErrorCode | None = None
    retryable: bool = False

    @property
    def ok(self) -> bool:
        """The try succeeded (its artifacts are uploaded)."""
        return self.error is None


# upload(artifact) -> {name, uri, sha256, size, media_type}; raises ArtifactError.
Uploader = Callable[[LocalArtifact], Awaitable[Json]]


@dataclass(frozen=True)
class TryCall:
    """Everything one try needs besides the tool and its input."""

    run_id: str
    step_key: str
    attempt: int  # what ToolContext.attempt says: the step's try (the run attempt for the one-step built-ins)
    timeout_seconds: float | None = None
    workdir_base: str = ""  # "" is the system's temporary folder
    fetcher: Fetcher | None = None
    upload: Uploader | None = None


def unavailable(name: str) -> TryResult:
    """The try of a tool this worker does not run."""
    return TryResult(None, error=f"tool {name!r} is not enabled on this worker (RUN_WORKER_TOOLS)",
                     code=StepErrorCode.TOOL_UNAVAILABLE, retryable=True)


async def run_try(tool: Tool, args: Json, call: TryCall) -> TryResult:
    """Run `tool` once with `args` in a fresh working directory; upload its artifacts if it succeeds.

    Never raises for the tool's own failures (they are in the TryResult); cancellation propagates
    once the tool is cancelled, and the directory is removed either way. An instant tool gets none.
    """
    workdir = "" if tool.instant else tempfile.mkdtemp(prefix="runs-try-", dir=call.workdir_base or None)
    ctx = ToolContext(call.run_id, call.attempt, call.step_key, workdir, call.fetcher)
    try:
        with tracer.start_as_current_span(f"tool.{tool.name}", attributes={"tool.name": tool.name,
                                                                           "step.key": call.step_key}):
            try:
                async with asyncio.timeout(call.timeout_seconds) as deadline:
                    output = await tool(args, ctx)
            except TimeoutError:
                if not deadline.expired():
                    raise
                return TryResult(None, error=f"step timed out after {call.timeout_seconds:g}s",
                                 code=StepErrorCode.TOOL_TIMEOUT, retryable=True)
            if not isinstance(output, dict):
                raise ToolError(f"tool {tool.name!r} returned {type(output).__name__}, not an object",
                                retryable=False)
            artifacts = []
            for artifact in ctx.artifacts:
                if call.upload is None:
                    raise ArtifactError("this worker cannot upload artifacts", retryable=False, output=output)
                try:
                    artifacts.append(await call.upload(artifact))
                except ArtifactError as err:
                    err.output = output if err.output is None else err.output
                    raise
            return TryResult(output, artifacts)
    except ToolError as err:
        code = StepErrorCode.ARTIFACT_FAILED if isinstance(err, ArtifactError) else StepErrorCode.TOOL_FAILED
        log.info("tool %s failed: %s", tool.name, err.message)
        return TryResult(err.output, error=err.message, code=code, retryable=err.retryable)
    except Exception as err:
        log.info("tool %s raised %s", tool.name, type(err).__name__, exc_info=True)
        return TryResult(None, error=f"{type(err).__name__}: {err}", code=StepErrorCode.TOOL_FAILED, retryable=True)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
