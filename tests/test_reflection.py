"""Server reflection as grpc.reflection.v1 (current grpcurl's first choice) and as v1alpha (issue 11 item 5).

Against a real API process with RUNS_AUTH=required and no key: reflection stays open under both
names. v1's messages are wire-identical to v1alpha's, so the calls below use v1alpha's messages on
v1's method path, as grpcurl's v1 client would send them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from features.harness import Api

pytestmark = pytest.mark.timeout(60)

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
Request = reflection_pb2.ServerReflectionRequest


@pytest.fixture
def channel(database_url: str) -> Iterator[grpc.Channel]:
    api = Api(database_url, RUNS_AUTH="required", RUNS_BOOTSTRAP_ADMIN_KEY=f"admin-{secrets.token_urlsafe(24)}")
    api.start()
    try:
        with grpc.insecure_channel(api.addr) as channel:
            yield channel
    finally:
        api.stop()


def ask(
    channel: grpc.Channel, path: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """The answers of one reflection stream (no API key) to `requests`."""
    call = channel.stream_stream(
        path,
        request_serializer=Request.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


def files(response: reflection_pb2.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The file descriptors of a file_descriptor_response, by file name."""
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    found = {}
    for data in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(data)
        found[proto.name] = proto
    return found


@pytest.mark.parametrize("path", [V1, V1ALPHA])
def test_reflection_is_served_as_v1_and_v1alpha_without_a_key(channel: grpc.Channel, path: str) -> None:
    listed, run_service = ask(channel, path, Request(list_services=""),
                              Request(file_containing_symbol="runs.v1.RunService"))
    names = {s.name for s in listed.list_services_response.service}
    assert {"runs.v1.RunService", "runs.v1.WorkflowService", "grpc.health.v1.Health"} | REFLECTION <= names
    found = files(run_service)
    (own,) = [f for f in found.values() if any(s.name == "RunService" for s in f.service)]
    assert own.package == "runs.v1" and "StartRun" in {m.name for m in own.service[0].method}


def test_every_listed_service_resolves_as_grpcurl_describe_asks(channel: grpc.Channel) -> None:
    """`grpcurl describe` resolves each listed service; v1's own descriptor is there too, in package v1."""
    (listed,) = ask(channel, V1, Request(list_services=""))
    names = sorted(s.name for s in listed.list_services_response.service)
    answers = ask(channel, V1, *(Request(file_containing_symbol=name) for name in names))
    for name, answer in zip(names, answers, strict=True):
        assert answer.WhichOneof("message_response") == "file_descriptor_response", (name, answer)
    v1 = files(answers[names.index("grpc.reflection.v1.ServerReflection")])["grpc/reflection/v1/reflection.proto"]
    assert v1.package == "grpc.reflection.v1"
    (method,) = v1.service[0].method
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest", ".grpc.reflection.v1.ServerReflectionResponse")
    request = next(m for m in v1.message_type if m.name == "ServerReflectionRequest")
    assert {f.name: f.number for f in request.field} == {f.name: f.number for f in Request.DESCRIPTOR.fields}
