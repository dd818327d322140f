"""Garbage requests and oversized values: INVALID_ARGUMENT with one log line, never a traceback.

The request deserializer runs inside grpc before any handler; without care a decode failure is
answered UNKNOWN "Unexpected <class ...>" with an ERROR traceback per request. Errors that echo a
client's value must stay small, or the client fails on its metadata limit instead of reading them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from features.harness import Api, wait_until
from services.run_api import errors
from services.run_api.errors import InvalidRequest, RunNotFound
from services.run_api.interceptors import ErrorInterceptor, rich_status
from shared.gen.runs.v1 import (
    key_service_pb2,
    ops_service_pb2,
    run_service_pb2,
    worker_service_pb2,
)

pytestmark = pytest.mark.timeout(90)

SERVICES: tuple[ServiceDescriptor, ...] = (
    run_service_pb2.DESCRIPTOR.services_by_name["RunService"],
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    ops_service_pb2.DESCRIPTOR.services_by_name["OpsService"],
)
UNDECODABLE = b"\xff\xff\xff"  # field 31, wire type 7: no such wire type
BAD_UTF8 = b"\xc3\x28"  # a lead byte followed by a non-continuation byte
LONE_SURROGATE = b"\xed\xa0\x80"  # U+D800 "encoded" as UTF-8, which UTF-8 forbids


def _string_field(message: Descriptor) -> FieldDescriptor | None:
    return next((f for f in message.fields if f.type == FieldDescriptor.TYPE_STRING), None)


def _in_string_field(field: FieldDescriptor, value: bytes) -> bytes:
    """A request whose one string field holds `value` as is (field numbers here are below 16)."""
    assert field.number < 16 and len(value) < 128
    return bytes([field.number << 3 | 2, len(value)]) + value


def _payloads(message: Descriptor) -> Iterator[tuple[str, bytes]]:
    yield "undecodable bytes", UNDECODABLE
    yield "lone surrogate bytes", LONE_SURROGATE
    field = _string_field(message)
    if field is not None:  # GetStatsRequest has no string field: unknown fields are no error
        yield f"invalid UTF-8 in {field.name}", _in_string_field(field, BAD_UTF8)
        yield f"lone surrogate in {field.name}", _in_string_field(field, LONE_SURROGATE)


def _call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> grpc.RpcError:
    path = f"/{method.containing_service.full_name}/{method.name}"
    with pytest.raises(grpc.RpcError) as caught:
        if method.server_streaming:
            list(channel.unary_stream(path, request_serializer=None, response_deserializer=None)(payload, timeout=10))
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(payload, timeout=10)
    return caught.value


def _bad_request(err: grpc.RpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {err}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad
    raise AssertionError(f"no BadRequest detail in {status}")


def _json_lines(output: str) -> list[dict[str, Any]]:
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def _refusals(api: Api) -> list[dict[str, Any]]:
    return [line for line in _json_lines(api.output()) if "undecodable" in line["message"]]


def test_every_method_refuses_garbage_with_invalid_argument(database_url: str) -> None:
    cases = [(m, name, payload) for s in SERVICES for m in s.methods for name, payload in _payloads(m.input_type)]
    covered = {f"{m.containing_service.name}/{m.name}" for m, _, _ in cases}
    assert covered >= {
        "RunService/StartRun", "RunService/GetRun", "RunService/ListRuns", "RunService/CancelRun",
        "RunService/WatchRun", "WorkerService/ReportRunEvents", "WorkerService/Heartbeat",
        "WorkerService/ClaimQueuedRuns", "OpsService/GetStats",
    }
    api = Api(database_url, LOG_FORMAT="json")
    api.start()
    try:
        with grpc.insecure_channel(api.addr) as channel:
            for method, name, payload in cases:
                where = f"{method.full_name} with {name}"
                err = _call(channel, method, payload)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {err.code()} {err.details()}"
                message = err.details() or ""
                assert "<class" not in message and "Traceback" not in message, f"{where}: {message}"
                assert f"not a valid {method.input_type.name} message" in message, f"{where}: {message}"
                violations = _bad_request(err).field_violations
                assert [v.field for v in violations] == ["request"], f"{where}: {violations}"
                assert "<class" not in violations[0].description, f"{where}: {violations[0].description}"
        wait_until(lambda: len(_refusals(api)) >= len(cases), 10, "one log line per refused request")
        assert api.health() == "SERVING"
    finally:
        api.stop()
    output = api.output()
    assert "Traceback" not in output
    lines = _json_lines(output)
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
    refusals = _refusals(api)
    assert len(refusals) == len(cases), "\n".join(line["message"] for line in refusals)
    assert {line["level"] for line in refusals} == {"warning"}
    assert all("exception" not in line for line in refusals)


def test_long_values_are_cut_in_errors(database_url: str) -> None:
    api = Api(database_url)
    api.start()
    try:
        with grpc.insecure_channel(api.addr) as channel:
            start = channel.unary_unary(
                "/runs.v1.RunService/StartRun",
                request_serializer=run_service_pb2.StartRunRequest.SerializeToString,
                response_deserializer=run_service_pb2.StartRunResponse.FromString,
            )
            get = channel.unary_unary(
                "/runs.v1.RunService/GetRun",
                request_serializer=run_service_pb2.GetRunRequest.SerializeToString,
                response_deserializer=run_service_pb2.GetRunResponse.FromString,
            )
            calls = {
                "workflow": lambda: start(run_service_pb2.StartRunRequest(workflow="w" * 4000), timeout=10),
                "idempotency_key": lambda: start(
                    run_service_pb2.StartRunRequest(idempotency_key="k" * 4000), timeout=10
                ),
                "run_id": lambda: get(run_service_pb2.GetRunRequest(run_id="r" * 4000), timeout=10),
            }
            for field, call in calls.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                err = caught.value
                message = err.details() or ""
                # A metadata-limit failure on the client would be RESOURCE_EXHAUSTED or INTERNAL. A long
                # run id may be refused as too long or looked up and not found: either way, cut.
                expected = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
                assert err.code() in expected, f"{field}: {err.code()} {message[:200]}"
                assert len(message.encode()) <= 1024, f"{field}: {len(message)} characters"
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    violations = _bad_request(err).field_violations
                    assert field in [v.field for v in violations]
                    assert all(len(v.description.encode()) <= 300 for v in violations)
        assert api.health() == "SERVING"
    finally:
        api.stop()


# --- in process ------------------------------------------------------------------------------------


def _metadata_bytes(status: grpc.Status) -> int:
    return len(status.details.encode()) + sum(len(k) + len(v) for k, v in status.trailing_metadata)


def _status_proto(status: grpc.Status) -> status_pb2.Status:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    return status_pb2.Status.FromString(raw)


@pytest.mark.parametrize("char", ["x", "é", "😀"])
def test_rich_status_caps_message_and_descriptions(char: str) -> None:
    status = rich_status(InvalidRequest([("workflow", char * 10_000), ("input", "fine")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(status.details.encode()) <= 1000
    assert status.details.endswith("…")
    bad = error_details_pb2.BadRequest()
    proto = _status_proto(status)
    proto.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["workflow", "input"]
    assert len(bad.field_violations[0].description.encode()) <= 300
    assert bad.field_violations[0].description.endswith("…")
    assert bad.field_violations[1].description == "fine"
    assert proto.message == status.details


def test_rich_status_stays_small_with_many_long_violations() -> None:
    status = rich_status(InvalidRequest([(f"f{i}" * 500, "é" * 10_000) for i in range(200)]))
    assert _metadata_bytes(status) < 6 * 1024
    bad = error_details_pb2.BadRequest()
    _status_proto(status).details[0].Unpack(bad)
    assert 1 <= len(bad.field_violations) < 200


def test_rich_status_leaves_short_errors_alone() -> None:
    status = rich_status(InvalidRequest([("run_id", "run_id is required")]))
    assert status.details == "run_id: run_id is required"


def test_shorten() -> None:
    assert errors.shorten("abc") == "abc"
    assert errors.shorten("x" * 64) == "x" * 64
    cut = errors.shorten("x" * 4000)
    assert len(cut) == 64 and cut.endswith("…") and cut.startswith("x" * 60)
    assert len(errors.shorten("y" * 100, 10)) == 10
    assert len(RunNotFound("r" * 4000).message) < 100


HANDLED: list[Any] = []


async def _echo(request: Any, context: grpc.aio.ServicerContext) -> Any:
    HANDLED.append(request)
    return request


async def _echo_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    HANDLED.append(request)
    yield request


async def test_any_runs_method_is_covered_also_services_added_later(caplog: pytest.LogCaptureFixture) -> None:
    """KeyService and a WorkflowService are not served yet: the wrapping must not need a list of methods."""
    key = key_service_pb2.CreateKeyRequest
    get = run_service_pb2.GetRunRequest
    server = grpc.aio.server(interceptors=[aio_server_interceptor(), ErrorInterceptor()])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "runs.v1.KeyService",
                {"CreateKey": grpc.unary_unary_rpc_method_handler(
                    _echo, request_deserializer=key.FromString, response_serializer=key.SerializeToString
                )},
            ),
            grpc.method_handlers_generic_handler(
                "runs.v1.WorkflowService",
                {"WatchWorkflow": grpc.unary_stream_rpc_method_handler(
                    _echo_stream, request_deserializer=get.FromString, response_serializer=get.SerializeToString
                )},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    HANDLED.clear()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            create = channel.unary_unary("/runs.v1.KeyService/CreateKey", None, None)
            watch = channel.unary_stream("/runs.v1.WorkflowService/WatchWorkflow", None, None)
            with caplog.at_level(logging.INFO):
                for _, payload in _payloads(key.DESCRIPTOR):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await create(payload, timeout=10)
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, payload
                    assert "not a valid CreateKeyRequest message" in (caught.value.details() or "")
                for _, payload in _payloads(get.DESCRIPTOR):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        async for _ in watch(payload, timeout=10):
                            pass
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, payload
                    assert "not a valid GetRunRequest message" in (caught.value.details() or "")
            assert HANDLED == []
            # Good requests still reach the handlers, decoded.
            good_key, good_get = key(description="k1").SerializeToString(), get(run_id="r1").SerializeToString()
            assert await create(good_key, timeout=10) == good_key
            assert [m async for m in watch(good_get, timeout=10)] == [good_get]
            assert HANDLED == [key(description="k1"), get(run_id="r1")]
    finally:
        await server.stop(None)
    records = [r for r in caplog.records if r.name.startswith(("services.run_api", "grpc"))]
    assert [r.levelno for r in records] == [logging.WARNING] * 8
    assert all(r.exc_info is None for r in records)
    assert all("undecodable" in r.getMessage() for r in records)
