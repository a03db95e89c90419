"""The load-balancing strategies: pure units, statistical checks with fixed seeds."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

import pytest

from backchannel.loadbalance import (
    MAX_WEIGHT,
    ConsistentHashLoadBalance,
    LeastActiveLoadBalance,
    NoProvider,
    RandomLoadBalance,
    RoundRobinLoadBalance,
    load_balance,
)
from backchannel.registry import ServiceURL


@dataclass(frozen=True)
class Node:
    address: str
    weight: int = 100
    active: int = 0


def nodes(*weights: int) -> tuple[Node, ...]:
    return tuple(Node(f"10.0.0.{i}:50051", w) for i, w in enumerate(weights, 1))


def shares(picks: list[Node]) -> dict[str, float]:
    counts = collections.Counter(p.address for p in picks)
    return {address: count / len(picks) for address, count in counts.items()}


PICKS = 60_000
#: percentage points a share may stray from its weight's over PICKS picks (the standard
#: deviation at these shares is under 0.2 points: 3 points is far outside chance)
TOLERANCE = 0.03


def test_random_shares_follow_the_weights() -> None:
    providers = nodes(100, 200, 300)
    strategy = RandomLoadBalance(random.Random(11))
    got = shares([strategy.select(providers) for _ in range(PICKS)])
    for provider, expected in zip(providers, (1 / 6, 2 / 6, 3 / 6), strict=True):
        assert got[provider.address] == pytest.approx(expected, abs=TOLERANCE)


def test_random_with_equal_weights_is_uniform_and_weight_zero_gets_nothing() -> None:
    strategy = RandomLoadBalance(random.Random(12))
    equal = nodes(100, 100, 100, 100)
    for share in shares([strategy.select(equal) for _ in range(PICKS)]).values():
        assert share == pytest.approx(0.25, abs=TOLERANCE)
    drained = nodes(100, 0, 100)
    assert drained[1] not in {strategy.select(drained) for _ in range(10_000)}


def test_a_list_changed_in_place_is_seen_by_random() -> None:
    strategy = RandomLoadBalance(random.Random(13))
    providers = list(nodes(100, 100))
    strategy.select(providers)
    providers[1] = Node("10.0.0.9:50051", 0)
    assert {strategy.select(providers) for _ in range(1000)} == {providers[0]}


def test_smooth_round_robin_gives_dubbos_documented_sequence_for_5_1_1() -> None:
    a, b, c = nodes(5, 1, 1)
    strategy = RoundRobinLoadBalance()
    picks = [strategy.select((a, b, c)) for _ in range(14)]
    assert picks == [a, a, b, a, c, a, a] * 2


def test_round_robin_shares_follow_the_weights_exactly_and_forget_removed_ones() -> None:
    providers = nodes(100, 200, 300)
    strategy = RoundRobinLoadBalance()
    counts = collections.Counter(strategy.select(providers) for _ in range(600))
    assert [counts[p] for p in providers] == [100, 200, 300]
    survivors = providers[1:]
    assert {strategy.select(survivors) for _ in range(5)} == set(survivors)
    assert len(strategy._state) == 2


def test_least_active_prefers_the_idle_provider() -> None:
    busy, idle, busier = Node("a:1", active=3), Node("b:1", active=0), Node("c:1", active=9)
    strategy = LeastActiveLoadBalance(rng=random.Random(14))
    assert {strategy.select((busy, idle, busier)) for _ in range(1000)} == {idle}


def test_least_active_breaks_ties_by_weight_and_reads_the_callers_counts() -> None:
    light, heavy, busy = Node("a:1", 100), Node("b:1", 300), Node("c:1", 900, active=1)
    strategy = LeastActiveLoadBalance(rng=random.Random(15))
    got = shares([strategy.select((light, heavy, busy)) for _ in range(PICKS)])
    assert got["a:1"] == pytest.approx(0.25, abs=TOLERANCE)
    assert got["b:1"] == pytest.approx(0.75, abs=TOLERANCE)
    assert "c:1" not in got
    in_flight = {"a:1": 5, "b:1": 0}
    counted = LeastActiveLoadBalance(active=lambda p: in_flight[p.address])
    assert counted.select((light, heavy)) is heavy


def test_consistent_hash_keeps_a_key_on_its_provider() -> None:
    providers = nodes(100, 100, 100)
    strategy = ConsistentHashLoadBalance()
    for key in ("IBM", "AAPL", 42, "GOOG"):
        chosen = strategy.select(providers, (key, "ignored"))
        assert {strategy.select(providers, (key, f"other{i}")) for i in range(20)} == {chosen}
    spread = collections.Counter(strategy.select(providers, (f"k{i}",)) for i in range(3000))
    assert len(spread) == 3 and min(spread.values()) > 600  # 160 nodes: roughly even


def test_consistent_hash_moves_only_the_removed_providers_keys() -> None:
    providers = nodes(*([100] * 5))
    strategy = ConsistentHashLoadBalance()
    keys = [f"user-{i}" for i in range(5000)]
    before = {key: strategy.select(providers, (key,)) for key in keys}
    gone = providers[2]
    after = {key: strategy.select(providers[:2] + providers[3:], (key,)) for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(before[key] == gone for key in moved)  # only the removed one's keys move
    assert len(moved) / len(keys) == pytest.approx(1 / 5, abs=0.05)


def test_consistent_hash_matches_dubbos_ring_arithmetic() -> None:
    # Dubbo: a key's point is md5(key)[0:4] read little-endian; a provider's points are
    # md5(address + i) for i < nodes/4, four little-endian points each; ceiling, wrapping
    import hashlib

    providers = nodes(100, 100)
    strategy = ConsistentHashLoadBalance(nodes=4)
    ring = {}
    for provider in providers:
        digest = hashlib.md5(f"{provider.address}0".encode()).digest()
        for h in range(4):
            ring[int.from_bytes(digest[4 * h : 4 * h + 4], "little")] = provider
    for key in ("a", "b", "c", "d", "e", "f"):
        point = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
        ceiling = [p for p in sorted(ring) if p >= point]
        expected = ring[ceiling[0] if ceiling else min(ring)]
        assert strategy.select(providers, (key,)) == expected


def test_strategies_take_service_urls_and_refuse_an_empty_set() -> None:
    urls = (
        ServiceURL.provider("demo.Echo", "127.0.0.1", 50051, weight=100),
        ServiceURL.provider("demo.Echo", "127.0.0.1", 50052, weight=0),
    )
    for name in ("random", "roundrobin", "consistenthash"):
        strategy = load_balance(name)
        assert strategy.name == name
        assert strategy.select(urls, ("IBM",)) in urls
        assert strategy.select(urls[:1]) is urls[0]
        with pytest.raises(NoProvider, match="no provider to choose from"):
            strategy.select(())
    with pytest.raises(ValueError, match="unknown loadbalance 'fastest'"):
        load_balance("fastest")
    with pytest.raises(ValueError, match="at least 4 nodes"):
        ConsistentHashLoadBalance(nodes=2)


def test_weights_outside_their_bounds_are_read_as_the_nearest_bound() -> None:
    """A caller's own providers may carry any int (a URL's are checked when parsed):
    10**400 is read as MAX_WEIGHT and -5 as 0, by random (which raised OverflowError on
    a weight too large for a float) and by roundrobin (where a negative weight took
    calls away from the others)."""
    huge, light, negative = nodes(10**400, 1, -5)
    strategy = RandomLoadBalance(random.Random(7))
    picks = [strategy.select((huge, light, negative)) for _ in range(1000)]
    assert set(picks) == {huge}  # light's share is 1 in 2**31
    assert [strategy.select((light, negative)) for _ in range(100)] == [light] * 100
    rr = RoundRobinLoadBalance()
    turns = [rr.select((light, negative)) for _ in range(10)]
    assert turns == [light] * 10
    big = Node("10.0.0.9:50051", MAX_WEIGHT + 1)
    assert {rr.select((big, light)) for _ in range(3)} == {big}
