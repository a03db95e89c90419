"""Event-loop turns per round trip, on each side, for backchannel and raw grpc.aio.

``python bench/loop_turns.py`` (part of ``make bench``) runs each scenario's two ends in
one process, each on its own event loop in its own thread, makes 2,000 sequential round
trips after a warm-up, and prints per round trip: the loop's iterations (``_run_once``)
and the callbacks it ran, by name (``call_soon``: task steps, future wake-ups, done
callbacks). It counts work, not time, so its figures do not depend on the machine's
load. docs/performance-notes.md quotes it.

Scenarios: (a) a forward call, ``await calc.add(i, 1)``; (d) a callback, the provider
awaiting ``listener.changed(i)``; and raw grpc.aio's bidi ping-pong (the baseline of
both: write one message, read one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from common import Calculator, EchoListener, Listener
from consumer import _raw_aio_pingpong
from provider import _start_backchannel, _start_raw

import backchannel

ROUND_TRIPS = 2_000
WARMUP = 200


class Turns:
    """Counts one event loop's iterations and the callbacks scheduled on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.iterations = 0
        self.callbacks: collections.Counter[str] = collections.Counter()
        run_once = loop._run_once  # type: ignore[attr-defined]
        call_soon = loop.call_soon

        def counted_run_once() -> None:
            self.iterations += 1
            run_once()

        def counted_call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
            self.callbacks[_name(callback)] += 1
            return call_soon(callback, *args, context=context)

        loop._run_once = counted_run_once  # type: ignore[attr-defined]
        loop.call_soon = counted_call_soon  # type: ignore[method-assign]

    def reset(self) -> None:
        self.iterations = 0
        self.callbacks.clear()


def _name(callback: Any) -> str:
    """A task's step by its coroutine's name; anything else by its qualified name."""
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return f"task step: {getattr(owner.get_coro(), '__qualname__', '?')}"
    return str(getattr(callback, "__qualname__", type(callback).__name__))


@backchannel.interface("bench.Pusher")
class Pusher:
    """The callback scenario's provider: it calls its listener back ``n`` times."""

    @backchannel.method(arguments=[backchannel.Argument(index=0)])
    def addListener(self, listener: Listener) -> None:
        """Keep ``listener``."""
        raise NotImplementedError

    def push(self, n: int) -> int:
        """Await ``listener.changed(i)`` ``n`` times; return how many answered right."""
        raise NotImplementedError


class AsyncPusher:
    """Counts its callbacks' turns from inside: the provider's loop is the caller."""

    def __init__(self) -> None:
        self.listener: Any = None
        self.on_warm: Callable[[], None] = lambda: None

    async def addListener(self, listener: Any) -> None:
        self.listener = listener

    async def push(self, n: int) -> int:
        for i in range(WARMUP):
            await self.listener.changed(i)
        self.on_warm()
        right = 0
        for i in range(n):
            right += await self.listener.changed(i) == i
        return right


Starter = Callable[[], Awaitable[tuple[str, Callable[[], Awaitable[object]]]]]


@contextlib.contextmanager
def provider_thread(start: Starter) -> Any:
    """Run a provider on its own loop in a thread; yield (address, its Turns)."""
    ready = threading.Event()
    found: list[Any] = []

    async def serve() -> None:
        address, stop = await start()
        stopping = asyncio.Event()
        found.extend([address, Turns(asyncio.get_running_loop()), asyncio.get_running_loop()])
        found.append(stopping)
        ready.set()
        await stopping.wait()
        await stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the provider did not start")
    address, turns, loop, stopping = found
    try:
        yield address, turns
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10)


async def _forward(address: str, provider: Turns) -> Turns:
    async with backchannel.AsyncClient(address, timeout=None) as client:
        calc = client.reference(Calculator)
        for i in range(WARMUP):
            await calc.add(i, 1)
        consumer = Turns(asyncio.get_running_loop())
        provider.reset()
        for i in range(ROUND_TRIPS):
            await calc.add(i, 1)
        return consumer


async def _raw(address: str, provider: Turns) -> Turns:
    async with contextlib.AsyncExitStack() as stack:
        op = await _raw_aio_pingpong(stack, address)
        for i in range(WARMUP):
            await op(i)
        consumer = Turns(asyncio.get_running_loop())
        provider.reset()
        for i in range(ROUND_TRIPS):
            await op(i)
        return consumer


def _callback_provider(pusher: AsyncPusher) -> Starter:
    async def start() -> tuple[str, Callable[[], Awaitable[object]]]:
        server = backchannel.AsyncServer("127.0.0.1:0")
        server.export(Pusher, pusher)
        await server.start()
        return server.address, server.stop

    return start


async def _callback(address: str, provider: Turns, pusher: AsyncPusher) -> Turns:
    async with backchannel.AsyncClient(address, timeout=None) as client:
        ref = client.reference(Pusher)
        await ref.addListener(EchoListener())
        consumer = Turns(asyncio.get_running_loop())

        def warm() -> None:  # on the provider's loop, between warm-up and counting
            provider.reset()
            consumer_loop.call_soon_threadsafe(consumer.reset)

        consumer_loop = asyncio.get_running_loop()
        pusher.on_warm = warm
        right = await ref.push(ROUND_TRIPS)
        if right != ROUND_TRIPS:
            raise AssertionError(f"{ROUND_TRIPS - right} callbacks answered wrong")
        return consumer


def report(label: str, sides: list[tuple[str, Turns]]) -> None:
    print(f"\n{label}: per round trip, over {ROUND_TRIPS:,} sequential round trips")
    for side, turns in sides:
        print(f"  {side}: {turns.iterations / ROUND_TRIPS:.2f} loop iterations; callbacks run:")
        for name, count in turns.callbacks.most_common():
            if count / ROUND_TRIPS >= 0.05:
                print(f"    {count / ROUND_TRIPS:5.2f}  {name}")


def run(start: Starter, drive: Callable[[str, Turns], Coroutine[Any, Any, Turns]]) -> list[Any]:
    with provider_thread(start) as (address, provider):
        consumer = asyncio.run(drive(address, provider))
        return [("consumer", consumer), ("provider", provider)]


def main() -> None:
    """Count the three scenarios and print them."""
    report("a. backchannel forward call", run(_start_backchannel, _forward))
    report("raw grpc.aio bidi ping-pong", run(_start_raw, _raw))
    pusher = AsyncPusher()
    sides = run(_callback_provider(pusher), lambda a, p: _callback(a, p, pusher))
    report("d. backchannel callback (the provider calls)", sides)


if __name__ == "__main__":
    main()
