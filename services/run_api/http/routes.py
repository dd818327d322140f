"""The JSON API under /v1 and the run event stream (Server-Sent Events), each route one gRPC method.

Path and query parameters (and a JSON body for POST) become the method's proto request; the
response is its proto3 JSON. `GET /v1/runs/{run_id}/events` streams WatchRun as Server-Sent
Events: `event:` the event type, `id:` its sequence, `data:` the event as JSON; a reconnecting
browser's `Last-Event-ID` (or `?after_sequence=`) resumes after that sequence, and the stream ends
after the terminal event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from services.run_api.errors import InvalidRequest
from services.run_api.http.gateway import Gateway, error_response, read_json, to_json
from shared.gen.runs.v1 import run_pb2, run_service_pb2

RUN_SERVICE = "/runs.v1.RunService/"
# Short status names in query strings (?status=RUNNING) as well as the enum's own.
_RUN_STATUS = {n.removeprefix("RUN_STATUS_"): n for n in run_pb2.RunStatus.keys()}


def from_query(request: Request, message: Message, **fixed: Any) -> Message:
    """`message` filled from the query string and `fixed` values (path parameters); unknown names are refused."""
    values: dict[str, Any] = {}
    for name, value in request.query_params.items():
        values[name] = value
    values.update(fixed)
    if "status" in values and isinstance(values["status"], str):
        values["status"] = _RUN_STATUS.get(values["status"].upper(), values["status"])
    try:
        json_format.ParseDict(values, message)
    except json_format.ParseError as err:
        raise InvalidRequest.field("query", str(err)[:300]) from None
    return message


def sse(event: dict[str, Any]) -> bytes:
    """One event as a Server-Sent Events message."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.get('sequence', '')}\nevent: {event.get('type', 'message')}\ndata: {data}\n\n".encode()


def resume_after(request: Request) -> int:
    """The sequence to resume after: Last-Event-ID, else ?after_sequence=, else 0."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after_sequence") or "0"
    if not raw.strip().isdigit() or len(raw) > 18:
        raise InvalidRequest.field("Last-Event-ID", "must be an event sequence (a whole number)")
    return int(raw)


def routes(gateway: Gateway) -> list[BaseRoute]:
    """The /v1 JSON routes and the event stream, served through `gateway`."""

    async def list_runs(request: Request) -> Response:
        try:
            message = from_query(request, run_service_pb2.ListRunsRequest())
        except InvalidRequest as err:
            return error_response(err, "ListRuns")
        return await gateway.respond(request, RUN_SERVICE + "ListRuns", message)

    async def start_run(request: Request) -> Response:
        try:
            message = await read_json(request, run_service_pb2.StartRunRequest())
        except InvalidRequest as err:
            return error_response(err, "StartRun")
        return await gateway.respond(request, RUN_SERVICE + "StartRun", message)

    async def get_run(request: Request) -> Response:
        message = run_service_pb2.GetRunRequest(run_id=request.path_params["run_id"])
        return await gateway.respond(request, RUN_SERVICE + "GetRun", message)

    async def cancel_run(request: Request) -> Response:
        try:
            message = await read_json(request, run_service_pb2.CancelRunRequest())
        except InvalidRequest as err:
            return error_response(err, "CancelRun")
        message.run_id = request.path_params["run_id"]  # type: ignore[attr-defined]
        return await gateway.respond(request, RUN_SERVICE + "CancelRun", message)

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

        async def body() -> AsyncIterator[bytes]:
            try:
                async for item in items:
                    yield sse(to_json(item.event))  # type: ignore[attr-defined]
            except Exception as exc:  # e.g. the server is stopping: the browser reconnects with Last-Event-ID
                error = error_response(exc, method)
                yield f"event: error\ndata: {bytes(error.body).decode()}\n\n".encode()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return [
        Route("/v1/runs", list_runs, methods=["GET"]),
        Route("/v1/runs", start_run, methods=["POST"]),
        Route("/v1/runs/{run_id}", get_run, methods=["GET"]),
        Route("/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/v1/runs/{run_id}/events", run_events, methods=["GET"]),
    ]
