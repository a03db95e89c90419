"""CPU per callback of a gather fan-out, both ends in one process, without gRPC.

A provider's Session and ten consumers' Sessions are joined in memory: each write hands
the serialized message to the other side's loop (``call_soon_threadsafe``), so nothing of
gRPC is measured, only backchannel's own work. The provider runs on the main thread and
the consumers on a second one, each with its own event loop, so ``time.thread_time`` gives
each side's CPU. The provider times rounds of ``await backchannel.gather(listener.changed(i)
for listener in listeners)`` to 1,000 listeners (100 per consumer), as bench figure e does.

    PYTHONPATH=src python bench/fanout_cpu.py [--seconds 2] [--rounds 3] [--profile FILE]

prints the CPU per callback of the provider, of the consumers and of both (the best of
``--rounds`` runs: the least disturbed by the rest of the machine), and the callbacks per
second of the provider's wall clock (which the other thread shares, so only a guide).
``--profile FILE`` saves a cProfile of the provider's thread and of the consumers'
(``FILE.provider``, ``FILE.consumer``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import sys
import threading
import time
from typing import Any

import backchannel
import backchannel.telemetry  # as the facades do: the hooks' slots filled
from backchannel.cluster.providers import ConsumerSide
from backchannel.rpc.consumer_callbacks import ExportedCallback
from backchannel.rpc.provider_callbacks import ProviderCallbacks, ReverseProxy
from backchannel.settings import DEFAULT_TIMEOUT, Limits
from backchannel.transport.pools import CallPools
from backchannel.transport.session import Session, parse_frame
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.protocol import Connection, Role

CONSUMERS = 10
LISTENERS = 1000


class Listener:
    """What bench/consumer.py's fan-out listeners do: answer with what they got."""

    async def changed(self, msg: int) -> int:
        return msg


class _ProviderSide:
    """A provider's dispatcher that takes no calls (only callbacks go out here)."""

    async def dispatch(self, call: pb.Call) -> pb.Value:
        raise RuntimeError("no forward calls in this bench")

    def released(self, callback_id: int) -> None:
        pass

    def ended(self, cause: BaseException) -> None:
        pass


class _Pipe:
    """One direction of a stream: messages written on one loop, read on another."""

    def __init__(self, reader: asyncio.AbstractEventLoop) -> None:
        self._reader = reader
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    async def write(self, message: bytes) -> None:
        if asyncio.get_running_loop() is self._reader:
            self._queue.put_nowait(message)
        else:
            self._reader.call_soon_threadsafe(self._queue.put_nowait, message)

    async def read(self) -> Any:
        return parse_frame(await self._queue.get())


async def _consumer_session(
    write: Any, pools: CallPools, listeners: int, first_id: int
) -> tuple[Session, list[int]]:
    """A consumer's session with ``listeners`` exported listeners (made on the consumer loop)."""
    sides: list[ConsumerSide] = []

    def dispatcher(session: Session) -> ConsumerSide:
        sides.append(ConsumerSide(session, pools))
        return sides[0]

    connection: Connection[Any] = Connection(Role.CONSUMER, "bench-consumer")
    session = Session(
        connection, write, dispatcher, codec.ErrorTypes(), peer="provider", limits=Limits()
    )
    callbacks = sides[0].callbacks
    ids = []
    for callback_id in range(first_id, first_id + listeners):
        entry = ExportedCallback(callback_id, Listener(), None)
        callbacks._by_id[callback_id] = entry
        callbacks._by_object[id(entry.obj)] = entry
        ids.append(callback_id)
    return session, ids


