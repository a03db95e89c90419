"""The raw grpclib baselines: the cheapest gRPC round trips grpclib itself can make.

The grpclib counterparts of the raw grpc.aio figures, with the same payloads
(``common.RAW_PAYLOAD``, ``common.RAW_CALLBACK_PAYLOAD``) and method paths, and no
generated stubs: a hand-written handler mapping (``__mapping__`` returning
``grpclib.const.Handler``) and a codec that passes bytes through as they are (content
type ``application/grpc+proto``, as grpcio's). The server (:func:`start_server`) serves
``Echo`` (unary), ``EchoStream`` (bidi: read one message, write it back), and the
server-push ``Push`` and ``FanOut`` of :mod:`rawpush`. The client side gives
``bench/consumer.py`` its operations: ping-pong on one bidi stream, unary calls on one
channel, pipelined calls on one bidi stream (many in flight, replies in order), and the
push streams. Whether it runs on plain asyncio or uvloop is the process's loop
(``common.use_event_loop``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from common import (
    RAW_FANOUT,
    RAW_PAYLOAD,
    RAW_PUSH,
    RAW_STREAM,
    RAW_UNARY,
    AsyncOp,
    Measurement,
)
from grpclib.client import Channel, Stream, UnaryUnaryMethod
from grpclib.const import Cardinality, Handler
from grpclib.encoding.base import CodecBase
from grpclib.server import Server
from grpclib.server import Stream as ServerStream
from rawpush import FanOut, echo_until_result, push_settings, serve_pingpong


class BytesCodec(CodecBase):
    """Messages are bytes, sent and received as they are (no protobuf)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message  # type: ignore[no-any-return]

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


# ---------------------------------------------------------------- server


class RawService:
    """The raw methods, mapped by hand (what generated ``*Base`` classes would do)."""

    def __init__(self) -> None:
        self._fanout = FanOut()

    def __mapping__(self) -> dict[str, Handler]:
        bidi = Cardinality.STREAM_STREAM
        return {
            RAW_UNARY: Handler(self.echo, Cardinality.UNARY_UNARY, bytes, bytes),
            RAW_STREAM: Handler(self.echo_stream, bidi, bytes, bytes),
            RAW_PUSH: Handler(self.push, bidi, bytes, bytes),
            RAW_FANOUT: Handler(self.fan_out, bidi, bytes, bytes),
        }

    async def echo(self, stream: ServerStream[bytes, bytes]) -> None:
        """Unary: answer with the request."""
        await stream.send_message(await stream.recv_message())  # type: ignore[arg-type]

    async def echo_stream(self, stream: ServerStream[bytes, bytes]) -> None:
        """Bidi: write back every message read, one at a time."""
        while (message := await stream.recv_message()) is not None:
            await stream.send_message(message)

    async def push(self, stream: ServerStream[bytes, bytes]) -> None:
        """Server-push ping-pong, timed here."""
        await serve_pingpong(stream.recv_message, stream.send_message, None)

    async def fan_out(self, stream: ServerStream[bytes, bytes]) -> None:
        """One client stream of the fan-out, timed here."""
        await self._fanout.handle(stream.recv_message, stream.send_message, None)


async def start_server() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the raw grpclib server on 127.0.0.1 (a free port); its address and stop."""
    server = Server([RawService()], codec=BytesCodec())
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    await server.start(sock=listening)

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return f"127.0.0.1:{port}", stop


# ---------------------------------------------------------------- client


def _channel(stack: contextlib.AsyncExitStack, address: str) -> Channel:
    """A channel to ``address``, closed when ``stack`` closes."""
    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port), codec=BytesCodec())
    stack.callback(channel.close)
    return channel


async def _bidi(
    stack: contextlib.AsyncExitStack, channel: Channel, path: str
) -> Stream[bytes, bytes]:
    """An open bidi stream on ``channel`` (its headers sent), reset when ``stack`` closes."""
    stream = channel.request(path, Cardinality.STREAM_STREAM, bytes, bytes)
    await stack.enter_async_context(stream)
    await stream.send_request()
    stack.push_async_callback(stream.cancel)
    return stream


async def pingpong(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
    """One bidi stream: write one message, read one (sequential callers only)."""
    stream = await _bidi(stack, _channel(stack, address), RAW_STREAM)
    send, receive = stream.send_message, stream.recv_message

    async def op(i: int) -> None:
        await send(RAW_PAYLOAD)
        await receive()

    return op


async def unary(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
    """Unary calls on one channel (one HTTP/2 stream each)."""
    method = UnaryUnaryMethod(_channel(stack, address), RAW_UNARY, bytes, bytes)
    return lambda i: method(RAW_PAYLOAD)


async def pipelined(stack: contextlib.AsyncExitStack, address: str) -> AsyncOp:
    """Calls pipelined on one bidi stream: every caller writes its message and waits for
    a reply; the server answers in order, so each reply settles the oldest waiter (what
    backchannel does on its one stream, less the ids and the frames)."""
    stream = await _bidi(stack, _channel(stack, address), RAW_STREAM)
    waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def read_replies() -> None:
        try:
            while await stream.recv_message() is not None:
                waiting.popleft().set_result(None)
            raise ConnectionError("the raw server ended the stream")
        except BaseException as exc:
            for reply in waiting:
                if not reply.done():
                    reply.set_exception(ConnectionError(f"the stream broke: {exc!r}"))
            raise

    reader = asyncio.create_task(read_replies())
    stack.callback(reader.cancel)
    loop = asyncio.get_running_loop()
    send = stream.send_message

    async def op(i: int) -> None:
        if reader.done():
            raise ConnectionError("the stream broke")
        reply = loop.create_future()
        waiting.append(reply)
        await send(RAW_PAYLOAD)
        await reply

    return op


class _Figure(Protocol):
    """What a pushed figure tells its run (``consumer.Figure``)."""

    concurrency: int
    clients: int


def pushed(
    path: str,
) -> Callable[[Any, int, str, float, float], Awaitable[Measurement]]:
    """Server push on ``path``: open ``clients`` streams (a channel each), echo every
    message the server writes, one at a time, until its result arrives."""

    async def run(
        figure: _Figure, clients: int, address: str, warmup: float, duration: float
    ) -> Measurement:
        settings = push_settings(figure.clients, figure.concurrency, warmup, duration)

        async def echo(stack: contextlib.AsyncExitStack) -> Measurement:
            channel = _channel(stack, address)
            stream = channel.request(path, Cardinality.STREAM_STREAM, bytes, bytes)
            await stack.enter_async_context(stream)
            await stream.send_message(settings)
            # the stream is ended once the result is in; its trailers are awaited on exit
            return await echo_until_result(
                stream.recv_message, stream.send_message, stream.end, None
            )

        async with contextlib.AsyncExitStack() as stack:
            results = await asyncio.gather(*(echo(stack) for _ in range(clients)))
        return results[0]

    return run
