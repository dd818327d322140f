"""The tool contract: what a tool is (Tool), what it is given (ToolContext) and how it fails (ToolError).

This docstring is the reference for writing a tool of your own; examples/runs-example-tools is a
complete package. Every name here is also importable from `services.run_worker.tools`.

The function. A tool is an async function `fn(args: Json, ctx: ToolContext) -> Json`:

- `args` is the step's input: its `args` merged with what its `input` selectors picked from the
  run context (for runtime.tool, the run's input.args). A plain dict of JSON values; numbers from a
  protobuf Struct may arrive as floats (2.0 for 2).
- It returns its output: a JSON object (a dict of JSON values). The output is recorded on the step
  (tool.succeeded, ListRunSteps), steps that depend on it can select from it (the JMESPath
  `steps.KEY.output.FIELD`), and a sink step's output is part of the run's output.
- Files: write them in `ctx.workdir` (a fresh empty directory per try, removed after it) and record
  them with `ctx.add_artifact(path, name=None, media_type=None)`; they are uploaded after the tool
  returns successfully (at most MAX_ARTIFACTS per step). `await ctx.fetch_artifact(artifact, dest)`
  fetches an upstream step's artifact (an object from the run context) into the workdir.
- Failure: raise `ToolError(message, retryable=True, output=None)`. Retryable failures are tried
  again under the step's retry policy; `retryable=False` ends the step at once (use it for bad
  arguments and anything a retry cannot fix); `output` is recorded with the failure. Any other
  exception fails the try as a retryable error "TypeName: text".
- Cancellation (CancelRun, a lost lease, worker shutdown) arrives as asyncio.CancelledError at an
  await: clean up and let it propagate. A tool that blocks (CPU or blocking I/O) should run that
  part in a thread (`asyncio.to_thread`) so the worker keeps heartbeating.

ToolContext fields: `run_id`; `attempt` (the step's try, 1 first; for runtime.noop and runtime.tool
the run's attempt); `step_key`; `workdir` ("" outside a run); `fetcher` and `artifacts` (used by
the two methods above; do not touch them directly).

The Tool. `Tool(name, fn, version="1", deterministic=True, schema=None, instant=False)`:

- `version`: a string; change it whenever the output for the same arguments changes. The step
  cache (steps with a cache scope) keys on the tool's name, version and arguments, so a new
  version never reuses an old result.
- `deterministic`: False for tools whose output varies with time or the world (sleep, fail, a
  network call); their steps are never cached.
- `schema`: a shared.tool_args.ToolArgs declaring the arguments (Arg(kind, required, default,
  minimum, doc)); `closed=True` also refuses undeclared names. Call `check_args(schema, args)`
  first thing in fn: it raises a non-retryable ToolError naming the argument ("n must be a number
  >= 1", "unknown argument 'x' of tool word_count; known: text"). Check what a schema cannot
  express yourself, naming the argument in the message.
- `instant`: True only when the tool returns at once and touches nothing but its output (no
  workdir, no artifacts, no side effects): its try then gets no working directory and its result
  is reported in the same report as its start.

Registering. A worker runs the tools named by RUN_WORKER_TOOLS (or --tools): stock tools by name,
others from the `runs.tools` entry point group of the installed packages, each entry loading a
Tool (its name is the entry's) or an async callable (its `version` and `deterministic` attributes
are read if present). The worker declares these names when its claim stream opens, and is handed
only runs whose workflow's tools it has all of; a run needing a tool no live worker declared
waits QUEUED (`runs explain RUN` says which tools it waits for).
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
    """A tool failed with `message`; `retryable` False ends the step at once instead of retrying;
    `output` (a JSON object) is recorded with the failure (e.g. a command's exit code and stderr)."""

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
    """What a tool may know about the call and what it may do besides returning its output.

    run_id, attempt (the step's try, from 1), step_key, workdir (a fresh directory per try; "" outside
    a run or for an instant tool); record files with add_artifact, fetch upstream ones with fetch_artifact.
    """

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
    """A registered tool; calling it calls its fn (see the module docstring for each field)."""

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
