"""The HTTP gateway's core: a JSON request becomes the proto request of a gRPC method, which is
served by the very servicer object the gRPC server uses, under the same caller checks.

So no rule lives twice: validation, tenants and errors are the servicers' and handlers'. The
gateway only transcodes (proto3 JSON both ways, field names as in the .proto), finds the caller
from an `Authorization: Bearer` header or the dashboard's `runs_key` cookie, and maps a domain
error to its HTTP status with the same body shape as the gRPC status details.

Every request that changes something (not GET or HEAD), whatever its credential (a cookie, a
bearer key, or none when auth is off), must carry the `X-Runs-Csrf: 1` header, which a cross-site
page cannot send without a CORS preflight (no CORS is served), and a JSON body
(`Content-Type: application/json`, else 415); one whose `Origin` is another origin or whose
`Sec-Fetch-Site` says it came from another site is refused (403) as well. `same_origin` is that
check for the dashboard's own form POSTs. The caller is checked before a body is read, so an
unauthenticated request learns nothing from field errors. Each call is an OpenTelemetry SERVER
span continuing the request's `traceparent`, so StartRun stores the caller's trace as over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.run_api.auth import Authenticator, Caller, acting_as
from services.run_api.errors import InvalidRequest, PermissionDenied, RequestTooLarge, RunsError
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
tracer = trace.get_tracer("runs.api.http")

KEY_COOKIE = "runs_key"
CSRF_HEADER = "x-runs-csrf"
# The largest JSON body accepted (the gRPC side's limit is 4 MiB of protobuf).
MAX_BODY_BYTES = 4 * 1024 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD"})

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


class UnsupportedMediaType(InvalidRequest):
    """A body that is not JSON by its Content-Type (HTTP 415; INVALID_ARGUMENT to metrics and gRPC)."""

    http_status = 415


def http_status(error: RunsError) -> int:
    """The HTTP status of a domain error: 413 for a body too large, 415 for a body not declared JSON,
    else by its gRPC code (HTTP_STATUS)."""
    if isinstance(error, RequestTooLarge):
        return 413
    return getattr(error, "http_status", None) or HTTP_STATUS.get(error.code, 500)


def _is_digits(text: str) -> bool:
    """Whole ASCII digits ("²" and other Unicode digits are not: int() refuses them)."""
    return text.isascii() and text.isdigit()


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    """(host lower-cased, port or the scheme's default) of a host[:port] (IPv6 in brackets); None if malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    return parts.hostname.lower(), port if port is not None else {"http": 80, "https": 443}.get(scheme)


def same_origin(request: Request) -> bool:
    """Whether a browser sent `request` from this server's own origin, or it is no browser's cross-site request.

    Refused: `Sec-Fetch-Site` other than same-origin or none (a user's own navigation), and an `Origin`
    (including "null") whose host and port are not the request's `Host`. No Origin and no
    Sec-Fetch-Site (curl, scripts, older browsers' same-origin requests): allowed. The scheme is not
    compared (behind a TLS terminator the request is http while the page is https); a missing port
    is the Origin's scheme's default on both sides.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        return False
    theirs = _host_port(parts.netloc, parts.scheme)
    ours = _host_port(request.headers.get("host", ""), parts.scheme)
    return theirs is not None and theirs == ours


def check_unsafe_request(request: Request) -> None:
    """For a request that changes something (not GET/HEAD): PermissionDenied unless it comes from this
    origin and carries `X-Runs-Csrf: 1`, whatever its credential."""
    if request.method in SAFE_METHODS:
        return
    if not same_origin(request):
        raise PermissionDenied("a cross-origin request may not change anything (Origin / Sec-Fetch-Site)")
    if request.headers.get(CSRF_HEADER) != "1":
        raise PermissionDenied(f"a request that changes something must send '{CSRF_HEADER}: 1'")


def _span_attributes(request: Request, method: str) -> dict[str, str]:
    _, service, name = method.split("/")
    return {"rpc.system": "runs-http", "rpc.service": service, "rpc.method": name,
            "http.request.method": request.method, "url.path": request.url.path}


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
    return JSONResponse(error_body(error), status_code=http_status(error))


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
        """The caller of an HTTP request to gRPC `method` (/pkg.Service/Method), or the auth error: a request
        that changes something must first pass `check_unsafe_request` (403)."""
        check_unsafe_request(request)
        key, _ = self.key_of(request)
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        return await self.authenticator.caller(method, metadata, self.authenticator.clock())

    async def authorize(self, request: Request, method: str) -> Caller:
        """`caller`, with a refusal told to the observer as the call's end (as gRPC's interceptor counts it)."""
        try:
            return await self.caller(request, method)
        except Exception as exc:
            self._ended(method, exc)
            raise

    def servicer(self, method: str) -> Callable[[Any, Any], Any]:
        """The bound servicer method serving `method`."""
        _, service, name = method.split("/")
        return getattr(self.services[service], name)  # type: ignore[no-any-return]

    async def _serve(self, request: Request, method: str, message: Message, caller: Caller) -> Message:
        try:
            with acting_as(caller), log_context(rpc=method):
                result: Message = await self.servicer(method)(message, HttpContext(request))
        except Exception as exc:
            self._ended(method, exc)
            raise
        self._ended(method, None)
        self.observer.call("observe_unary", self.observer.observer.observe_unary, method, message, result)
        return result

    async def call(self, request: Request, method: str, message: Message, caller: Caller | None = None) -> Message:
        """Serve unary `method` with `message` as the caller of `request` (checked here unless given), in a
        SERVER span continuing the request's trace context; domain errors propagate."""
        with tracer.start_as_current_span(
            method.lstrip("/"), context=propagate.extract(request.headers), kind=trace.SpanKind.SERVER,
            attributes=_span_attributes(request, method),
        ):
            if caller is None:
                caller = await self.authorize(request, method)
            return await self._serve(request, method, message, caller)

    async def respond(
        self, request: Request, method: str, build: Callable[[Request], Awaitable[Message] | Message],
        shape: Callable[[Message], Any] = to_json, status_code: int = 200,
    ) -> Response:
        """Unary `method` answered as JSON (`shape` of the response) or as the error's status and body: the
        caller is checked first, then `build` makes the request message of the HTTP request (its query or
        body, read only for a caller allowed to call), then the servicer serves it; all in one SERVER span."""
        with tracer.start_as_current_span(
            method.lstrip("/"), context=propagate.extract(request.headers), kind=trace.SpanKind.SERVER,
            attributes=_span_attributes(request, method),
        ) as span:
            try:
                caller = await self.authorize(request, method)
                message = build(request)
                if not isinstance(message, Message):
                    message = await message
                result = await self._serve(request, method, message, caller)
            except Exception as exc:
                response = error_response(exc, method)
            else:
                response = JSONResponse(shape(result), status_code=status_code)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(trace.StatusCode.ERROR)
            return response

    async def stream(
        self, request: Request, method: str, message: Message, caller: Caller | None = None
    ) -> AsyncIterator[Message]:
        """Server-streaming `method`, iterated in the caller's task with the caller set (checked here unless given)."""
        if caller is None:
            caller = await self.authorize(request, method)
        return self._stream(caller, method, message, request)

    async def _stream(self, caller: Caller, method: str, message: Message, request: Request) -> AsyncIterator[Message]:
        # The span is not made current: a stream may be resumed in another task than the one that started it.
        span = tracer.start_span(method.lstrip("/"), context=propagate.extract(request.headers),
                                 kind=trace.SpanKind.SERVER, attributes=_span_attributes(request, method))
        try:
            with acting_as(caller), log_context(rpc=method):
                items = self.servicer(method)(message, HttpContext(request))
                try:
                    async for item in items:
                        yield item
                except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
                    gone = isinstance(exc, asyncio.CancelledError | GeneratorExit)
                    error = RunsErrorCancelled() if gone else exc
                    self._ended(method, error)
                    translated = translate(error)
                    span.set_attribute("rpc.grpc.status_code",
                                       translated.code.value[0] if translated is not None else 2)
                    if translated is None:
                        span.set_status(trace.StatusCode.ERROR)
                    raise
                else:
                    self._ended(method, None)
                finally:
                    await items.aclose()
        finally:
            span.end()


async def read_json(request: Request, message: Message) -> Message:
    """The request's JSON body parsed into `message` (an empty body leaves it empty); 415 unless its
    Content-Type is application/json, 413 past MAX_BODY_BYTES."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        why = "the body must be JSON, sent as 'Content-Type: application/json'"
        raise UnsupportedMediaType([("Content-Type", why)])
    declared = request.headers.get("content-length")
    if declared is not None and _is_digits(declared) and int(declared) > MAX_BODY_BYTES:
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
