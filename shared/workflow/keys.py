"""Canonical JSON (RFC 8785) and the hashes made from it.

`spec_version_hash` identifies a workflow version: the same spec, however its keys are ordered or
whichever of YAML and JSON it came from, hashes the same.

The step cache key is the sha256 of the canonical JSON of a step's components — workflow, step key,
tool and tool version, the step's spec (tool, args, selectors), its resolved input, the sha256 of
every artifact in that input, the run id for scope `run_only` — and the tenant, always. The worker
builds the components (`cache_components`); the API adds the tenant and hashes (`cache_key`), so no
tenant can ever produce another's key. People see `{workflow}:{step}:{input_hash}` (`cache_display`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from shared.workflow.spec import StepSpec, WorkflowSpec, spec_to_dict

INPUT_HASH_CHARS = 12  # of the input hash in a key's display form


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical JSON of `value` (sorted keys, no spaces, ES6 numbers); raises on NaN/Infinity."""
    return rfc8785.dumps(value)


def spec_version_hash(spec: WorkflowSpec) -> str:
    """The version of a spec: sha256 hex of the canonical JSON of its canonical plain form."""
    return hashlib.sha256(canonical_json(spec_to_dict(spec))).hexdigest()


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def input_artifact_hashes(value: Any) -> list[str]:
    """The sha256 of every artifact object (a mapping with `sha256` and `name`) anywhere in `value`, sorted."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("sha256"), str) and "name" in item:
                found.add(item["sha256"])
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return sorted(found)


def cache_components(workflow: str, step: StepSpec, tool: str, tool_version: str, resolved_input: Any,
                     run_id: str | None = None) -> dict[str, Any]:
    """What a step's cache key is made of (`run_id` only for scope run_only); the API adds the tenant."""
    components: dict[str, Any] = {
        "workflow": workflow,
        "step": step.key,
        "tool": tool,
        "tool_version": tool_version,
        "spec": {"tool": step.tool, "args": step.args, "input": step.input},
        "input": resolved_input,
        "input_artifacts": input_artifact_hashes(resolved_input),
    }
    if run_id is not None:
        components["run_id"] = run_id
    return components


def cache_key(components: dict[str, Any], tenant: str) -> str:
    """The cache key: sha256 hex of the canonical JSON of the components and the tenant."""
    return _sha256({**components, "tenant": tenant})


def input_hash(resolved_input: Any) -> str:
    """sha256 hex of a step's resolved input."""
    return _sha256(resolved_input)


def cache_display(components: dict[str, Any]) -> str:
    """The key as people see it: {workflow}:{step}:{input_hash} (the first characters of the input hash)."""
    short = input_hash(components.get("input"))[:INPUT_HASH_CHARS]
    return f"{components.get('workflow')}:{components.get('step')}:{short}"
