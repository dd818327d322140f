"""Canonical JSON (RFC 8785) and the hashes made from it.

`spec_version_hash` identifies a workflow version: the same spec, however its keys are ordered or
whichever of YAML and JSON it came from, hashes the same. The step cache key comes with the next
issue and belongs here too: sha256 of the canonical JSON of workflow, step key, tool and tool
version, step spec, resolved input, input artifacts' hashes, and the run id for `run_only`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from shared.workflow.spec import WorkflowSpec, spec_to_dict


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical JSON of `value` (sorted keys, no spaces, ES6 numbers); raises on NaN/Infinity."""
    return rfc8785.dumps(value)


def spec_version_hash(spec: WorkflowSpec) -> str:
    """The version of a spec: sha256 hex of the canonical JSON of its canonical plain form."""
    return hashlib.sha256(canonical_json(spec_to_dict(spec))).hexdigest()
