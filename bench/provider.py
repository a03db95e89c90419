"""A benchmark provider process: ``python bench/provider.py backchannel|raw``.

Listens on 127.0.0.1 with a free port, prints ``host:port`` on stdout, and serves until
SIGTERM or SIGINT, then exits cleanly (so ``python -m cProfile -o ...`` can save a profile).

``backchannel`` exports :class:`~common.Calculator` twice: the ``async def`` implementation
under no group and the ``def`` one under the group ``"sync"``, and
:class:`~common.CallbackBench`, whose ``drive`` times callbacks to the registered
listeners here, in the provider. ``raw`` is a plain grpc.aio server with generic handlers
on bytes: unary ``Echo`` and bidi ``EchoStream`` (read one message, write it back, as
backchannel's provider reads and writes its stream), and the server-push counterparts of
the callback figures, which also time on the server: ``Push`` (write one message, read the
client's reply, in a loop) and ``FanOut`` (one message per callback to each of several
client streams, many outstanding).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from common import (
    JOIN_TIMEOUT,
    RAW_CALLBACK_PAYLOAD,
    RAW_RESULT_MARK,
    RAW_SERVICE,
    SYNC_GROUP,
    AsyncCalculator,
    Calculator,
    CallbackBench,
    Listener,
    Measurement,
    SyncCalculator,
    summarise,
    warm_then_drive,
)

import backchannel

EOF = grpc.aio.EOF  # type: ignore[attr-defined]


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """Raw unary handler: answer with the request."""
    return request


async def _echo_stream(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Raw bidi handler: write back every message read, one at a time."""
    while (message := await context.read()) is not EOF:
        await context.write(message)


