"""The worker's side of the step cache: LookupStepCache for a cacheable step of a run it holds.

The worker sends the key's components (shared.workflow.cache_components); the API adds the tenant,
hashes them and answers a hit (the cached output and artifacts) or a miss with its reason. Like every
call about a held run it is fenced by the worker's session and the run attempt: a refusal for that
(PERMISSION_DENIED, FAILED_PRECONDITION) means the attempt is not ours, as for a report. Anything
else that goes wrong (the API unreachable after a short retry, an API without the RPC) is no reason
to fail a run: the lookup answers None and the step runs without the cache. Such failures are
logged once per outage, not once per step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import json_format

from services.run_worker.reporter import StaleAttempt
from services.run_worker.tools import Json
from shared.gen.runs.v1 import worker_service_pb2

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
NOT_OURS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION})


@dataclass(frozen=True)
class CacheHit:
    """A valid cached result: the step is recorded step.skipped with it and runs no tool."""

    key: str
    display: str
    layer: str  # hot (Redis) or cold (PostgreSQL)
    output: Json
    artifacts: list[Json]
    source_run_id: str
    source_step_key: str


@dataclass(frozen=True)
class CacheMiss:
    """No usable entry, and why (no_entry, expired, artifact_missing, artifact_changed, scope_run_only)."""

    key: str
    display: str
    reason: str
    detail: str = ""


class StepCache(Protocol):
    """What the orchestrator needs of the cache: one lookup (None: run the step without the cache)."""

    async def lookup(self, run_id: str, attempt: int, step_key: str, components: Mapping[str, Any],
                     scope: str) -> CacheHit | CacheMiss | None: ...


class _Session(Protocol):
    worker_id: str
    session_token: str


@dataclass
class StepCacheClient:
    """LookupStepCache over the worker's stub, with the worker id and session token of its Reporter."""

    stub: Any
    session: _Session
    timeout_seconds: float = 5.0
    tries: int = 3  # calls while the API is unreachable, then the step runs without the cache
    retry_seconds: float = 0.2  # before the second call; doubled after each
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _outage: str | None = field(default=None, init=False)  # what is failing now (logged once)

    async def lookup(self, run_id: str, attempt: int, step_key: str, components: Mapping[str, Any],
                     scope: str) -> CacheHit | CacheMiss | None:
        """Ask the API; raises StaleAttempt when the attempt is not ours, answers None when it cannot ask."""
        try:
            request = worker_service_pb2.LookupStepCacheRequest(
                worker_id=self.session.worker_id, session_token=self.session.session_token, run_id=run_id,
                attempt=attempt, step_key=step_key, scope=scope,
            )
            request.components.update(dict(components))
        except (TypeError, ValueError) as err:  # a component protobuf cannot carry: no key for this step
            self._failing(f"components not sendable ({type(err).__name__})", f"{err}")
            return None
        delay = self.retry_seconds
        for i in range(self.tries):
            try:
                response = await self.stub.LookupStepCache(request, timeout=self.timeout_seconds)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code in NOT_OURS:
                    raise StaleAttempt(f"cache lookup refused: {code.name}: {err.details()}") from None
                if code in RETRYABLE and i < self.tries - 1:
                    await self.sleep(delay)
                    delay *= 2
                    continue
                self._failing(code.name, err.details() or "")
                return None
            self._recovered()
            return _answer(response)
        return None  # not reached: the last try returns

    def _failing(self, what: str, details: str) -> None:
        if self._outage != what:
            self._outage = what
            log.warning("step cache lookups fail (%s: %s); steps run without the cache until they work again",
                        what, details[:300])

    def _recovered(self) -> None:
        if self._outage is not None:
            log.info("step cache lookups work again (after %s)", self._outage)
            self._outage = None


def artifact_dict(a: Any) -> Json:
    """An Artifact message as events carry it."""
    return {"name": a.name, "uri": a.uri, "sha256": a.sha256, "size": a.size, "media_type": a.media_type}


def _answer(response: Any) -> CacheHit | CacheMiss:
    if response.hit:
        return CacheHit(
            key=response.cache_key, display=response.display, layer=response.layer,
            output=json_format.MessageToDict(response.output),
            artifacts=[artifact_dict(a) for a in response.artifacts],
            source_run_id=response.source_run_id, source_step_key=response.source_step_key,
        )
    return CacheMiss(key=response.cache_key, display=response.display, reason=response.miss_reason or "no_entry",
                     detail=response.detail)
