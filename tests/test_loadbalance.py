"""The load-balancing strategies: pure units, statistical checks with fixed seeds."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass

import pytest

from backchannel.cluster.loadbalance import (
    MAX_WEIGHT,
    ConsistentHashLoadBalance,
    LeastActiveLoadBalance,
    NoProvider,
    RandomLoadBalance,
    RoundRobinLoadBalance,
    load_balance,
)
from backchannel.cluster.service_url import ServiceURL


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


class Draws(random.Random):
    """An rng whose ``random()`` returns the given draws in turn."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self._draws = iter(draws)

    def random(self) -> float:
        return next(self._draws)


def test_random_picks_the_first_provider_whose_running_total_exceeds_the_draw() -> None:
    # Dubbo: offset = random() * total weight; 100/100/200 own [0, 100), [100, 200), [200, 400)
    a, b, c = nodes(100, 100, 200)
    draws = (0.0, 0.2499, 0.25, 0.4999, 0.5, 0.9999)
    strategy = RandomLoadBalance(Draws(*draws))
    picks = []
    for _ in draws:
        assert strategy.select((b,)) is b  # one provider: taken without a draw (as Dubbo)
        picks.append(strategy.select((a, b, c)))
    assert picks == [a, a, b, b, c, c]


def test_random_with_every_weight_zero_is_uniform() -> None:
    providers = nodes(0, 0, 0)
    strategy = RandomLoadBalance(random.Random(16))
    got = shares([strategy.select(providers) for _ in range(PICKS)])
    assert sorted(got) == sorted(p.address for p in providers)
    for share in got.values():
        assert share == pytest.approx(1 / 3, abs=TOLERANCE)


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


def test_round_robin_restarts_a_provider_whose_weight_changed() -> None:
    # Dubbo sets a provider's current weight back to 0 when its weight changes; the
    # others keep theirs. Currents after each pick (each adds its weight, the pick
    # takes the total off): a b c at 1 1 1 pick a (-2 1 1); c now weighs 3 and restarts
    # at 0: -1 2 3 -> c (-1 2 -2), 0 3 1 -> b, 1 -1 4 -> c, 2 0 2 -> a (first on a tie),
    # -2 0 5 -> c, -1 1 3 -> c
    a, b, c = nodes(1, 1, 1)
    strategy = RoundRobinLoadBalance()
    assert strategy.select((a, b, c)) is a
    heavier = Node(c.address, 3)
    picks = [strategy.select((a, b, heavier)) for _ in range(6)]
    assert picks == [heavier, b, heavier, a, heavier, heavier]


def test_round_robin_keeps_an_absent_providers_turn_until_the_set_shrinks() -> None:
    """As Dubbo, which keeps a provider's state while it is idle (for 60 s): a call with
    a single provider changes nothing, and a provider swapped out for one call (the set
    did not shrink) is still owed its turn."""
    a, b, c = nodes(2, 1, 1)
    strategy = RoundRobinLoadBalance()
    picks = []
    for alone in (a, b, a):
        picks.append(strategy.select((a, b)))
        assert strategy.select((alone,)) is alone
    assert picks == [a, b, a]  # as with no one-provider call in between
    a, b, c = nodes(1, 1, 1)
    strategy = RoundRobinLoadBalance()
    # a and b alternate; c stands in for b for one call; back, b has its turn (not a)
    assert [strategy.select(s) for s in ((a, b), (a, c), (a, b))] == [a, c, b]


def test_round_robin_with_every_weight_zero_takes_the_first() -> None:
    providers = nodes(0, 0, 0)  # all tie at 0, every time (as Dubbo)
    strategy = RoundRobinLoadBalance()
    assert [strategy.select(providers) for _ in range(3)] == [providers[0]] * 3


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


def test_least_active_breaks_ties_with_the_given_rng_as_random_does() -> None:
    tied = nodes(100, 200, 300, 400)  # none active: all tie
    least = LeastActiveLoadBalance(rng=random.Random(17))
    weighted = RandomLoadBalance(random.Random(17))
    assert [least.select(tied) for _ in range(50)] == [weighted.select(tied) for _ in range(50)]


def test_consistent_hash_keeps_a_key_on_its_provider() -> None:
    providers = nodes(100, 100, 100)
    strategy = ConsistentHashLoadBalance()
    for key in ("IBM", "AAPL", 42, "GOOG"):
        chosen = strategy.select(providers, (key, "ignored"))
        assert {strategy.select(providers, (key, f"other{i}")) for i in range(20)} == {chosen}
    spread = collections.Counter(strategy.select(providers, (f"k{i}",)) for i in range(3000))
    assert len(spread) == 3 and min(spread.values()) > 600  # 160 nodes: roughly even


