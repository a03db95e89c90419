"""The cost of choosing a provider: each strategy's ``select``, timed with timeit.

``python bench/loadbalance.py`` prints microseconds per pick (the best of 5 repeats of
100,000 picks) over 3 and 10 providers; docs/cluster.md quotes it. Not yet part of
``make bench``, whose figure of calls over several providers needs the Client wired.
"""

from __future__ import annotations

import functools
import timeit
from dataclasses import dataclass

from backchannel.loadbalance import (
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


def main() -> None:
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


if __name__ == "__main__":
    main()
