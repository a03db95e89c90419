"""The cost of choosing a provider, timed with timeit (the best of 5 repeats of 100,000).

``python bench/loadbalance.py`` (part of ``make bench``) prints microseconds per pick:
each strategy's ``select`` alone over 3 and 10 providers, then the whole choice an
``AsyncClient`` makes for each call (the streams' states checked, then ``select``) with
streams open to 3 live providers in this process. docs/cluster.md quotes it; the same
cost inside calls is bench/run.py's "Several providers" table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import timeit
from dataclasses import dataclass

from common import AsyncCalculator, Calculator

import backchannel
from backchannel.cluster.loadbalance import (
    ConsistentHashLoadBalance,
    LeastActiveLoadBalance,
    LoadBalance,
    RandomLoadBalance,
    RoundRobinLoadBalance,
)

PICKS = 100_000


@dataclass(frozen=True)
class Provider:
    address: str
    weight: int = 100
    active: int = 0


def time_select() -> None:
    """Each strategy's ``select`` alone."""
    print("providers  strategy            us/pick")
    for count in (3, 10):
        equal = tuple(Provider(f"10.0.0.{i}:50051") for i in range(count))
        weighted = tuple(Provider(f"10.0.0.{i}:50051", 100 * (i + 1)) for i in range(count))
        cases: list[tuple[str, LoadBalance, tuple[Provider, ...], tuple[object, ...]]] = [
            ("random, equal", RandomLoadBalance(), equal, ()),
            ("random, weighted", RandomLoadBalance(), weighted, ()),
            ("roundrobin", RoundRobinLoadBalance(), weighted, ()),
            ("leastactive, idle", LeastActiveLoadBalance(), weighted, ()),
            ("consistenthash", ConsistentHashLoadBalance(), weighted, ("IBM",)),
        ]
        for name, strategy, providers, arguments in cases:
            pick = functools.partial(strategy.select, providers, arguments)
            best = min(timeit.repeat(pick, number=PICKS, repeat=5))
            print(f"{count:9d}  {name:18s}  {best / PICKS * 1e6:7.2f}")


async def time_client_choice(count: int = 3) -> None:
    """A client's whole choice per call, its streams to ``count`` providers open."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [backchannel.AsyncServer("127.0.0.1:0") for _ in range(count)]
        for server in servers:
            server.export(Calculator, AsyncCalculator())
            await server.start()
            stack.push_async_callback(server.stop)
        addresses = ",".join(server.address for server in servers)
        client = await stack.enter_async_context(backchannel.AsyncClient(f"static://{addresses}"))
        print("\nproviders  strategy            us/pick  (an AsyncClient's choice, streams open)")
        for strategy in ("random", "roundrobin", "leastactive", "consistenthash"):
            calc = client.reference(Calculator, loadbalance="roundrobin")
            for i in range(count):  # roundrobin: one call opens each provider's stream
                await calc.add(i, 1)
            reference = client.reference(Calculator, loadbalance=strategy)._reference
            consumer = client._consumer  # the consumer core: its directories and its choice
            directory = await consumer.directories.get(reference)
            pick = functools.partial(consumer.choose, reference, directory, (1, 1))
            best = min(timeit.repeat(pick, number=PICKS, repeat=5))
            print(f"{count:9d}  {strategy:18s}  {best / PICKS * 1e6:7.2f}")


def main() -> None:
    """Time the strategies alone, then inside a client."""
    time_select()
    asyncio.run(time_client_choice())


if __name__ == "__main__":
    main()
