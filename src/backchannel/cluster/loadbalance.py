"""Choosing a provider for each call: Dubbo's four load-balancing strategies.

Each strategy picks one of a sequence of providers, anything with an ``address`` (its
identity) and a ``weight`` (from its URL; Dubbo's default is 100; read as 0 when
negative and :data:`MAX_WEIGHT` when larger, so no weight can break the arithmetic).
They run once per forward call, so they are cheap: about a microsecond for a handful
of providers (see docs/cluster.md). Pass a *tuple* of providers and keep passing the
same one until the set changes: what a strategy derives from the set (cumulative
weights, the hash ring) is then computed once per set instead of once per call.

Not thread-safe: one instance serves one event loop (a reference's, or a method's to
keep Dubbo's per-method state).
"""

from __future__ import annotations

import bisect
import hashlib
import operator
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from backchannel.errors import BackchannelError

#: virtual nodes per provider on the consistent-hash ring (Dubbo's ``hash.nodes``)
DEFAULT_HASH_NODES = 160
#: the largest weight: Java's ``Integer.MAX_VALUE``, the most a Dubbo URL's ``weight``
#: can hold. Strategies treat a weight outside 0..MAX_WEIGHT as its nearest bound, so
#: a set of 2**22 providers at the most still sums exactly in a float (below 2**53)
MAX_WEIGHT = 2**31 - 1


class NoProvider(BackchannelError, LookupError):
    """There is no provider to choose from."""


class Weighted(Protocol):
    """A provider as the strategies see it."""

    @property
    def address(self) -> str: ...

    @property
    def weight(self) -> int: ...


P = TypeVar("P", bound=Weighted)


class LoadBalance(Protocol):
    """A strategy: ``select`` one of ``providers`` for a call with ``arguments``."""

    name: str

    def select(self, providers: Sequence[P], arguments: Sequence[object] = ()) -> P: ...


def _weight(provider: Weighted) -> int:
    """The provider's weight within 0..MAX_WEIGHT (a URL's is already; a caller's own
    objects may say anything)."""
    return min(max(provider.weight, 0), MAX_WEIGHT)


def _no_provider() -> NoProvider:
    return NoProvider("no provider to choose from (none registered, or all gone)")


