"""The stock tool shell (opt-in: WorkerSettings.tools): runs a command in the try's working directory.

The command runs through the launcher (services/run_worker/launcher.py), which leads a new process
group and dies with the worker; a timeout or a cancel kills that group. Only the first 64 KiB of
stdout and stderr are kept, and the worker's own secrets (RUNS_API_KEY) are not in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.run_worker import launcher
from services.run_worker.tools.base import (
    ArtifactError,
    Json,
    Tool,
    ToolContext,
    ToolError,
    check_args,
    check_artifact_name,
)
from shared.tool_args import SHELL

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
    check_args(SHELL, args)
    command = args["command"]
    timeout = float(SHELL.get(args, "timeout_seconds"))
    argv = ["/bin/sh", "-c", command] if args.get("shell") is True else command
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
        output = await _run(argv, workdir, env, timeout, bool(SHELL.get(args, "retryable")))
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


# A command is as deterministic as its author makes it: a step is cached only when its spec asks for it
# (cache.scope global or run_only; the default, none, never caches), so the step's spec decides.
TOOL = Tool("shell", shell, version="1", deterministic=True, schema=SHELL)
