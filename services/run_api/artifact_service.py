"""Artifact RPCs: a worker uploads a step's files and fetches upstream ones; a client downloads them.

The servicers delegate UploadArtifact, FetchArtifact and DownloadArtifact here. The database is
only read, in a short transaction before any bytes move: the worker's session and its hold on the
run's attempt, or the client's view of the run, and the run_artifacts rows (written only by the
event store, when step.succeeded is recorded). The bytes go to and come from the ArtifactStore,
under the run's tenant.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.run_api import convert, handlers
from services.run_api.artifacts import ArtifactMissing, ArtifactStore, check_artifact_name, check_sha256
from services.run_api.auth import current_caller
from services.run_api.checks import MAX_IDENTIFIER, check_identifier, check_text
from services.run_api.errors import IllegalTransition, InvalidRequest, NotFound, PermissionDenied, shorten
from services.run_api.store import queries as Q
from services.run_api.store.uow import UnitOfWork
from shared.events import RunStatus
from shared.gen.runs.v1 import run_pb2, run_service_pb2, worker_service_pb2

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
DEFAULT_MEDIA_TYPE = "application/octet-stream"
MAX_MEDIA_TYPE_CHARS = 255
MAX_SESSION_TOKEN_CHARS = 128

class ArtifactNotFound(NotFound):
    """No artifact of the run answers the request."""


# --- checks ------------------------------------------------------------------------------------


def _check_worker_fields(prefix: str, worker_id: str, session_token: str, run_id: str, attempt: int) -> None:
    check_identifier(f"{prefix}worker_id", worker_id, required=True)
    check_text(f"{prefix}session_token", session_token, limit=MAX_SESSION_TOKEN_CHARS)
    check_identifier(f"{prefix}run_id", run_id, required=True)
    if attempt < 1:
        raise InvalidRequest.field(f"{prefix}attempt", "attempt must be the claim's attempt (1 or more)")


def media_type_of(name: str, media_type: str) -> str:
    """The media type an artifact is recorded with: the one given, else guessed from its name."""
    if media_type:
        return media_type
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or DEFAULT_MEDIA_TYPE


def _check_media_type(field: str, media_type: str) -> None:
    if not media_type:
        return
    check_identifier(field, media_type, limit=MAX_MEDIA_TYPE_CHARS)
    kind, slash, sub = media_type.partition(";")[0].strip().partition("/")
    if not (kind and slash and sub) or " " in kind or " " in sub:
        raise InvalidRequest.field(field, f"{field} must be a media type such as text/plain")


async def held_run(uow: UnitOfWork, worker_id: str, session_token: str, run_id: str, attempt: int) -> Any:
    """The run row, when the calling worker's session is live and it holds the run's `attempt` now.

    Else PERMISSION_DENIED (wrong session, or an attempt this worker never claimed: the same answer
    whether or not the run exists) or FAILED_PRECONDITION (a stale attempt: this worker claimed it,
    but the run moved on), as for a report (handlers._check_holder).
    """
    await handlers.check_session(uow, worker_id, session_token)
    run = (await uow.conn.execute(Q.run_get, {"run_id": run_id})).first()
    if run is not None and run.status == RunStatus.RUNNING and run.worker_id == worker_id and run.attempt == attempt:
        return run
    claimers = await uow.conn.execute(Q.run_events_claimers, {"run_ids": [run_id], "attempts": [attempt]})
    claimed = any(row.worker_id == worker_id for row in claimers.all())
    if run is None or not claimed:
        log.warning(
            "refused an artifact call about a run attempt this worker never held",
            extra={"worker_id": worker_id, "run_id": shorten(run_id), "attempt": attempt},
        )
        raise PermissionDenied(f"this worker does not hold run {shorten(run_id)!r} attempt {attempt}")
    raise IllegalTransition(
        f"run {run_id} attempt {attempt} is no longer held by this worker (the run is {run.status}, "
        f"attempt {run.attempt}): a stale attempt can record nothing"
    )


# --- handlers ----------------------------------------------------------------------------------


async def upload_artifact(
    engine: AsyncEngine,
    store: ArtifactStore,
    max_bytes: int,
    request_iterator: AsyncIterable[worker_service_pb2.UploadArtifactRequest],
    context: grpc.aio.ServicerContext | None,
) -> worker_service_pb2.UploadArtifactResponse:
    """Store a file a step of a held run produced: a header first, then chunks; returns what was stored.

    The artifact is not recorded here: the worker reports it with step.succeeded, which the event
    store fences like every event (a stale attempt's upload leaves bytes nobody refers to).
    """
    requests = aiter(request_iterator)
    first = await anext(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidRequest.field("header", "the first message must carry the header (worker, run, step and name)")
    header = first.header
    _check_worker_fields("header.", header.worker_id, header.session_token, header.run_id, header.attempt)
    check_identifier("header.step_key", header.step_key, required=True, limit=MAX_IDENTIFIER)
    check_artifact_name(header.name, "header.name")
    _check_media_type("header.media_type", header.media_type)
    worker_id = current_caller().worker_id(header.worker_id)
    async with UnitOfWork(engine) as uow:
        run = await held_run(uow, worker_id, header.session_token, header.run_id, header.attempt)

    async def chunks() -> AsyncIterator[bytes]:
        async for request in requests:
            if request.WhichOneof("part") == "header":
                raise InvalidRequest.field("header", "only the first message carries the header")
            yield request.chunk

    sha256, size, uri = await store.put(run.tenant_id, chunks(), max_bytes)
    log.debug(
        "artifact stored (%d bytes)", size,
        extra={"run_id": header.run_id, "worker_id": worker_id, "attempt": header.attempt},
    )
    return worker_service_pb2.UploadArtifactResponse(
        artifact=run_pb2.Artifact(
            run_id=header.run_id, step_key=header.step_key, name=header.name, uri=uri, sha256=sha256, size=size,
            media_type=media_type_of(header.name, header.media_type),
        )
    )


async def fetch_artifact(
    engine: AsyncEngine,
    store: ArtifactStore,
    request: worker_service_pb2.FetchArtifactRequest,
    context: grpc.aio.ServicerContext | None,
) -> AsyncIterator[worker_service_pb2.FetchArtifactResponse]:
    """Stream an artifact of a run the calling worker holds (any step's), by its sha256."""
    _check_worker_fields("", request.worker_id, request.session_token, request.run_id, request.attempt)
    check_sha256(request.sha256)
    worker_id = current_caller().worker_id(request.worker_id)
    async with UnitOfWork(engine) as uow:
        run = await held_run(uow, worker_id, request.session_token, request.run_id, request.attempt)
        params = {"run_id": request.run_id, "sha256": request.sha256}
        row = (await uow.conn.execute(Q.run_artifacts_by_sha256, params)).first()
    if row is None:
        raise ArtifactNotFound(f"run {request.run_id} has no artifact with sha256 {request.sha256}")
    async for chunk in store.read(run.tenant_id, request.sha256, CHUNK_BYTES):
        yield worker_service_pb2.FetchArtifactResponse(chunk=chunk)


async def download_artifact(
    engine: AsyncEngine,
    store: ArtifactStore,
    request: run_service_pb2.DownloadArtifactRequest,
    context: grpc.aio.ServicerContext | None,
) -> AsyncIterator[run_service_pb2.DownloadArtifactResponse]:
    """Stream one artifact of a run the caller sees: its Artifact first, then its bytes in chunks."""
    check_identifier("step_key", request.step_key, required=True)
    check_text("name", request.name, limit=1024)
    if not request.name:
        raise InvalidRequest.field("name", "name is required")
    async with UnitOfWork(engine) as uow:
        run = await handlers.run_exists(uow, request.run_id, current_caller())
        params = {"run_id": request.run_id, "step_key": request.step_key, "name": request.name}
        row = (await uow.conn.execute(Q.run_artifacts_get, params)).first()
    if row is None:
        raise ArtifactNotFound(
            f"run {request.run_id} has no artifact {shorten(request.name)!r} of step {shorten(request.step_key)!r}"
        )
    if not await store.exists(run.tenant_id, row.sha256):
        log.error("an artifact's bytes are missing from the store", extra={"run_id": request.run_id})
        raise ArtifactMissing(row.sha256)
    yield run_service_pb2.DownloadArtifactResponse(artifact=convert.artifact(row.run_id, row.step_key, row))
    async for chunk in store.read(run.tenant_id, row.sha256, CHUNK_BYTES):
        yield run_service_pb2.DownloadArtifactResponse(chunk=chunk)
