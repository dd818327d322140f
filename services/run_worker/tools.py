"""The worker's tools: the registry (stock tools and the `runs.tools` entry point group) and the stock tools.

A tool is a `Tool`: a name, a version string (the step cache will key on it), whether it is
deterministic, and an async fn(args, ctx) returning a JSON object. It raises ToolError to fail
(retryable or not). Cancellation arrives as asyncio.CancelledError: tools clean up (shell kills its
process group) and let it propagate. Stock tools: noop, echo, sleep, fail and shell (opt-in:
WorkerSettings.tools); other packages add theirs through the entry point group `runs.tools`, whose
entries load a `Tool` or an async callable with a `version` attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import mimetypes
import os
import re
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.run_worker import launcher

log = logging.getLogger(__name__)

Json = dict[str, Any]
ENTRY_POINT_GROUP = "runs.tools"
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


class UnknownTools(ValueError):
    """RUN_WORKER_TOOLS names tools that are neither stock nor in the `runs.tools` entry point group."""


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

    async def __call__(self, args: Json, ctx: ToolContext) -> Json:
        return await self.fn(args, ctx)


def as_tool(name: str, obj: Any) -> Tool:
    """A Tool from a Tool or an async callable (its `version` and `deterministic` attributes, if any)."""
    if isinstance(obj, Tool):
        return obj if obj.name == name else Tool(name, obj.fn, obj.version, obj.deterministic)
    if not callable(obj):
        raise TypeError(f"tool {name!r} is neither a Tool nor callable")
    return Tool(name, obj, str(getattr(obj, "version", "0")), bool(getattr(obj, "deterministic", True)))


# --- stock tools ---------------------------------------------------------------------------------


def _number(args: Json, name: str, default: float, minimum: float = 0.0) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ToolError(f"{name} must be a number >= {minimum}", retryable=False)
    return float(value)


async def noop(args: Json, ctx: ToolContext) -> Json:
    """Do nothing, successfully."""
    return {"ok": True}


async def echo(args: Json, ctx: ToolContext) -> Json:
    """Return the input as the output."""
    return dict(args)


async def sleep(args: Json, ctx: ToolContext) -> Json:
    """Sleep `seconds` (cancellable mid-sleep)."""
    seconds = _number(args, "seconds", 1.0)
    await asyncio.sleep(seconds)
    return {"slept_seconds": seconds}


async def fail(args: Json, ctx: ToolContext) -> Json:
    """Fail with `message`; with `times` N only on the first N attempts; `retryable` (default true)."""
    message = str(args.get("message", "failed on purpose"))
    times = args.get("times")
    if times is not None and ctx.attempt > _number(args, "times", 0):
        return {"ok": True, "attempt": ctx.attempt}
    raise ToolError(message, retryable=bool(args.get("retryable", True)))


MAX_CAPTURE = 64 * 1024
MAX_RESULT_BYTES = 1024 * 1024  # what a command may write to RUNS_OUTPUT
LAUNCHER = launcher.__file__
_EXEC_FAILED = launcher.EXEC_FAILED_MARKER.encode()
# The worker's own secrets are not the command's business.
_HIDDEN_ENV = ("RUNS_API_KEY",)


async def shell(args: Json, ctx: ToolContext) -> Json:
    """Run `command` (a list: program and arguments; a string only with `shell: true`) with a timeout.

    The command runs in the try's working directory with RUNS_INPUT (a JSON file holding this
    input), RUNS_OUTPUT (where it may write a JSON object: the output's `result`), RUNS_RUN_ID and
    RUNS_STEP_KEY set. `inputs` (artifacts, a list or a map name -> artifact) are fetched into the
    directory first; files matching the `artifacts` globs become the step's artifacts. Captures
    the exit code and up to 64 KiB of stdout and stderr; kills the process group on cancel or
    timeout, and the launcher kills it when the worker dies. A non-zero exit fails the tool
    (retryable unless `retryable: false`).
    """
    command = args.get("command")
    timeout = _number(args, "timeout_seconds", 60.0, minimum=0.001)
    if args.get("shell", False):
        if not isinstance(command, str) or not command:
            raise ToolError("with shell: true, command must be a non-empty string", retryable=False)
        argv = ["/bin/sh", "-c", command]
    else:
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise ToolError("command must be a non-empty list of strings", retryable=False)
        argv = command
    patterns = _patterns(args.get("artifacts"))
    inputs = _inputs(args.get("inputs"))
    with contextlib.ExitStack() as stack:
        workdir = ctx.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="runs-shell-"))
        io_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runs-io-")))
        ctx = dataclasses.replace(ctx, workdir=workdir)  # the same artifact list
        for name, artifact in inputs:
            await ctx.fetch_artifact(artifact, name)
        input_path, output_path = io_dir / "input.json", io_dir / "output.json"
        input_path.write_text(json.dumps(args))
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_ENV}
        env.update(RUNS_INPUT=str(input_path), RUNS_OUTPUT=str(output_path), RUNS_RUN_ID=ctx.run_id,
                   RUNS_STEP_KEY=ctx.step_key)
        output = await _run(argv, workdir, env, timeout, bool(args.get("retryable", True)))
        result = _result(output_path)
        if result is not None:
            output["result"] = result
        for pattern in patterns:
            matches = sorted(p for p in Path(workdir).glob(pattern) if p.is_file())
            if not matches:
                raise ArtifactError(f"artifacts: {pattern!r} matched no file", retryable=False, output=output)
            for path in matches:
                name = path.relative_to(workdir).as_posix()
                if all(a.name != name for a in ctx.artifacts):
                    ctx.add_artifact(str(path), name)
        return output


def _patterns(value: Any) -> list[str]:
    """The `artifacts` argument: glob patterns relative to the working directory."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ToolError("artifacts must be a list of glob patterns", retryable=False)
    for pattern in value:
        if pattern.startswith("/") or ".." in pattern.split("/"):
            raise ToolError(f"artifacts: {pattern!r} must be relative to the working directory", retryable=False)
    return value


def _inputs(value: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """The `inputs` argument as (name in the workdir, artifact) pairs: a list (each by its name) or a map."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [(a.get("name") if isinstance(a, Mapping) else None, a) for a in value]
    else:
        raise ToolError("inputs must be a list of artifacts or a map of name to artifact", retryable=False)
    for name, artifact in pairs:
        if not isinstance(artifact, Mapping) or not isinstance(name, str):
            raise ToolError("inputs must hold artifact objects (with name and sha256)", retryable=False)
        check_artifact_name(name)
    return pairs


def _result(path: Path) -> Json | None:
    """The JSON object a command wrote to RUNS_OUTPUT, if it wrote one."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_RESULT_BYTES:
        raise ToolError(f"RUNS_OUTPUT holds {size} bytes; at most {MAX_RESULT_BYTES}", retryable=False)
    try:
        value = json.loads(path.read_bytes())
    except ValueError as err:
        raise ToolError(f"RUNS_OUTPUT does not hold JSON: {err}", retryable=False) from None
    if not isinstance(value, dict):
        raise ToolError("RUNS_OUTPUT must hold a JSON object", retryable=False)
    return value


async def _run(argv: list[str], cwd: str, env: dict[str, str], timeout: float, retryable: bool) -> Json:
    """Run `argv` through the launcher (it leads a new process group and dies with this process)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", LAUNCHER, str(os.getpid()), "--", *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            cwd=cwd,
            env=env,
        )
    except OSError as err:  # out of processes or descriptors, say: another attempt may do better
        raise ToolError(f"cannot start the command launcher: {err.strerror or err}") from None
    try:
        (stdout, out_cut), (stderr, err_cut), _ = await asyncio.wait_for(
            asyncio.gather(_capture(proc.stdout), _capture(proc.stderr), proc.wait()), timeout
        )
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise ToolError(f"command timed out after {timeout:g}s", output={"timed_out": True}) from None
    except asyncio.CancelledError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode == launcher.EXEC_FAILED_CODE and not stdout and stderr.startswith(_EXEC_FAILED):
        reason = stderr[len(_EXEC_FAILED):].decode(errors="replace").strip()
        raise ToolError(f"cannot start {argv[0]!r}: {reason}", retryable=False)
    output = {
        "exit_code": proc.returncode,
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
        "truncated": out_cut or err_cut,
    }
    if proc.returncode != 0:
        raise ToolError(f"command exited with code {proc.returncode}", retryable=retryable, output=output)
    return output


async def _capture(stream: asyncio.StreamReader | None) -> tuple[bytes, bool]:
    """The first MAX_CAPTURE bytes of a pipe, and whether there was more; the rest is read and dropped,
    so a noisy command never fills the worker's memory (nor blocks on a full pipe)."""
    if stream is None:
        return b"", False
    kept = bytearray()
    cut = False
    while chunk := await stream.read(65536):
        room = MAX_CAPTURE - len(kept)
        kept += chunk[:room]
        cut = cut or len(chunk) > room
    return bytes(kept), cut


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- the registry --------------------------------------------------------------------------------

STOCK: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("noop", noop, version="1"),
        Tool("echo", echo, version="1"),
        Tool("sleep", sleep, version="1", deterministic=False),
        Tool("fail", fail, version="1", deterministic=False),
        Tool("shell", shell, version="1", deterministic=False),
    )
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_tools() -> list[str]:
    """Every tool name a worker could run: the stock tools and those of the `runs.tools` entry points."""
    return sorted({*STOCK, *_entry_points()})


def registry(allowed: Iterable[str]) -> dict[str, Tool]:
    """The tools named in `allowed` (WorkerSettings.tools): stock ones, else loaded from their entry point.

    Raises UnknownTools naming the known tools when a name is neither.
    """
    names = list(dict.fromkeys(allowed))
    points = _entry_points() if any(n not in STOCK for n in names) else {}
    unknown = [n for n in names if n not in STOCK and n not in points]
    if unknown:
        raise UnknownTools(
            f"unknown tool{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known tools: {', '.join(sorted({*STOCK, *points}))}"
        )
    tools: dict[str, Tool] = {}
    for name in names:
        if name in STOCK:
            tools[name] = STOCK[name]
            continue
        try:
            tools[name] = as_tool(name, points[name].load())
        except Exception as err:
            raise UnknownTools(f"cannot load tool {name!r} ({points[name].value}): {err}") from err
    return tools
