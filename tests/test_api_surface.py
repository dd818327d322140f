"""The API's standard surfaces: reflection lists the services; health follows the database."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.run_api.server import ApiServer
from shared.settings import ApiSettings

pytestmark = pytest.mark.timeout(60)


async def test_reflection_and_health(database_url: str) -> None:
    settings = dataclasses.replace(ApiSettings(), addr="127.0.0.1:0", database_url=database_url)
    server = ApiServer(settings, database_url)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            names: set[str] = set()
            async for response in stub.ServerReflectionInfo(iter([request])):
                names |= {s.name for s in response.list_services_response.service}
            assert {"runs.v1.RunService", "runs.v1.WorkerService", "runs.v1.OpsService",
                    "grpc.health.v1.Health"} <= names
            assert await server.monitor.run_once() is True
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "runs.v1.RunService", "runs.v1.WorkerService"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()
        await server.stop()  # safe to call twice
