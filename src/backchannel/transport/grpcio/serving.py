"""A provider's side of grpcio: a ``grpc.aio`` server with the envelope's generic
handlers, the standard health service, server reflection, and the RPCs they serve as
the seam's :class:`~backchannel.transport.seam.Rpc`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backchannel.settings import Keepalive, Limits
from backchannel.transport.grpcio import reflection
from backchannel.transport.grpcio.options import server_options
from backchannel.transport.grpcio.status import STATUS
from backchannel.transport.health import SERVING, HealthState
from backchannel.transport.seam import SERVICE_NAME, Code, Guard, Handlers, Parse, Serialize
from backchannel.transport.status_details import DETAILS_KEY, failure
from backchannel.v1 import envelope_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]


class GrpcioRpc:
    """An RPC grpc serves, as the seam's :class:`~backchannel.transport.seam.Rpc`."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    def peer(self) -> str:
        return self._context.peer()

    def metadata(self) -> dict[str, str]:
        return {
            key: value if isinstance(value, str) else value.decode(errors="replace")
            for key, value in self._context.invocation_metadata() or ()
        }

    async def abort(self, code: Code, message: str) -> NoReturn:
        await self._context.abort(STATUS[code], message)

    async def refuse(self, code: Code, message: str) -> NoReturn:
        await self.abort(code, message)


class GrpcioStream(GrpcioRpc):
    """A Connect stream grpc serves; its ``read`` and ``write`` are the context's own."""

    __slots__ = ("read", "write")

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.read = context.read
        self.write = context.write

    async def refuse(self, code: Code, message: str) -> NoReturn:
        """End a stream with a status, after reading the caller's first message (a
        consumer's hello).

        Aborting while the consumer's first write is in flight makes gRPC report INTERNAL to
        it instead of our status (grpc/grpc#36066), so the hello is read first.
        """
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._context.read(), 2.0)
        await self.abort(code, message)


def on_stream(guard: Guard) -> reflection.Guard:
    """``guard`` for the reflection servicer, which has only grpc's context (a stream's)."""

    async def check(context: Context) -> None:
        await guard(GrpcioStream(context))

    return check


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The standard health service on grpcio, over the state both transports share
    (:class:`~backchannel.transport.health.HealthState`); behind ``guard`` (the
    authenticator) when set."""

    def __init__(self, guard: Guard | None = None) -> None:
        self.guard = guard
        self.state = HealthState()

    async def _check(self, context: Context) -> None:
        if self.guard is not None:
            await self.guard(GrpcioRpc(context))

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        await self._check(context)
        status = self.state.check(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        await self._check(context)
        async for status in self.state.watch(request.service):
            yield health_pb2.HealthCheckResponse(status=status)

    # every method of the service is served here, behind the guard: the test
    # (test_grpcurl.py) calls each one the service descriptor names without a token
    async def List(
        self, request: health_pb2.HealthListRequest, context: Context
    ) -> health_pb2.HealthListResponse:
        await self._check(context)
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self.state.statuses().items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


class GrpcioServer:
    """A ``grpc.aio`` server for the envelope service, made on :meth:`start` (and again
    on a later start); health and reflection beside it when asked."""

    def __init__(
        self,
        address: str,
        handlers: Handlers,
        *,
        credentials: grpc.ServerCredentials | None,
        limits: Limits,
        keepalive: Keepalive | None,
        parse: Parse,
        serialize: Serialize,
        health: bool,
        health_guard: Guard | None,
        reflection: bool,
        reflection_guard: Guard | None,
    ) -> None:
        self._address = address
        self._handlers = handlers
        self._credentials = credentials
        self._limits = limits
        self._keepalive = keepalive
        self._parse = parse
        self._serialize = serialize
        self.health: Health | None = Health(health_guard) if health else None
        self._reflection = reflection
        self._reflection_guard = reflection_guard
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        server = grpc.aio.server(options=server_options(self._limits, self._keepalive))
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    self._connect,
                    request_deserializer=self._parse,
                    response_serializer=self._serialize,
                ),
                "Invoke": grpc.unary_unary_rpc_method_handler(
                    self._invoke,
                    request_deserializer=pb.Call.FromString,
                    response_serializer=pb.Result.SerializeToString,
                ),
                "Describe": grpc.unary_unary_rpc_method_handler(
                    self._describe,
                    request_deserializer=pb.DescribeRequest.FromString,
                    response_serializer=pb.DescribeResponse.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        served = [SERVICE_NAME]
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            self.health.state.set("", SERVING)
            self.health.state.set(SERVICE_NAME, SERVING)
            served.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        if self._reflection:
            # grpcurl resolves Any payloads through reflection over the default pool,
            # where every generated message module this process imported is registered
            guard = self._reflection_guard
            reflection.enable(server, served, on_stream(guard) if guard else None)
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self._address)
            else:
                port = server.add_secure_port(self._address, self._credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self._address}: {exc}") from exc
        await server.start()
        self._server = server
        return port

    async def going_away(self) -> None:
        if self.health is not None:
            self.health.state.going_away()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0)

    async def wait_for_termination(self, timeout: float | None) -> bool:
        if self._server is None:
            return False
        return bool(await self._server.wait_for_termination(timeout))

    async def _connect(self, requests: AsyncIterator[pb.Frame], context: Context) -> None:
        await self._handlers.connect(GrpcioStream(context))

    async def _invoke(self, call: pb.Call, context: Context) -> pb.Result:
        result = await self._handlers.invoke(call, GrpcioRpc(context))
        if result.HasField("error"):  # its code as the status, the Error in the details
            code, message, details = failure(result.error)
            await context.abort(STATUS[code], message, ((DETAILS_KEY, details),))
        return result

    async def _describe(self, request: pb.DescribeRequest, context: Context) -> pb.DescribeResponse:
        return await self._handlers.describe(request, GrpcioRpc(context))