class AsyncCallbackBench:
    """Keeps the listeners consumers add, and times callbacks to them on request."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._added = asyncio.Event()
        self._run: asyncio.Task[Measurement] | None = None

    async def addListener(self, listener: Listener) -> None:
        """Register a listener (a ReverseProxy to the consumer's object)."""
        self._listeners.append(listener)
        self._added.set()

    async def _joined(self, listeners: int) -> list[Listener]:
        """The first ``listeners`` listeners, once that many are in (JOIN_TIMEOUT)."""
        async with asyncio.timeout(JOIN_TIMEOUT):
            while len(self._listeners) < listeners:
                self._added.clear()
                await self._added.wait()
        return self._listeners[:listeners]

    async def drive(self, listeners: int, warmup: float, seconds: float) -> dict[str, float]:
        """Wait for ``listeners`` listeners, then time ``await listener.changed(i)`` with
        one caller per listener. Every consumer calling this gets the same Measurement."""
        proxies = await self._joined(listeners)
        if self._run is None:

            async def op(i: int) -> None:
                answer = await proxies[i % listeners].changed(i)
                if answer != i:
                    raise AssertionError(f"changed({i}) answered {answer!r}")

            # a fresh context: the callbacks are made as by a background pusher, not
            # during this forward call (which would make each one its nested child)
            run = warm_then_drive(op, listeners, warmup, seconds)
            self._run = asyncio.create_task(run, context=contextvars.Context())
        return (await asyncio.shield(self._run)).to_json()

    async def driveGather(self, listeners: int, warmup: float, seconds: float) -> dict[str, float]:
        """Wait for ``listeners`` listeners, then time rounds of ``await
        backchannel.gather(listener.changed(i) for listener in listeners)``."""
        proxies = await self._joined(listeners)
        if self._run is None:

            async def rounds(seconds: float) -> Measurement:
                latencies: list[float] = []
                began = time.perf_counter()
                deadline, i = began + seconds, 0
                while (start := time.perf_counter()) < deadline:
                    i += 1
                    answers = await backchannel.gather(proxy.changed(i) for proxy in proxies)
                    if any(answer != i for answer in answers):
                        raise AssertionError(f"changed({i}) answered {answers[:3]!r}...")
                    latencies += [time.perf_counter() - start] * len(proxies)
                return summarise([latencies], time.perf_counter() - began)

            async def run() -> Measurement:
                await rounds(warmup)
                return await rounds(seconds)

            self._run = asyncio.create_task(run(), context=contextvars.Context())
        return (await asyncio.shield(self._run)).to_json()


def _result_message(outcome: Measurement | BaseException) -> bytes:
    """The raw server's last message on a push stream: a Measurement or an error."""
    if isinstance(outcome, BaseException):
        data: dict[str, Any] = {"error": f"{type(outcome).__name__}: {outcome}"}
    else:
        data = outcome.to_json()
    return RAW_RESULT_MARK + json.dumps(data).encode()


async def _push(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Raw server-push ping-pong: read the settings, then time writing one message and
    reading the client's reply, in a loop; last, write the Measurement."""
    settings = json.loads(await context.read())

    async def op(i: int) -> None:
        await context.write(RAW_CALLBACK_PAYLOAD)
        if await context.read() is EOF:
            raise ConnectionError("the client closed the stream")

    try:
        outcome: Measurement | BaseException = await warm_then_drive(
            op, 1, settings["warmup"], settings["seconds"]
        )
    except Exception as exc:
        outcome = exc
    await context.write(_result_message(outcome))


class _RawPushStream:
    """One client stream of the raw fan-out: a writer task sends what is queued, one gRPC
    message each; the replies, which come back in order, settle the oldest waiter."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.context = context
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def write_loop(self) -> None:
        while True:
            await self.context.write(await self.outbox.get())

    async def push(self) -> None:
        """One callback: queue a message, wait for its reply."""
        reply = asyncio.get_running_loop().create_future()
        self.waiting.append(reply)
        self.outbox.put_nowait(RAW_CALLBACK_PAYLOAD)
        await reply


class RawFanOut:
    """The raw fan-out: waits for every client stream, then times one message per
    callback to ``listeners`` slots spread evenly over the streams, one caller per slot."""

    def __init__(self) -> None:
        self._streams: list[_RawPushStream] = []
        self._joined = asyncio.Event()
        self._run: asyncio.Task[None] | None = None

    async def handle(self, requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """One client stream: join, then settle waiters as replies arrive."""
        settings = json.loads(await context.read())
        stream = _RawPushStream(context)
        self._streams.append(stream)
        if len(self._streams) == 1:
            self._run = asyncio.create_task(self._drive(settings))
        if len(self._streams) == settings["streams"]:
            self._joined.set()
        writer = asyncio.create_task(stream.write_loop())
        try:
            while (await context.read()) is not EOF:
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
            stream.outbox.put_nowait(_result_message(outcome))


async def _start_raw() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the raw grpc.aio echo server; return its address and its stop function."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
            "Push": grpc.stream_stream_rpc_method_handler(_push),
            "FanOut": grpc.stream_stream_rpc_method_handler(RawFanOut().handle),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return f"127.0.0.1:{port}", lambda: server.stop(None)


async def _start_backchannel() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the backchannel provider; return its address and its stop function."""
    # callbacks keep a timer (as by default) but a generous one: a slow shared machine
    # must not fail the fan-out's 1,000 outstanding callbacks
    server = backchannel.AsyncServer(
        "127.0.0.1:0", application="bench-provider", callback_timeout=10.0
    )
    server.export(Calculator, AsyncCalculator())
    server.export(Calculator, SyncCalculator(), group=SYNC_GROUP)
    server.export(CallbackBench, AsyncCallbackBench())
    await server.start()
    return server.address, server.stop


async def main(kind: str) -> None:
    """Serve ``kind`` until told to stop."""
    starters = {"backchannel": _start_backchannel, "raw": _start_raw}
    if kind not in starters:
        raise SystemExit(f"usage: provider.py {'|'.join(starters)}")
    address, stop = await starters[kind]()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(address, flush=True)
    await stopped.wait()
    await stop()


if __name__ == "__main__":
    if os.environ.get("BACKCHANNEL_UVLOOP") == "1":  # measure on uvloop (issue 19)
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else ""))
