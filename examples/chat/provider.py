"""The chat room: python examples/chat/provider.py [HOST:PORT] [--transport NAME].

An :class:`~backchannel.AsyncServer` serving one :class:`ChatRoom`. It logs each
consumer's stream opening and ending (``on_connect``/``on_disconnect``) and each member
the room forgets (``proxy.on_gone``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from chat_service import ChatRoom, Room

import backchannel


def connected(peer: backchannel.Peer) -> None:
    print(f"connected: {peer.application or 'a consumer'} at {peer.address}", flush=True)


async def disconnected(peer: backchannel.Peer) -> None:
    print(f"disconnected: {peer.address} ({peer.reason})", flush=True)


def left(name: str, reason: str) -> None:
    print(f"forgot {name}: {reason}", flush=True)


async def serve(address: str, transport: str | None) -> None:
    server = backchannel.AsyncServer(
        address,
        application="chat-room",
        transport=transport,
        on_connect=connected,
        on_disconnect=disconnected,
    )
    server.export(Room, ChatRoom(on_leave=left))
    async with server:
        print(f"listening on {server.address}", flush=True)
        await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:0")
    parser.add_argument("--transport", default=None, help="grpcio (default) or grpclib")
    options = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options.address, options.transport))


if __name__ == "__main__":
    main()