async def _on(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    if loop is asyncio.get_running_loop():
        return await coroutine
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


async def _rounds(proxies: list[ReverseProxy], seconds: float, single: bool = False) -> int:
    """Gather rounds for ``seconds`` (``single``: each call made alone, a future each, and
    the futures awaited with asyncio.gather); the callbacks made."""
    deadline, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        i += 1
        if single:
            answers = await asyncio.gather(*[proxy.changed(i) for proxy in proxies])
        else:
            answers = await backchannel.gather(proxy.changed(i) for proxy in proxies)
        if answers[0] != i or answers[-1] != i:
            raise AssertionError(f"changed({i}) answered {answers[0]!r} ... {answers[-1]!r}")
    return i * len(proxies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="")
    parser.add_argument(
        "--one-loop",
        action="store_true",
        help="both sides on one loop and thread (no thread hand-offs: the total only)",
    )
    parser.add_argument(
        "--single",
        action="store_true",
        help="single calls instead of gather (each started on the loop, a future each)",
    )
    args = parser.parse_args()
    consumer_cpu: list[float] = []
    consumer_loop: asyncio.AbstractEventLoop

    def read_consumer_cpu() -> None:
        consumer_cpu.append(time.thread_time())

    async def provider_main() -> None:
        nonlocal consumer_loop
        loop = asyncio.get_running_loop()
        if args.one_loop:
            consumer_loop = loop
        else:
            consumer_loop = asyncio.new_event_loop()
            threading.Thread(target=consumer_loop.run_forever, daemon=True).start()
        pools = CallPools(4, 4, role="bench", owners="bench")
        proxies: list[ReverseProxy] = []
        readers: list[asyncio.Task[None]] = []  # strong references
        per = LISTENERS // CONSUMERS
        for index in range(CONSUMERS):
            to_consumer, to_provider = _Pipe(consumer_loop), _Pipe(loop)
            consumer, ids = await _on(
                consumer_loop, _consumer_session(to_provider.write, pools, per, 1 + index * per)
            )
            provider = Session(
                Connection(Role.PROVIDER, "bench-provider"),
                to_consumer.write,
                lambda session: _ProviderSide(),
                codec.ErrorTypes(),
                peer="consumer",
                limits=Limits(),
            )
            readers.append(loop.create_task(provider.run(to_provider.read)))
            consumer_loop.call_soon_threadsafe(
                lambda c=consumer, r=to_consumer.read: (
                    c.connection.start(),
                    c.flush(),
                    consumer_loop.create_task(c.run(r)),
                )
            )
            await provider.handshake
            table = ProviderCallbacks(provider, DEFAULT_TIMEOUT, pools)
            for callback_id in ids:
                proxy = ReverseProxy(table, callback_id, "Listener", None)
                table._proxies[callback_id] = proxy
                proxies.append(proxy)
        await _rounds(proxies, 0.5, args.single)  # warm up
        best: tuple[float, float, float, float] | None = None
        for _ in range(args.rounds):
            if not args.one_loop:
                consumer_loop.call_soon_threadsafe(read_consumer_cpu)
            provider_cpu, wall = time.thread_time(), time.perf_counter()
            callbacks = await _rounds(proxies, args.seconds, args.single)
            provider_cpu, wall = time.thread_time() - provider_cpu, time.perf_counter() - wall
            spent = 0.0
            if not args.one_loop:
                consumer_loop.call_soon_threadsafe(read_consumer_cpu)
                while len(consumer_cpu) % 2:
                    await asyncio.sleep(0.001)
                spent = consumer_cpu[-1] - consumer_cpu[-2]
            figures = (
                provider_cpu / callbacks * 1e6,
                spent / callbacks * 1e6,
                (provider_cpu + spent) / callbacks * 1e6,
                callbacks / wall,
            )
            if best is None or figures[2] < best[2]:
                best = figures
        assert best is not None
        if args.one_loop:
            print(f"CPU per callback, both sides on one loop: {best[2]:.2f} us; ", end="")
            print(f"{best[3]:,.0f} callbacks/s")
        else:
            print(
                f"CPU per callback: provider {best[0]:.2f} us, consumers {best[1]:.2f} us, "
                f"both {best[2]:.2f} us; {best[3]:,.0f} callbacks/s (wall, one process)"
            )
        if args.profile:
            profiler = cProfile.Profile()
            consumer_profiler = cProfile.Profile()
            if not args.one_loop:
                consumer_loop.call_soon_threadsafe(consumer_profiler.enable)
            profiler.enable()
            await _rounds(proxies, args.seconds, args.single)
            profiler.disable()
            profiler.dump_stats(args.profile + ".provider")
            if not args.one_loop:
                consumer_loop.call_soon_threadsafe(consumer_profiler.disable)
                await asyncio.sleep(0.05)
                consumer_profiler.dump_stats(args.profile + ".consumer")

    asyncio.run(provider_main())
    sys.stdout.flush()
    os._exit(0)  # the streams are left open: tearing them down is not what is measured


if __name__ == "__main__":
    main()
