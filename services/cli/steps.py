"""`runs steps RUN`, `runs artifacts RUN`, `runs artifact RUN STEP NAME -o FILE`, and the DAG table of `runs get`.

`artifact` streams into a temporary file beside FILE while hashing, and moves it into place only
when the sha256 and size match what the API announced; otherwise the partial file is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from graphlib import CycleError
from pathlib import Path
from typing import Any

from services.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    UNARY_DEADLINE_SECONDS,
    Api,
    CliError,
    cell,
    dumps,
    enum_name,
    format_table,
    iso_time,
    out,
    to_dict,
)
from shared.gen.runs.v1 import run_pb2, run_service_pb2
from shared.workflow import StepSpec, WorkflowSpec, order

STEP_STATUS_CHOICES = ("created", "running", "succeeded", "failed", "skipped", "canceled")
SHA256_SHOWN = 12  # hex digits of a sha256 in tables
MAX_ERROR_CELL = 100  # a step's error is the cell people read the table for
DOWNLOAD_DEADLINE_SECONDS = 600.0  # a whole download (artifacts are at most 64 MiB by default)


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `steps`, `artifacts` and `artifact` through `add(name, help)`."""
    steps = add("steps", "List a run's steps in the DAG's order, with their status, tries and duration.")
    steps.add_argument("run_id", metavar="RUN")
    steps.add_argument(
        "--status", type=str.lower, choices=STEP_STATUS_CHOICES, default=None, help="only steps in this status"
    )

    artifacts = add("artifacts", "List the files a run's steps produced.")
    artifacts.add_argument("run_id", metavar="RUN")

    artifact = add("artifact", "Download one artifact to a file, checking its sha256.")
    artifact.add_argument("run_id", metavar="RUN")
    artifact.add_argument("step_key", metavar="STEP", help="the step that produced it")
    artifact.add_argument("name", metavar="NAME", help="its name in that step (see `runs artifacts RUN`)")
    artifact.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it (replaced)")


# --- formatting --------------------------------------------------------------------------------


def step_status_name(value: int) -> str:
    """A StepStatus without its STEP_STATUS_ prefix."""
    return enum_name(run_pb2.StepStatus, value, "STEP_STATUS_")


def format_seconds(seconds: float) -> str:
    """A duration for people: 850ms, 3.2s, 2m05s, 1h02m."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def step_duration(step: run_pb2.Step, now: datetime) -> str:
    """From start to finish; for a step still running, the time so far with a '+'; '-' when it never started."""
    if not step.HasField("started_at"):
        return "-"
    started = step.started_at.ToDatetime(tzinfo=UTC)
    if step.HasField("finished_at"):
        return format_seconds((step.finished_at.ToDatetime(tzinfo=UTC) - started).total_seconds())
    if step.status == run_pb2.STEP_STATUS_RUNNING:
        return format_seconds((now - started).total_seconds()) + "+"
    return "-"


def step_problem(step: run_pb2.Step) -> str:
    """Why the step failed (code: message) or did not run (its reason); '' otherwise."""
    if step.HasField("step_error") and (step.step_error.code or step.step_error.message):
        error = step.step_error
        return f"{error.code}: {error.message}" if error.code else error.message
    if step.error:
        return step.error
    if step.reason:
        return f"{step_status_name(step.status).lower()}: {step.reason}"
    return ""


def step_cache(step: run_pb2.Step) -> str:
    """What the step cache did: 'hit (cold) from RUN', 'miss (no_entry)', 'reused from RUN'; '' when not looked up."""
    if step.reason == "reused_from_base":
        return f"reused from {step.source_run_id or 'the base run'}"
    if step.cache_result == "hit":
        return f"hit ({step.cache_reason or '?'})" + (f" from {step.source_run_id}" if step.source_run_id else "")
    if step.cache_result == "miss":
        return f"miss ({step.cache_reason or '?'})"
    return ""


def dag_order(steps: Sequence[run_pb2.Step]) -> list[run_pb2.Step]:
    """The steps in a topological order of their depends_on (ties: the order given); as given if it has a cycle."""
    spec = WorkflowSpec(
        name="run",
        description="",
        steps=tuple(StepSpec(key=s.step_key, tool=s.tool, depends_on=tuple(s.depends_on)) for s in steps),
    )
    by_key = {s.step_key: s for s in steps}
    try:
        keys = order(spec)
    except (CycleError, KeyError):
        return list(steps)
    if len(keys) != len(steps):  # two steps with one key: nothing to sort by
        return list(steps)
    return [by_key[k] for k in keys]


def format_steps_table(steps: Sequence[run_pb2.Step], now: datetime) -> str:
    """Steps in the DAG's order: key, status, tries, duration, what each depends on, its tool, what the cache
    did and its problem."""
    if not steps:
        return "no steps"
    return format_table(
        ("STEP", "STATUS", "TRIES", "DURATION", "DEPENDS_ON", "TOOL", "STARTED_AT", "CACHE", "ERROR"),
        (
            (
                cell(s.step_key),
                step_status_name(s.status),
                str(s.attempt),
                step_duration(s, now),
                cell(",".join(s.depends_on)),
                cell(s.tool),
                iso_time(s, "started_at"),
                cell(step_cache(s)),
                cell(step_problem(s), MAX_ERROR_CELL),
            )
            for s in dag_order(steps)
        ),
    )


def format_size(size: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 3.2 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def format_artifacts_table(artifacts: Sequence[run_pb2.Artifact]) -> str:
    """Artifacts as a table: step, name, size, the sha256's first digits, media type."""
    if not artifacts:
        return "no artifacts"
    return format_table(
        ("STEP", "NAME", "SIZE", "SHA256", "MEDIA_TYPE"),
        (
            (
                cell(a.step_key),
                cell(a.name),
                format_size(a.size),
                a.sha256[:SHA256_SHOWN] or "-",
                cell(a.media_type),
            )
            for a in artifacts
        ),
    )


