"""Server interceptors: request context and error mapping (OpenTelemetry's comes first, see server.py).

Every domain error becomes its gRPC status (with google.rpc.BadRequest field violations for bad
input); a database that cannot be reached becomes UNAVAILABLE; anything else is logged with its
stack and returned as a plain INTERNAL. Clients never see a stack trace or driver text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import sqlalchemy.exc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.run_api.errors import InvalidRequest, RunsError, StoreUnavailable
from shared.logs import log_context

log = logging.getLogger(__name__)


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


def rich_status(error: RunsError) -> grpc.Status:
    """The gRPC status (with details in trailing metadata) for a domain error."""
    proto = status_pb2.Status(code=error.code.value[0], message=error.message)
    if isinstance(error, InvalidRequest):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=desc)
                for field, desc in error.violations
            ]
        )
        proto.details.add().Pack(detail)
    return rpc_status.to_status(proto)


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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by servicers to gRPC statuses, in one place."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/runs.v1."):
            return handler
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with log_context(rpc=method):
                    try:
                        return await unary(request, context)  # type: ignore[arg-type]
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with log_context(rpc=method):
                    try:
                        # aclosing: when the call ends early the handler is closed here, in this task.
                        async with contextlib.aclosing(stream(request, context)) as items:  # type: ignore[arg-type,type-var]
                            async for item in items:  # type: ignore[attr-defined]
                                yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


