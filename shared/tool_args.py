"""The stock tools' argument schemas, and the one check that reads them.

Pure data and a pure function, no I/O. The API (shared/workflows.py, check_tool_args) refuses a
runtime.tool run whose arguments a stock tool could never run with; each stock tool
(services/run_worker/tools/) refuses the same arguments in the same words. Both read the schemas
here, so the rules exist once. A closed schema (sleep, fail) refuses an argument it does not
declare, naming it, so a misspelt name is not silently ignored; an open one accepts them (noop is
handed runtime.noop's input, echo returns them, shell hands them to its command in RUNS_INPUT).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.text import shorten


class Kind(enum.Enum):
    """The type of an argument's value; `null` is none of them except ANY."""

    ANY = "any"  # anything: the tool reads it itself (its truth, or str() of it)
    NUMBER = "number"  # an int or a float, not a bool
    BOOL = "bool"  # true or false
    STRING = "string"  # a non-empty string
    STRINGS = "strings"  # a non-empty list of strings


@dataclass(frozen=True)
class Arg:
    """One argument: its kind, whether it must be there, its default, and a lower bound for numbers."""

    kind: Kind = Kind.ANY
    required: bool = False
    default: Any = None
    minimum: float | None = None
    exclusive: bool = False  # the value must be above `minimum`, not equal to it
    hint: str = ""  # added to the refusal, e.g. "(program and arguments)"
    doc: str = ""


class ArgError(ValueError):
    """An argument does not fit its schema; `name` is the argument, `message` says why."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


@dataclass(frozen=True)
class ToolArgs:
    """A tool's argument schema: declared arguments in check order, and those a switch replaces.

    When the argument `switch` is exactly true, each argument of `switched` takes the place of the
    declared one of the same name (shell: `shell: true` makes `command` one string).
    """

    args: Mapping[str, Arg] = field(default_factory=dict)
    switch: str = ""
    switched: Mapping[str, Arg] = field(default_factory=dict)
    closed: bool = False  # arguments it does not declare are refused
    tool: str = ""  # the tool's name, for the refusal of an unknown argument

    def get(self, args: Mapping[str, Any], name: str) -> Any:
        """The value of `name` in `args`, or its declared default."""
        return args.get(name, self.args[name].default)

    def check(self, args: Mapping[str, Any]) -> None:
        """Raise ArgError for the first argument (in declaration order) that does not fit.

        A closed schema then refuses the first (by name) argument it does not declare.
        """
        switched = bool(self.switch) and args.get(self.switch) is True
        for name, spec in self.args.items():
            prefix = ""
            if switched and name in self.switched:
                spec, prefix = self.switched[name], f"with {self.switch}: true, "
            if name not in args:
                if spec.required:
                    raise ArgError(name, prefix + _refusal(name, spec))
                continue
            if not _fits(args[name], spec):
                raise ArgError(name, prefix + _refusal(name, spec))
        if self.closed:
            unknown = sorted(str(name) for name in args if name not in self.args)
            if unknown:
                name = shorten(unknown[0])
                of = f" of tool {self.tool}" if self.tool else ""
                raise ArgError(name, f"unknown argument {name!r}{of}; known: {', '.join(self.args) or 'none'}")


def _fits(value: Any, spec: Arg) -> bool:
    if spec.kind is Kind.ANY:
        return True
    if spec.kind is Kind.BOOL:
        return isinstance(value, bool)
    if spec.kind is Kind.STRING:
        return isinstance(value, str) and bool(value)
    if spec.kind is Kind.STRINGS:
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if spec.minimum is None:
        return True
    return value > spec.minimum if spec.exclusive else value >= spec.minimum


def _refusal(name: str, spec: Arg) -> str:
    if spec.kind is Kind.BOOL:
        text = f"{name} must be true or false"
    elif spec.kind is Kind.STRING:
        text = f"{name} must be a non-empty string"
    elif spec.kind is Kind.STRINGS:
        text = f"{name} must be a non-empty list of strings"
    elif spec.kind is Kind.NUMBER and spec.minimum is not None:
        text = f"{name} must be a number {'>' if spec.exclusive else '>='} {spec.minimum:g}"
    elif spec.kind is Kind.NUMBER:
        text = f"{name} must be a number"
    else:
        text = f"{name} is required"
    return f"{text} {spec.hint}" if spec.hint else text


NOOP = ToolArgs()
ECHO = ToolArgs()
SLEEP = ToolArgs({"seconds": Arg(Kind.NUMBER, default=1.0, minimum=0, doc="how long to sleep")},
                 closed=True, tool="sleep")
FAIL = ToolArgs({
    "times": Arg(Kind.NUMBER, minimum=0, doc="fail only on tries up to this one; absent: always"),
    "retryable": Arg(Kind.BOOL, default=True, doc="false ends the step at once"),
    "message": Arg(default="failed on purpose", doc="the error (str() of any value)"),
}, closed=True, tool="fail")
SHELL = ToolArgs(
    {
        "command": Arg(Kind.STRINGS, required=True, hint="(program and arguments)",
                       doc="program and arguments, run without a shell"),
        "timeout_seconds": Arg(Kind.NUMBER, default=60.0, minimum=0.001,
                               doc="the process group is killed after this long"),
        "shell": Arg(doc="exactly true: command is one string for /bin/sh -c"),
        "retryable": Arg(default=True, doc="false (by its truth): a non-zero exit ends the step at once"),
        "artifacts": Arg(doc="glob patterns (relative to the working directory) of the files to upload"),
        "inputs": Arg(doc="artifacts to fetch first: a list (each by its name) or a map of name to artifact"),
    },
    switch="shell",
    switched={"command": Arg(Kind.STRING, required=True, doc="a command line for /bin/sh -c")},
)

# The stock tools' schemas by tool name; the API accepts runtime.tool runs only for these tools.
STOCK_TOOL_ARGS: Mapping[str, ToolArgs] = {"noop": NOOP, "echo": ECHO, "sleep": SLEEP, "fail": FAIL, "shell": SHELL}
