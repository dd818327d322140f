"""Unknown arguments of the stock tools sleep and fail are refused, the argument named (issue 11 item 5).

StartRun of runtime.tool refuses them up front with a field violation input.args.NAME; a registered
workflow's step (whose arguments are known only when the step runs) fails at the worker with the
same words, not retryable. noop (handed runtime.noop's input), echo (returns its input) and shell
(hands it to its command) keep accepting arguments they do not declare, as does a tool of another
package whose schema is not closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from features.harness import Api, Client, Worker, running, wait_until
from runs_client.errors import field_violations_of as field_violations
from services.run_worker.tools import STOCK, ToolContext, ToolError
from shared.tool_args import STOCK_TOOL_ARGS, Arg, ArgError, Kind, ToolArgs
from shared.workflows import WorkflowInputError, check_tool_args

pytestmark = pytest.mark.timeout(90)

CTX = ToolContext("r", 1, "runtime")
SLEEP_TYPO = "unknown argument 'secnds' of tool sleep; known: seconds"
FAIL_TYPO = "unknown argument 'time' of tool fail; known: times, retryable, message"


@pytest.mark.parametrize(
    ("tool", "args", "field", "message"),
    [
        ("sleep", {"secnds": 1}, "secnds", SLEEP_TYPO),
        ("sleep", {"seconds": 0, "secnds": 1}, "secnds", SLEEP_TYPO),
        ("fail", {"time": 1, "zz": 2}, "time", FAIL_TYPO),
    ],
)
async def test_the_api_and_the_tool_refuse_an_unknown_argument_naming_it(
    tool: str, args: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(WorkflowInputError) as api:
        check_tool_args(tool, args)
    assert (api.value.field, api.value.message) == (f"input.args.{field}", message)
    with pytest.raises(ToolError) as refused:
        await STOCK[tool](args, CTX)
    assert (refused.value.message, refused.value.retryable) == (message, False)


def test_a_wrong_declared_argument_is_named_before_an_unknown_one() -> None:
    with pytest.raises(WorkflowInputError) as api:
        check_tool_args("sleep", {"seconds": -1, "aaa": 1})
    assert api.value.field == "input.args.seconds"


async def test_open_tools_keep_accepting_arguments_they_do_not_declare() -> None:
    assert [name for name, schema in STOCK_TOOL_ARGS.items() if schema.closed] == ["sleep", "fail"]
    for tool in ("noop", "echo", "shell"):
        check_tool_args(tool, {"command": ["true"], "anything": 1})
    assert await STOCK["echo"]({"anything": 1}, CTX) == {"anything": 1}
    assert await STOCK["noop"]({"anything": 1}, CTX) == {"ok": True}
    check_tool_args("not-a-stock-tool", {"anything": 1})  # another package's tool: its own business


def test_a_schema_is_open_unless_it_says_closed() -> None:
    declared = {"n": Arg(Kind.NUMBER)}
    ToolArgs(declared).check({"n": 1, "extra": True})
    with pytest.raises(ArgError) as info:
        ToolArgs(declared, closed=True).check({"n": 1, "extra": True})
    assert (info.value.name, info.value.message) == ("extra", "unknown argument 'extra'; known: n")
    with pytest.raises(ArgError) as info:
        ToolArgs(closed=True, tool="mine").check({"x" * 100: 1})
    assert info.value.name == "x" * 63 + "…" and info.value.message.endswith("of tool mine; known: none")


@pytest.fixture(scope="module")
def api(make_database: Callable[[], contextlib.AbstractContextManager[str]]) -> Iterator[Api]:
    with make_database() as url:
        api = Api(url)
        with running(api, Worker(api.addr, RUN_WORKER_POLL_MS="100", RUN_WORKER_TOOLS="noop,echo,sleep,fail")):
            yield api


@pytest.fixture
def client(api: Api) -> Iterator[Client]:
    client = Client(api.addr)
    try:
        yield client
    finally:
        client.close()


def test_start_run_refuses_an_unknown_argument_of_a_stock_tool_with_a_field_violation(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.start_tool("sleep", {"secnds": 1})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == [("input.args.secnds", SLEEP_TYPO)]
    run = client.start_tool("echo", {"anything": 1})  # echo's arguments are its output
    assert client.wait_status(run.run_id, {"SUCCEEDED", "FAILED"}, 30) == "SUCCEEDED"


def test_register_workflow_refuses_a_stock_tool_step_with_an_unknown_argument(client: Client) -> None:
    """Refused when the spec is registered (INVALID_ARGUMENT naming the argument), not when a run reaches the step."""
    with pytest.raises(grpc.RpcError) as info:
        client.register({"name": "typo.sleep", "steps": [{"key": "nap", "tool": "sleep", "args": {"secnds": 0}}]})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == [("spec.steps[0].args.secnds", SLEEP_TYPO)]


def test_a_workflow_step_of_a_stock_tool_with_an_unknown_argument_is_refused_at_registration() -> None:
    """A spec's constant args and input selectors become the tool's arguments: a closed stock schema names the
    unknown ones when the spec is parsed (RegisterWorkflow answers INVALID_ARGUMENT with them)."""
    from shared.workflow import SpecError, parse_spec

    step = {"key": "nap", "tool": "sleep", "args": {"secnds": 1}, "input": {"seconds": "input.s", "zz": "input.z"}}
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "t.nap", "steps": [step]})
    assert [(v.field, v.description) for v in info.value.violations] == [
        ("steps[0].args.secnds", "unknown argument 'secnds' of tool sleep; known: seconds"),
        ("steps[0].input.zz", "unknown argument 'zz' of tool sleep; known: seconds"),
    ]
    assert parse_spec({"name": "t.nap", "steps": [{"key": "nap", "tool": "sleep", "args": {"seconds": 1}}]})
