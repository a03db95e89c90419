"""A benchmark provider process: ``python bench/provider.py backchannel|raw|raw-grpclib``.

Listens on 127.0.0.1 with a free port, prints ``host:port`` on stdout, and serves until
SIGTERM or SIGINT, then exits cleanly (so ``python -m cProfile -o ...`` can save a profile).
It runs on the event loop ``$BENCH_LOOP`` names (asyncio or uvloop), and backchannel on the
transport ``$BACKCHANNEL_TRANSPORT`` names (``bench/run.py`` sets both per figure).

``backchannel`` exports :class:`~common.Calculator` twice: the ``async def`` implementation
under no group and the ``def`` one under the group ``"sync"``, and
:class:`~common.CallbackBench`, whose ``drive`` times callbacks to the registered
listeners here, in the provider. ``raw`` is a plain grpc.aio server with generic handlers
on bytes: unary ``Echo`` and bidi ``EchoStream`` (read one message, write it back, as
backchannel's provider reads and writes its stream), and the server-push counterparts of
the callback figures, which also time on the server: ``Push`` (write one message, read the
client's reply, in a loop) and ``FanOut`` (one message per callback to each of several
client streams, many outstanding), both in ``bench/rawpush.py``. ``raw-grpclib`` serves
the same methods on grpclib (``bench/raw_grpclib.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from common import (
    JOIN_TIMEOUT,
    RAW_SERVICE,
    SYNC_GROUP,
    AsyncCalculator,
    Calculator,
    CallbackBench,
    Listener,
    Measurement,
    SyncCalculator,
    summarise,
    use_event_loop,
    warm_then_drive,
)
from rawpush import FanOut, serve_pingpong

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


async def _push(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Raw server-push ping-pong on grpc.aio (:func:`rawpush.serve_pingpong`)."""
    await serve_pingpong(context.read, context.write, EOF)


def _fan_out() -> Callable[[object, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
    """Raw fan-out on grpc.aio: each stream's handler (:class:`rawpush.FanOut`)."""
    fan_out = FanOut()

    async def handle(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await fan_out.handle(context.read, context.write, EOF)

    return handle


async def _start_raw() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the raw grpc.aio echo server; return its address and its stop function."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
            "Push": grpc.stream_stream_rpc_method_handler(_push),
            "FanOut": grpc.stream_stream_rpc_method_handler(_fan_out()),
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


async def _start_raw_grpclib() -> tuple[str, Callable[[], Awaitable[object]]]:
    """Start the raw grpclib server (imported only here: the other kinds need no grpclib)."""
    from raw_grpclib import start_server

    return await start_server()


async def main(kind: str) -> None:
    """Serve ``kind`` until told to stop."""
    starters = {
        "backchannel": _start_backchannel,
        "raw": _start_raw,
        "raw-grpclib": _start_raw_grpclib,
    }
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
    use_event_loop()
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else ""))
