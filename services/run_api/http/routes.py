"""The JSON API under /v1 and the run event stream (Server-Sent Events), each route one gRPC method.

Path and query parameters (and a JSON body for POST) become the method's proto request; the
response is its proto3 JSON. An unknown query parameter or body field is a 400 naming it; the caller
is checked before the request is read (a POST also needs `X-Runs-Csrf: 1` and a JSON body: see gateway).
`GET /v1/runs/{run_id}/events` streams WatchRun as Server-Sent Events: `event:` the event type,
`id:` its sequence, `data:` the event as JSON; a reconnecting browser's `Last-Event-ID` (or
`?after_sequence=`) resumes after that sequence, and the stream ends after the terminal event.
While the run is idle a comment line is sent every KEEPALIVE_SECONDS, so proxies keep it open. An
error once the stream is open (e.g. the server stopping) comes as an `event: runs.error` message
(not `error`, which a browser's EventSource takes for a broken connection); a refusal before it
(unknown run, another tenant's, no key) is the response's status.

| route | method |
| --- | --- |
| GET /v1/runs (?status, workflow, query, page_size, page_token) | RunService.ListRuns |
| POST /v1/runs | RunService.StartRun |
| GET /v1/runs/{run_id} | RunService.GetRun |
| POST /v1/runs/{run_id}/cancel | RunService.CancelRun |
| POST /v1/runs/{run_id}/rebuild | RunService.RebuildRun |
| GET /v1/runs/{run_id}/events | RunService.WatchRun (SSE) |
| GET /v1/runs/{run_id}/steps (?status) | RunService.ListRunSteps |
| GET /v1/runs/{run_id}/explain, /v1/runs/{run_id}/steps/{step_key}/explain | RunService.ExplainStep |
| GET /v1/runs/{run_id}/why | RunService.ExplainRun |
| GET /v1/runs/{run_id}/artifacts | RunService.ListRunArtifacts |
| GET /v1/runs/{run_id}/artifacts/{step_key}/{name} | RunService.DownloadArtifact (the bytes) |
| GET /v1/workflows (?page_size, page_token) | WorkflowService.ListWorkflows |
| GET /v1/workflows/{name} (?version) | WorkflowService.GetWorkflow |
| GET /v1/stats | OpsService.GetStats |
| GET /v1/workers (?page_size, page_token) | OpsService.ListWorkers |
| GET /v1/throughput (?minutes) | OpsService.GetThroughput |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from services.run_api.errors import InvalidRequest
from services.run_api.http.gateway import Gateway, error_response, parse_fields, read_json, to_json
from shared.gen.runs.v1 import ops_service_pb2, run_pb2, run_service_pb2, workflow_service_pb2

RUN_SERVICE = "/runs.v1.RunService/"
WORKFLOW_SERVICE = "/runs.v1.WorkflowService/"
OPS_SERVICE = "/runs.v1.OpsService/"
# A comment line this often while a run's stream is idle (proxies close connections silent for long).
KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keepalive\n\n"
# How long an event stream waits for its first event before it answers 200 and keeps waiting (see run_events).
FIRST_EVENT_WAIT_SECONDS = 5.0
# Short status names in query strings (?status=RUNNING) as well as the enum's own.
_RUN_STATUS = {n.removeprefix("RUN_STATUS_"): n for n in run_pb2.RunStatus.keys()}
_STEP_STATUS = {n.removeprefix("STEP_STATUS_"): n for n in run_pb2.StepStatus.keys()}


def from_query(request: Request, message: Message, **fixed: Any) -> Message:
    """`message` filled from the query string and `fixed` values (path parameters, which the query
    may not set); an unknown or malformed parameter is a field violation under its name."""
    values: dict[str, Any] = {}
    for name, value in request.query_params.items():
        if name in fixed:
            raise InvalidRequest.field(name, f"{name} is part of the path, not a query parameter")
        values[name] = value
    status_field = message.DESCRIPTOR.fields_by_name.get("status")
    if isinstance(values.get("status"), str) and status_field is not None and status_field.enum_type is not None:
        names = _STEP_STATUS if status_field.enum_type.name == "StepStatus" else _RUN_STATUS
        values["status"] = names.get(values["status"].upper(), values["status"])
    parse_fields(values, message, "query parameter")
    parse_fields(fixed, message, "field")
    return message


def sse(event: dict[str, Any]) -> bytes:
    """One event as a Server-Sent Events message."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.get('sequence', '')}\nevent: {event.get('type', 'message')}\ndata: {data}\n\n".encode()


