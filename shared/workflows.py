"""The workflow model: which workflows exist and the steps each one runs.

Both services use it: the API to validate StartRun, the worker to execute a claimed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.text import shorten
from shared.tool_args import STOCK_TOOL_ARGS, ArgError

DEFAULT_WORKFLOW = "runtime.noop"
TOOL_WORKFLOW = "runtime.tool"

# Tools the stock worker registers; the API accepts runtime.tool runs only for these.
KNOWN_TOOLS = frozenset(STOCK_TOOL_ARGS)


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


def check_tool_args(tool: str, args: dict[str, Any]) -> None:
    """Refuse arguments a stock tool could never run with, naming the field (input.args.NAME).

    The rules are the tools' own schemas (shared/tool_args.py), which the tools check again.
    """
    schema = STOCK_TOOL_ARGS.get(tool)
    if schema is None:
        return
    try:
        schema.check(args)
    except ArgError as err:
        raise WorkflowInputError(f"input.args.{err.name}", err.message) from None
