"""Workflow specs: the data model, parsing from plain data and text, validation, the canonical form.

A spec arrives as plain data (a YAML or JSON file, or the proto's JSON form, snake_case field
names). `validate` reports every problem at once, each as a `Violation` with a field path
(`steps[2].depends_on[0]`, `steps[1].input.text`, `name`; "" is the document itself);
`parse_spec` returns a `WorkflowSpec` only for data with no violation and raises `SpecError`
otherwise. `spec_to_dict` gives the canonical plain form that `keys.spec_version_hash` hashes.

Pure: no I/O beyond parsing the text it is given.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any, Literal, cast

import jmespath.exceptions
import yaml
from jmespath.parser import Parser

from shared.limits import MAX_JSON_DEPTH
from shared.text import shorten
from shared.tool_args import STOCK_TOOL_ARGS

CacheScope = Literal["none", "global", "run_only"]
CACHE_SCOPES: tuple[str, ...] = ("none", "global", "run_only")

MAX_NAME_CHARS = 128
MAX_ATTEMPTS = 100
MAX_SECONDS = 86400.0  # one day: the cap of a backoff and of a step's timeout
# An argument sits up to four levels down in the events it travels in (tool.invoked's input, an echoed
# output in run.completed), which nest at most MAX_JSON_DEPTH levels.
MAX_ARG_DEPTH = MAX_JSON_DEPTH - 4
MAX_SAFE_INTEGER = 2**53 - 1  # RFC 8785 numbers are IEEE doubles; larger integers cannot be hashed exactly
MAX_CYCLES_REPORTED = 20
# Bounds that keep validation fast on anything one request holds (the graph checks grow with
# steps times edges) and jmespath's parse cache small.
MAX_STEPS = 256
MAX_SELECTOR_CHARS = 1024

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_NAME_RULE = f"1..{MAX_NAME_CHARS} characters, each a letter, digit, '.', '_' or '-'"

# The fields each object may carry; anything else is a typo to report, never to ignore.
_SPEC_FIELDS = ("name", "description", "steps", "change_requests")
_STEP_FIELDS = ("key", "tool", "depends_on", "input", "args", "retry", "timeout_seconds", "cache")
_RETRY_FIELDS = ("max_attempts", "backoff_seconds", "backoff_max_seconds")
_CACHE_FIELDS = ("scope", "ttl_seconds")
# What one step contributes to the run context (see selectors.run_context).
STEP_RESULT_FIELDS = ("output", "artifacts")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a step is tried and how long to wait between tries (exponential, capped)."""

    max_attempts: int = 1
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class CachePolicy:
    """Whether a step's result may be reused (stored now, used by the step cache)."""

    scope: CacheScope = "none"
    ttl_seconds: int | None = None


@dataclass(frozen=True)
class StepSpec:
    """One step: a tool call whose input is `args` merged with the selectors of `input`."""

    key: str
    tool: str
    depends_on: tuple[str, ...] = ()
    input: dict[str, str] = field(default_factory=dict)  # argument name -> JMESPath selector
    args: dict[str, Any] = field(default_factory=dict)  # constant arguments
    retry: RetryPolicy = RetryPolicy()
    timeout_seconds: float | None = None
    cache: CachePolicy = CachePolicy()


@dataclass(frozen=True)
class WorkflowSpec:
    """A workflow: a DAG of steps plus the change requests a rebuild may name."""

    name: str
    description: str
    steps: tuple[StepSpec, ...]
    change_requests: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def step(self, key: str) -> StepSpec:
        """The step called `key` (KeyError when there is none)."""
        for step in self.steps:
            if step.key == key:
                return step
        raise KeyError(key)

    @property
    def keys(self) -> list[str]:
        """Step keys in the spec's order."""
        return [step.key for step in self.steps]


