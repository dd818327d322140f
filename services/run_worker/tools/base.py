"""The tool contract: what a tool is (Tool), what it is given (ToolContext) and how it fails (ToolError).

A tool is a `Tool`: a name, a version string (the step cache will key on it), whether it is
deterministic, its argument schema (shared/tool_args.py; None for a tool that declares none) and an
async fn(args, ctx) returning a JSON object. It raises ToolError to fail (retryable or not).
Cancellation arrives as asyncio.CancelledError: tools clean up and let it propagate. Every name here
is also importable from `services.run_worker.tools`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mimetypes
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.tool_args import ArgError, ToolArgs

Json = dict[str, Any]
# At most this many artifacts per step (the API's payloads.MAX_ARTIFACTS_PER_STEP).
MAX_ARTIFACTS = 100
# An artifact name: relative path segments of letters, digits, '.', '_', '-' (not '.' or '..').
_NAME_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class ToolError(Exception):
    """A tool failed; `retryable` False ends the step at once instead of retrying."""

    def __init__(self, message: str, retryable: bool = True, output: Json | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.output = output


class ArtifactError(ToolError):
    """An artifact could not be recorded, uploaded or fetched (the step fails with code artifact_failed)."""


@dataclass(frozen=True)
class LocalArtifact:
    """A file a try produced, to upload once the tool has succeeded."""

    path: str
    name: str
    media_type: str


# fetch(artifact, absolute destination path): streams an upstream artifact into a file.
Fetcher = Callable[[Mapping[str, Any], str], Awaitable[None]]


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call and what it may do besides returning its output."""

    run_id: str
    attempt: int  # the step's try (the run's attempt for runtime.noop and runtime.tool)
    step_key: str
    workdir: str = ""  # a fresh empty directory for this try, removed after it ("" outside a run)
    fetcher: Fetcher | None = None
    artifacts: list[LocalArtifact] = field(default_factory=list)

    def add_artifact(self, path: str, name: str | None = None, media_type: str | None = None) -> LocalArtifact:
        """Record a file (relative to the workdir, or absolute) as an artifact of the step; uploaded on success."""
        full = Path(self.workdir or ".", path).resolve()
        if not full.is_file():
            raise ArtifactError(f"artifact {path!r} is not a file", retryable=False)
        if name is None:
            base = Path(self.workdir).resolve() if self.workdir else None
            name = full.relative_to(base).as_posix() if base is not None and full.is_relative_to(base) else full.name
        check_artifact_name(name)
        if any(a.name == name for a in self.artifacts):
            raise ArtifactError(f"artifact name {name!r} appears twice", retryable=False)
        if len(self.artifacts) >= MAX_ARTIFACTS:
            raise ArtifactError(f"a step may record at most {MAX_ARTIFACTS} artifacts", retryable=False)
        artifact = LocalArtifact(
            str(full), name, media_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        )
        self.artifacts.append(artifact)
        return artifact

    async def fetch_artifact(self, artifact: Mapping[str, Any], dest: str) -> str:
        """Fetch an upstream artifact (an object from the run context) to `dest` (relative: in the workdir)."""
        if self.fetcher is None:
            raise ArtifactError("this worker cannot fetch artifacts here", retryable=False)
        if not isinstance(artifact, Mapping) or not isinstance(artifact.get("sha256"), str):
            raise ArtifactError("an artifact to fetch is an object with its sha256", retryable=False)
        base = Path(self.workdir or ".").resolve()
        target = (base / dest).resolve()
        if not Path(dest).is_absolute() and not target.is_relative_to(base):
            raise ArtifactError(f"{dest!r} is outside the working directory", retryable=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        await self.fetcher(artifact, str(target))
        return str(target)


def check_artifact_name(name: str) -> None:
    """Refuse a name the API would refuse (ArtifactHeader.name), before anything is uploaded."""
    segments = name.split("/")
    if not name or len(name) > 1024 or any(not _NAME_SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
        raise ArtifactError(
            f"artifact name {name[:200]!r} must be a relative path of letters, digits, '.', '_' and '-'",
            retryable=False,
        )


def sha256_file(path: str) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


ToolFn = Callable[[Json, ToolContext], Awaitable[Json]]


@dataclass(frozen=True)
class Tool:
    """A registered tool; calling it calls its fn."""

    name: str
    fn: ToolFn
    version: str = "1"
    deterministic: bool = True
    schema: ToolArgs | None = None  # its declared arguments; the fn itself refuses what does not fit
    # Returns at once and touches nothing but its output (no working directory, no artifacts, no side
    # effects): its try gets no working directory and is announced in the same report as its result.
    instant: bool = False

    async def __call__(self, args: Json, ctx: ToolContext) -> Json:
        return await self.fn(args, ctx)


def as_tool(name: str, obj: Any) -> Tool:
    """A Tool from a Tool or an async callable (its `version` and `deterministic` attributes, if any)."""
    if isinstance(obj, Tool):
        return obj if obj.name == name else dataclasses.replace(obj, name=name)
    if not callable(obj):
        raise TypeError(f"tool {name!r} is neither a Tool nor callable")
    return Tool(name, obj, str(getattr(obj, "version", "0")), bool(getattr(obj, "deterministic", True)))


def check_args(schema: ToolArgs, args: Json) -> None:
    """Refuse (ToolError, not retryable) arguments that do not fit the tool's schema, in the API's words."""
    try:
        schema.check(args)
    except ArgError as err:
        raise ToolError(err.message, retryable=False) from None
