"""Pure logic: settings, log format, workflow plans, the notification hub, event guards."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from services.run_api import convert
from services.run_api.listener import Hub
from services.run_api.store.events import NewEvent, _check, _RunState
from shared.logs import JsonFormatter, _ContextFilter, log_context
from shared.settings import ApiSettings, LogSettings, SettingsError, WorkerSettings
from shared.workflows import WorkflowInputError, plan


def test_settings_defaults_and_bad_values_name_their_variable() -> None:
    api = ApiSettings.from_env({})
    assert (api.addr, api.database_url, api.lease_seconds, api.embedded_worker) == (
        "127.0.0.1:50051", None, 30.0, False
    )
    worker = WorkerSettings.from_env({"RUN_LEASE_SECONDS": "9"})
    assert worker.heartbeat_seconds == 3.0 and worker.poll_ms == 1000 and worker.worker_id
    with pytest.raises(SettingsError, match="RUN_WORKER_CONCURRENCY"):
        WorkerSettings.from_env({"RUN_WORKER_CONCURRENCY": "many"})
    with pytest.raises(SettingsError, match="RUN_WORKER_EMBEDDED"):
        ApiSettings.from_env({"RUN_WORKER_EMBEDDED": "perhaps"})
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        LogSettings.from_env({"LOG_FORMAT": "xml"})


def test_json_log_lines_carry_context() -> None:
    record = logging.LogRecord("services.x", logging.INFO, __file__, 1, "run %s", ("done",), None)
    record.status = "SUCCEEDED"
    with log_context(run_id="r1", worker_id="w1"):
        assert _ContextFilter("api").filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "run done" and line["module"] == "services.x"
    assert (line["actor"], line["run_id"], line["worker_id"], line["status"]) == ("api", "r1", "w1", "SUCCEEDED")


def test_plans() -> None:
    (step,) = plan("runtime.noop", {})
    assert (step.key, step.tool) == ("runtime", "noop")
    (step,) = plan("runtime.tool", {"tool": "sleep", "args": {"seconds": 1}})
    assert (step.tool, step.args) == ("sleep", {"seconds": 1})
    with pytest.raises(WorkflowInputError) as info:
        plan("runtime.tool", {"tool": "nope"})
    assert info.value.field == "input.tool"
    with pytest.raises(KeyError):
        plan("other", {})
    for tool, args, field in [
        ("sleep", {"seconds": -1}, "input.args.seconds"),
        ("shell", {"command": "ls"}, "input.args.command"),
        ("shell", {"command": ["ls"], "timeout_seconds": 0}, "input.args.timeout_seconds"),
        ("fail", {"retryable": "no"}, "input.args.retryable"),
    ]:
        with pytest.raises(WorkflowInputError) as bad:
            plan("runtime.tool", {"tool": tool, "args": args})
        assert bad.value.field == field
    plan("runtime.tool", {"tool": "shell", "args": {"command": "echo hi", "shell": True}})


def test_event_guard() -> None:
    running = _RunState(status="RUNNING", attempt=2, workspace_id="default", worker_id="w", last_sequence=5)
    assert _check(running, NewEvent("r", "run.started", 2, "e")) is None
    assert "stale" in (_check(running, NewEvent("r", "run.started", 1, "e")) or "")
    assert _check(running, NewEvent("r", "run.claimed", 3, "e")) is not None
    done = _RunState(status="SUCCEEDED", attempt=2, workspace_id="default", worker_id="w", last_sequence=9)
    assert _check(done, NewEvent("r", "run.completed", 2, "e")) == "run is SUCCEEDED"
    queued = _RunState(status="QUEUED", attempt=0, workspace_id="default", worker_id=None, last_sequence=1)
    assert _check(queued, NewEvent("r", "run.claimed", 1, "e")) is None
    assert _check(queued, NewEvent("r", "run.canceled", 0, "e")) is None
    assert _check(None, NewEvent("r", "run.started", 1, "e")) == "run not found"


async def test_hub_wakes_subscribers_of_a_key_only() -> None:
    hub = Hub()
    with hub.subscribe(("runs_events", "a")) as a, hub.subscribe(("runs_events", "b")) as b:
        hub.publish("runs_events", "a")
        assert await a.wait(1) is True
        assert await b.wait(0.01) is False
        hub.wake_all()
        assert await b.wait(1) is True
    assert not hub._waiters
    await asyncio.sleep(0)


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=5))
def test_struct_to_dict_gives_what_message_to_dict_gives(value: dict) -> None:
    message = Struct()
    message.update(value)
    assert convert.to_dict(message) == json_format.MessageToDict(message)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_struct_to_dict_refuses_what_message_to_dict_refuses(bad: float) -> None:
    message = Struct()
    message.update({"a": [{"b": bad}]})
    with pytest.raises(ValueError):
        json_format.MessageToDict(message)
    with pytest.raises(ValueError):
        convert.to_dict(message)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max(map(_depth, value), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=20,
)


@given(_JSON)
@settings(max_examples=200, deadline=None)
def test_json_depth_is_the_nesting_depth(value: object) -> None:
    from shared.limits import json_depth

    assert json_depth(value, limit=100) == _depth(value)
