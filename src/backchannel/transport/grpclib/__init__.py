"""The grpclib transport: the seam (:mod:`backchannel.transport.seam`) on grpclib, the
pure-Python HTTP/2 of h2 (fastest on uvloop).

The only modules of backchannel that import grpclib or h2 are this package's: a
consumer's channel and Connect streams (:mod:`.channel`), a provider's server
(:mod:`.serving`) and the RPCs it serves (:mod:`.incoming`, :mod:`.services`: Invoke,
Describe, health, reflection), one call's messages each way (:mod:`.inbox`, framed and
refused from their length prefix; :mod:`.call`, framed by hand), what backchannel's
settings become (:mod:`.options`: keepalive, TLS contexts, addresses) and grpclib's
statuses and errors in backchannel's terms (:mod:`.status`).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from backchannel.errors import TransportError
from backchannel.settings import Keepalive, Limits
from backchannel.transport.grpclib import channel, options, status
from backchannel.transport.grpclib.serving import GrpclibServer
from backchannel.transport.seam import Guard, Handlers, Parse, Serialize


class GrpclibTransport:
    """:class:`~backchannel.transport.seam.Transport` on grpclib; credentials are
    ``ssl.SSLContext`` objects."""

    eof = status.EOF

    def translate(self, exc: BaseException, peer: str) -> TransportError:
        return status.translate(exc, peer)

    def is_plaintext(self, credentials: object | None) -> bool:
        return not options.verifies_server(options.client_tls(credentials))

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
    ) -> channel.GrpclibChannel:
        return channel.GrpclibChannel(
            address,
            credentials=credentials,
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
    ) -> GrpclibServer:
        return GrpclibServer(
            address,
            handlers,
            credentials=credentials,
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


#: the one grpclib transport (it holds no state of its own)
TRANSPORT = GrpclibTransport()
