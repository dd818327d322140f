"""The worker's side of the artifact RPCs: UploadArtifact (a header, then 256 KiB chunks) and FetchArtifact.

Every call carries the worker id and the session token of the worker's claim stream (the Reporter
holds both), so a worker needs no storage credentials: the API stores and serves the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from services.run_worker.reporter import Reporter
from services.run_worker.tools import ArtifactError, LocalArtifact
from shared.gen.runs.v1 import worker_service_pb2, worker_service_pb2_grpc

CHUNK_BYTES = 256 * 1024
# Refusals about the artifact itself: trying again cannot help.
_FINAL = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _refused(what: str, err: grpc.aio.AioRpcError) -> ArtifactError:
    return ArtifactError(f"{what} refused: {err.code().name}: {err.details()}", retryable=err.code() not in _FINAL)


class ArtifactClient:
    """Uploads a try's files and fetches upstream ones for the runs this worker holds."""

    def __init__(self, stub: worker_service_pb2_grpc.WorkerServiceStub, reporter: Reporter,
                 timeout_seconds: float = 300.0) -> None:
        """The channel under `stub` carries the API key on every kind of call (shared/channels.py)."""
        self.stub = stub
        self.reporter = reporter
        self.timeout_seconds = timeout_seconds

    async def upload(self, run_id: str, attempt: int, step_key: str, artifact: LocalArtifact) -> dict[str, Any]:
        """Stream one file; returns what step.succeeded records of it: {name, uri, sha256, size, media_type}."""
        header = worker_service_pb2.ArtifactHeader(
            worker_id=self.reporter.worker_id, session_token=self.reporter.session_token, run_id=run_id,
            attempt=attempt, step_key=step_key, name=artifact.name, media_type=artifact.media_type,
        )

        async def requests() -> AsyncIterator[worker_service_pb2.UploadArtifactRequest]:
            yield worker_service_pb2.UploadArtifactRequest(header=header)
            with open(artifact.path, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                    yield worker_service_pb2.UploadArtifactRequest(chunk=chunk)

        try:
            response = await self.stub.UploadArtifact(requests(), timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise _refused(f"upload of artifact {artifact.name!r}", err) from None
        except OSError as err:
            raise ArtifactError(f"cannot read artifact {artifact.name!r}: {err.strerror or err}") from None
        stored = response.artifact
        return {"name": stored.name or artifact.name, "uri": stored.uri, "sha256": stored.sha256,
                "size": stored.size, "media_type": stored.media_type or artifact.media_type}

    async def fetch(self, run_id: str, attempt: int, artifact: Mapping[str, Any], dest: str) -> None:
        """Stream an artifact of the run into `dest`; its sha256 is checked before the file appears."""
        sha256 = str(artifact.get("sha256", ""))
        name = str(artifact.get("name", sha256))
        request = worker_service_pb2.FetchArtifactRequest(
            worker_id=self.reporter.worker_id, session_token=self.reporter.session_token, run_id=run_id,
            attempt=attempt, sha256=sha256,
        )
        partial = f"{dest}.part"
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as f:
                async for message in self.stub.FetchArtifact(request, timeout=self.timeout_seconds):
                    digest.update(message.chunk)
                    await asyncio.to_thread(f.write, message.chunk)
            if digest.hexdigest() != sha256:
                raise ArtifactError(f"artifact {name!r} arrived with sha256 {digest.hexdigest()}, not {sha256}")
            os.replace(partial, dest)
        except grpc.aio.AioRpcError as err:
            raise _refused(f"fetch of artifact {name!r}", err) from None
        except OSError as err:
            raise ArtifactError(f"cannot write artifact {name!r}: {err.strerror or err}") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
