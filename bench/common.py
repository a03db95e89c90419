"""What the benchmark's provider and consumer processes share.

The ``Calculator`` interface and its two implementations (an ``async def`` one and a plain
``def`` one, exported under the group ``"sync"``), the callback interfaces
(``CallbackBench``, which the provider exports, and ``Listener``, which consumers pass to
it), the raw grpc method paths and payloads, and the drivers that time calls:
:func:`drive_async` (asyncio tasks) and :func:`drive_threads` (OS threads). Both drivers
run ``concurrency`` callers that call ``op(i)`` in a loop until a deadline and return one
:class:`Measurement`; :func:`warm_then_drive` warms up first. :func:`use_event_loop` puts a
bench process on the event loop ``$BENCH_LOOP`` names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import backchannel
from backchannel.v1 import envelope_pb2 as pb

#: the generic service the raw grpc provider serves (no generated stubs)
RAW_SERVICE = "bench.Raw"
RAW_UNARY = f"/{RAW_SERVICE}/Echo"
RAW_STREAM = f"/{RAW_SERVICE}/EchoStream"
#: server-push ping-pong: the server writes a message, the client echoes it back
RAW_PUSH = f"/{RAW_SERVICE}/Push"
#: server-push fan-out: one stream per client, many messages outstanding on each
RAW_FANOUT = f"/{RAW_SERVICE}/FanOut"

#: the group the sync-method implementation is exported under
SYNC_GROUP = "sync"

#: what raw grpc echoes: the same bytes a backchannel call frame for add(12345, 1) has
RAW_PAYLOAD = pb.Frame(
    call=pb.Call(
        id=12345,
        service="bench.Calculator",
        method="add",
        args=[pb.Value(int_value=12345), pb.Value(int_value=1)],
    )
).SerializeToString()


#: what raw grpc pushes per callback: the bytes of a backchannel callback frame for
#: listener.changed(12345)
RAW_CALLBACK_PAYLOAD = pb.Frame(
    call=pb.Call(id=12345, method="changed", callback_id=1, args=[pb.Value(int_value=12345)])
).SerializeToString()

#: the raw server's last message on a push stream starts with this (a serialised Frame
#: never starts with a zero byte), followed by the Measurement as JSON
RAW_RESULT_MARK = b"\x00result:"

#: the fan-out scenario: listeners in all, spread evenly over this many client streams
FANOUT_LISTENERS = 1000
FANOUT_CLIENTS = 10

#: the environment variable naming a bench process's event loop: "asyncio" or "uvloop"
LOOP_ENVIRONMENT = "BENCH_LOOP"
LOOPS = ("asyncio", "uvloop")

#: how long a pushing provider waits for every consumer to register before giving up
JOIN_TIMEOUT = 30.0


@backchannel.interface("bench.Calculator")
class Calculator:
    """The benchmarked service: one tiny method, so the figures measure the transport."""

    def add(self, a: int, b: int) -> int:
        """a + b."""
        raise NotImplementedError


class AsyncCalculator:
    """The default implementation: an ``async def`` method, run on the provider's loop."""

    async def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


class SyncCalculator:
    """A plain ``def`` method, which backchannel runs in the provider's thread pool."""

    def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


@backchannel.interface("bench.Listener")
class Listener:
    """What a consumer passes to the provider, which calls it back."""

    def changed(self, msg: int) -> int:
        """A notification; answers ``msg`` so the provider can check the round trip."""
        raise NotImplementedError


@backchannel.interface("bench.CallbackBench")
class CallbackBench:
    """The provider side of the callback figures: it times callbacks it makes itself."""

    @backchannel.method(arguments=[backchannel.Argument(index=0)])
    def addListener(self, listener: Listener) -> None:
        """Register one listener (a callback argument)."""
        raise NotImplementedError

    def drive(self, listeners: int, warmup: float, seconds: float) -> dict[str, float]:
        """Once ``listeners`` are registered, call them back (one caller per listener)
        for ``warmup`` then ``seconds``; every caller gets the same Measurement as JSON."""
        raise NotImplementedError

    def driveGather(self, listeners: int, warmup: float, seconds: float) -> dict[str, float]:
        """As :meth:`drive`, but one caller notifies every listener at once with
        ``backchannel.gather`` in rounds; each callback's latency is its round's."""
        raise NotImplementedError


