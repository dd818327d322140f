"""The dashboard's drawing of a workflow's DAG and a run's timeline, computed on the server.

Layout: graphlib's TopologicalSorter gives the layers (every step whose dependencies are done
becomes ready together); each layer is a column, and inside a column steps are ordered by the
mean row of their dependencies (fewer crossing arrows). The templates draw the result as inline
SVG: a box per step, a curved arrow per dependency. Pure functions, no I/O.
"""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

BOX_W, BOX_H = 168, 50
GAP_X, GAP_Y = 56, 18
PAD = 10
MAX_LABEL = 20
TICK_STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600,
              7200, 14400, 43200, 86400)


@dataclass(frozen=True)
class Node:
    """One step's box: its key, where it is drawn, and what it shows."""

    key: str
    x: int
    y: int
    label: str
    status: str = ""
    tool: str = ""
    mark: str = ""  # "cache hit", "reused", ...: why a SKIPPED step did not run


@dataclass(frozen=True)
class Edge:
    """An arrow from a dependency to the step that depends on it (an SVG path)."""

    source: str
    target: str
    path: str


@dataclass(frozen=True)
class Graph:
    """A laid-out DAG: boxes, arrows, and the drawing's size."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0
    box_w: int = BOX_W
    box_h: int = BOX_H


def layers(dependencies: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The steps in layers: each layer's steps depend only on steps of earlier layers.

    Dependencies on unknown steps are ignored; a cycle (never valid in a registered spec) is broken
    by placing the remaining steps in one last layer.
    """
    known = set(dependencies)
    graph = {key: [d for d in deps if d in known] for key, deps in dependencies.items()}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return [sorted(known)]
    result: list[list[str]] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        result.append(ready)
        sorter.done(*ready)
    return result


def _label(key: str) -> str:
    return key if len(key) <= MAX_LABEL else key[: MAX_LABEL - 1] + "…"


def layout(
    dependencies: Mapping[str, Sequence[str]],
    status: Mapping[str, str] | None = None,
    tools: Mapping[str, str] | None = None,
    marks: Mapping[str, str] | None = None,
) -> Graph:
    """Lay out a DAG given each step's dependencies (in spec order); status, tool and mark per step."""
    status, tools, marks = status or {}, tools or {}, marks or {}
    spec_order = {key: i for i, key in enumerate(dependencies)}
    row: dict[str, float] = {}
    columns: list[list[str]] = []
    for layer in layers(dependencies):
        def weight(key: str) -> tuple[float, int]:
            deps = [row[d] for d in dependencies[key] if d in row]
            return (sum(deps) / len(deps) if deps else -1.0, spec_order[key])

        column = sorted(layer, key=weight)
        for i, key in enumerate(column):
            row[key] = float(i)
        columns.append(column)
    tallest = max((len(c) for c in columns), default=0)
    height = PAD * 2 + tallest * BOX_H + max(0, tallest - 1) * GAP_Y
    width = PAD * 2 + len(columns) * BOX_W + max(0, len(columns) - 1) * GAP_X
    place: dict[str, tuple[int, int]] = {}
    nodes: list[Node] = []
    for c, column in enumerate(columns):
        used = len(column) * BOX_H + max(0, len(column) - 1) * GAP_Y
        top = PAD + (height - 2 * PAD - used) // 2  # centre each column vertically
        for i, key in enumerate(column):
            x, y = PAD + c * (BOX_W + GAP_X), top + i * (BOX_H + GAP_Y)
            place[key] = (x, y)
            nodes.append(Node(key, x, y, _label(key), status.get(key, ""), tools.get(key, ""), marks.get(key, "")))
    edges: list[Edge] = []
    for key, deps in dependencies.items():
        for dep in deps:
            if dep not in place:
                continue
            (sx, sy), (tx, ty) = place[dep], place[key]
            x1, y1, x2, y2 = sx + BOX_W, sy + BOX_H // 2, tx - 4, ty + BOX_H // 2
            bend = max(20, (x2 - x1) // 2)
            edges.append(Edge(dep, key, f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"))
    return Graph(nodes, edges, width, height)


@dataclass(frozen=True)
class Bar:
    """One bar of the timeline: where it starts and how long it is, in percent of the span."""

    left: float
    width: float
    status: str
    label: str


@dataclass(frozen=True)
class Lane:
    """One row of the timeline: a step and the bars of its tries."""

    key: str
    bars: list[Bar]


@dataclass(frozen=True)
class Timeline:
    """The Gantt chart of a run: lanes, and the span they are drawn in (seconds)."""

    lanes: list[Lane]
    seconds: float
    ticks: list[tuple[float, str]]


Interval = tuple[datetime, datetime | None, str, str]  # start, end (None: still going), status, label


def timeline(lanes: Sequence[tuple[str, Sequence[Interval]]], now: datetime) -> Timeline:
    """The Gantt chart of `lanes` (step key, its tries as intervals); open intervals end at `now`."""
    starts = [s for _, tries in lanes for s, _, _, _ in tries]
    ends = [e or now for _, tries in lanes for _, e, _, _ in tries]
    if not starts:
        return Timeline([], 0.0, [])
    first, last = min(starts), max(ends)
    span = max((last - first).total_seconds(), 0.001)
    result: list[Lane] = []
    for key, tries in lanes:
        bars = []
        for start, end, state, label in tries:
            left = (start - first).total_seconds() / span * 100
            width = ((end or now) - start).total_seconds() / span * 100
            bars.append(Bar(round(left, 3), round(max(width, 0.4), 3), state, label))
        result.append(Lane(key, bars))
    return Timeline(result, span, _ticks(span))


def _ticks(span: float) -> list[tuple[float, str]]:
    """Up to about five axis ticks at a round step: (percent, label)."""
    step = next((s for s in TICK_STEPS if span / s <= 5), span / 5)
    ticks, t = [], 0.0
    while t <= span + 1e-9:
        ticks.append((round(t / span * 100, 3), duration(t)))
        t += step
    return ticks


def duration(seconds: float) -> str:
    """A short human duration: 850ms, 4.2s, 3m 05s, 2h 10m."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