def resume_after(request: Request) -> int:
    """The sequence to resume after: Last-Event-ID, else ?after_sequence=, else 0."""
    unknown = sorted(set(request.query_params) - {"after_sequence"})
    if unknown:
        raise InvalidRequest([(name[:100], "unknown query parameter; known: after_sequence") for name in unknown])
    raw = (request.headers.get("last-event-id") or request.query_params.get("after_sequence") or "0").strip()
    # ASCII digits only: str.isdigit() accepts "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidRequest.field("Last-Event-ID", "must be an event sequence (a whole number)")
    return int(raw)


def content_disposition(name: str) -> str:
    """An attachment header for an artifact's file name (its last path part): an ASCII fallback and
    the exact name in RFC 5987 form."""
    base = name.rsplit("/", 1)[-1] or "artifact"
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in base)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(base, safe='')}"


class Pump:
    """Iterates `items` in a task of its own (all in one task, so the stream's context stays whole) and
    hands them over through a queue, so that waiting for the next one with a timeout never cancels the
    stream itself. `close()` cancels and awaits the task, which closes `items` (its hub subscription too)."""

    def __init__(self, items: AsyncIterator[Any]) -> None:
        self.items = items
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=16)
        self.task = asyncio.create_task(self._pump(), name="sse-pump")

    async def _pump(self) -> None:
        try:
            async for item in self.items:
                await self.queue.put(("item", item))
        except Exception as exc:
            await self.queue.put(("error", exc))
        else:
            await self.queue.put(("end", None))
        finally:
            await self.items.aclose()  # type: ignore[attr-defined]

    async def get(self, seconds: float) -> tuple[str, Any] | None:
        """("item", it), ("error", exc) or ("end", None); None when nothing came for `seconds`."""
        try:
            return await asyncio.wait_for(self.queue.get(), seconds)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def error_event(exc: BaseException, where: str) -> bytes:
    """An error inside an open event stream, as a `runs.error` message (its data: the error's JSON body)."""
    return f"event: runs.error\ndata: {bytes(error_response(exc, where).body).decode()}\n\n".encode()


