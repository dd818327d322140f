"""Server interceptors: request context and error mapping (OpenTelemetry's comes first, see server.py).

Every domain error becomes its gRPC status (with google.rpc.BadRequest field violations for bad
input); a database that cannot be reached becomes UNAVAILABLE; anything else is logged with its
stack and returned as a plain INTERNAL. Clients never see a stack trace or driver text.

A request that cannot be decoded (bad bytes, invalid UTF-8 in a string field) is INVALID_ARGUMENT
with one warning line: grpc decodes before any handler runs and would answer UNKNOWN with the
exception's class and log a traceback, so the interceptor swaps in a deserializer that cannot fail.
Every status it sends is capped in size, so no error echoes a client's long value back whole.
Client-streaming methods get the same: each message the handler reads is checked as it arrives.
Bidirectional methods (runs.v1 has none) fail closed with UNIMPLEMENTED until they are wrapped too.

It is also the one place that sees every call's final status code, request and response: a
CallObserver (the process's metrics) is told of each, outside the call's error handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import psycopg
import sqlalchemy.exc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.run_api.errors import InvalidRequest, RunsError, StoreUnavailable
from shared.logs import log_context

log = logging.getLogger(__name__)

# Caps on what a status carries (UTF-8 bytes, cut with an ellipsis): grpc-message is sent
# percent-encoded and grpc-status-details-bin base64-encoded, and together they must stay well
# under the client's 8 KiB metadata limit, or the client sees a metadata error instead.
MAX_MESSAGE_BYTES = 1000
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 300
MAX_DETAILS_BYTES = 3000  # the serialized google.rpc.Status; violations past it are left out


def translate(exc: BaseException) -> RunsError | None:
    """The domain error for `exc`: itself, UNAVAILABLE for connection failures, None for bugs."""
    if isinstance(exc, RunsError):
        return exc
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
    ):
        return StoreUnavailable()
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | ConnectionError | TimeoutError):
        return StoreUnavailable()
    return None


def cap(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, ending in "…" when cut (lone surrogates become "?")."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8")
    return data[: max(limit - 3, 0)].decode("utf-8", "ignore") + "…"  # "…" is 3 bytes


def rich_status(error: RunsError) -> grpc.Status:
    """The gRPC status (with details in trailing metadata) for a domain error, capped in size."""
    proto = status_pb2.Status(code=error.code.value[0], message=cap(error.message, MAX_MESSAGE_BYTES))
    if isinstance(error, InvalidRequest):
        detail = error_details_pb2.BadRequest()
        budget = MAX_DETAILS_BYTES - proto.ByteSize() - 100  # the Any's type URL and framing
        for field, desc in error.violations:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=cap(field, MAX_FIELD_BYTES), description=cap(desc, MAX_DESCRIPTION_BYTES)
            )
            budget -= violation.ByteSize() + 4
            if budget < 0 and detail.field_violations:
                break  # keep the first ones: the client fixes those and learns of the rest next
            detail.field_violations.append(violation)
        proto.details.add().Pack(detail)
    return rpc_status.to_status(proto)


class _Undecodable:
    """What the deserializer returns for bytes that are not a valid request message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    """`StartRunRequest` for `StartRunRequest.FromString`; "request" for anything else."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "name", "request"))


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, returning an `_Undecodable` (with a short reason) where it would raise."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            # upb: "Error parsing message with type 'runs.v1.X': Wire format was corrupt"; keep the
            # part after the type. Other errors (not DecodeError) have no text a client needs.
            text = str(exc) if isinstance(exc, DecodeError) else ""
            reason = text.rpartition("': ")[2].strip().rstrip(".") or "it cannot be decoded"
            return _Undecodable(cap(reason, 120))

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, method: str, message: str, request: _Undecodable) -> None:
    """INVALID_ARGUMENT for an undecodable request, logged in one line without a stack."""
    log.warning("%s: refused an undecodable request (%s)", method, request.reason)
    description = f"the request is not a valid {message} message: {request.reason}"
    status = rich_status(InvalidRequest.field("request", description))
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    error = translate(exc)
    if error is None:
        log.error("unhandled error in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        return
    if isinstance(error, StoreUnavailable):
        log.warning("%s: database unavailable (%s)", method, type(exc).__name__)
    status = rich_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


# Opens the scope of one call's caller (see auth.Authenticator.calling): (method, metadata) -> context.
CallerScope = Callable[[str, Any], contextlib.AbstractAsyncContextManager[Any]]


def _no_caller(method: str, metadata: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    return contextlib.nullcontext()


class CallObserver(Protocol):
    """Told of each runs.v1 call: its final code, a unary call's answer, a stream's messages."""

    def observe_call(self, method: str, code: grpc.StatusCode) -> None:
        """The call ended with `code`."""

    def observe_unary(self, method: str, request: Any, response: Any) -> None:
        """A unary call answered `response`."""

    def observe_streamed(self, method: str, request: Any, item: Any) -> None:
        """A server-streaming call sent `item`."""


class Unobserved:
    def observe_call(self, method: str, code: grpc.StatusCode) -> None:
        pass

    def observe_unary(self, method: str, request: Any, response: Any) -> None:
        pass

    def observe_streamed(self, method: str, request: Any, item: Any) -> None:
        pass


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """The status a call that raised `exc` ends with: what it aborted with; CANCELLED when the client left."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    try:
        code = context.code()
    except Exception:
        code = None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class SafeObserver:
    """An observer whose failures are logged (once per kind) and never reach the call."""

    def __init__(self, observer: CallObserver) -> None:
        self.observer = observer
        self.failed: set[str] = set()

    def call(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            if what not in self.failed:
                self.failed.add(what)
                log.exception("call observer failed in %s (logged once)", what)

    def ended(self, method: str, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        code = grpc.StatusCode.OK if exc is None else _final_code(context, exc)
        self.call("observe_call", self.observer.observe_call, method, code)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by servicers to gRPC statuses, in one place.

    Inside it, each call runs in `scope(method, metadata)`: the server passes the authenticator's,
    which finds the caller (or raises UNAUTHENTICATED / PERMISSION_DENIED, mapped here like any
    other error) and sets it for the servicer.
    """

    def __init__(self, scope: CallerScope = _no_caller, observer: CallObserver | None = None) -> None:
        self.scope = scope
        self.observer = SafeObserver(observer or Unobserved())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/runs.v1."):
            return handler
        metadata = handler_call_details.invocation_metadata
        scope, observer = self.scope, self.observer
        # Interceptors that run before this one (OpenTelemetry's _wrap_rpc_behavior) rebuild the
        # handler with the request_deserializer returned here, so the tolerant one stays in force.
        # Client-streaming handlers get their messages through _checked (never use context.read():
        # it would hand them the sentinel); bidirectional ones are not served and keep grpc's.
        deserializer = handler.request_deserializer
        message = "request"
        if deserializer is not None and handler.stream_stream is None:
            message = _message_name(deserializer)
            deserializer = _tolerant(deserializer)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    response = await mapped_unary(request, context)
                except BaseException as exc:
                    observer.ended(method, context, exc)
                    raise
                observer.ended(method, context, None)
                observer.call("observe_unary", observer.observer.observe_unary, method, request, response)
                return response

            async def mapped_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with log_context(rpc=method):
                    try:
                        # The caller first: garbage from a caller without a key is UNAUTHENTICATED, unlogged.
                        async with scope(method, metadata):
                            if isinstance(request, _Undecodable):
                                await _refuse(context, method, message, request)
                            return await unary(request, context)  # type: ignore[arg-type]
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async with contextlib.aclosing(mapped_stream(request, context)) as items:
                        async for item in items:
                            observer.call("observe_streamed", observer.observer.observe_streamed, method,
                                          request, item)
                            yield item
                except BaseException as exc:
                    observer.ended(method, context, exc)
                    raise
                observer.ended(method, context, None)

            async def mapped_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
                with log_context(rpc=method):
                    try:
                        async with scope(method, metadata):
                            if isinstance(request, _Undecodable):
                                await _refuse(context, method, message, request)
                            # aclosing: when the call ends early the handler is closed here, in this task.
                            async with contextlib.aclosing(
                                stream(request, context)  # type: ignore[arg-type,type-var]
                            ) as items:
                                async for item in items:  # type: ignore[attr-defined]
                                    yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            client_stream = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    response = await mapped_client_stream(requests, context)
                except BaseException as exc:
                    observer.ended(method, context, exc)
                    raise
                observer.ended(method, context, None)
                return response

            async def mapped_client_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                with log_context(rpc=method):
                    try:
                        # The caller first, before any message is read (or refused as garbage).
                        async with scope(method, metadata):
                            checked = _checked(requests, context, method, message)
                            async with contextlib.aclosing(checked):
                                return await client_stream(checked, context)  # type: ignore[arg-type]
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort(context, method, exc)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        # Fail closed: a bidirectional method would reach its servicer with no caller checked.
        return grpc.stream_stream_rpc_method_handler(
            _unserved, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str, message: str
) -> AsyncGenerator[Any, None]:
    """A client stream's messages as they arrive; an undecodable one ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, method, message, request)
        yield request


async def _unserved(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Bidirectional methods are not served: none passes the caller and error checks yet."""
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "bidirectional streaming methods are not served")
    yield  # pragma: no cover - an async generator, as a stream-stream handler must be


