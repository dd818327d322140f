"""The artifact store: files steps produced, content-addressed by sha256, per tenant, over fsspec.

An object lives at `{root}/{tenant}/sha256/{h[:2]}/{h}`; `root` comes from RUNS_ARTIFACTS_URL (any
fsspec URL; default `<data_dir>/artifacts`). An upload is streamed to a temporary object while it
is hashed, then moved into place, so a reader never sees a partial object and the same bytes
uploaded twice are stored once. fsspec is synchronous: every call runs in a worker thread.

Only the API writes here, and only bytes: which run and step an artifact belongs to is recorded
by the event store (run_artifacts, projected from step.succeeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import fsspec
import grpc
from fsspec.core import url_to_fs
from ulid import ULID

from services.run_api.errors import InvalidRequest, RequestTooLarge, RunsError
from shared.settings import ApiSettings

MAX_NAME_CHARS = 255
_NAME_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Tenant ids are free text (printable, no surrounding spaces): every character but these is escaped
# as %XX (so '/', '.', '%' never reach the path) and distinct tenants never share a folder.
_TENANT_SAFE = re.compile(r"[A-Za-z0-9_-]")


class ArtifactTooLarge(RequestTooLarge):
    """An upload over the size limit: RESOURCE_EXHAUSTED, naming `chunk` (the message that crossed it)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__([("chunk", f"the artifact is over the limit of {max_bytes} bytes (RUNS_ARTIFACT_MAX_BYTES)")])


class ArtifactMissing(RunsError):
    """An artifact recorded for a run whose bytes are not (or no longer) in the store."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, sha256: str) -> None:
        super().__init__(f"the bytes of artifact sha256 {sha256} are missing from the artifact store")


def check_artifact_name(name: str, field: str = "name") -> None:
    """Refuse an artifact name that is not a relative path of [A-Za-z0-9._-]+ segments joined by '/'."""
    if not name:
        raise InvalidRequest.field(field, f"{field} is required")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequest.field(field, f"{field} is {len(name)} characters; at most {MAX_NAME_CHARS}")
    segments = name.split("/")
    if any(not _NAME_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidRequest.field(
            field, f"{field} must be a relative path: segments of letters, digits, '.', '_', '-' joined by '/'"
        )
    if any(s in (".", "..") for s in segments):
        raise InvalidRequest.field(field, f"{field} must not have '.' or '..' segments")


def check_sha256(sha256: str, field: str = "sha256") -> None:
    """Refuse a digest that is not 64 lowercase hex digits."""
    if not _SHA256.fullmatch(sha256):
        raise InvalidRequest.field(field, f"{field} must be 64 lowercase hex digits")


def tenant_segment(tenant: str) -> str:
    """The path segment of a tenant: letters, digits, '_' and '-' as they are, anything else %XX-escaped."""
    if not tenant:
        raise ValueError("a tenant is required")
    return "".join(c if _TENANT_SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in tenant)


class ArtifactStore:
    """Content-addressed artifacts of every tenant under one fsspec root."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        fs, root = url_to_fs(url, **storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/") or root

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> ArtifactStore:
        """The store RUNS_ARTIFACTS_URL names; unset: the folder `artifacts` in the data directory."""
        url = settings.artifacts_url or os.path.abspath(os.path.join(settings.data_dir, "artifacts"))
        return cls(url)

    def path(self, tenant: str, sha256: str) -> str:
        """Where the object with this digest lives, in the filesystem's own path form."""
        check_sha256(sha256)
        return f"{self.root}/{tenant_segment(tenant)}/sha256/{sha256[:2]}/{sha256}"

    def uri(self, tenant: str, sha256: str) -> str:
        """The object's URL (with its protocol, e.g. file:///..., s3://...)."""
        return str(self.fs.unstrip_protocol(self.path(tenant, sha256)))

    async def exists(self, tenant: str, sha256: str) -> bool:
        """Whether the store holds the object."""
        return bool(await asyncio.to_thread(self.fs.exists, self.path(tenant, sha256)))

    async def size(self, tenant: str, sha256: str) -> int | None:
        """The object's size in bytes, or None when the store does not hold it."""
        try:
            return int(await asyncio.to_thread(self.fs.size, self.path(tenant, sha256)))
        except FileNotFoundError:
            return None

    async def put(self, tenant: str, chunks: AsyncIterable[bytes], max_bytes: int) -> tuple[str, int, str]:
        """Store the bytes of `chunks`; returns (sha256, size, uri). Over `max_bytes`: ArtifactTooLarge.

        Nothing is left behind when it fails (too large, the chunks raise, the call is cancelled).
        """
        folder = f"{self.root}/{tenant_segment(tenant)}"
        temporary = f"{folder}/tmp/{ULID()}"
        digest, size = hashlib.sha256(), 0
        await asyncio.to_thread(self.fs.makedirs, f"{folder}/tmp", exist_ok=True)
        file = await asyncio.to_thread(self.fs.open, temporary, "wb")
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise ArtifactTooLarge(max_bytes)
                    await asyncio.to_thread(_write, file, digest, chunk)
            finally:
                await asyncio.to_thread(file.close)
            sha256 = digest.hexdigest()
            final = self.path(tenant, sha256)
            await asyncio.to_thread(self._settle, temporary, final)
        except BaseException:
            # Shielded: a cancelled upload still removes its temporary object.
            await asyncio.shield(asyncio.to_thread(self._discard, temporary))
            raise
        return sha256, size, self.uri(tenant, sha256)

    async def read(self, tenant: str, sha256: str, chunk_size: int) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of at most `chunk_size`; ArtifactMissing when it is not there."""
        path = self.path(tenant, sha256)
        try:
            file = await asyncio.to_thread(self.fs.open, path, "rb")
        except FileNotFoundError:
            raise ArtifactMissing(sha256) from None
        try:
            while chunk := await asyncio.to_thread(file.read, chunk_size):
                yield chunk
        finally:
            await asyncio.shield(asyncio.to_thread(file.close))

    def _settle(self, temporary: str, final: str) -> None:
        """Move the finished temporary object into place; if the same bytes are there already, drop it."""
        if self.fs.exists(final):
            self.fs.rm(temporary)
            return
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(temporary, final)

    def _discard(self, temporary: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(temporary)


def _write(file: Any, digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    file.write(chunk)
