"""Input selectors: the run context a step sees and the tool input its selectors resolve to."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import jmespath
import jmespath.exceptions
from jmespath.parser import ParsedResult

from shared.text import shorten
from shared.workflow.spec import StepSpec


class SelectorError(ValueError):
    """A selector that yielded nothing (or could not be evaluated); the step fails with this message."""

    def __init__(self, arg: str, expression: str, message: str) -> None:
        super().__init__(message)
        self.arg = arg
        self.expression = expression
        self.message = message


def run_context(
    run_input: Any, step_results: Mapping[str, Mapping[str, Any]], upstream_keys: Iterable[str]
) -> dict[str, Any]:
    """{"input": run input, "steps": {key: {"output", "artifacts"}}} holding only `upstream_keys`.

    An upstream key without a result is left out, so a selector reading it yields nothing.
    """
    steps: dict[str, Any] = {}
    for key in upstream_keys:
        result = step_results.get(key)
        if result is not None:
            steps[key] = {"output": result.get("output"), "artifacts": list(result.get("artifacts") or [])}
    return {"input": run_input, "steps": steps}


@lru_cache(maxsize=1024)
def _compiled(expression: str) -> ParsedResult:
    return jmespath.compile(expression)


def resolve_input(step: StepSpec, context: Mapping[str, Any]) -> dict[str, Any]:
    """The tool's input: a copy of `step.args` with each selector's result over it (selectors win).

    Raises SelectorError naming the selector when one yields nothing (null) or fails to evaluate.
    """
    resolved = copy.deepcopy(dict(step.args))
    for arg, expression in step.input.items():
        shown = shorten(expression, 200)
        try:
            value = _compiled(expression).search(context)
        except jmespath.exceptions.JMESPathError as e:
            first = str(e).splitlines()[0].removesuffix(", for expression:").rstrip(":")
            raise SelectorError(arg, expression, f"input.{arg}: selector {shown!r} failed: {first}") from e
        if value is None:
            raise SelectorError(arg, expression, f"input.{arg}: selector {shown!r} yielded nothing")
        resolved[arg] = value
    return resolved
