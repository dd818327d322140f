"""RFC 7396 JSON Merge Patch: the patch's members replace the target's, `null` removes one.

A rebuild's new input is the base run's input with the request's `input_patch` merged over it.
"""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """The result of applying `patch` to `target` (RFC 7396 section 2); neither argument is changed.

    A patch that is not an object replaces the target whole; an object patch turns a non-object
    target into an object first, removes the members it sets to null and merges the others.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