@dataclass(frozen=True)
class Violation:
    """One problem of a spec: the field's path and what is wrong with it."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}" if self.field else self.description


class SpecError(ValueError):
    """A spec that does not parse or validate; `violations` lists every problem."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(str(v) for v in violations))
        self.violations = violations


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_spec(data: Mapping[str, Any]) -> WorkflowSpec:
    """The WorkflowSpec of plain data (defaults filled in); raises SpecError listing every problem."""
    violations = validate(data)
    if violations:
        raise SpecError(violations)
    steps = tuple(_parse_step(s) for s in data["steps"])
    change_requests = {name: tuple(keys) for name, keys in (_opt_mapping(data.get("change_requests")) or {}).items()}
    return WorkflowSpec(
        name=data["name"],
        description=data.get("description") or "",
        steps=steps,
        change_requests=change_requests,
    )


def _parse_step(data: Mapping[str, Any]) -> StepSpec:
    retry = _opt_mapping(data.get("retry")) or {}
    cache = _opt_mapping(data.get("cache")) or {}
    timeout = data.get("timeout_seconds")
    ttl = cache.get("ttl_seconds")
    defaults = RetryPolicy()
    return StepSpec(
        key=data["key"],
        tool=data["tool"],
        depends_on=tuple(data.get("depends_on") or ()),
        input=dict(_opt_mapping(data.get("input")) or {}),
        args=copy.deepcopy(dict(_opt_mapping(data.get("args")) or {})),
        retry=RetryPolicy(
            max_attempts=_as_int(_or(retry.get("max_attempts"), defaults.max_attempts)),
            backoff_seconds=float(_or(retry.get("backoff_seconds"), defaults.backoff_seconds)),
            backoff_max_seconds=float(_or(retry.get("backoff_max_seconds"), defaults.backoff_max_seconds)),
        ),
        timeout_seconds=None if timeout is None else float(timeout),
        cache=CachePolicy(
            scope=cast(CacheScope, cache.get("scope") or "none"),
            ttl_seconds=None if ttl is None else _as_int(ttl),
        ),
    )


def _or(value: Any, default: Any) -> Any:
    """`value`, or `default` when it is null (null means "the default" everywhere in a spec)."""
    return default if value is None else value


def _opt_mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _as_int(value: Any) -> int:
    return int(value)  # already validated: an int, an integral float or a decimal string


def load_spec_text(text: str, fmt: Literal["yaml", "json"]) -> WorkflowSpec:
    """Parse a YAML or JSON document into a validated WorkflowSpec; raises SpecError."""
    if fmt == "json":
        try:
            data = json.loads(text, object_pairs_hook=_json_object_without_duplicates)
        except json.JSONDecodeError as e:
            raise SpecError([Violation("", f"JSON does not parse: {e.msg} (line {e.lineno}, column {e.colno})")]) from e
        except _DuplicateKey as e:
            raise SpecError([Violation("", f"JSON has the key {shorten(e.key)!r} twice in one object")]) from e
        except (ValueError, RecursionError) as e:  # e.g. an integer of more digits than Python converts
            raise SpecError([Violation("", f"JSON does not parse: {type(e).__name__}")]) from e
    elif fmt == "yaml":
        try:
            data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            raise SpecError([Violation("", f"YAML does not parse: {_yaml_error_text(e)}")]) from e
        except (ValueError, RecursionError) as e:
            raise SpecError([Violation("", f"YAML does not parse: {type(e).__name__}")]) from e
    else:
        raise ValueError(f"unknown spec format {fmt!r}; expected 'yaml' or 'json'")
    if not isinstance(data, Mapping):
        raise SpecError([Violation("", f"a workflow spec must be an object, not {_kind(data)}")])
    return parse_spec(data)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars (so YAML and JSON agree) and no duplicate keys.

    YAML 1.1 would turn `yes`/`on` into booleans, `2024-01-01` into a date, `010` into 8 and
    `1:30` into 90, and would keep the last of two equal keys in silence.
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"

