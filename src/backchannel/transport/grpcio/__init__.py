"""The grpcio transport: the seam (:mod:`backchannel.transport.seam`) on ``grpc.aio``.

The only module of backchannel that imports grpc is this package: a consumer's channels
and streams (:mod:`.channel`), a provider's server with health and reflection
(:mod:`.serving`, :mod:`.reflection`), the gRPC options backchannel's settings become
(:mod:`.options`), and grpc's statuses and errors in backchannel's terms (:mod:`.status`).
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf.message import Message

from backchannel.errors import TransportError
from backchannel.settings import Keepalive, Limits
from backchannel.transport.grpcio import channel, status
from backchannel.transport.grpcio.serving import GrpcioServer
from backchannel.transport.seam import Guard, Handlers, Parse, Serialize


def _check_credentials(credentials: object | None, kind: type, made_by: str) -> None:
    """Refuse credentials of another kind than grpc's (an ``ssl.SSLContext`` is grpclib's)."""
    if credentials is not None and not isinstance(credentials, kind):
        name = f"{type(credentials).__module__}.{type(credentials).__qualname__}"
        hint = ", which is for transport='grpclib'" if name == "ssl.SSLContext" else ""
        raise TypeError(
            f"transport 'grpcio' takes {kind.__module__}.{kind.__qualname__} as credentials= "
            f"(e.g. {made_by}(...)), got {name}{hint}"
        )


class GrpcioTransport:
    """:class:`~backchannel.transport.seam.Transport` on ``grpc.aio``."""

    eof = status.EOF

    def translate(self, exc: BaseException, peer: str) -> TransportError:
        return status.translate(exc, peer)

    def is_plaintext(self, credentials: object | None) -> bool:
        _check_credentials(credentials, grpc.ChannelCredentials, "grpc.ssl_channel_credentials")
        return credentials is None or credentials is channel.PLAINTEXT

    def channel(
        self,
        address: str,
        *,
        credentials: object | None,
        limits: Limits,
        keepalive: Keepalive | None,
        connect_timeout: float,
        parse: Parse,
        serialize: Serialize,
    ) -> channel.GrpcioChannel:
        return channel.GrpcioChannel(
            address,
            credentials=cast("grpc.ChannelCredentials | None", credentials),
            limits=limits,
            keepalive=keepalive,
            connect_timeout=connect_timeout,
            parse=parse,
            serialize=serialize,
        )

    def server(
        self,
        address: str,
        handlers: Handlers,
        *,
        credentials: object | None,
        limits: Limits,
        keepalive: Keepalive | None,
        parse: Parse,
        serialize: Serialize,
        health: bool,
        health_guard: Guard | None,
        reflection: bool,
        reflection_guard: Guard | None,
    ) -> GrpcioServer:
        _check_credentials(credentials, grpc.ServerCredentials, "grpc.ssl_server_credentials")
        return GrpcioServer(
            address,
            handlers,
            credentials=cast("grpc.ServerCredentials | None", credentials),
            limits=limits,
            keepalive=keepalive,
            parse=parse,
            serialize=serialize,
            health=health,
            health_guard=health_guard,
            reflection=reflection,
            reflection_guard=reflection_guard,
        )

    async def unary(
        self,
        address: str,
        method: str,
        request: Message,
        response_type: type[Message],
        timeout: float,
    ) -> Any:
        return await channel.unary(address, method, request, response_type, timeout)


#: the one grpcio transport (it holds no state of its own)
TRANSPORT = GrpcioTransport()
