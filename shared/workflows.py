"""The workflow model: which workflows exist and the steps each one runs.

Both services use it: the API to validate StartRun, the worker to execute a claimed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.text import shorten

DEFAULT_WORKFLOW = "runtime.noop"
TOOL_WORKFLOW = "runtime.tool"

# Tools the stock worker registers; the API accepts runtime.tool runs only for these.
KNOWN_TOOLS = frozenset({"noop", "echo", "sleep", "fail", "shell"})


@dataclass(frozen=True)
class StepSpec:
    """One step of a workflow: a key and the tool it invokes with its arguments."""

    key: str
    tool: str
    args: dict[str, Any]


class WorkflowInputError(ValueError):
    """The input does not fit the workflow; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def workflow_names() -> list[str]:
    """Names of every workflow a run may ask for."""
    return [DEFAULT_WORKFLOW, TOOL_WORKFLOW]


def plan(workflow: str, run_input: dict[str, Any]) -> list[StepSpec]:
    """The steps a run of `workflow` with `run_input` executes, in order.

    Raises WorkflowInputError when the input does not fit, KeyError for an unknown workflow.
    """
    if workflow == DEFAULT_WORKFLOW:
        return [StepSpec(key="runtime", tool="noop", args=dict(run_input))]
    if workflow == TOOL_WORKFLOW:
        tool = run_input.get("tool")
        if not isinstance(tool, str) or not tool:
            raise WorkflowInputError("input.tool", "runtime.tool needs input.tool, the name of a tool")
        if tool not in KNOWN_TOOLS:
            raise WorkflowInputError(
                "input.tool", f"unknown tool {shorten(tool)!r}; known tools: {', '.join(sorted(KNOWN_TOOLS))}"
            )
        args = run_input.get("args", {})
        if not isinstance(args, dict):
            raise WorkflowInputError("input.args", "input.args must be an object")
        check_tool_args(tool, args)
        return [StepSpec(key="runtime", tool=tool, args=args)]
    raise KeyError(workflow)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_tool_args(tool: str, args: dict[str, Any]) -> None:
    """Refuse arguments a stock tool could never run with, naming the field (input.args.NAME)."""

    def bad(name: str, message: str) -> WorkflowInputError:
        return WorkflowInputError(f"input.args.{name}", message)

    if tool == "sleep" and "seconds" in args and not (_is_number(args["seconds"]) and args["seconds"] >= 0):
        raise bad("seconds", "seconds must be a number >= 0")
    if tool == "fail":
        if "times" in args and not (_is_number(args["times"]) and args["times"] >= 0):
            raise bad("times", "times must be a number >= 0")
        if "retryable" in args and not isinstance(args["retryable"], bool):
            raise bad("retryable", "retryable must be true or false")
    if tool == "shell":
        command = args.get("command")
        if args.get("shell") is True:
            if not isinstance(command, str) or not command:
                raise bad("command", "with shell: true, command must be a non-empty string")
        elif not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
            raise bad("command", "command must be a non-empty list of strings (program and arguments)")
        if "timeout_seconds" in args and not (_is_number(args["timeout_seconds"]) and args["timeout_seconds"] > 0):
            raise bad("timeout_seconds", "timeout_seconds must be a number > 0")