_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_SpecLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_SpecLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(cast(yaml.ScalarNode, node)))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(cast(yaml.ScalarNode, node))).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
    mapping = cast(yaml.MappingNode, node)
    seen: set[Any] = set()
    for key_node, _ in mapping.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` may be overridden by the keys beside it
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable: construct_mapping below reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
            )
    return loader.construct_mapping(mapping, deep=True)


_SpecLoader.add_constructor(_INT_TAG, _construct_int)
_SpecLoader.add_constructor(_FLOAT_TAG, _construct_float)
_SpecLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _yaml_error_text(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        problem = error.problem or error.context or "invalid YAML"
        mark = error.problem_mark or error.context_mark
        if mark is not None:
            return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
        return problem
    return str(error).splitlines()[0] if str(error) else "invalid YAML"


# ---------------------------------------------------------------------------------------------
# The canonical plain form


def spec_to_dict(spec: WorkflowSpec) -> dict[str, Any]:
    """The canonical plain form: defaults filled in, sets sorted, steps in the spec's order."""
    return _plain(spec, canonical=True)


def _plain(spec: WorkflowSpec, *, canonical: bool) -> dict[str, Any]:
    def maybe_sorted(values: Iterable[Any]) -> list[Any]:
        return sorted(values) if canonical else list(values)

    def sorted_map(mapping: Mapping[str, Any]) -> dict[str, Any]:
        return dict(sorted(mapping.items())) if canonical else dict(mapping)

    steps = [
        {
            "key": step.key,
            "tool": step.tool,
            "depends_on": maybe_sorted(step.depends_on),
            "input": sorted_map(step.input),
            "args": copy.deepcopy(sorted_map(step.args)),
            "retry": {
                "max_attempts": step.retry.max_attempts,
                "backoff_seconds": step.retry.backoff_seconds,
                "backoff_max_seconds": step.retry.backoff_max_seconds,
            },
            "timeout_seconds": step.timeout_seconds,
            "cache": {"scope": step.cache.scope, "ttl_seconds": step.cache.ttl_seconds},
        }
        for step in spec.steps
    ]
    return {
        "name": spec.name,
        "description": spec.description,
        "steps": steps,
        "change_requests": {name: maybe_sorted(keys) for name, keys in sorted_map(spec.change_requests).items()},
    }


# ---------------------------------------------------------------------------------------------
# Validation


def validate(spec_or_dict: WorkflowSpec | Mapping[str, Any]) -> list[Violation]:
    """Every problem of a spec (a WorkflowSpec or its plain data): fields first, then the graph; [] if none."""
    data: Any = _plain(spec_or_dict, canonical=False) if isinstance(spec_or_dict, WorkflowSpec) else spec_or_dict
    return _Validator().run(data)


@dataclass
class _Step:
    """What the graph checks need of one step that passed its own checks."""

    index: int
    key: str | None
    depends_on: list[tuple[int, str]]  # (position in depends_on, key) of the string entries
    selectors: dict[str, Any]  # argument name -> compiled-and-parsed AST (only those that parse)
    selector_text: dict[str, str]


class _Validator:
    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def add(self, path: str, description: str) -> None:
        self.violations.append(Violation(path, description))

    def run(self, data: Any) -> list[Violation]:
        if not isinstance(data, Mapping):
            self.add("", f"a workflow spec must be an object, not {_kind(data)}")
            return self.violations
        self.unknown_fields("", data, _SPEC_FIELDS)
        self.name("name", data.get("name"), what="the workflow's name", required=True)
        if data.get("description") is not None:
            self.string("description", data["description"])
        steps = self.check_steps(data)
        self.graph(steps)
        self.change_requests(data.get("change_requests"), {s.key for s in steps if s.key is not None})
        return self.violations

    # -- generic checks ------------------------------------------------------------------------

    def unknown_fields(self, path: str, data: Mapping[Any, Any], known: tuple[str, ...]) -> None:
        for name in data:
            if name in known:
                continue
            where = _join(path, name)
            if not isinstance(name, str):
                self.add(where, f"unknown field {name!r} (field names are strings)")
                continue
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            self.add(where, f"unknown field {shorten(name)!r}{hint}")

    def string(self, path: str, value: Any) -> bool:
        if not isinstance(value, str):
            self.add(path, f"must be a string, not {_kind(value)}")
            return False
        problem = _text_problem(value)
        if problem:
            self.add(path, problem)
            return False
        return True

    def name(self, path: str, value: Any, *, what: str, required: bool) -> bool:
        if value is None:
            if required:
                self.add(path, f"{what} is required")
            return False
        if not isinstance(value, str):
            self.add(path, f"{what} must be a string, not {_kind(value)}")
            return False
        if not value:
            self.add(path, f"{what} must not be empty")
            return False
        if len(value) > MAX_NAME_CHARS or not _NAME_RE.fullmatch(value):
            self.add(path, f"{what} {shorten(value)!r} is invalid: use {_NAME_RULE}")
            return False
        return True

    def mapping(self, path: str, value: Any) -> Mapping[Any, Any] | None:
        """The value as a mapping; None (and a violation unless it is null) when it is not one."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.add(path, f"must be an object, not {_kind(value)}")
            return None
        return value

    def sequence(self, path: str, value: Any) -> list[Any] | None:
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            self.add(path, f"must be a list, not {_kind(value)}")
            return None
        return list(value)

    def integer(self, path: str, value: Any, low: int | None, high: int | None) -> int | None:
        number = _integer_value(value)
        if number is None:
            self.add(path, f"must be a whole number, not {_kind(value)}")
            return None
        if (low is not None and number < low) or (high is not None and number > high):
            self.add(path, f"must be {_range_text(low, high)}, not {number}")
            return None
        return number

    def number(self, path: str, value: Any, low: float, high: float, *, low_exclusive: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(path, f"must be a number, not {_kind(value)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.add(path, f"must be a finite number, not {value}")
            return None
        if value < low or (low_exclusive and value == low) or value > high:
            lower = f"> {low:g}" if low_exclusive else f">= {low:g}"
            self.add(path, f"must be {lower} and <= {high:g}, not {value}")
            return None
        return float(value)

    def json_value(self, path: str, value: Any, depth: int = 0) -> None:
        """Refuse what canonical JSON cannot hold: NaN, Infinity, huge integers, non-JSON types."""
        if depth > MAX_ARG_DEPTH:
            self.add(path, f"nests deeper than {MAX_ARG_DEPTH} levels (a step's input travels inside events)")
        elif value is None or isinstance(value, bool):
            return
        elif isinstance(value, int):
            if abs(value) > MAX_SAFE_INTEGER:
                self.add(path, f"integer {shorten(str(value))} is outside JSON's exact range (±(2**53 - 1))")
        elif isinstance(value, float):
            if not math.isfinite(value):
                self.add(path, f"must be a finite number, not {value}")
        elif isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                self.add(path, problem)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                self.json_value(f"{path}[{i}]", item, depth + 1)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.add(_join(path, key), f"object keys must be strings, not {_kind(key)}")
                elif _text_problem(key):
                    self.add(_join(path, key), f"object keys {_text_problem(key)}")
                else:
                    self.json_value(_join(path, key), item, depth + 1)
        else:
            self.add(path, f"must be a JSON value, not {_kind(value)}")

    # -- steps ---------------------------------------------------------------------------------

    def check_steps(self, data: Mapping[str, Any]) -> list[_Step]:
        if "steps" not in data or data["steps"] is None:
            self.add("steps", "a workflow needs at least one step")
            return []
        raw = self.sequence("steps", data["steps"])
        if raw is None:
            return []
        if not raw:
            self.add("steps", "a workflow needs at least one step")
            return []
        if len(raw) > MAX_STEPS:
            self.add("steps", f"a workflow has at most {MAX_STEPS} steps, not {len(raw)}")
            return []
        steps = []
        for i, item in enumerate(raw):
            path = f"steps[{i}]"
            if not isinstance(item, Mapping):
                self.add(path, f"a step must be an object, not {_kind(item)}")
                continue
            steps.append(self.step(i, path, item))
        first_index: dict[str, int] = {}
        for step in steps:
            if step.key is None:
                continue
            if step.key in first_index:
                self.add(
                    f"steps[{step.index}].key", f"duplicate step key {step.key!r} (also steps[{first_index[step.key]}])"
                )
            else:
                first_index[step.key] = step.index
        return steps

    def step(self, i: int, path: str, data: Mapping[Any, Any]) -> _Step:
        self.unknown_fields(path, data, _STEP_FIELDS)
        key = data.get("key")
        valid_key = key if self.name(f"{path}.key", key, what="a step's key", required=True) else None
        tool = data.get("tool")
        if tool is None:
            self.add(f"{path}.tool", "a step's tool is required")
        elif self.string(f"{path}.tool", tool):
            if not tool:
                self.add(f"{path}.tool", "a step's tool must not be empty")
            elif len(tool) > MAX_NAME_CHARS or not tool.isprintable() or any(c.isspace() for c in tool):
                self.add(
                    f"{path}.tool",
                    f"tool {shorten(tool)!r} is invalid: at most {MAX_NAME_CHARS} printable characters, no spaces",
                )
        depends_on = []
        deps = self.sequence(f"{path}.depends_on", data.get("depends_on"))
        if deps is not None and len(deps) > MAX_STEPS:
            self.add(f"{path}.depends_on", f"lists at most {MAX_STEPS} steps, not {len(deps)}")
            deps = None
        for j, dep in enumerate(deps or []):
            if self.string(f"{path}.depends_on[{j}]", dep):
                depends_on.append((j, dep))
        selectors: dict[str, Any] = {}
        texts: dict[str, str] = {}
        inputs = self.mapping(f"{path}.input", data.get("input"))
        for arg, expression in (inputs or {}).items():
            where = _join(f"{path}.input", arg)
            if not isinstance(arg, str):
                self.add(where, f"argument names must be strings, not {_kind(arg)}")
                continue
            if not arg:
                self.add(where, "argument names must not be empty")
                continue
            if _text_problem(arg):
                self.add(where, f"argument names {_text_problem(arg)}")
                continue
            if not isinstance(expression, str):
                self.add(where, f"a selector must be a string (a JMESPath expression), not {_kind(expression)}")
                continue
            if _text_problem(expression):
                self.add(where, f"a selector {_text_problem(expression)}")
                continue
            if len(expression) > MAX_SELECTOR_CHARS:
                self.add(where, f"a selector is at most {MAX_SELECTOR_CHARS} characters, not {len(expression)}")
                continue
            parsed = _parse_selector(expression)
            if isinstance(parsed, str):
                self.add(where, parsed)
                continue
            selectors[arg] = parsed
            texts[arg] = expression
        args = self.mapping(f"{path}.args", data.get("args"))
        for arg, value in (args or {}).items():
            where = _join(f"{path}.args", arg)
            if not isinstance(arg, str):
                self.add(where, f"argument names must be strings, not {_kind(arg)}")
            elif not arg:
                self.add(where, "argument names must not be empty")
            elif _text_problem(arg):
                self.add(where, f"argument names {_text_problem(arg)}")
            else:
                self.json_value(where, value)
        self.stock_tool_args(path, tool, args or {}, selectors)
        self.retry(f"{path}.retry", data.get("retry"))
        if data.get("timeout_seconds") is not None:
            self.number(f"{path}.timeout_seconds", data["timeout_seconds"], 0.0, MAX_SECONDS, low_exclusive=True)
        self.cache(f"{path}.cache", data.get("cache"))
        return _Step(index=i, key=valid_key, depends_on=depends_on, selectors=selectors, selector_text=texts)

    def stock_tool_args(self, path: str, tool: Any, args: Mapping[Any, Any], selectors: Mapping[str, Any]) -> None:
        """A stock tool with a closed argument schema (sleep, fail, ...) refuses the names it does not declare,
        among the step's constant `args` and its `input` selectors (both become its arguments), at
        registration rather than when the step runs."""
        schema = STOCK_TOOL_ARGS.get(tool) if isinstance(tool, str) else None
        if schema is None or not schema.closed:
            return
        for where, names in (("args", args), ("input", selectors)):
            for name in names:
                if isinstance(name, str) and name and name not in schema.args:
                    self.add(_join(f"{path}.{where}", name), f"unknown argument {shorten(name)!r} of tool {tool}; "
                             f"known: {', '.join(schema.args) or 'none'}")

    def retry(self, path: str, value: Any) -> None:
        retry = self.mapping(path, value)
        if retry is None:
            return
        self.unknown_fields(path, retry, _RETRY_FIELDS)
        defaults = RetryPolicy()
        if retry.get("max_attempts") is not None:
            self.integer(f"{path}.max_attempts", retry["max_attempts"], 1, MAX_ATTEMPTS)
        backoff: float | None = defaults.backoff_seconds
        if retry.get("backoff_seconds") is not None:
            backoff = self.number(f"{path}.backoff_seconds", retry["backoff_seconds"], 0.0, MAX_SECONDS)
        backoff_max: float | None = defaults.backoff_max_seconds
        if retry.get("backoff_max_seconds") is not None:
            backoff_max = self.number(f"{path}.backoff_max_seconds", retry["backoff_max_seconds"], 0.0, MAX_SECONDS)
        if backoff is not None and backoff_max is not None and backoff_max < backoff:
            self.add(
                f"{path}.backoff_max_seconds",
                f"must be >= backoff_seconds ({backoff:g}), not {backoff_max:g}",
            )

    def cache(self, path: str, value: Any) -> None:
        cache = self.mapping(path, value)
        if cache is None:
            return
        self.unknown_fields(path, cache, _CACHE_FIELDS)
        scope = cache.get("scope")
        if scope is not None and scope not in CACHE_SCOPES:
            shown = shorten(scope) if isinstance(scope, str) else _kind(scope)
            self.add(f"{path}.scope", f"must be one of {', '.join(CACHE_SCOPES)}, not {shown!r}")
        if cache.get("ttl_seconds") is not None:
            self.integer(f"{path}.ttl_seconds", cache["ttl_seconds"], 0, MAX_SAFE_INTEGER)  # RFC 8785 hashes no more

    # -- the graph -----------------------------------------------------------------------------

    def graph(self, steps: list[_Step]) -> None:
        keys = {s.key for s in steps if s.key is not None}
        known = shorten(", ".join(sorted(keys)) or "none", 200)
        index_of: dict[str, int] = {}
        edges: dict[str, list[str]] = {}
        for step in steps:
            seen: set[str] = set()
            for j, dep in step.depends_on:
                where = f"steps[{step.index}].depends_on[{j}]"
                if dep in seen:
                    self.add(where, f"lists {shorten(dep)!r} twice")
                elif step.key is not None and dep == step.key:
                    self.add(where, f"step {step.key!r} depends on itself")
                elif dep not in keys:
                    self.add(where, f"names no step: {shorten(dep)!r} (steps: {known})")
                seen.add(dep)
            if step.key is not None:
                index_of.setdefault(step.key, step.index)
                known_deps = [d for _, d in step.depends_on if d in keys and d != step.key]
                edges.setdefault(step.key, [])
                edges[step.key].extend(d for d in known_deps if d not in edges[step.key])
        self.cycles(edges, index_of, steps)
        self.selector_references(steps, edges, keys)

    def cycles(self, edges: dict[str, list[str]], index_of: dict[str, int], steps: list[_Step]) -> None:
        """Report each cycle once, in order, on the dependency that closes it; then cut it and look again."""
        graph = {key: list(deps) for key, deps in edges.items()}
        for _ in range(MAX_CYCLES_REPORTED):
            try:
                TopologicalSorter(graph).prepare()
                return
            except CycleError as e:
                cycle = list(e.args[1][:-1])  # each node is a dependency of the next one
            start = min(range(len(cycle)), key=lambda p: index_of[cycle[p]])
            cycle = cycle[start:] + cycle[:start]
            first, closing = cycle[0], cycle[-1]  # `first` depends on `closing`
            step = next(s for s in steps if s.key == first)
            j = next((j for j, dep in step.depends_on if dep == closing), None)
            where = f"steps[{step.index}].depends_on" + (f"[{j}]" if j is not None else "")
            self.add(where, "cycle: " + " -> ".join([*cycle, first]))
            graph[first].remove(closing)

    def selector_references(self, steps: list[_Step], edges: dict[str, list[str]], keys: set[str]) -> None:
        for step in steps:
            if not step.selectors:
                continue
            upstream = _reachable(edges, step.key) if step.key is not None else None
            for arg, tree in step.selectors.items():
                where = _join(f"steps[{step.index}].input", arg)
                text = shorten(step.selector_text[arg])
                try:
                    refs, problems = _references(tree)
                except RecursionError:
                    self.add(where, f"selector {text!r} nests too deeply")
                    continue
                for problem in problems:
                    self.add(where, f"selector {text!r} {problem}")
                for ref in refs:
                    if upstream is None:
                        continue  # the step's own key is invalid (reported): "upstream of" means nothing
                    if ref not in keys:
                        self.add(
                            where,
                            f"selector {text!r} refers to step {shorten(ref)!r}, which is not a step of this workflow",
                        )
                    elif ref == step.key:
                        self.add(where, f"selector {text!r} refers to its own step {ref!r}")
                    elif ref not in upstream:
                        self.add(
                            where,
                            f"selector {text!r} refers to step {ref!r}, which is not upstream of {step.key!r}; "
                            f"add it to depends_on (directly or through a step that depends on it)",
                        )

    # -- change requests -----------------------------------------------------------------------

    def change_requests(self, value: Any, keys: set[str]) -> None:
        requests = self.mapping("change_requests", value)
        for name, targets in (requests or {}).items():
            where = _join("change_requests", name)
            if not isinstance(name, str):
                self.add(where, f"a change request's name must be a string, not {_kind(name)}")
                continue
            if not self.name(where, name, what="a change request's name", required=True):
                continue
            listed = self.sequence(where, targets)
            if listed is None:
                if targets is None:
                    self.add(where, "must list the steps it changes")
                continue
            if not listed:
                self.add(where, "must list at least one step")
            seen: set[str] = set()
            for j, key in enumerate(listed):
                at = f"{where}[{j}]"
                if not self.string(at, key):
                    continue
                if key in seen:
                    self.add(at, f"lists {shorten(key)!r} twice")
                elif key not in keys:
                    self.add(at, f"names no step: {shorten(key)!r}")
                seen.add(key)


# ---------------------------------------------------------------------------------------------
# Selector analysis: which steps a JMESPath expression reads from the run context


def _parse_selector(expression: str) -> dict[str, Any] | str:
    """The selector's AST, or why it does not parse."""
    if not expression.strip():
        return "a selector must not be empty"
    try:
        return cast(dict[str, Any], Parser().parse(expression).parsed)  # what jmespath.compile does
    except jmespath.exceptions.JMESPathError as e:
        first = str(e).splitlines()[0].removesuffix(", for expression:").rstrip(":")
        return f"selector {shorten(expression)!r} does not parse: {first}"
    except (RecursionError, ValueError, TypeError) as e:
        return f"selector {shorten(expression)!r} does not parse: {type(e).__name__}"


# Abstract values: what a sub-expression evaluates to, as far as the run context is concerned.
_ROOT = ("root",)
_STEPS = ("steps",)
_OTHER = ("other",)


def _references(tree: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(step keys the expression reads as `steps.<key>`, problems such as `steps.*`).

    Walks the AST with the value each node is evaluated against: only a `steps` field read from
    the run context itself is a step reference (`input.items[*].steps` is data, not a step).
    """
    refs: list[str] = []
    problems: list[str] = []

    def problem(text: str) -> None:
        if text not in problems:
            problems.append(text)

    def use(value: tuple[str, ...]) -> None:
        # The value is consumed as a whole (returned, compared, projected, passed to a function).
        if value == _STEPS:
            problem("reads 'steps' without naming a step, which is ambiguous; name the step, as in steps.<key>.output")
        elif value == _ROOT:
            problem("reads the whole run context; name what it needs, as in input.<field> or steps.<key>.output")

    def ev(node: Mapping[str, Any], cur: tuple[str, ...]) -> tuple[str, ...]:
        kind = node.get("type")
        children: list[Mapping[str, Any]] = list(node.get("children") or [])
        if kind == "field":
            name = node.get("value")
            if cur == _ROOT:
                if name == "steps":
                    return _STEPS
                if name != "input":
                    problem(f"reads {shorten(str(name))!r}, which is not in the run context (only 'input' and 'steps')")
                return _OTHER
            if cur == _STEPS:
                key = str(name)
                if key not in refs:
                    refs.append(key)
                return ("step", key)
            if cur[0] == "step" and name not in STEP_RESULT_FIELDS:
                problem(
                    f"reads {shorten(str(name))!r} of step {cur[1]!r}; a step offers only "
                    + " and ".join(repr(f) for f in STEP_RESULT_FIELDS)
                )
            return _OTHER
        if kind in ("current", "identity"):
            return cur
        if kind == "literal":
            return _OTHER
        if kind == "subexpression":
            value = cur
            for child in children:
                value = ev(child, value)
            return value
        if kind == "pipe" and len(children) == 2:
            return ev(children[1], ev(children[0], cur))
        if kind == "index_expression" and len(children) == 2:
            return ev(children[1], ev(children[0], cur))
        if kind in ("index", "slice"):
            use(cur)
            return _OTHER
        if kind in ("projection", "value_projection") and len(children) == 2:
            use(ev(children[0], cur))
            use(ev(children[1], _OTHER))
            return _OTHER
        if kind == "filter_projection" and len(children) == 3:
            use(ev(children[0], cur))
            use(ev(children[1], _OTHER))
            use(ev(children[2], _OTHER))
            return _OTHER
        if kind == "key_val_pair" and len(children) == 1:
            return ev(children[0], cur)
        if kind == "expref" and len(children) == 1:
            use(ev(children[0], _OTHER))  # evaluated against each element, not the context
            return _OTHER
        # flatten, multi-selects, functions, comparators, and/or/not, and anything unforeseen:
        # every child is evaluated against the current value and consumed as a whole.
        for child in children:
            use(ev(child, cur))
        return _OTHER

    use(ev(tree, _ROOT))
    return refs, problems


# ---------------------------------------------------------------------------------------------
# Helpers


def _reachable(edges: Mapping[str, list[str]], key: str) -> set[str]:
    """Every step `key` depends on, directly or transitively (never `key` itself)."""
    seen: set[str] = set()
    stack = list(edges.get(key, ()))
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(edges.get(current, ()))
    seen.discard(key)
    return seen


def _join(path: str, name: Any) -> str:
    text = shorten(name) if isinstance(name, str) else repr(name)
    return f"{path}.{text}" if path else text


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {shorten(value)!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _integer_value(value: Any) -> int | None:
    """An integer given as a number or (proto3 JSON's int64 form) a decimal string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):
        return int(value)
    return None


def _range_text(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    if low is not None:
        return f">= {low}"
    return f"<= {high}"


def _text_problem(text: str) -> str | None:
    """Why `text` cannot be stored (PostgreSQL's jsonb holds no U+0000) or hashed (no lone surrogate); None if fine."""
    if "\x00" in text:
        return "must not contain the character U+0000"
    if not _is_unicode(text):
        return "must be valid Unicode text (it holds a lone surrogate)"
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
