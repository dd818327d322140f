"""The HTTP gateway's core: a JSON request becomes the proto request of a gRPC method, which is
served by the very servicer object the gRPC server uses, under the same caller checks.

So no rule lives twice: validation, tenants and errors are the servicers' and handlers'. The
gateway only transcodes (proto3 JSON both ways, field names as in the .proto), finds the caller
from an `Authorization: Bearer` header or the dashboard's `runs_key` cookie, and maps a domain
error to its HTTP status with the same body shape as the gRPC status details.

A browser's cookie is sent on cross-site requests too, so a call that changes something and is
authenticated by the cookie must also carry the `X-Runs-Csrf: 1` header, which a cross-site form
cannot send (no CORS is served).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.run_api.auth import Authenticator, Caller, acting_as
from services.run_api.errors import InvalidRequest, RequestTooLarge, RunsError, Unauthenticated
from services.run_api.interceptors import (
    MAX_MESSAGE_BYTES,
    CallObserver,
    SafeObserver,
    Unobserved,
    cap,
    translate,
)
from shared.logs import log_context

log = logging.getLogger(__name__)

KEY_COOKIE = "runs_key"
CSRF_HEADER = "x-runs-csrf"
# The largest JSON body accepted (the gRPC side's limit is 4 MiB of protobuf).
MAX_BODY_BYTES = 4 * 1024 * 1024

# gRPC status -> HTTP status, as Google's HTTP APIs map them (google.rpc.Code).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RunsErrorCancelled(RunsError):
    """The client went away while its stream was open (counted as CANCELLED, as gRPC counts it)."""

    code = grpc.StatusCode.CANCELLED

    def __init__(self) -> None:
        super().__init__("the client went away")


class HttpContext:
    """The little of grpc.aio.ServicerContext that unary servicers may touch over HTTP."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's headers, lower-cased as gRPC metadata is."""
        return tuple((k.lower(), v) for k, v in self.request.headers.items())


