"""gRPC channels to the API for every client (worker, CLI, tests): TLS when configured, a bearer key.

One factory, so the worker, the CLI and the embedded worker connect the same way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import grpc

from shared.settings import ClientTls

Options = Sequence[tuple[str, Any]]


def _read(path: str | None) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes()


def credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Channel credentials trusting `tls.ca` (the system roots when unset), with a client certificate if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
    )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries an API key."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class _AioBearer:
    """Adds `authorization: Bearer <key>` to a call of an aio channel."""

    def __init__(self, api_key: str) -> None:
        self.metadata = auth_metadata(api_key)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first call kind it implements, so each kind needs its own object.
class _AioBearerUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioBearerStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioBearerClientStream(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def aio_channel(
    addr: str,
    tls: ClientTls | None = None,
    api_key: str | None = None,
    options: Options = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to the API: TLS when `tls` says so, the API key on every call."""
    extra: list[grpc.aio.ClientInterceptor] = [*interceptors]
    if api_key:
        extra += [_AioBearerUnary(api_key), _AioBearerStream(api_key), _AioBearerClientStream(api_key)]  # type: ignore[list-item]
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(addr, credentials(tls), options=list(options), interceptors=extra)
    return grpc.aio.insecure_channel(addr, options=list(options), interceptors=extra)


class _SyncBearerKey(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor
):
    """Adds `authorization: Bearer <key>` to every call of a blocking channel."""

    def __init__(self, api_key: str) -> None:
        self.metadata = auth_metadata(api_key)

    def _details(self, details: Any) -> Any:
        return _CallDetails(
            details.method, details.timeout, [*(details.metadata or ()), *self.metadata], details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self, method: str, timeout: Any, metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any
    ) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def channel(addr: str, tls: ClientTls | None = None, api_key: str | None = None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to the API (the CLI's): TLS when `tls` says so, the API key on every call."""
    if tls is not None and tls.enabled:
        base = grpc.secure_channel(addr, credentials(tls), options=list(options))
    else:
        base = grpc.insecure_channel(addr, options=list(options))
    if api_key:
        return grpc.intercept_channel(base, _SyncBearerKey(api_key))
    return base
