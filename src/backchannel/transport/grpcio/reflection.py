"""Server reflection on grpcio: the shared answers (:mod:`backchannel.transport.reflection`,
stock reflection with the documented descriptors that show the envelope's comments to
grpcurl ``describe``) served as grpc's servicer.

With a ``guard`` (the server's authenticator), each reflection stream must pass it first.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from backchannel.transport.reflection import Reflection

#: refuses a reflection stream (aborts its context) unless its metadata is accepted
Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


class DocumentedReflection(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """Reflection for ``service_names``, behind ``guard`` when one is given."""

    def __init__(self, service_names: Iterable[str], guard: Guard | None = None) -> None:
        self._reflection = Reflection(service_names)
        self._guard = guard

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        if self._guard is not None:
            await self._guard(context)
        async for request in request_iterator:
            yield self._reflection.respond(request)


def enable(
    server: grpc.aio.Server, service_names: Iterable[str], guard: Guard | None = None
) -> None:
    """Serve reflection for ``service_names`` (the reflection service itself included),
    each stream first passing ``guard`` when one is given."""
    servicer = DocumentedReflection(service_names, guard)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
