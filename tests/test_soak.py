"""Soak: many consumers, many calls and callbacks at once, then nothing left behind.

50 ``AsyncClient`` consumers (real gRPC over 127.0.0.1, on two event-loop threads) each
register a listener through a callback method and then make 500 calls (echo and add, 100
at a time, each checked against its own arguments) while the provider pushes to every
listener concurrently: 20 pushes per listener from provider threads (blocking reverse-proxy
calls, 5 threads) and a burst of 20 from the event loop (``asyncio.gather``) that each
consumer triggers in the middle of its calls. That is 25,000 forward calls and 2,000
callbacks per round. Every listener must receive exactly its own pushes, each source in
order. Afterwards every stream is closed, the provider's tables are empty, and its memory
is back near where it was after a smaller warm-up round of the same shape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import threading
from typing import Any

import pytest
from helpers import wait_until
from notifier import Listener

import backchannel
from backchannel import Argument, Method
from backchannel.rpc.provider_callbacks import ReverseProxy
from backchannel.transport.portal import LoopThread
from backchannel.transport.session import Session

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")

CONSUMERS = 50
CALLS = 500  # per consumer
WAVE = 100  # calls in flight per consumer at once
PUSHES = 20  # per listener, from provider threads
BURST = 20  # per listener, from the provider's event loop
PUSHER_THREADS = 5
LOOPS = 2  # consumer event-loop threads


@backchannel.interface("test.Soak")
class Soak:
    """What the soak consumers call."""

    def subscribe(self, key: str, listener: Listener) -> None: ...
    def unsubscribe(self, key: str, listener: Listener) -> None: ...
    def echo(self, value: Any) -> Any: ...
    def add(self, a: int, b: int) -> int: ...
    def burst(self, key: str, count: int) -> int: ...


SOAK_METHODS = [
    Method("subscribe", arguments=[Argument(index=1, callback=True)]),
    Method("unsubscribe", arguments=[Argument(index=1, callback=False)]),
]


class SoakImpl:
    """Listeners by key; a sync echo (thread pool) and async add and burst (event loop)."""

    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}
        self.subscribed = threading.Condition()

    def subscribe(self, key: str, listener: Any) -> None:
        with self.subscribed:
            self.listeners[key] = listener
            self.subscribed.notify_all()

    def unsubscribe(self, key: str, listener: Any) -> None:
        assert self.listeners.pop(key) is listener

    def echo(self, value: Any) -> Any:
        return value

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def burst(self, key: str, count: int) -> int:
        listener = self.listeners[key]
        replies = await asyncio.gather(*(listener.changed(f"{key} b{i}") for i in range(count)))
        assert replies == [f"got {key} b{i}" for i in range(count)]
        return count

    def push_all(self, keys: list[str], rounds: int) -> None:
        """From a provider thread: every listener of ``keys`` gets ``rounds`` pushes."""
        for i in range(rounds):
            for key in keys:
                reply = self.listeners[key].changed(f"{key} p{i}")
                assert reply == f"got {key} p{i}", reply


class Recorder:
    """An async listener that keeps what it got."""

    def __init__(self) -> None:
        self.received: list[str] = []

    async def changed(self, msg: str) -> str:
        self.received.append(msg)
        return f"got {msg}"


def check_listener(key: str, received: list[str], pushes: int, burst: int) -> None:
    """Exactly and only this listener's pushes, each source in order."""
    assert all(msg.startswith(f"{key} ") for msg in received), received[:3]  # none misrouted
    pushed = [msg for msg in received if msg.startswith(f"{key} p")]
    bursted = [msg for msg in received if msg.startswith(f"{key} b")]
    assert pushed == [f"{key} p{i}" for i in range(pushes)]  # none lost, doubled, reordered
    assert bursted == [f"{key} b{i}" for i in range(burst)]
    assert len(received) == pushes + burst


