"""The raw baselines' server push, written once for both gRPC libraries.

The callback figures' raw counterparts (d: ping-pong pushed by the server; e: fan-out of
one message per callback to several client streams) time on the server, as backchannel's
provider does. Here is their logic on any stream given as its ``read`` (the next message,
or the library's end marker ``eof``) and ``write`` callables: grpc.aio's ``context.read``
/ ``context.write`` with ``grpc.aio.EOF`` (``bench/provider.py``), grpclib's
``stream.recv_message`` / ``stream.send_message`` with ``None`` (``bench/raw_grpclib.py``).
The client's side, :func:`echo_until_result`, echoes every message until the server's
:class:`~common.Measurement` arrives.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Awaitable, Callable
from typing import Any

from common import (
    JOIN_TIMEOUT,
    RAW_CALLBACK_PAYLOAD,
    RAW_RESULT_MARK,
    Measurement,
    warm_then_drive,
)

#: a stream's next message (bytes), or its library's end marker
Read = Callable[[], Awaitable[Any]]
#: send one message on a stream
Write = Callable[[bytes], Awaitable[Any]]


def result_message(outcome: Measurement | BaseException) -> bytes:
    """The raw server's last message on a push stream: a Measurement or an error."""
    if isinstance(outcome, BaseException):
        data: dict[str, Any] = {"error": f"{type(outcome).__name__}: {outcome}"}
    else:
        data = outcome.to_json()
    return RAW_RESULT_MARK + json.dumps(data).encode()


async def serve_pingpong(read: Read, write: Write, eof: object) -> None:
    """Server-push ping-pong: read the settings, then time writing one message and
    reading the client's reply, in a loop; last, write the Measurement."""
    settings = json.loads(await read())

    async def op(i: int) -> None:
        await write(RAW_CALLBACK_PAYLOAD)
        if await read() is eof:
            raise ConnectionError("the client closed the stream")

    try:
        outcome: Measurement | BaseException = await warm_then_drive(
            op, 1, settings["warmup"], settings["seconds"]
        )
    except Exception as exc:
        outcome = exc
    await write(result_message(outcome))


class _PushStream:
    """One client stream of the fan-out: a writer task sends what is queued, one gRPC
    message each; the replies, which come back in order, settle the oldest waiter."""

    def __init__(self, write: Write) -> None:
        self.write = write
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def write_loop(self) -> None:
        while True:
            await self.write(await self.outbox.get())

    async def push(self) -> None:
        """One callback: queue a message, wait for its reply."""
        reply = asyncio.get_running_loop().create_future()
        self.waiting.append(reply)
        self.outbox.put_nowait(RAW_CALLBACK_PAYLOAD)
        await reply


class FanOut:
    """The raw fan-out: waits for every client stream, then times one message per
    callback to ``listeners`` slots spread evenly over the streams, one caller per slot."""

    def __init__(self) -> None:
        self._streams: list[_PushStream] = []
        self._joined = asyncio.Event()
        self._run: asyncio.Task[None] | None = None

    async def handle(self, read: Read, write: Write, eof: object) -> None:
        """One client stream: join, then settle waiters as replies arrive."""
        settings = json.loads(await read())
        stream = _PushStream(write)
        self._streams.append(stream)
        if len(self._streams) == 1:
            self._run = asyncio.create_task(self._drive(settings))
        if len(self._streams) == settings["streams"]:
            self._joined.set()
        writer = asyncio.create_task(stream.write_loop())
        try:
            while (await read()) is not eof:
                stream.waiting.popleft().set_result(None)
        finally:
            writer.cancel()
            for reply in stream.waiting:
                reply.cancel()

    async def _drive(self, settings: dict[str, Any]) -> None:
        outcome: Measurement | BaseException
        try:
            await asyncio.wait_for(self._joined.wait(), JOIN_TIMEOUT)
            streams, listeners = list(self._streams), settings["listeners"]
            per_stream = listeners // len(streams)

            def op(i: int) -> Awaitable[None]:
                return streams[(i % listeners) // per_stream].push()

            outcome = await warm_then_drive(op, listeners, settings["warmup"], settings["seconds"])
        except Exception as exc:
            outcome = exc
        for stream in self._streams:
            stream.outbox.put_nowait(result_message(outcome))


async def echo_until_result(
    read: Read, write: Write, done_writing: Callable[[], Awaitable[Any]], eof: object
) -> Measurement:
    """The client of a push stream (its settings already sent): echo every message the
    server writes, one at a time, until its result arrives; then end the writing side."""
    while (message := await read()) is not eof:
        if message.startswith(RAW_RESULT_MARK):
            data = json.loads(message[len(RAW_RESULT_MARK) :])
            if "error" in data:
                raise RuntimeError(f"the raw server failed: {data['error']}")
            await done_writing()
            return Measurement.from_json(data)
        await write(message)
    raise ConnectionError("the raw server closed the stream before its result")


def push_settings(streams: int, listeners: int, warmup: float, seconds: float) -> bytes:
    """The first message a client writes on a push stream: what the server is to time."""
    settings = {"streams": streams, "listeners": listeners, "warmup": warmup, "seconds": seconds}
    return json.dumps(settings).encode()
