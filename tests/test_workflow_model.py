"""The pure workflow model (shared.workflow): specs, validation, the DAG, selectors, version hashes."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.workflow import (
    CachePolicy,
    RetryPolicy,
    SelectorError,
    SpecError,
    StepSpec,
    Violation,
    WorkflowSpec,
    canonical_json,
    downstream_closure,
    load_spec_text,
    order,
    parse_spec,
    ready,
    resolve_input,
    run_context,
    sinks,
    spec_to_dict,
    spec_version_hash,
    upstream,
    validate,
)
from shared.workflow.spec import MAX_SELECTOR_CHARS, MAX_STEPS


def diamond() -> dict[str, Any]:
    return {
        "name": "diamond",
        "description": "a -> (b, c) -> d",
        "steps": [
            {"key": "a", "tool": "echo", "args": {"title": "hello"}},
            {
                "key": "b",
                "tool": "echo",
                "depends_on": ["a"],
                "input": {"text": "steps.a.output.title", "x": "input.x"},
                "retry": {"max_attempts": 3, "backoff_seconds": 0.5, "backoff_max_seconds": 4},
            },
            {"key": "c", "tool": "sleep", "depends_on": ["a"], "args": {"seconds": 1}, "timeout_seconds": 30},
            {
                "key": "d",
                "tool": "echo",
                "depends_on": ["b", "c"],
                "input": {"first": "steps.a.output", "both": "[steps.b.output, steps.c.output]"},
                "cache": {"scope": "global", "ttl_seconds": 3600},
            },
        ],
        "change_requests": {"title_update": ["a"], "sleep_update": ["c"]},
    }


def fields(violations: list[Violation]) -> list[str]:
    return [v.field for v in violations]


def only(violations: list[Violation], field: str) -> Violation:
    found = [v for v in violations if v.field == field]
    assert len(found) == 1, (field, violations)
    return found[0]


# -- a valid spec ------------------------------------------------------------------------------


def test_diamond_parses_orders_and_has_one_sink() -> None:
    assert validate(diamond()) == []
    spec = parse_spec(diamond())
    assert spec.name == "diamond" and spec.keys == ["a", "b", "c", "d"]
    assert order(spec) == ["a", "b", "c", "d"]
    assert sinks(spec) == ["d"]
    assert upstream(spec, "d") == {"a", "b", "c"} and upstream(spec, "a") == set()
    assert downstream_closure(spec, ["b"]) == {"b", "d"}
    assert downstream_closure(spec, ["a"]) == {"a", "b", "c", "d"}
    assert downstream_closure(spec, []) == set()
    b = spec.step("b")
    assert b.depends_on == ("a",) and b.retry == RetryPolicy(3, 0.5, 4.0)
    assert spec.step("c").timeout_seconds == 30.0 and spec.step("c").retry == RetryPolicy()
    assert spec.step("d").cache == CachePolicy("global", 3600) and spec.step("a").cache == CachePolicy()
    assert spec.change_requests == {"title_update": ("a",), "sleep_update": ("c",)}
    assert validate(spec) == []
    with pytest.raises(KeyError):
        upstream(spec, "nope")


def test_order_breaks_ties_by_spec_order_and_keeps_a_valid_listing() -> None:
    spec = parse_spec(
        {
            "name": "w",
            "steps": [
                {"key": "late", "tool": "t", "depends_on": ["early"]},
                {"key": "free", "tool": "t"},
                {"key": "early", "tool": "t"},
            ],
        }
    )
    assert order(spec) == ["free", "early", "late"]
    listed = parse_spec({"name": "w", "steps": [{"key": k, "tool": "t"} for k in "zyx"]})
    assert order(listed) == ["z", "y", "x"] and sinks(listed) == ["z", "y", "x"]


def test_ready_lists_steps_whose_dependencies_succeeded() -> None:
    spec = parse_spec(diamond())
    assert ready(spec, set(), set()) == ["a"]
    assert ready(spec, set(), {"a"}) == []
    assert ready(spec, {"a"}, {"a"}) == ["b", "c"]
    assert ready(spec, {"a", "b"}, {"a", "b", "c"}) == []
    assert ready(spec, {"a", "b", "c"}, {"a", "b", "c"}) == ["d"]
    assert ready(spec, {"a", "b", "c", "d"}, {"a", "b", "c", "d"}) == []


def test_spec_to_dict_is_the_canonical_form_with_defaults() -> None:
    spec = parse_spec(
        {
            "name": "w",
            "steps": [
                {"key": "b", "tool": "t", "depends_on": ["z", "a"]},
                {"key": "z", "tool": "t"},
                {"key": "a", "tool": "t"},
            ],
        }
    )
    plain = spec_to_dict(spec)
    assert plain["description"] == "" and plain["change_requests"] == {}
    assert [s["key"] for s in plain["steps"]] == ["b", "z", "a"]  # steps keep their order
    assert plain["steps"][0]["depends_on"] == ["a", "z"]  # a set: sorted
    assert plain["steps"][1] == {
        "key": "z",
        "tool": "t",
        "depends_on": [],
        "input": {},
        "args": {},
        "retry": {"max_attempts": 1, "backoff_seconds": 1.0, "backoff_max_seconds": 60.0},
        "timeout_seconds": None,
        "cache": {"scope": "none", "ttl_seconds": None},
    }
    assert spec_to_dict(parse_spec(plain)) == plain  # the canonical form parses back to itself
    assert json.loads(json.dumps(plain)) == plain


def test_nulls_mean_defaults() -> None:
    data = {
        "name": "w",
        "description": None,
        "change_requests": None,
        "steps": [
            {
                "key": "a",
                "tool": "t",
                "depends_on": None,
                "input": None,
                "args": None,
                "retry": None,
                "timeout_seconds": None,
                "cache": None,
            }
        ],
    }
    assert validate(data) == []
    assert parse_spec(data) == WorkflowSpec("w", "", (StepSpec("a", "t"),), {})
    data["steps"][0]["retry"] = {"max_attempts": None, "backoff_seconds": None, "backoff_max_seconds": None}
    data["steps"][0]["cache"] = {"scope": None, "ttl_seconds": None}
    assert validate(data) == []
    assert parse_spec(data) == WorkflowSpec("w", "", (StepSpec("a", "t"),), {})


# -- validation: every problem, with its field path ---------------------------------------------


def test_name_problems() -> None:
    base = {"steps": [{"key": "a", "tool": "t"}]}
    assert "required" in only(validate(base), "name").description
    for bad in ["", "has space", "x" * 129, "naïve", "a/b", 7]:
        violations = validate({**base, "name": bad})
        assert fields(violations) == ["name"], (bad, violations)
    for good in ["a", "campaign.build.v1", "A_b-c.9", "x" * 128]:
        assert validate({**base, "name": good}) == []


def test_no_steps() -> None:
    steps: list[Any] | None
    for steps in ([], None):
        assert fields(validate({"name": "w", "steps": steps})) == ["steps"]
    assert fields(validate({"name": "w"})) == ["steps"]
    assert fields(validate({"name": "w", "steps": {"a": {}}})) == ["steps"]
    assert fields(validate({"name": "w", "steps": ["a"]})) == ["steps[0]"]


def test_step_key_and_tool_problems() -> None:
    violations = validate(
        {
            "name": "w",
            "steps": [
                {"key": "a", "tool": "t"},
                {"key": "", "tool": "t"},
                {"key": "a", "tool": ""},
                {"tool": "t"},
                {"key": "b c", "tool": "has space"},
                {"key": "k" * 129},
            ],
        }
    )
    assert fields(violations) == [
        "steps[1].key",
        "steps[2].tool",
        "steps[3].key",
        "steps[4].key",
        "steps[4].tool",
        "steps[5].key",
        "steps[5].tool",
        "steps[2].key",
    ]
    assert only(violations, "steps[2].key").description == "duplicate step key 'a' (also steps[0])"
    assert "must not be empty" in only(violations, "steps[1].key").description
    assert "required" in only(violations, "steps[3].key").description


def test_dependency_problems() -> None:
    violations = validate(
        {
            "name": "w",
            "steps": [
                {"key": "a", "tool": "t"},
                {"key": "b", "tool": "t", "depends_on": ["a", "nope", "b", "a", 5]},
                {"key": "c", "tool": "t", "depends_on": "a"},
            ],
        }
    )
    assert fields(violations) == [
        "steps[1].depends_on[4]",
        "steps[2].depends_on",
        "steps[1].depends_on[1]",
        "steps[1].depends_on[2]",
        "steps[1].depends_on[3]",
    ]
    assert only(violations, "steps[1].depends_on[1]").description == "names no step: 'nope' (steps: a, b, c)"
    assert only(violations, "steps[1].depends_on[2]").description == "step 'b' depends on itself"
    assert only(violations, "steps[1].depends_on[3]").description == "lists 'a' twice"


def test_cycle_is_named_in_order_on_the_dependency_that_closes_it() -> None:
    violations = validate(
        {
            "name": "w",
            "steps": [
                {"key": "start", "tool": "t"},
                {"key": "a", "tool": "t", "depends_on": ["start", "c"]},
                {"key": "b", "tool": "t", "depends_on": ["a"]},
                {"key": "c", "tool": "t", "depends_on": ["b"]},
            ],
        }
    )
    assert violations == [Violation("steps[1].depends_on[1]", "cycle: a -> b -> c -> a")]


def test_two_cycles_are_both_reported() -> None:
    violations = validate(
        {
            "name": "w",
            "steps": [
                {"key": "a", "tool": "t", "depends_on": ["b"]},
                {"key": "b", "tool": "t", "depends_on": ["a"]},
                {"key": "x", "tool": "t", "depends_on": ["y"]},
                {"key": "y", "tool": "t", "depends_on": ["x"]},
            ],
        }
    )
    assert sorted((v.field, v.description) for v in violations) == [
        ("steps[0].depends_on[0]", "cycle: a -> b -> a"),
        ("steps[2].depends_on[0]", "cycle: x -> y -> x"),
    ]


def test_retry_timeout_and_cache_problems() -> None:
    def step(**extra: Any) -> list[Violation]:
        return validate({"name": "w", "steps": [{"key": "a", "tool": "t", **extra}]})

    for attempts in (0, 101, 1.5, True, "x"):
        assert fields(step(retry={"max_attempts": attempts})) == ["steps[0].retry.max_attempts"], attempts
    assert step(retry={"max_attempts": 100}) == [] and step(retry={"max_attempts": 1}) == []
    assert step(retry={"max_attempts": "3"}) == []  # proto3 JSON writes int64 as a string
    for backoff in (-1, 86401, math.nan, math.inf, "1"):
        assert fields(step(retry={"backoff_seconds": backoff})) == ["steps[0].retry.backoff_seconds"], backoff
    assert step(retry={"backoff_seconds": 0, "backoff_max_seconds": 0}) == []
    violation = only(step(retry={"backoff_seconds": 120}), "steps[0].retry.backoff_max_seconds")
    assert violation.description == "must be >= backoff_seconds (120), not 60"
    assert fields(step(retry={"backoff_seconds": 5, "backoff_max_seconds": 2})) == [
        "steps[0].retry.backoff_max_seconds"
    ]
    for timeout in (0, -1, 86401, math.inf, math.nan, "10", True):
        assert fields(step(timeout_seconds=timeout)) == ["steps[0].timeout_seconds"], timeout
    assert step(timeout_seconds=0.001) == [] and step(timeout_seconds=86400) == []
    assert fields(step(cache={"scope": "local"})) == ["steps[0].cache.scope"]
    assert fields(step(cache={"scope": 1})) == ["steps[0].cache.scope"]
    assert fields(step(cache={"scope": "run_only", "ttl_seconds": -1})) == ["steps[0].cache.ttl_seconds"]
    assert step(cache={"scope": "run_only", "ttl_seconds": 0}) == []
    assert fields(step(retry=3, cache="global")) == ["steps[0].retry", "steps[0].cache"]


def test_unknown_fields_anywhere_are_refused_with_a_hint() -> None:
    violations = validate(
        {
            "name": "w",
            "stepz": [],
            "steps": [
                {
                    "key": "a",
                    "tool": "t",
                    "dependson": [],
                    "retry": {"max_attempt": 2},
                    "cache": {"scope": "global", "ttl": 3},
                }
            ],
        }
    )
    assert fields(violations) == ["stepz", "steps[0].dependson", "steps[0].retry.max_attempt", "steps[0].cache.ttl"]
    assert only(violations, "steps[0].dependson").description == "unknown field 'dependson'; did you mean 'depends_on'?"
    assert "did you mean 'max_attempts'?" in only(violations, "steps[0].retry.max_attempt").description


def test_args_and_input_keys_and_values() -> None:
    violations = validate(
        {
            "name": "w",
            "steps": [
                {
                    "key": "a",
                    "tool": "t",
                    "input": {1: "input.x", "ok": "input.y", "n": 3},
                    "args": {
                        2: "x",
                        "nan": math.nan,
                        "deep": {"list": [1, math.inf]},
                        "huge": 2**60,
                        "obj": object(),
                        "fine": {"a": [1, 2.5, None, True, "é"]},
                    },
                }
            ],
        }
    )
    assert fields(violations) == [
        "steps[0].input.1",
        "steps[0].input.n",
        "steps[0].args.2",
        "steps[0].args.nan",
        "steps[0].args.deep.list[1]",
        "steps[0].args.huge",
        "steps[0].args.obj",
    ]
    assert "argument names must be strings" in only(violations, "steps[0].input.1").description


def test_change_requests_must_name_steps() -> None:
    data = diamond()
    data["change_requests"] = {"ok": ["a", "b"], "bad": ["a", "zz", "a"], "empty": [], "bad name": ["a"]}
    violations = validate(data)
    assert fields(violations) == [
        "change_requests.bad[1]",
        "change_requests.bad[2]",
        "change_requests.empty",
        "change_requests.bad name",
    ]
    assert only(violations, "change_requests.bad[1]").description == "names no step: 'zz'"
    assert fields(validate({**diamond(), "change_requests": ["a"]})) == ["change_requests"]


def test_several_problems_are_all_reported() -> None:
    violations = validate(
        {
            "name": "",
            "steps": [
                {"key": "a", "tool": "t", "depends_on": ["ghost"], "retry": {"max_attempts": 0}},
                {"key": "a", "tool": "t", "timeout_seconds": -5, "input": {"x": "steps.."}},
            ],
        }
    )
    assert sorted(fields(violations)) == sorted(
        [
            "name",
            "steps[0].retry.max_attempts",
            "steps[1].timeout_seconds",
            "steps[1].input.x",
            "steps[1].key",
            "steps[0].depends_on[0]",
        ]
    )
    with pytest.raises(SpecError) as raised:
        parse_spec({"name": "", "steps": []})
    assert fields(raised.value.violations) == ["name", "steps"]


def test_not_an_object() -> None:
    assert validate([1, 2]) == [Violation("", "a workflow spec must be an object, not a list")]  # type: ignore[arg-type]


def test_a_hand_built_spec_is_validated_too() -> None:
    spec = WorkflowSpec("w", "", (StepSpec("a", "t", depends_on=("b",)), StepSpec("b", "t", depends_on=("a",))))
    assert [v.description for v in validate(spec)] == ["cycle: a -> b -> a"]


# -- selectors: parse, and reach only upstream steps -------------------------------------------


def selector_violations(expression: str, *, depends_on: tuple[str, ...] = ("b",)) -> list[Violation]:
    return validate(
        {
            "name": "w",
            "steps": [
                {"key": "a", "tool": "t"},
                {"key": "b", "tool": "t", "depends_on": ["a"]},
                {"key": "side", "tool": "t"},
                {"key": "c", "tool": "t", "depends_on": list(depends_on), "input": {"text": expression}},
            ],
        }
    )


@pytest.mark.parametrize(
    "expression",
    [
        "steps.a.output.title",  # transitively upstream through b
        "steps.b.output",
        "steps.b.artifacts[0].sha256",
        "input.x",
        "[steps.a.output, input.x]",
        "{t: steps.a.output.title, n: length(steps.b.output)}",
        "steps.a.output || input.title",
        'steps."a".output',
        "input.items[*].steps.side",  # data inside the input, not a step reference
        "steps.b.output | steps.side",  # after a pipe: a field of b's output
        "sort_by(steps.b.output, &steps.side)",  # an expression reference runs on each element
        '`"literal"`',
        "@.input.x",
        "steps.a.output[?kind == 'x'].name",
    ],
)
def test_selectors_reading_upstream_steps_are_accepted(expression: str) -> None:
    assert selector_violations(expression) == []


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("steps.side.output", "refers to step 'side', which is not upstream of 'c'"),
        ("[input.x, steps.side.output]", "refers to step 'side', which is not upstream of 'c'"),
        ("steps.ghost.output", "refers to step 'ghost', which is not a step of this workflow"),
        ("steps.c.output", "refers to its own step 'c'"),
        ("steps.*", "reads 'steps' without naming a step"),
        ("steps.*.output", "reads 'steps' without naming a step"),
        ("steps", "reads 'steps' without naming a step"),
        ("keys(steps)", "reads 'steps' without naming a step"),
        ("steps[0]", "reads 'steps' without naming a step"),
        ("@", "reads the whole run context"),
        ("*.a", "reads the whole run context"),
        ("step.a.output", "reads 'step', which is not in the run context"),
        ("steps.a.outputs", "a step offers only 'output' and 'artifacts'"),
        ("steps.a.", "does not parse"),
        ("steps[", "does not parse"),
        ("", "must not be empty"),
    ],
)
def test_bad_selectors_are_refused_on_their_field(expression: str, message: str) -> None:
    violations = selector_violations(expression)
    assert fields(violations) == ["steps[3].input.text"], violations
    assert message in violations[0].description


def test_depending_on_the_step_makes_the_selector_valid() -> None:
    assert selector_violations("steps.side.output", depends_on=("b", "side")) == []


# -- resolving input ----------------------------------------------------------------------------


def test_run_context_holds_only_upstream_steps() -> None:
    results: dict[str, dict[str, Any]] = {
        "a": {"output": {"title": "T"}, "artifacts": [{"name": "x.txt", "sha256": "00"}], "extra": 1},
        "b": {"output": 2},
        "side": {"output": 3, "artifacts": []},
    }
    context = run_context({"x": 1}, results, ["a", "b", "missing"])
    assert context == {
        "input": {"x": 1},
        "steps": {
            "a": {"output": {"title": "T"}, "artifacts": [{"name": "x.txt", "sha256": "00"}]},
            "b": {"output": 2, "artifacts": []},
        },
    }


def test_resolve_input_merges_selectors_over_args() -> None:
    step = StepSpec(
        "b",
        "echo",
        depends_on=("a",),
        input={"text": "steps.a.output.title", "n": "input.n", "empty": "input.list"},
        args={"text": "default", "keep": {"nested": [1]}, "n": 0},
    )
    context = run_context({"n": 5, "list": []}, {"a": {"output": {"title": "Hello"}}}, ["a"])
    resolved = resolve_input(step, context)
    assert resolved == {"text": "Hello", "keep": {"nested": [1]}, "n": 5, "empty": []}
    resolved["keep"]["nested"].append(2)
    assert step.args["keep"] == {"nested": [1]}  # the spec is never changed through the result


def test_a_selector_yielding_nothing_names_itself() -> None:
    step = StepSpec("b", "echo", input={"text": "steps.a.output.title"})
    context = run_context({}, {"a": {"output": {"name": "no title"}}}, ["a"])
    with pytest.raises(SelectorError) as raised:
        resolve_input(step, context)
    assert str(raised.value) == "input.text: selector 'steps.a.output.title' yielded nothing"
    assert (raised.value.arg, raised.value.expression) == ("text", "steps.a.output.title")
    failing = StepSpec("b", "echo", input={"n": "length(input.x)"})
    with pytest.raises(SelectorError, match=r"^input\.n: selector 'length\(input\.x\)' failed"):
        resolve_input(failing, run_context({"x": 5}, {}, []))


# -- version hashes -----------------------------------------------------------------------------


def test_key_order_does_not_change_the_version_but_content_does() -> None:
    data = diamond()
    shuffled = json.loads(json.dumps(data, sort_keys=True))
    shuffled["steps"] = [dict(reversed(list(s.items()))) for s in shuffled["steps"]]
    shuffled["steps"][3]["depends_on"] = ["c", "b"]
    shuffled["change_requests"] = dict(reversed(list(shuffled["change_requests"].items())))
    version = spec_version_hash(parse_spec(data))
    assert len(version) == 64 and int(version, 16) >= 0
    assert spec_version_hash(parse_spec(shuffled)) == version
    # Filling in a default explicitly is the same spec.
    explicit = copy.deepcopy(data)
    explicit["steps"][0]["retry"] = {"max_attempts": 1, "backoff_seconds": 1, "backoff_max_seconds": 60.0}
    explicit["steps"][0]["cache"] = {"scope": "none"}
    assert spec_version_hash(parse_spec(explicit)) == version
    for change in (
        lambda d: d.update(description="other"),
        lambda d: d["steps"][1]["input"].update(text="steps.a.output.body"),
        lambda d: d["steps"][2]["args"].update(seconds=2),
        lambda d: d["steps"][1]["retry"].update(max_attempts=4),
        lambda d: d["change_requests"].update(more=["d"]),
        lambda d: d["steps"].reverse(),  # step order is part of the spec
    ):
        changed = copy.deepcopy(data)
        change(changed)
        assert spec_version_hash(parse_spec(changed)) != version


def test_yaml_and_json_texts_give_the_same_version() -> None:
    data = diamond()
    from_json = load_spec_text(json.dumps(data, indent=2), "json")
    from_yaml = load_spec_text(yaml.safe_dump(data, sort_keys=False), "yaml")
    handwritten = load_spec_text(
        """
