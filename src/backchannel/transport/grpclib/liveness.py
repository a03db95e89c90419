"""What ends a grpclib connection whose peer is dead or does not read: keepalive expiry
aborts the socket (grpclib's close waits for the write buffer to drain, which a
black-holed peer never lets happen); the bound on replies a provider queues for a peer
that does not read them."""

from __future__ import annotations

import asyncio
import logging

from grpclib.protocol import Connection, Peer

logger = logging.getLogger("backchannel")

#: bytes of replies (PING and SETTINGS acknowledgements, resets) a connection may queue
#: for a peer that goes on sending while its socket's buffer is over the high-water mark
FLOOD_SLACK = 2 * 2**20


class _Watched(Connection):
    """grpclib's connection, closed at once (unsent bytes dropped) when its keepalive
    ping went unanswered: the peer is gone, the bytes would never leave. Its peer is
    still known once closed (grpclib's RPCs started just before ask for it)."""

    _closed_transport: asyncio.BaseTransport | None = None

    def get_peer(self) -> Peer:
        transport = getattr(self, "_transport", None) or self._closed_transport
        return Peer(transport)  # type: ignore[arg-type]

    def close(self) -> None:
        expiry = self._close_by_ping_handler
        transport = getattr(self, "_transport", None)
        if transport is not None:
            self._closed_transport = transport
        if (
            expiry is not None
            and transport is not None
            and expiry.when() <= asyncio.get_running_loop().time()
        ):
            transport.abort()
        super().close()


def watch(connection: Connection) -> None:
    """Make ``connection`` abort rather than close when its keepalive expires (before its
    first ping is sent: grpclib schedules the expiry with ``self.close``)."""
    if type(connection) is Connection:
        connection.__class__ = _Watched


def shut(connection: Connection) -> None:
    """Close the connection now: what it still had to send is dropped rather than
    waited for (a peer that did not read it would hold the socket open)."""
    transport = getattr(connection, "_transport", None)
    if transport is not None and transport.get_write_buffer_size():
        transport.abort()
    connection.close()
