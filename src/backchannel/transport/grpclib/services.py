"""The unary and standard services a grpclib provider serves through grpclib's own
request handler, as ``grpclib.const.Handler`` mappings: the envelope's Invoke and
Describe, the standard health service and server reflection (their logic shared with
grpcio: :mod:`backchannel.transport.health`, :mod:`backchannel.transport.reflection`),
over the same ``*_pb2`` messages grpcio's side uses (grpclib's own health and reflection
modules register clashing descriptors in the default pool: never imported)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from backchannel.transport.grpclib.incoming import MappedRpc
from backchannel.transport.grpclib.status import STATUS
from backchannel.transport.health import HealthState
from backchannel.transport.reflection import SERVICE_NAME as REFLECTION_SERVICE
from backchannel.transport.reflection import Reflection
from backchannel.transport.seam import SERVICE_NAME, Guard, Handlers
from backchannel.transport.status_details import failure
from backchannel.v1 import envelope_pb2 as pb

Mapping = dict[str, Handler]
Method = Callable[[Stream[Any, Any]], Awaitable[None]]

#: the health service's name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def envelope(handlers: Handlers) -> Mapping:
    """Invoke and Describe of the envelope service (Connect is served apart)."""

    async def invoke(stream: Stream[pb.Call, pb.Result]) -> None:
        call = await stream.recv_message()
        assert call is not None  # grpclib ends a unary call without its message itself
        result = await handlers.invoke(call, MappedRpc(stream))
        if result.HasField("error"):  # its code as the status, the Error in the details
            code, message, details = failure(result.error)
            raise GRPCError(STATUS[code], message, details)  # details: see RawDetails
        await stream.send_message(result)

    async def describe(stream: Stream[pb.DescribeRequest, pb.DescribeResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(await handlers.describe(request, MappedRpc(stream)))

    unary = Cardinality.UNARY_UNARY
    return {
        f"/{SERVICE_NAME}/Invoke": Handler(invoke, unary, pb.Call, pb.Result),
        f"/{SERVICE_NAME}/Describe": Handler(
            describe, unary, pb.DescribeRequest, pb.DescribeResponse
        ),
    }


class Health:
    """The standard health service on grpclib; behind ``guard`` (the authenticator)
    when set."""

    def __init__(self, guard: Guard | None = None) -> None:
        self.guard = guard
        self.state = HealthState()

    async def _check_guard(self, stream: Stream[Any, Any]) -> None:
        if self.guard is not None:
            await self.guard(MappedRpc(stream))

    async def check(
        self, stream: Stream[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
    ) -> None:
        await self._check_guard(stream)
        request = await stream.recv_message()
        assert request is not None
        status = self.state.check(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND)
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))

    async def watch(
        self, stream: Stream[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
    ) -> None:
        await self._check_guard(stream)
        request = await stream.recv_message()
        assert request is not None
        async for status in self.state.watch(request.service):
            await stream.send_message(health_pb2.HealthCheckResponse(status=status))

    async def list(
        self, stream: Stream[health_pb2.HealthListRequest, health_pb2.HealthListResponse]
    ) -> None:
        await self._check_guard(stream)
        await stream.recv_message()
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self.state.statuses().items()
        }
        await stream.send_message(health_pb2.HealthListResponse(statuses=statuses))

    def mapping(self) -> Mapping:
        """Every method of the service, each behind the guard."""
        path = f"/{HEALTH_SERVICE}"
        request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {
            f"{path}/Check": Handler(self.check, Cardinality.UNARY_UNARY, request, response),
            f"{path}/Watch": Handler(self.watch, Cardinality.UNARY_STREAM, request, response),
            f"{path}/List": Handler(
                self.list,
                Cardinality.UNARY_UNARY,
                health_pb2.HealthListRequest,
                health_pb2.HealthListResponse,
            ),
        }


def reflection(service_names: list[str], guard: Guard | None) -> Mapping:
    """Server reflection for ``service_names``, each stream first passing ``guard``."""
    answers = Reflection(service_names)

    async def info(
        stream: Stream[
            reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
        ],
    ) -> None:
        if guard is not None:
            await guard(MappedRpc(stream))
        async for request in stream:
            await stream.send_message(answers.respond(request))

    return {
        f"/{REFLECTION_SERVICE}/ServerReflectionInfo": Handler(
            info,
            Cardinality.STREAM_STREAM,
            reflection_pb2.ServerReflectionRequest,
            reflection_pb2.ServerReflectionResponse,
        )
    }
