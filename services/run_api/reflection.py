"""Server reflection as grpc.reflection.v1 (current grpcurl's first choice) and as v1alpha.

grpcio-reflection ships only v1alpha. v1's messages are wire-identical to v1alpha's (same fields,
same numbers), so one v1alpha servicer answers both names: v1 is a generic handler that decodes and
encodes with the v1alpha messages. A v1 descriptor (v1alpha's, renamed) is added to the default
descriptor pool, so that a client describing every listed service finds v1's too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE_NAME = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE, _V1_PACKAGE = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection on `server` as v1alpha and v1, listing `service_names` and both reflection names."""
    _add_v1_descriptor()
    servicer = ReflectionServicer((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    })
    server.add_generic_rpc_handlers((v1,))


def _add_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto (v1alpha's under v1's names) into the default pool, once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return  # already there (from this module before, or another package's copy)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, _V1_PACKAGE.strip(".")
    proto.ClearField("options")  # v1alpha's are deprecated and name its java and go packages
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
            method.output_type = method.output_type.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
    pool.AddSerializedFile(proto.SerializeToString())