name: diamond
description: a -> (b, c) -> d
steps:
  - key: a
    tool: echo
    args: {title: hello}
  - key: b
    tool: echo
    depends_on: [a]
    input:
      text: steps.a.output.title
      x: input.x
    retry: {max_attempts: 3, backoff_seconds: 0.5, backoff_max_seconds: 4}
  - {key: c, tool: sleep, depends_on: [a], args: {seconds: 1}, timeout_seconds: 30}
  - key: d
    tool: echo
    depends_on: [c, b]
    input:
      first: steps.a.output
      both: "[steps.b.output, steps.c.output]"
    cache: {scope: global, ttl_seconds: 3600}
change_requests:
  sleep_update: [c]
  title_update: [a]
""",
        "yaml",
    )
    assert from_json == from_yaml == parse_spec(data)
    assert spec_version_hash(handwritten) == spec_version_hash(from_json) == spec_version_hash(from_yaml)


def test_yaml_scalars_follow_json_and_duplicates_are_refused() -> None:
    spec = load_spec_text(
        "name: w\nsteps:\n- key: a\n  tool: t\n  args: {on: yes, day: 2024-01-02, n: 010, t: 1:30, e: 1e3, b: true}\n",
        "yaml",
    )
    assert spec.steps[0].args == {"on": "yes", "day": "2024-01-02", "n": 10, "t": "1:30", "e": 1000.0, "b": True}
    with pytest.raises(SpecError, match=r"found the key 'tool' twice"):
        load_spec_text("name: w\nsteps:\n- key: a\n  tool: t\n  tool: u\n", "yaml")
    merged = load_spec_text(
        "name: w\nsteps:\n- key: a\n  tool: t\n  retry: &r {max_attempts: 2}\n"
        + "- key: b\n  tool: t\n  retry: {<<: *r, max_attempts: 5}\n",
        "yaml",
    )
    assert merged.steps[1].retry.max_attempts == 5
    with pytest.raises(SpecError) as raised:
        load_spec_text("name: w\nsteps:\n- key: a\n  tool: t\n  args: {x: .nan}\n", "yaml")
    assert fields(raised.value.violations) == ["steps[0].args.x"]


def test_texts_that_do_not_parse() -> None:
    for text, fmt, message in [
        ("{", "json", "JSON does not parse"),
        ('{"name": "a", "name": "b"}', "json", "JSON has the key 'name' twice"),
        ("[1, 2]", "json", "must be an object, not a list"),
        ("name: [unclosed", "yaml", "YAML does not parse"),
        ("- a\n- b\n", "yaml", "must be an object, not a list"),
        ("", "yaml", "must be an object, not null"),
    ]:
        with pytest.raises(SpecError, match=message) as raised:
            load_spec_text(text, fmt)  # type: ignore[arg-type]
        assert fields(raised.value.violations) == [""]
    with pytest.raises(SpecError) as raised:
        load_spec_text('{"name": "w", "steps": [{"key": "a", "tool": "t", "timeout_seconds": NaN}]}', "json")
    assert fields(raised.value.violations) == ["steps[0].timeout_seconds"]
    with pytest.raises(ValueError, match="unknown spec format"):
        load_spec_text("{}", "toml")  # type: ignore[arg-type]


def test_canonical_json_is_rfc8785() -> None:
    assert canonical_json({"b": 1.0, "a": [1, 2.5, None, True, "é"]}) == b'{"a":[1,2.5,null,true,"\xc3\xa9"],"b":1}'


# -- properties ---------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """A random acyclic spec: step j may depend only on steps listed before it, then shuffled."""
    n = draw(st.integers(min_value=1, max_value=12))
    keys = [f"s{i}" for i in range(n)]
    steps: list[dict[str, Any]] = []
    for j, key in enumerate(keys):
        deps = draw(st.lists(st.sampled_from(keys[:j]), unique=True)) if j else []
        step: dict[str, Any] = {"key": key, "tool": "t", "depends_on": deps}
        upstream_keys = sorted(_transitive(steps, deps))
        if upstream_keys:
            ref = draw(st.sampled_from(upstream_keys))
            step["input"] = {"v": f"steps.{ref}.output"}
        steps.append(step)
    shuffled = draw(st.permutations(steps))
    return {"name": "random", "steps": list(shuffled)}


def _transitive(steps: list[dict[str, Any]], deps: list[str]) -> set[str]:
    by_key = {s["key"]: s for s in steps}
    seen: set[str] = set()
    stack = list(deps)
    while stack:
        key = stack.pop()
        if key not in seen:
            seen.add(key)
            stack.extend(by_key[key]["depends_on"])
    return seen


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(dags())
def test_random_dags_validate_and_order_respects_every_edge(data: dict[str, Any]) -> None:
    assert validate(data) == []
    spec = parse_spec(data)
    ordered = order(spec)
    assert sorted(ordered) == sorted(spec.keys)
    position = {key: i for i, key in enumerate(ordered)}
    for step in spec.steps:
        for dep in step.depends_on:
            assert position[dep] < position[step.key]
            assert step.key in downstream_closure(spec, [dep])
            assert dep in upstream(spec, step.key)
    for sink in sinks(spec):
        assert downstream_closure(spec, [sink]) == {sink}
    # Running the ready steps wave by wave finishes every step.
    done: set[str] = set()
    while wave := ready(spec, done, done):
        done |= set(wave)
    assert done == set(spec.keys)


@PROPERTY
@given(dags(), st.data())
def test_a_back_edge_always_makes_a_cycle(data: dict[str, Any], draw: st.DataObject) -> None:
    spec = parse_spec(data)
    pairs = [(dep, step.key) for step in spec.steps for dep in upstream(spec, step.key)]
    if not pairs:
        return
    ancestor, descendant = draw.draw(st.sampled_from(pairs))
    cyclic = copy.deepcopy(data)
    target = next(s for s in cyclic["steps"] if s["key"] == ancestor)
    target["depends_on"] = [*target["depends_on"], descendant]
    violations = validate(cyclic)
    cycles = [v for v in violations if v.description.startswith("cycle: ")]
    assert len(cycles) >= 1, violations
    assert all(not v.description.startswith("cycle: ") for v in validate(data))
    named = cycles[0].description.removeprefix("cycle: ").split(" -> ")
    assert named[0] == named[-1] and len(named) >= 3
    with pytest.raises(Exception, match="cycle"):
        order(WorkflowSpec(spec.name, "", tuple(parse_step(s) for s in cyclic["steps"])))


def parse_step(data: dict[str, Any]) -> StepSpec:
    return StepSpec(data["key"], data["tool"], depends_on=tuple(data["depends_on"]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "name",
        "description",
        "steps",
        "change_requests",
        "key",
        "tool",
        "depends_on",
        "input",
        "args",
        "retry",
        "timeout_seconds",
        "cache",
        "max_attempts",
        "scope",
        "ttl_seconds",
        "x",
    ]
)
garbage = st.recursive(
    json_values,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(field_names, inner, max_size=6),
    max_leaves=30,
)


@PROPERTY
@given(garbage)
def test_any_data_gives_violations_or_a_spec_never_a_crash(data: Any) -> None:
    violations = validate(data)
    assert all(isinstance(v, Violation) and isinstance(v.field, str) and v.description for v in violations)
    if isinstance(data, dict) and not violations:
        spec = parse_spec(data)
        spec_version_hash(spec)
        order(spec)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


DIAMOND_PATHS = _paths(diamond())


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(DIAMOND_PATHS), json_values), min_size=1, max_size=3))
def test_a_mutated_valid_spec_never_crashes(mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    data = diamond()
    for path, value in mutations:
        target: Any = data
        try:
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the path
    violations = validate(data)
    assert all(isinstance(v, Violation) and v.description for v in violations)
    if not violations:
        spec = parse_spec(data)
        assert spec_to_dict(parse_spec(spec_to_dict(spec))) == spec_to_dict(spec)
        spec_version_hash(spec)
        order(spec)


# --- the proto's form ---------------------------------------------------------------------------


def test_a_spec_sent_as_the_proto_message_hashes_like_its_yaml_file() -> None:
    """runs.v1.WorkflowSpec and the YAML file are one schema: the same spec is the same version."""
    from google.protobuf import json_format

    from shared.gen.runs.v1 import workflow_service_pb2
    from shared.workflow import load_spec_text, parse_spec, spec_to_dict, spec_version_hash
    from shared.workflow.wire import from_proto_dict, to_proto_dict

    text = """
