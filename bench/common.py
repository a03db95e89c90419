"""What the benchmark's provider and consumer processes share.

The ``Calculator`` interface and its two implementations (an ``async def`` one and a plain
``def`` one, exported under the group ``"sync"``), the raw grpc method paths and payload,
and the drivers that time calls: :func:`drive_async` (asyncio tasks) and
:func:`drive_threads` (OS threads). Both drivers run ``concurrency`` callers that call
``op(i)`` in a loop until a deadline and return one :class:`Measurement`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
