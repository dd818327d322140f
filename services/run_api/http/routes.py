"""The JSON API under /v1 and the run event stream (Server-Sent Events), each route one gRPC method.

Path and query parameters (and a JSON body for POST) become the method's proto request; the
response is its proto3 JSON. An unknown query parameter or body field is a 400 naming it.
`GET /v1/runs/{run_id}/events` streams WatchRun as Server-Sent Events: `event:` the event type,
`id:` its sequence, `data:` the event as JSON; a reconnecting browser's `Last-Event-ID` (or
`?after_sequence=`) resumes after that sequence, and the stream ends after the terminal event.
While the run is idle a comment line is sent every KEEPALIVE_SECONDS, so proxies keep it open.

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
    raw = request.headers.get("last-event-id") or request.query_params.get("after_sequence") or "0"
    if not raw.strip().isdigit() or len(raw) > 18:
        raise InvalidRequest.field("Last-Event-ID", "must be an event sequence (a whole number)")
    return int(raw)


def content_disposition(name: str) -> str:
    """An attachment header for an artifact's file name (its last path part): an ASCII fallback and
    the exact name in RFC 5987 form."""
    base = name.rsplit("/", 1)[-1] or "artifact"
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in base)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(base, safe='')}"


async def keepalive(items: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes]:
    """`items`, with KEEPALIVE sent whenever none came for `seconds`.

    A pump task iterates `items` (all in one task, so the stream's context stays whole) and hands
    them over through a queue; waiting on the queue with a timeout never cancels the stream itself.
    When this generator is closed (the stream ended, or the client went away and the response was
    cancelled), the pump is cancelled and awaited, which closes `items` (its hub subscription too).
    """
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=16)

    async def pump() -> None:
        try:
            async for item in items:
                await queue.put(("item", item))
        except Exception as exc:
            await queue.put(("error", exc))
        else:
            await queue.put(("end", None))
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    task = asyncio.create_task(pump(), name="sse-pump")
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), seconds)
            except TimeoutError:
                yield KEEPALIVE
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def routes(gateway: Gateway, keepalive_seconds: float = KEEPALIVE_SECONDS) -> list[BaseRoute]:
    """The /v1 JSON routes and the event stream, served through `gateway`."""

    def unary(
        method: str, build: Callable[[Request], Awaitable[Message] | Message]
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint serving unary `method` with the request `build` makes of the HTTP request."""

        async def endpoint(request: Request) -> Response:
            try:
                message = build(request)
                if not isinstance(message, Message):
                    message = await message
            except InvalidRequest as err:
                return error_response(err, method)
            return await gateway.respond(request, method, message)

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
            after = resume_after(request)
            # Refuse an unknown run, another tenant's, or a missing key with a status, before the stream starts.
            await gateway.call(request, RUN_SERVICE + "GetRun", run_service_pb2.GetRunRequest(run_id=run_id))
            items = await gateway.stream(
                request, method, run_service_pb2.WatchRunRequest(run_id=run_id, after_sequence=after)
            )
        except Exception as exc:
            return error_response(exc, method)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for item in items:
                    yield sse(to_json(item.event))  # type: ignore[attr-defined]
            except Exception as exc:  # e.g. the server is stopping: the browser reconnects with Last-Event-ID
                error = error_response(exc, method)
                yield f"event: error\ndata: {bytes(error.body).decode()}\n\n".encode()
            finally:
                await items.aclose()  # type: ignore[attr-defined]

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            keepalive(events(), keepalive_seconds), media_type="text/event-stream", headers=headers
        )

    async def download_artifact(request: Request) -> Response:
        method = RUN_SERVICE + "DownloadArtifact"
        params = request.path_params
        try:
            if request.query_params:
                raise InvalidRequest([(n[:100], "unknown query parameter") for n in sorted(request.query_params)])
            message = run_service_pb2.DownloadArtifactRequest(
                run_id=params["run_id"], step_key=params["step_key"], name=params["name"]
            )
            items = await gateway.stream(request, method, message)
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
            "Cache-Control": "private, max-age=3600",
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
