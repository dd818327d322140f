"""The proto's form of a spec (runs.v1.WorkflowSpec as a plain dict) to the file form, and back.

Both are the same schema except where proto3 cannot say it: a change request's steps sit in a
`StepKeys` message, and zero means "unset" for `timeout_seconds`, `retry.max_attempts` and
`cache.ttl_seconds`, and "" for `cache.scope`. Pass the proto through
`json_format.MessageToDict(spec, preserving_proto_field_name=True)` first.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def from_proto_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """The file form of a WorkflowSpec dict (for `parse_spec`/`validate`); unknown fields pass through."""
    out = copy.deepcopy(dict(data))
    requests = out.get("change_requests")
    if isinstance(requests, Mapping):
        out["change_requests"] = {
            name: (keys.get("step_keys", []) if isinstance(keys, Mapping) else keys) for name, keys in requests.items()
        }
    steps = out.get("steps")
    if isinstance(steps, list):
        out["steps"] = [_step_from_proto(s) if isinstance(s, Mapping) else s for s in steps]
    return out


def _step_from_proto(step: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(step)
    _drop_zero(out, "timeout_seconds")
    for name, zero_fields in (("retry", ("max_attempts",)), ("cache", ("ttl_seconds", "scope"))):
        part = out.get(name)
        if isinstance(part, Mapping):
            part = dict(part)
            for zero in zero_fields:
                _drop_zero(part, zero)
            out[name] = part
    return out


def _drop_zero(mapping: dict[str, Any], name: str) -> None:
    if mapping.get(name) in (0, 0.0, "0", ""):
        del mapping[name]


def to_proto_dict(plain: Mapping[str, Any]) -> dict[str, Any]:
    """The proto's dict form of a file-form spec (as `spec_to_dict` gives it), for `json_format.ParseDict`."""
    out = copy.deepcopy(dict(plain))
    out["change_requests"] = {name: {"step_keys": list(keys)} for name, keys in out.get("change_requests", {}).items()}
    for step in out.get("steps", []):
        if step.get("timeout_seconds") is None:
            step.pop("timeout_seconds", None)
        cache = step.get("cache") or {}
        if cache.get("ttl_seconds") is None:
            cache.pop("ttl_seconds", None)
    return out