class EchoListener:
    """The consumer's listener: an ``async def`` method that returns at once."""

    async def changed(self, msg: int) -> int:
        """Answer the notification with itself."""
        return msg


@dataclass(frozen=True)
class Measurement:
    """How one figure came out: call count, wall time, and per-call latency statistics."""

    calls: int
    seconds: float
    calls_per_second: float
    mean_us: float
    p50_us: float
    p99_us: float

    def to_json(self) -> dict[str, Any]:
        """The measurement as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        """The measurement from :meth:`to_json`'s dict (as it came off a wire)."""
        return cls(**data)


def summarise(latencies: list[list[float]], seconds: float) -> Measurement:
    """Merge the per-caller latency lists (seconds) of one timed run."""
    merged = sorted(value for caller in latencies for value in caller)
    if not merged:
        raise RuntimeError("no call finished within the measuring time")
    quantiles = statistics.quantiles(merged, n=100, method="inclusive")
    return Measurement(
        calls=len(merged),
        seconds=seconds,
        calls_per_second=len(merged) / seconds,
        mean_us=statistics.fmean(merged) * 1e6,
        p50_us=quantiles[49] * 1e6,
        p99_us=quantiles[98] * 1e6,
    )


AsyncOp = Callable[[int], Awaitable[object]]
SyncOp = Callable[[int], object]


async def drive_async(op: AsyncOp, concurrency: int, seconds: float) -> Measurement:
    """Run ``concurrency`` asyncio tasks that await ``op(i)`` back to back for ``seconds``."""
    deadline = time.perf_counter() + seconds

    async def caller(first: int) -> list[float]:
        latencies: list[float] = []
        i = first
        while (start := time.perf_counter()) < deadline:
            await op(i)
            latencies.append(time.perf_counter() - start)
            i += concurrency
        return latencies

    began = time.perf_counter()
    latencies = await asyncio.gather(*(caller(n) for n in range(concurrency)))
    return summarise(list(latencies), time.perf_counter() - began)


async def warm_then_drive(
    op: AsyncOp, concurrency: int, warmup: float, seconds: float
) -> Measurement:
    """:func:`drive_async` for ``warmup`` seconds (discarded), then for ``seconds``."""
    await drive_async(op, concurrency, warmup)
    return await drive_async(op, concurrency, seconds)


def _call_until(op: SyncOp, first: int, step: int, deadline: float) -> list[float]:
    """One thread's share of :func:`drive_threads`."""
    latencies: list[float] = []
    i = first
    while (start := time.perf_counter()) < deadline:
        op(i)
        latencies.append(time.perf_counter() - start)
        i += step
    return latencies


def drive_threads(op: SyncOp, concurrency: int, seconds: float) -> Measurement:
    """Run ``concurrency`` threads that call ``op(i)`` back to back for ``seconds``.

    With a concurrency of 1 the calls are made on the calling thread itself.
    """
    began = time.perf_counter()
    deadline = began + seconds
    if concurrency == 1:
        latencies = [_call_until(op, 0, 1, deadline)]
    else:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [
                pool.submit(_call_until, op, n, concurrency, deadline) for n in range(concurrency)
            ]
            latencies = [future.result() for future in futures]
    return summarise(latencies, time.perf_counter() - began)


def use_event_loop() -> str:
    """Make every event loop this process creates the kind ``$BENCH_LOOP`` names
    (``asyncio.run``'s, and the sync ``Client``'s loop thread's, through the event loop
    policy); return its name. Called first thing by the bench's process entry points."""
    name = os.environ.get(LOOP_ENVIRONMENT) or "asyncio"
    if name not in LOOPS:
        raise SystemExit(f"${LOOP_ENVIRONMENT} must be one of {', '.join(LOOPS)}, got {name!r}")
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return name