def test_consistent_hash_keys_on_the_arguments_at_hash_arguments() -> None:
    # Dubbo's hash.arguments: the key is str() of the arguments at those indexes, joined
    # with nothing between; an index past a call's arguments is skipped; none: ""
    providers = nodes(100, 100, 100)
    first = ConsistentHashLoadBalance()
    second = ConsistentHashLoadBalance(argument_indexes=(1,))
    first_and_third = ConsistentHashLoadBalance(argument_indexes=(0, 2))
    for i in range(50):
        key = f"user-{i}"
        expected = first.select(providers, (f"{key}{i * 7}",))
        assert first_and_third.select(providers, (key, "ignored", i * 7)) == expected
        assert first_and_third.select(providers, (f"{key}{i * 7}", "ignored")) == expected
        assert second.select(providers, ("ignored", key)) == first.select(providers, (key,))
    for strategy in (first, second, first_and_third):
        for count in range(2, 9):
            some = nodes(*([100] * count))
            assert strategy.select(some) == first.select(some, ("",))


def test_consistent_hash_answers_with_the_providers_it_was_given() -> None:
    providers = list(nodes(100, 100, 100))
    strategy = ConsistentHashLoadBalance()
    keys = [f"user-{i}" for i in range(300)]
    for key in keys:
        strategy.select(providers, (key,))
    providers[1] = Node("10.0.0.9:50051")  # a list changed in place
    assert all(strategy.select(providers, (key,)) in providers for key in keys)
    urls = nodes(100, 100, 100)
    for key in keys:
        strategy.select(urls, (key,))
    reweighted = tuple(Node(p.address, 200) for p in urls)  # new URLs, same addresses
    assert all(strategy.select(reweighted, (key,)) in reweighted for key in keys)
    # a list keyed by its addresses, given new objects at the same addresses: the answer
    # is one of the objects given (failed before: the ring answered with the old ones)
    listed = list(nodes(100, 100, 100))
    chosen = {key: strategy.select(listed, (key,)) for key in keys}
    renewed = [Node(p.address, 50) for p in listed]
    for key in keys:
        answer = strategy.select(renewed, (key,))
        assert any(answer is p for p in renewed) and answer.address == chosen[key].address


def test_consistent_hash_of_a_list_changed_in_place_follows_its_new_addresses() -> None:
    """A list is keyed by the addresses it holds at each call: after one of its providers
    is replaced in place, every key goes where a new strategy given that list sends it
    (the ring of the new addresses), not by the ring of the addresses it held before."""
    providers = list(nodes(100, 100, 100))
    strategy = ConsistentHashLoadBalance()
    keys = [f"user-{i}" for i in range(300)]
    for key in keys:
        strategy.select(providers, (key,))
    providers[1] = Node("10.0.0.9:50051")
    fresh = ConsistentHashLoadBalance()
    got = [strategy.select(providers, (key,)).address for key in keys]
    assert got == [fresh.select(providers, (key,)).address for key in keys]


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
    strategy = ConsistentHashLoadBalance(nodes=8)
    ring = {}
    for provider in providers:
        for i in range(2):
            digest = hashlib.md5(f"{provider.address}{i}".encode()).digest()
            for h in range(4):
                ring[int.from_bytes(digest[4 * h : 4 * h + 4], "little")] = provider
    wrapped = []
    for key in ("a", "b", "c", "d", "e", "f"):
        point = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
        ceiling = [p for p in sorted(ring) if p >= point]
        expected = ring[ceiling[0] if ceiling else min(ring)]
        assert strategy.select(providers, (key,)) == expected
        wrapped += [] if ceiling else [key]
    # "b" lies past the last point: it wraps to the first, whose owner is not the second's
    assert wrapped == ["b"] and len({ring[p] for p in sorted(ring)[:2]}) == 2


def test_strategies_take_service_urls_and_refuse_an_empty_set() -> None:
    urls = (
        ServiceURL.provider("demo.Echo", "127.0.0.1", 50051, weight=100),
        ServiceURL.provider("demo.Echo", "127.0.0.1", 50052, weight=0),
    )
    strategies = [load_balance(name) for name in ("random", "roundrobin", "consistenthash")]
    strategies.append(load_balance("leastactive", active=lambda url: 0))
    for strategy in strategies:
        assert strategy.select(urls, ("IBM",)) in urls
        assert strategy.select(urls[:1]) is urls[0]
        with pytest.raises(NoProvider) as refused:
            strategy.select(())
        assert str(refused.value) == "no provider to choose from (none registered, or all gone)"
    assert [s.name for s in strategies] == ["random", "roundrobin", "consistenthash", "leastactive"]
    assert isinstance(load_balance(), RandomLoadBalance)  # Dubbo's default
    with pytest.raises(ValueError) as unknown:
        load_balance("fastest")
    assert str(unknown.value) == (
        "unknown loadbalance 'fastest' (known: random, roundrobin, leastactive, consistenthash)"
    )
    with pytest.raises(ValueError) as few:
        ConsistentHashLoadBalance(nodes=3)
    assert str(few.value) == "a consistent-hash ring needs at least 4 nodes a provider, not 3"
    assert ConsistentHashLoadBalance(nodes=4).nodes == 4  # the least it takes


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