def routes(gateway: Gateway, keepalive_seconds: float = KEEPALIVE_SECONDS) -> list[BaseRoute]:
    """The /v1 JSON routes and the event stream, served through `gateway`."""

    def unary(
        method: str, build: Callable[[Request], Awaitable[Message] | Message]
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint serving unary `method` with the request `build` makes of the HTTP request (once the
        caller has been checked)."""

        async def endpoint(request: Request) -> Response:
            return await gateway.respond(request, method, build)

        return endpoint

    def query(message_type: type[Message], **path: str) -> Callable[[Request], Message]:
        """Build `message_type` from the query string and the path parameters `path` names (field -> param)."""
        return lambda request: from_query(
            request, message_type(), **{field: request.path_params[param] for field, param in path.items()}
        )

    def body(message_type: type[Message], **path: str) -> Callable[[Request], Awaitable[Message]]:
        """Build `message_type` from the JSON body and the path parameters `path` names (they win)."""

        async def build(request: Request) -> Message:
            if request.query_params:
                why = "unknown query parameter; this route takes a JSON body"
                raise InvalidRequest([(n[:100], why) for n in sorted(request.query_params)])
            message = await read_json(request, message_type())
            parse_fields({field: request.path_params[param] for field, param in path.items()}, message, "field")
            return message

        return build

    async def run_events(request: Request) -> Response:
        method = RUN_SERVICE + "WatchRun"
        run_id = request.path_params["run_id"]
        try:
            caller = await gateway.authorize(request, method)
            after = resume_after(request)
            # WatchRun checks the run (unknown, another tenant's) in its first pass, before its first event.
            # It is asked from the event before `after` on, so that a run that exists answers at once with an
            # event the client has seen (dropped below) and a refusal is this response's status; no GetRun.
            watch = run_service_pb2.WatchRunRequest(run_id=run_id, after_sequence=max(after - 1, 0))
            items = await gateway.stream(request, method, watch, caller)
        except Exception as exc:
            return error_response(exc, method)
        pump = Pump(items)
        # Only an ?after_sequence= past the run's last event leaves nothing to answer at once; then the
        # stream opens after FIRST_EVENT_WAIT_SECONDS and a refusal found later comes as a runs.error event.
        first = await pump.get(FIRST_EVENT_WAIT_SECONDS)
        if first is not None and first[0] == "error":
            await pump.close()
            return error_response(first[1], method)

        async def events() -> AsyncIterator[bytes]:
            got = first
            try:
                while True:
                    if got is None:
                        got = await pump.get(keepalive_seconds)
                        if got is None:
                            yield KEEPALIVE
                            continue
                    kind, value = got
                    got = None
                    if kind == "end":
                        return
                    if kind == "error":  # e.g. the server is stopping: the browser reconnects with Last-Event-ID
                        yield error_event(value, method)
                        return
                    if value.event.sequence > after:
                        yield sse(to_json(value.event))
            finally:
                await pump.close()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def download_artifact(request: Request) -> Response:
        method = RUN_SERVICE + "DownloadArtifact"
        params = request.path_params
        try:
            caller = await gateway.authorize(request, method)
            if request.query_params:
                raise InvalidRequest([(n[:100], "unknown query parameter") for n in sorted(request.query_params)])
            message = run_service_pb2.DownloadArtifactRequest(
                run_id=params["run_id"], step_key=params["step_key"], name=params["name"]
            )
            items = await gateway.stream(request, method, message, caller)
            # The first message describes the artifact; every refusal (auth, tenant, unknown) comes before it.
            first = await anext(items)
        except Exception as exc:
            return error_response(exc, method)
        artifact = first.artifact  # type: ignore[attr-defined]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for item in items:
                    yield item.chunk  # type: ignore[attr-defined]
            finally:
                await items.aclose()  # type: ignore[attr-defined]

        headers = {
            "Content-Disposition": content_disposition(artifact.name),
            "Content-Length": str(artifact.size),
            # Never rendered as a page of this origin (an HTML or SVG artifact could script the dashboard).
            "Content-Security-Policy": "sandbox",
            "X-Content-Type-Options": "nosniff",
            "ETag": f'"{artifact.sha256}"',
            # Not kept by the browser or a proxy: the next user of a shared machine must not find it there.
            "Cache-Control": "no-store",
        }
        return StreamingResponse(chunks(), media_type=artifact.media_type or "application/octet-stream",
                                 headers=headers)

    R, W, Ops = run_service_pb2, workflow_service_pb2, ops_service_pb2
    return [
        Route("/v1/runs", unary(RUN_SERVICE + "ListRuns", query(R.ListRunsRequest)), methods=["GET"]),
        Route("/v1/runs", unary(RUN_SERVICE + "StartRun", body(R.StartRunRequest)), methods=["POST"]),
        Route("/v1/runs/{run_id}", unary(RUN_SERVICE + "GetRun", query(R.GetRunRequest, run_id="run_id")),
              methods=["GET"]),
        Route("/v1/runs/{run_id}/cancel", unary(RUN_SERVICE + "CancelRun", body(R.CancelRunRequest, run_id="run_id")),
              methods=["POST"]),
        Route("/v1/runs/{run_id}/rebuild",
              unary(RUN_SERVICE + "RebuildRun", body(R.RebuildRunRequest, base_run_id="run_id")), methods=["POST"]),
        Route("/v1/runs/{run_id}/events", run_events, methods=["GET"]),
        Route("/v1/runs/{run_id}/steps",
              unary(RUN_SERVICE + "ListRunSteps", query(R.ListRunStepsRequest, run_id="run_id")), methods=["GET"]),
        Route("/v1/runs/{run_id}/explain",
              unary(RUN_SERVICE + "ExplainStep", query(R.ExplainStepRequest, run_id="run_id")), methods=["GET"]),
        Route("/v1/runs/{run_id}/why",
              unary(RUN_SERVICE + "ExplainRun", query(R.ExplainRunRequest, run_id="run_id")), methods=["GET"]),
        Route("/v1/runs/{run_id}/steps/{step_key}/explain",
              unary(RUN_SERVICE + "ExplainStep", query(R.ExplainStepRequest, run_id="run_id", step_key="step_key")),
              methods=["GET"]),
        Route("/v1/runs/{run_id}/artifacts",
              unary(RUN_SERVICE + "ListRunArtifacts", query(R.ListRunArtifactsRequest, run_id="run_id")),
              methods=["GET"]),
        Route("/v1/runs/{run_id}/artifacts/{step_key}/{name:path}", download_artifact, methods=["GET"]),
        Route("/v1/workflows", unary(WORKFLOW_SERVICE + "ListWorkflows", query(W.ListWorkflowsRequest)),
              methods=["GET"]),
        Route("/v1/workflows/{name}", unary(WORKFLOW_SERVICE + "GetWorkflow", query(W.GetWorkflowRequest, name="name")),
              methods=["GET"]),
        Route("/v1/stats", unary(OPS_SERVICE + "GetStats", query(Ops.GetStatsRequest)), methods=["GET"]),
        Route("/v1/workers", unary(OPS_SERVICE + "ListWorkers", query(Ops.ListWorkersRequest)), methods=["GET"]),
        Route("/v1/throughput", unary(OPS_SERVICE + "GetThroughput", query(Ops.GetThroughputRequest)), methods=["GET"]),
    ]