def to_json(message: Message) -> dict[str, Any]:
    """A proto message as proto3 JSON with the .proto's field names (int64 as strings, enums by name)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def error_body(error: RunsError) -> dict[str, Any]:
    """The JSON body of an error: code and message, and field violations for bad input."""
    body: dict[str, Any] = {"code": error.code.name, "message": cap(error.message, MAX_MESSAGE_BYTES)}
    if isinstance(error, InvalidRequest):
        body["field_violations"] = [
            {"field": cap(f, 100), "description": cap(d, 300)} for f, d in error.violations[:50]
        ]
    return body


def error_response(exc: BaseException, where: str) -> JSONResponse:
    """The response for an exception raised while serving `where` (unknown ones: 500, logged with the stack)."""
    error = translate(exc)
    if error is None:
        log.error("unhandled error in %s", where, exc_info=exc)
        return JSONResponse({"code": "INTERNAL", "message": "internal error"}, status_code=500)
    return JSONResponse(error_body(error), status_code=HTTP_STATUS.get(error.code, 500))


class Gateway:
    """Serves gRPC methods over HTTP: `services` maps a service's full name to its servicer object."""

    def __init__(
        self, authenticator: Authenticator, services: dict[str, Any], observer: CallObserver | None = None
    ) -> None:
        self.authenticator = authenticator
        self.services = services
        # Told of each call as the gRPC interceptor tells it (metrics: requests by method and code, runs started).
        self.observer = SafeObserver(observer or Unobserved())

    def _ended(self, method: str, exc: BaseException | None) -> None:
        error = None if exc is None else translate(exc)
        code = grpc.StatusCode.OK if exc is None else error.code if error is not None else grpc.StatusCode.INTERNAL
        self.observer.call("observe_call", self.observer.observer.observe_call, method, code)

    def key_of(self, request: Request) -> tuple[str | None, bool]:
        """The API key a request carries and whether it came from the cookie."""
        header = request.headers.get("authorization")
        if header:
            scheme, _, token = header.strip().partition(" ")
            return (token.strip() if scheme.lower() == "bearer" else None), False
        cookie = request.cookies.get(KEY_COOKIE)
        return (cookie or None), bool(cookie)

    async def caller(self, request: Request, method: str) -> Caller:
        """The caller of an HTTP request to gRPC `method` (/pkg.Service/Method), or the auth error."""
        key, from_cookie = self.key_of(request)
        if from_cookie and request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
            raise Unauthenticated(f"a request authenticated by the {KEY_COOKIE} cookie must send '{CSRF_HEADER}: 1'")
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        return await self.authenticator.caller(method, metadata, self.authenticator.clock())

    def servicer(self, method: str) -> Callable[[Any, Any], Any]:
        """The bound servicer method serving `method`."""
        _, service, name = method.split("/")
        return getattr(self.services[service], name)  # type: ignore[no-any-return]

    async def call(self, request: Request, method: str, message: Message) -> Message:
        """Serve unary `method` with `message` as the caller of `request`; domain errors propagate."""
        try:
            caller = await self.caller(request, method)
            with acting_as(caller), log_context(rpc=method):
                result: Message = await self.servicer(method)(message, HttpContext(request))
        except Exception as exc:
            self._ended(method, exc)
            raise
        self._ended(method, None)
        self.observer.call("observe_unary", self.observer.observer.observe_unary, method, message, result)
        return result

    async def respond(
        self, request: Request, method: str, message: Message,
        shape: Callable[[Message], Any] = to_json, status_code: int = 200,
    ) -> Response:
        """`call`, answered as JSON (`shape` of the response) or as the error's status and body."""
        try:
            result = await self.call(request, method, message)
        except Exception as exc:
            return error_response(exc, method)
        return JSONResponse(shape(result), status_code=status_code)

    async def stream(
        self, request: Request, method: str, message: Message
    ) -> AsyncIterator[Message]:
        """Server-streaming `method`, iterated in the caller's task with the caller set (checked before)."""
        try:
            caller = await self.caller(request, method)
        except Exception as exc:
            self._ended(method, exc)
            raise
        return self._stream(caller, method, message, request)

    async def _stream(self, caller: Caller, method: str, message: Message, request: Request) -> AsyncIterator[Message]:
        with acting_as(caller), log_context(rpc=method):
            items = self.servicer(method)(message, HttpContext(request))
            try:
                async for item in items:
                    yield item
            except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
                gone = isinstance(exc, asyncio.CancelledError | GeneratorExit)
                self._ended(method, RunsErrorCancelled() if gone else exc)
                raise
            else:
                self._ended(method, None)
            finally:
                await items.aclose()


async def read_json(request: Request, message: Message) -> Message:
    """The request's JSON body parsed into `message` (an empty body leaves it empty)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestTooLarge([("body", f"the body must be at most {MAX_BODY_BYTES} bytes")])
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise RequestTooLarge([("body", f"the body must be at most {MAX_BODY_BYTES} bytes")])
    if not data.strip():
        return message
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidRequest.field("body", "the body must be JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest.field("body", "the body must be a JSON object")
    return parse_fields(value, message, "field")


def parse_fields(values: dict[str, Any], message: Message, kind: str) -> Message:
    """`values` (proto3 JSON by field name) parsed into `message`, one field at a time, so that every
    unknown or malformed one is a field violation under its own name (`kind`: "field" or "query parameter")."""
    fields = message.DESCRIPTOR.fields_by_name
    json_names = {f.json_name: f.name for f in message.DESCRIPTOR.fields}
    violations: list[tuple[str, str]] = []
    for name, value in values.items():
        field = fields.get(name) or fields.get(json_names.get(name, ""))
        if field is None:
            violations.append((cap(name, 100), f"unknown {kind}; known: {', '.join(sorted(fields))}"))
            continue
        if kind == "query parameter" and field.type == field.TYPE_BOOL and isinstance(value, str):
            value = {"true": True, "1": True, "false": False, "0": False}.get(value.lower(), value)
        try:
            json_format.ParseDict({name: value}, message)
        except (json_format.ParseError, RecursionError, TypeError, ValueError) as err:
            # ParseError says "Failed to parse <field> field: <why> at <Message>.<field>."; keep the why.
            why = str(err).split("\n", 1)[0].partition(" field: ")[2].rsplit(" at ", 1)[0]
            violations.append((field.name, cap(why or "does not match the field's type", 300)))
    if violations:
        raise InvalidRequest(violations)
    return message


Endpoint = Callable[[Request], Awaitable[Response]]