class RandomLoadBalance:
    """Weighted random, Dubbo's default (``RandomLoadBalance``): each provider gets a
    share of the calls proportional to its weight; all equal (or all zero) is uniform.
    A provider of weight 0 gets no call while another has a weight."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random
        self._providers: Sequence[Any] | None = None
        self._cumulative: list[int] = []
        self._total = 0

    def select(self, providers: Sequence[P], arguments: Sequence[object] = ()) -> P:
        count = len(providers)
        if count <= 1:
            if count == 0:
                raise _no_provider()
            return providers[0]
        if providers is not self._providers:
            self._prepare(providers)
        if not self._cumulative:  # same weights: no need to search
            return providers[int(self._random() * count)]
        # the first provider whose running total exceeds the offset, as Dubbo's loop
        return providers[bisect.bisect_right(self._cumulative, self._random() * self._total)]

    def _prepare(self, providers: Sequence[Any]) -> None:
        weights = [_weight(provider) for provider in providers]
        cumulative, total = [], 0
        for weight in weights:
            total += weight
            cumulative.append(total)
        same = total == 0 or all(weight * len(weights) == total for weight in weights)
        self._cumulative = [] if same else cumulative
        self._total = total
        # a list may change in place: only a tuple's derived state is kept between calls
        self._providers = providers if isinstance(providers, tuple) else None


class RoundRobinLoadBalance:
    """Smooth weighted round robin (Dubbo's ``RoundRobinLoadBalance``, after nginx):
    every call adds each provider's weight to its current value, picks the highest
    (the first one on a tie) and takes the total weight off it. Weights 5/1/1 give
    A A B A C A A, repeating: the heavy provider's calls are spread, not bunched."""

    name = "roundrobin"

    def __init__(self) -> None:
        # address -> [weight as said, current, weight within bounds]; a changed weight
        # starts again from 0, as Dubbo
        self._state: dict[str, list[int]] = {}

    def select(self, providers: Sequence[P], arguments: Sequence[object] = ()) -> P:
        count = len(providers)
        if count <= 1:
            if count == 0:
                raise _no_provider()
            return providers[0]
        state = self._state
        if len(state) > count:  # providers went away: forget them (Dubbo: after 60 s idle)
            addresses = {p.address for p in providers}
            self._state = state = {a: s for a, s in state.items() if a in addresses}
        total = 0
        chosen: P | None = None
        chosen_state: list[int] = []
        highest = -(1 << 62)
        for provider in providers:
            said = provider.weight
            entry = state.get(provider.address)
            if entry is None:
                entry = state[provider.address] = [said, 0, _weight(provider)]
            elif entry[0] != said:
                entry[0], entry[1], entry[2] = said, 0, _weight(provider)
            weight = entry[2]
            current = entry[1] = entry[1] + weight
            if current > highest:
                highest, chosen, chosen_state = current, provider, entry
            total += weight
        assert chosen is not None
        chosen_state[1] -= total
        return chosen


class LeastActiveLoadBalance:
    """Fewest calls in flight (Dubbo's ``LeastActiveLoadBalance``): the caller counts
    each provider's active calls, read through ``active`` (default: its ``active``
    attribute); ties are broken by weighted random, so a slow provider, whose calls
    pile up, gets fewer new ones."""

    name = "leastactive"

    def __init__(
        self,
        active: Callable[[Any], int] = operator.attrgetter("active"),
        rng: random.Random | None = None,
    ) -> None:
        self._active = active
        self._tie_break = RandomLoadBalance(rng)

    def select(self, providers: Sequence[P], arguments: Sequence[object] = ()) -> P:
        count = len(providers)
        if count <= 1:
            if count == 0:
                raise _no_provider()
            return providers[0]
        values = [self._active(provider) for provider in providers]
        least = min(values)
        ties = values.count(least)
        if ties == 1:
            return providers[values.index(least)]
        if ties < count:
            providers = tuple(p for p, v in zip(providers, values, strict=True) if v == least)
        # Dubbo's tie-break is its weighted random: the same arithmetic, and with every
        # provider tied (the usual case when idle) the same tuple and cached weights
        return self._tie_break.select(providers)


class ConsistentHashLoadBalance:
    """The same arguments go to the same provider (Dubbo's
    ``ConsistentHashLoadBalance``): each provider has ``nodes`` points on a ring of
    32-bit md5 hashes of ``{address}{i}``, and a call goes to the first point at or
    after the md5 hash of ``str()`` of its arguments at ``argument_indexes`` (Dubbo's
    ``hash.arguments``, default the first). Removing one of N providers moves only the
    keys it had, about 1/N of them; weights are not used (as in Dubbo)."""

    name = "consistenthash"

    def __init__(
        self, nodes: int = DEFAULT_HASH_NODES, argument_indexes: Sequence[int] = (0,)
    ) -> None:
        if nodes < 4:
            raise ValueError(
                f"a consistent-hash ring needs at least 4 nodes a provider, not {nodes}"
            )
        self.nodes = nodes
        self.argument_indexes = tuple(argument_indexes)
        self._key: object = None
        self._points: list[int] = []
        self._owners: list[int] = []

    def select(self, providers: Sequence[P], arguments: Sequence[object] = ()) -> P:
        count = len(providers)
        if count <= 1:
            if count == 0:
                raise _no_provider()
            return providers[0]
        key = providers if isinstance(providers, tuple) else [p.address for p in providers]
        if key is not self._key and key != self._key:
            self._build(providers)
            self._key = key
        indexes = self.argument_indexes
        if indexes == (0,):  # the usual case, without the join
            text = str(arguments[0]) if arguments else ""
        else:
            text = "".join(str(arguments[i]) for i in indexes if 0 <= i < len(arguments))
        point = int.from_bytes(hashlib.md5(text.encode()).digest()[:4], "little")
        index = bisect.bisect_left(self._points, point)
        return providers[self._owners[index if index < len(self._points) else 0]]

    def _build(self, providers: Sequence[Any]) -> None:
        # a point owns a position in the list, not the provider object: a list keyed by
        # its addresses may come back with new objects at the same places
        ring: dict[int, int] = {}
        for position, provider in enumerate(providers):
            for i in range(self.nodes // 4):
                digest = hashlib.md5(f"{provider.address}{i}".encode()).digest()
                # four points from one digest, read little-endian as Dubbo's hash(digest, h)
                for h in range(4):
                    ring[int.from_bytes(digest[4 * h : 4 * h + 4], "little")] = position
        self._points = sorted(ring)
        self._owners = [ring[point] for point in self._points]


_STRATEGIES: dict[str, Callable[..., LoadBalance]] = {
    "random": RandomLoadBalance,
    "roundrobin": RoundRobinLoadBalance,
    "leastactive": LeastActiveLoadBalance,
    "consistenthash": ConsistentHashLoadBalance,
}


def load_balance(name: str = "random", **options: Any) -> LoadBalance:
    """A new strategy by its Dubbo name (``loadbalance="..."``)."""
    try:
        factory = _STRATEGIES[name]
    except KeyError:
        known = ", ".join(_STRATEGIES)
        raise ValueError(f"unknown loadbalance {name!r} (known: {known})") from None
    return factory(**options)