async def consume(
    address: str,
    key: str,
    number: int,
    calls: int,
    burst: int,
    go: threading.Event,
    pushed: threading.Event,
) -> Recorder:
    """One consumer: subscribe, wait for the pushes to start, call away, and once the
    pushes are over unsubscribe and close."""
    async with backchannel.AsyncClient(address, timeout=30) as client:
        soak = client.reference(Soak)
        listener = Recorder()
        await soak.subscribe(key, listener)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, go.wait, 30)

        async def one(i: int) -> None:
            payload = {"consumer": number, "call": i, "blob": key.encode() * (i % 5)}
            got = await soak.echo(payload)
            assert got == payload, (payload, got)
            assert await soak.add(number * 1_000_000, i) == number * 1_000_000 + i

        for start in range(0, calls, WAVE):
            wave = [one(i) for i in range(start, min(start + WAVE, calls))]
            if start == (calls // WAVE // 2) * WAVE:  # the burst, amid the calls
                assert (await asyncio.gather(soak.burst(key, burst), *wave))[0] == burst
            else:
                await asyncio.gather(*wave)
        await loop.run_in_executor(None, pushed.wait, 30)
        await soak.unsubscribe(key, listener)
        assert client.callback_count == 0
    return listener


def soak_round(address: str, impl: SoakImpl, calls: int, pushes: int, burst: int) -> None:
    """One round: every consumer connects, is pushed to, calls, and closes."""
    keys = [f"c{n}" for n in range(CONSUMERS)]
    go, pushed = threading.Event(), threading.Event()
    loops = [LoopThread(f"soak-consumers-{i}") for i in range(LOOPS)]
    try:
        outcomes = [
            loops[n % LOOPS].submit(consume(address, key, n, calls, burst, go, pushed))
            for n, key in enumerate(keys)
        ]
        with impl.subscribed:
            assert impl.subscribed.wait_for(lambda: len(impl.listeners) == CONSUMERS, 20)
        go.set()  # pushes and calls start together
        with concurrent.futures.ThreadPoolExecutor(PUSHER_THREADS) as pool:
            shares = [keys[i::PUSHER_THREADS] for i in range(PUSHER_THREADS)]
            pushers = [pool.submit(impl.push_all, share, pushes) for share in shares]
            for pusher in pushers:
                pusher.result(25)
        pushed.set()
        listeners = [outcome.result(25) for outcome in outcomes]
    finally:
        for loop in loops:
            loop.close()
    for key, listener in zip(keys, listeners, strict=True):
        check_listener(key, listener.received, pushes, burst)
    assert impl.listeners == {}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live(kind: type) -> list[Any]:
    """Every object of ``kind`` still alive (other tests' leftovers included)."""
    gc.collect()
    return [obj for obj in gc.get_objects() if isinstance(obj, kind)]


def test_fifty_consumers_five_hundred_calls_each_with_pushes_leave_nothing_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "backchannel")
    impl = SoakImpl()
    sessions_before, proxies_before = len(live(Session)), len(live(ReverseProxy))
    with backchannel.Server(max_workers=64, callback_timeout=30) as server:
        server.export(Soak, impl, methods=SOAK_METHODS)
        core = server._core

        # warm-up: the same shape, fewer calls, so pools, arenas and gRPC's own caches
        # have grown before memory is measured
        soak_round(server.address, impl, calls=WAVE, pushes=2, burst=BURST)
        wait_until(lambda: core.session_count == 0, 5, "the provider's streams closed")
        gc.collect()
        baseline = rss_bytes()

        soak_round(server.address, impl, calls=CALLS, pushes=PUSHES, burst=BURST)
        faults = [
            record.getMessage()
            for record in caplog.records
            if "protocol mistake" in record.getMessage()
            or "reports a protocol fault" in record.getMessage()
        ]
        assert faults == []  # well-behaved peers under load never break the protocol

        wait_until(lambda: core.session_count == 0, 5, "every stream closed")
        assert core._sessions == set()
        # no stream state kept on either side, no callback table entry kept
        sessions = live(Session)
        assert len(sessions) <= sessions_before, [session.peer for session in sessions]
        assert len(live(ReverseProxy)) <= proxies_before
        growth = rss_bytes() - baseline
        # The main round makes 5x the calls of the warm-up with the same concurrency, so
        # without a leak its peak needs no new memory; RSS still moves by a few MB
        # (allocator fragmentation, gRPC buffers). A leak of only 1 KB per call would
        # add 25 MB here, so 16 MB separates the two.
        assert growth < 16 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
