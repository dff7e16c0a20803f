"""gRPC health checking (`grpc.health.v1.Health`: Check and Watch) on the endpoint picker's
port, as the endpoint-picker protocol asks (gateway-api-inference-extension,
docs/proposals/004-endpoint-picker-protocol, "Health Checking"), so that a Kubernetes `grpc:`
probe and the gateway can check the picker.

The two messages are built at run time from a `FileDescriptorProto` (grpc/health/v1/
health.proto, field for field) in a descriptor pool of their own: grpcio-health-checking,
which ships them generated, caps protobuf below what the [epp] extra allows, and a pool of
their own cannot clash with that package's file should something else import it.

Services (the names the protocol lists, and "" for the server as a whole):
- `liveness`: SERVING while the process answers (a probe restarting a picker whose pods are
  all down would not bring a pod back);
- "", `readiness` and `envoy.service.ext_proc.v3.ExternalProcessor`: SERVING while the picker
  can route (`ready()`: a healthy decode pod), else NOT_SERVING;
- any other name: Check fails with NOT_FOUND, Watch answers SERVICE_UNKNOWN (and keeps
  watching: the gRPC health spec's rules).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

HEALTH_SERVICE = "grpc.health.v1.Health"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
LIVENESS, READINESS = "liveness", "readiness"
# the services whose status is the picker's readiness ("": the server as a whole)
READY_SERVICES = frozenset(["", READINESS, EXT_PROC_SERVICE])
# HealthCheckResponse.ServingStatus
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3


def _health_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/health/v1/health.proto's two messages (the service is served by hand below)."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for name, number in (
        ("UNKNOWN", UNKNOWN),
        ("SERVING", SERVING),
        ("NOT_SERVING", NOT_SERVING),
        ("SERVICE_UNKNOWN", SERVICE_UNKNOWN),
    ):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field.LABEL_OPTIONAL,
    )
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_health_file())
HealthCheckRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
)
HealthCheckResponse: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
)


class HealthService:
    """Check and Watch over `ready()`; `watch_interval_s`: how often Watch looks again (the
    readiness has no change event: it follows the pods' health polls)."""

    def __init__(self, ready: Callable[[], bool], watch_interval_s: float = 1.0) -> None:
        self.ready = ready
        self.watch_interval_s = watch_interval_s

    def status(self, service: str) -> int:
        if service == LIVENESS:
            return SERVING
        if service in READY_SERVICES:
            return SERVING if self.ready() else NOT_SERVING
        return SERVICE_UNKNOWN

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """The status now, then each change, until the client leaves."""
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self.watch_interval_s)


def add_health_service(server: grpc.aio.Server, service: HealthService) -> None:
    """Serve `service` as grpc.health.v1.Health on `server`."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            service.Check,
            request_deserializer=HealthCheckRequest.FromString,
            response_serializer=HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            service.Watch,
            request_deserializer=HealthCheckRequest.FromString,
            response_serializer=HealthCheckResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),)
    )
