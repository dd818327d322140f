"""The plan of a partial rebuild: which steps of a finished run re-execute, which are reused, and why.

The impacted steps are those the change request names (or the steps given explicitly) plus their
downstream closure; every other step is reused from the base run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from shared.text import shorten
from shared.workflow.graph import downstream_closure
from shared.workflow.spec import WorkflowSpec

Action = Literal["rerun", "reuse"]
RERUN: Final = "rerun"
REUSE: Final = "reuse"


@dataclass(frozen=True)
class PlanStep:
    """What a rebuild does with one step, and the reason people read."""

    step_key: str
    action: Action
    reason: str


class PlanError(ValueError):
    """A rebuild request the spec cannot plan; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def rebuild_plan(spec: WorkflowSpec, change_request_type: str | None, steps: Sequence[str] | None) -> list[PlanStep]:
    """Every step of `spec` in the spec's order with `rerun` or `reuse` and its reason.

    Rerun: the steps `change_request_type` names ("named by change request T"), the steps given in
    `steps` ("named"), and everything downstream of them ("downstream of a, b": the named steps it
    depends on). Raises PlanError for an unknown type (listing the declared ones), an unknown step, or
    when neither a type nor a step is given.
    """
    named: dict[str, str] = {}
    if change_request_type:
        declared = spec.change_requests.get(change_request_type)
        if declared is None:
            known = ", ".join(sorted(spec.change_requests)) or "none"
            raise PlanError(
                "change_request_type",
                f"unknown change request type {shorten(change_request_type)!r}; "
                f"workflow {spec.name} declares: {known}",
            )
        named.update(dict.fromkeys(declared, f"named by change request {change_request_type}"))
    keys = spec.keys
    for i, key in enumerate(steps or ()):
        if key not in keys:
            raise PlanError(
                f"steps[{i}]", f"unknown step {shorten(key)!r}; workflow {spec.name} has steps: {', '.join(keys)}"
            )
        named.setdefault(key, "named")
    if not named:
        raise PlanError("change_request_type", "give a change_request_type or the steps to re-execute")
    closures = {n: downstream_closure(spec, [n]) for n in named}
    impacted_by = {key: [n for n in keys if n in named and key in closures[n]] for key in keys}
    plan: list[PlanStep] = []
    for key in keys:
        if key in named:
            plan.append(PlanStep(key, RERUN, named[key]))
        elif impacted_by[key]:
            plan.append(PlanStep(key, RERUN, f"downstream of {', '.join(impacted_by[key])}"))
        else:
            plan.append(PlanStep(key, REUSE, "unaffected"))
    return plan
