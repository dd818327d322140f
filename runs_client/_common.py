"""What Client and AsyncClient share: the connection settings and the retry policy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from shared.backoff import backoff_seconds
from shared.settings import ClientTls

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0

CHANNEL_OPTIONS = (
    # Reconnect soon after the API comes back (gRPC's own default starts at 1 s and grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a dead peer under a long watch (the API accepts pings every 5 s; the worker sends the same).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # GetRun of a large run carries every step's output (gRPC's default limit is 4 MiB).
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

# Codes a retried call may meet again: only UNAVAILABLE (the call did not reach a server that answered).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class Retry:
    """Retries of idempotent calls on UNAVAILABLE: exponential backoff with jitter, capped.

    `attempts` is how many tries a unary call gets in all; a watch may fail `attempts` times in a
    row without receiving an event before it gives up (an event resets the count).
    """

    attempts: int = 8
    backoff_seconds: float = 0.1
    backoff_max_seconds: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...)."""
        return backoff_seconds(failures, self.backoff_seconds, self.backoff_max_seconds)


NO_RETRY = Retry(attempts=1)


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: the address, the API key and TLS."""

    addr: str
    key: str | None
    tls: ClientTls

    @classmethod
    def resolve(
        cls,
        addr: str | None,
        key: str | None,
        tls_ca: str | os.PathLike[str] | None,
        tls_cert: str | os.PathLike[str] | None,
        tls_key: str | os.PathLike[str] | None,
        env: Mapping[str, str] = os.environ,
    ) -> Connection:
        """Fill what was not given from RUN_API_ADDR, RUNS_API_KEY and RUNS_TLS_CA/CERT/KEY.

        key="" means no key even when RUNS_API_KEY is set; TLS files given as arguments replace the
        environment's as a whole.
        """
        address = addr or env.get("RUN_API_ADDR", "").strip() or DEFAULT_ADDR
        api_key = key if key is not None else (env.get("RUNS_API_KEY", "").strip() or None)
        if tls_ca is None and tls_cert is None and tls_key is None:
            tls = ClientTls.from_env(env)
        else:
            tls = ClientTls(
                ca=None if tls_ca is None else os.fspath(tls_ca),
                cert=None if tls_cert is None else os.fspath(tls_cert),
                key=None if tls_key is None else os.fspath(tls_key),
            )
        return cls(address, api_key or None, tls)