name: diamond
description: a to b and c to d
steps:
  - {key: a, tool: echo, args: {x: 1}}
  - {key: b, tool: sleep, depends_on: [a], input: {seconds: steps.a.output.x}, retry: {max_attempts: 3}}
  - {key: c, tool: echo, depends_on: [a], timeout_seconds: 5, cache: {scope: global, ttl_seconds: 60}}
  - {key: d, tool: echo, depends_on: [b, c]}
change_requests:
  redo_c: [c]
"""
    from_file = load_spec_text(text, "yaml")
    message = json_format.ParseDict(to_proto_dict(spec_to_dict(from_file)), workflow_service_pb2.WorkflowSpec())
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    from_wire = parse_spec(from_proto_dict(as_dict))
    assert from_wire == from_file
    assert spec_version_hash(from_wire) == spec_version_hash(from_file)
    assert message.change_requests["redo_c"].step_keys == ["c"]


# --- found by fuzzing RegisterWorkflow (tests/test_fuzz.py::test_workflow_service) ---------------


def test_every_accepted_spec_has_a_version_hash_ttl_seconds_included() -> None:
    """A cache TTL past 2**53 - 1 passed validation, then RFC 8785 refused to hash it (INTERNAL)."""

    def spec(ttl: Any) -> dict[str, Any]:
        return {"name": "w", "steps": [{"key": "a", "tool": "t", "cache": {"ttl_seconds": ttl}}]}

    for ttl in (2**53, "100000000000000000", 10**17):  # proto3 JSON writes int64 as a string
        assert fields(validate(spec(ttl))) == ["steps[0].cache.ttl_seconds"], ttl
    spec_version_hash(parse_spec(spec(2**53 - 1)))


def test_text_postgresql_cannot_store_is_refused_where_it_is() -> None:
    """U+0000 anywhere in a spec passed validation, then PostgreSQL refused the jsonb (INTERNAL)."""
    data = diamond()
    data["description"] = "a\x00b"
    data["steps"][0]["args"] = {"t\x00": "x", "nested": {"k\x00": 1, "list": ["\x00"]}, "v": "\x00"}
    data["steps"][1]["input"] = {"a\x00": "input.x", "b": "input.x || '\x00'"}
    violations = validate(data)
    assert fields(violations) == [
        "description",
        "steps[0].args.t\x00",
        "steps[0].args.nested.k\x00",
        "steps[0].args.nested.list[0]",
        "steps[0].args.v",
        "steps[1].input.a\x00",
        "steps[1].input.b",
    ]
    assert all("U+0000" in v.description for v in violations), violations


def test_sizes_that_made_validation_hang_are_refused_at_once() -> None:
    """A 7,000-step chain with selectors took the API's event loop for over 10 s (steps x edges)."""
    chain = [{"key": f"s{i}", "tool": "t", "depends_on": [f"s{i - 1}"] if i else [],
              "input": {"x": f"steps.s{i - 1}.output" if i else "input.x"}} for i in range(5000)]
    assert fields(validate({"name": "w", "steps": chain})) == ["steps"]
    assert validate({"name": "w", "steps": chain[:MAX_STEPS]}) == []
    unknown = [f"u{i}" for i in range(MAX_STEPS + 1)]
    assert fields(validate({"name": "w", "steps": [{"key": "a", "tool": "t", "depends_on": unknown}]})) == [
        "steps[0].depends_on"
    ]
    # jmespath keeps the last 128 parsed expressions: a 600 KB selector cost 76 MB of them, each
    long = "input" + ".a" * MAX_SELECTOR_CHARS
    violation = only(validate({"name": "w", "steps": [{"key": "a", "tool": "t", "input": {"x": long}}]}),
                      "steps[0].input.x")
    assert violation.description == f"a selector is at most {MAX_SELECTOR_CHARS} characters, not {len(long)}"