# --- downloading -------------------------------------------------------------------------------


def _cannot_write(path: str, error: OSError) -> CliError:
    return CliError([f"error: cannot write {path}: {error.strerror or error}"], EXIT_ERROR)


def download(stream: Any, path: str) -> run_pb2.Artifact:
    """Write a DownloadArtifact stream to `path` if its bytes match the announced sha256 and size.

    The bytes go to a temporary file beside `path` first; on a mismatch, an error or an interrupt
    it is removed and `path` is left as it was.
    """
    target = Path(path)
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as error:
        raise _cannot_write(path, error) from None
    done = False
    try:
        artifact: run_pb2.Artifact | None = None
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            for item in stream:
                if artifact is None:
                    if not item.HasField("artifact"):
                        raise CliError(["error: the API sent bytes before describing the artifact"], EXIT_ERROR)
                    artifact = item.artifact
                if item.chunk:
                    digest.update(item.chunk)
                    size += len(item.chunk)
                    f.write(item.chunk)
        if artifact is None:
            raise CliError(["error: the API ended the download without sending the artifact"], EXIT_ERROR)
        got = digest.hexdigest()
        if got != artifact.sha256.lower() or size != artifact.size:
            raise CliError(
                [
                    f"error: the download of {artifact.step_key}/{artifact.name} does not match the artifact: "
                    f"sha256 {got} ({size} bytes), expected {artifact.sha256} ({artifact.size} bytes); "
                    f"{path} was not written"
                ],
                EXIT_ERROR,
            )
        try:
            os.chmod(partial, 0o666 & ~_umask())
            os.replace(partial, target)
        except OSError as error:
            raise _cannot_write(path, error) from None
        done = True
        return artifact
    except OSError as error:
        raise _cannot_write(path, error) from None
    finally:
        cancel = getattr(stream, "cancel", None)
        if callable(cancel):
            cancel()
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(partial)


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- commands ----------------------------------------------------------------------------------


def cmd_steps(api: Api, args: argparse.Namespace) -> int:
    """`runs steps RUN`: the run's steps (only those in --status S)."""
    request = run_service_pb2.ListRunStepsRequest(run_id=args.run_id)
    if args.status:
        request.status = run_pb2.StepStatus.Value("STEP_STATUS_" + args.status.upper())
    steps = api.runs.ListRunSteps(request, timeout=UNARY_DEADLINE_SECONDS).steps
    if args.json:
        out(dumps({"steps": [to_dict(s) for s in steps]}))
    else:
        out(format_steps_table(steps, datetime.now(UTC)))
    return EXIT_OK


def cmd_artifacts(api: Api, args: argparse.Namespace) -> int:
    """`runs artifacts RUN`: every artifact of the run."""
    request = run_service_pb2.ListRunArtifactsRequest(run_id=args.run_id)
    artifacts = api.runs.ListRunArtifacts(request, timeout=UNARY_DEADLINE_SECONDS).artifacts
    if args.json:
        out(dumps({"artifacts": [to_dict(a) for a in artifacts]}))
    else:
        out(format_artifacts_table(artifacts))
    return EXIT_OK


def cmd_artifact(api: Api, args: argparse.Namespace) -> int:
    """`runs artifact RUN STEP NAME -o FILE`: download one artifact, verified."""
    request = run_service_pb2.DownloadArtifactRequest(run_id=args.run_id, step_key=args.step_key, name=args.name)
    artifact = download(api.runs.DownloadArtifact(request, timeout=DOWNLOAD_DEADLINE_SECONDS), args.output)
    if args.json:
        out(dumps({"artifact": to_dict(artifact), "path": args.output}))
    else:
        out(f"{args.output}: {artifact.step_key}/{artifact.name}, {artifact.size} bytes, sha256 {artifact.sha256}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "steps": cmd_steps,
    "artifacts": cmd_artifacts,
    "artifact": cmd_artifact,
}
