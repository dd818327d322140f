"""The workflow model: specs, validation, the DAG, input selectors and canonical hashes.

Pure functions with no I/O, shared by the API, the worker and the CLI.
"""

from __future__ import annotations

from shared.workflow.graph import downstream_closure, order, ready, sinks, upstream
from shared.workflow.keys import (
    cache_components,
    cache_display,
    cache_key,
    canonical_json,
    input_artifact_hashes,
    input_hash,
    spec_version_hash,
)
from shared.workflow.selectors import SelectorError, resolve_input, run_context
from shared.workflow.spec import (
    CACHE_SCOPES,
    CachePolicy,
    CacheScope,
    RetryPolicy,
    SpecError,
    StepSpec,
    Violation,
    WorkflowSpec,
    load_spec_text,
    parse_spec,
    spec_to_dict,
    validate,
)
from shared.workflow.wire import from_proto_dict, to_proto_dict

__all__ = [
    "CACHE_SCOPES",
    "CachePolicy",
    "CacheScope",
    "RetryPolicy",
    "SelectorError",
    "SpecError",
    "StepSpec",
    "Violation",
    "WorkflowSpec",
    "cache_components",
    "cache_display",
    "cache_key",
    "canonical_json",
    "downstream_closure",
    "from_proto_dict",
    "input_artifact_hashes",
    "input_hash",
    "load_spec_text",
    "order",
    "parse_spec",
    "ready",
    "resolve_input",
    "run_context",
    "sinks",
    "spec_to_dict",
    "spec_version_hash",
    "to_proto_dict",
    "upstream",
    "validate",
]
