"""The DAG of a workflow spec: order, upstream and downstream sets, sinks, and what is ready to run.

These functions expect a spec that passed `validate`: a cycle makes `order` raise
graphlib.CycleError, and dependencies naming no step are ignored.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from graphlib import TopologicalSorter

from shared.workflow.spec import WorkflowSpec


def _dependencies(spec: WorkflowSpec) -> dict[str, list[str]]:
    """key -> the keys it depends on (known steps only, no self-edges)."""
    keys = {step.key for step in spec.steps}
    return {step.key: [d for d in step.depends_on if d in keys and d != step.key] for step in spec.steps}


def _dependents(spec: WorkflowSpec) -> dict[str, list[str]]:
    """key -> the keys that depend on it directly."""
    result: dict[str, list[str]] = {step.key: [] for step in spec.steps}
    for key, deps in _dependencies(spec).items():
        for dep in deps:
            result[dep].append(key)
    return result


def _check_keys(spec: WorkflowSpec, keys: Iterable[str]) -> None:
    known = {step.key for step in spec.steps}
    for key in keys:
        if key not in known:
            raise KeyError(key)


def order(spec: WorkflowSpec) -> list[str]:
    """A topological order of the steps; among steps ready together the spec's order decides.

    A spec already listed in a valid order comes back in that order.
    """
    position = {step.key: i for i, step in enumerate(spec.steps)}
    sorter = TopologicalSorter(_dependencies(spec))
    sorter.prepare()  # raises graphlib.CycleError
    ready: list[tuple[int, str]] = []
    result: list[str] = []
    while sorter.is_active():
        for key in sorter.get_ready():
            heapq.heappush(ready, (position[key], key))
        _, key = heapq.heappop(ready)
        result.append(key)
        sorter.done(key)
    return result


def upstream(spec: WorkflowSpec, key: str) -> set[str]:
    """Every step `key` depends on, directly or transitively (not `key` itself)."""
    _check_keys(spec, [key])
    return _closure(_dependencies(spec), [key]) - {key}


def downstream_closure(spec: WorkflowSpec, keys: Iterable[str]) -> set[str]:
    """`keys` plus every step that depends on one of them, directly or transitively."""
    keys = list(keys)
    _check_keys(spec, keys)
    return _closure(_dependents(spec), keys) | set(keys)


def sinks(spec: WorkflowSpec) -> list[str]:
    """The steps no other step depends on, in the spec's order (their outputs are the run's output)."""
    dependents = _dependents(spec)
    return [step.key for step in spec.steps if not dependents[step.key]]


def ready(spec: WorkflowSpec, succeeded: set[str], started: set[str]) -> list[str]:
    """Steps not yet started whose dependencies have all succeeded, in `order(spec)`."""
    deps = _dependencies(spec)
    return [
        key
        for key in order(spec)
        if key not in started and key not in succeeded and all(d in succeeded for d in deps[key])
    ]


def _closure(edges: dict[str, list[str]], start: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = [n for s in start for n in edges.get(s, ())]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(edges.get(current, ()))
    return seen
