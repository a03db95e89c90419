"""What providers register in and consumers subscribe to: the :class:`Registry` protocol,
the :class:`Subscription` a consumer holds, and the simplest registry, a fixed list.

A provider registers one :class:`~backchannel.cluster.service_url.ServiceURL` per export;
a consumer subscribes to an interface and keeps the current set of its providers. Two
registries meet the protocol:

* :class:`StaticRegistry` (``"127.0.0.1:50051,127.0.0.1:50052"`` or ``static://...``):
  a fixed list, the embedded default that needs no server;
* :class:`~backchannel.cluster.zookeeper.ZookeeperRegistry`
  (``zookeeper://127.0.0.1:2181``): Dubbo's own layout (:mod:`backchannel.cluster.zookeeper`).

:func:`~backchannel.cluster.registries.open_registry` picks one by its address.
A subscriber's listener runs on the subscriber's event loop when it gave one, through
:mod:`backchannel.transport.handoff`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from backchannel.cluster.service_url import ServiceURL
from backchannel.errors import BackchannelError, ChannelClosed
from backchannel.transport.handoff import inbox

logger = logging.getLogger("backchannel.registry")

ZOOKEEPER_SCHEME = "zookeeper://"
STATIC_SCHEME = "static://"


class RegistryError(BackchannelError):
    """A registry could not be reached, or refused what was asked of it."""


# pragma: no mutate start -- subscriptions: reached only with a real ZooKeeper (docs/testing.md)
Listener = Callable[[frozenset[ServiceURL]], None]


class Subscription:
    """A consumer's view of one service's providers: ``providers`` is the current set,
    and the listener is told of every change after the first (with the whole new set).

    With a ``loop``, both the set and the listener change on that loop only; without
    one, in the registry's thread (then the listener must not block)."""

    def __init__(
        self,
        interface: str,
        group: str,
        version: str,
        listener: Listener | None,
        loop: asyncio.AbstractEventLoop | None,
        providers: frozenset[ServiceURL] = frozenset(),
    ) -> None:
        self.interface = interface
        self.group = group
        self.version = version
        self.providers = providers
        self.closed = False
        self._listener = listener
        self._loop = loop
        # a burst of updates (a thousand providers registering one by one) is delivered
        # as its latest state only: one list waits at most, one delivery is posted at
        # most, and deliveries take at most a tenth of the loop's time (see _flush)
        self._lock = threading.Lock()
        self._latest: list[ServiceURL] | None = None
        self._posted = False
        self._not_before = 0.0

    def matches(self, url: ServiceURL) -> bool:
        """Whether ``url`` is a provider of what this subscription follows."""
        return url.matches(self.interface, self.group, self.version)

    def offer(self, urls: Iterable[ServiceURL]) -> None:
        """From any thread: the providers are now ``urls`` (those that match are kept).
        Offers that arrive faster than the subscriber's loop takes them replace each
        other: only the latest is delivered."""
        if self._loop is None:
            self._deliver(frozenset(u for u in urls if self.matches(u)))
            return
        latest = urls if isinstance(urls, list) else list(urls)
        with self._lock:
            self._latest = latest
            if self._posted:
                return
            self._posted = True
        try:
            inbox(self._loop).post(self._flush)
        except ChannelClosed:  # the subscriber's loop is gone: nobody to tell
            self.closed = True

    def _flush(self) -> None:
        # on the loop; a delivery this soon after a costly one waits its turn
        loop = self._loop
        assert loop is not None
        if loop.time() < self._not_before:
            loop.call_at(self._not_before, self._flush_now)
        else:
            self._flush_now()

    def _flush_now(self) -> None:
        with self._lock:
            urls, self._latest = self._latest, None
            self._posted = False
        if urls is None:
            return
        started = time.perf_counter()
        self._deliver(frozenset(u for u in urls if self.matches(u)))
        # the next delivery waits nine times what this one cost (listener included):
        # nothing for a few providers, a fraction of a second for ten thousand
        assert self._loop is not None
        self._not_before = self._loop.time() + 9 * (time.perf_counter() - started)

    def _deliver(self, providers: frozenset[ServiceURL]) -> None:
        if self.closed or providers == self.providers:
            return
        self.providers = providers
        if self._listener is not None:
            try:
                self._listener(providers)
            except Exception:  # it must not stop the inbox (or kazoo's watch) it runs in
                logger.exception("the listener of %s's providers raised", self.interface)

    def close(self) -> None:
        """Stop following changes."""
        self.closed = True


class Registry(Protocol):
    """What providers register in and consumers subscribe to."""

    def register(self, url: ServiceURL) -> None:
        """Announce ``url`` (a provider's or a consumer's) until unregistered or closed."""

    def unregister(self, url: ServiceURL) -> None:
        """Withdraw ``url``; nothing happens if it is not registered."""

    def subscribe(
        self,
        interface: str,
        listener: Listener | None = None,
        *,
        group: str = "",
        version: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        """Follow the providers of (interface, group, version): the subscription holds
        the current set, and ``listener`` hears of each change (on ``loop`` if given)."""
        ...

    def close(self) -> None:
        """Withdraw everything registered through this registry and stop following."""


# pragma: no mutate end


class StaticRegistry:
    """A fixed list of provider addresses (``"h1:p1,h2:p2"``, ``static://`` optional):
    every interface is served by all of them, with Dubbo's default weight. Registering
    only records the URL, as nobody else reads it."""

    def __init__(self, addresses: str | Iterable[str]) -> None:
        if isinstance(addresses, str):
            text = addresses.removeprefix(STATIC_SCHEME)
            addresses = text.split(",")
        self.addresses = tuple(a.strip() for a in addresses if a.strip())
        if not self.addresses:
            raise ValueError("a static registry needs at least one host:port")
        self._hosts = tuple(_split_address(a) for a in self.addresses)
        self.registered: set[ServiceURL] = set()

    def register(self, url: ServiceURL) -> None:
        self.registered.add(url)

    def unregister(self, url: ServiceURL) -> None:
        self.registered.discard(url)

    def subscribe(
        self,
        interface: str,
        listener: Listener | None = None,
        *,
        group: str = "",
        version: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        # the list says nothing of groups and versions: the consumer's own are assumed
        providers = frozenset(
            ServiceURL(interface, host, port, group=group, version=version)
            for host, port in self._hosts
        )
        return Subscription(interface, group, version, listener, loop, providers)

    def close(self) -> None:
        self.registered.clear()


# pragma: no mutate start -- the static list's addresses (docs/testing.md)
def _split_address(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"a static registry address must be host:port, not {address!r}")
    return host.strip("[]"), int(port)


# pragma: no mutate end
