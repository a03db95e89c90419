"""The providers a consumer knows of each export it calls: one fixed address, a static
list, or a registry subscribed to on first use (Dubbo's directory)."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable

from backchannel.cluster.reference import Reference
from backchannel.cluster.registries import open_registry
from backchannel.cluster.registry import ZOOKEEPER_SCHEME, Registry, StaticRegistry
from backchannel.cluster.registry import Subscription as RegistrySubscription
from backchannel.cluster.service_url import ServiceURL, reachable_host
from backchannel.errors import ChannelClosed, DeadlineExceeded
from backchannel.rpc.interface import MethodSpec

logger = logging.getLogger("backchannel")

ServiceKey = tuple[str, str, str]

#: addresses a log line about a change of providers names, at most (each way)
NAMED_IN_LOG = 10


class Directory:
    """The providers of one (interface, group, version), as this consumer knows them."""

    def __init__(self, key: ServiceKey) -> None:
        self.key = key
        #: one URL per provider address, in address order (what strategies choose from)
        self.urls: tuple[ServiceURL, ...] = ()
        #: their addresses, to check a failover pick is still listed
        self.addresses: frozenset[str] = frozenset()
        self.ready = False
        self.subscription: RegistrySubscription | None = None
        #: the subscription being made (in a thread), shared by the calls that wait for it
        self.discovery: asyncio.Future[None] | None = None

    def update(self, urls: Iterable[ServiceURL]) -> None:
        """The providers are now ``urls``: one per address, the newest one kept (a
        restarted provider's old node may linger until its session expires)."""
        newest: dict[str, ServiceURL] = {}
        for url in urls:
            known = newest.get(url.address)
            if known is None or url.timestamp > known.timestamp:
                newest[url.address] = url
        self.urls = tuple(newest[address] for address in sorted(newest))
        self.addresses = frozenset(newest)
        self.ready = True


class Directories:
    """The directory of each export a consumer of ``address`` calls, and the registry
    they come from: its own (opened on the first call, closed with it) or one given."""

    def __init__(
        self,
        address: str | Registry,
        where: str,
        application: str,
        changed: Callable[[], None],
    ) -> None:
        self._where = where
        self._application = application
        #: called on the loop when a registry changed the providers of a directory
        self._changed = changed
        #: one per export, made on its first call (never replaced: callers keep it)
        self.by_key: dict[ServiceKey, Directory] = {}
        #: a plain address: the one provider of every export
        self.single_address: str | None = None
        #: a list or a registry: what to subscribe to, opened on the first call
        self.registry_spec: str | Registry | None = None
        self.registry: Registry | None = None
        self.static: StaticRegistry | None = None
        self.consumer_urls: list[ServiceURL] = []
        self.closed = False
        if not is_cluster(address):
            assert isinstance(address, str)
            self.single_address = address
        elif isinstance(address, str) and not address.startswith(ZOOKEEPER_SCHEME):
            # a static list: no server, checked now
            registry = open_registry(address)
            assert isinstance(registry, StaticRegistry)
            self.static = registry
        else:
            self.registry_spec = address

    async def get(
        self, ref: Reference, deadline: float | None = None, method: MethodSpec | None = None
    ) -> Directory:
        """The providers of the reference's export, subscribed to on first use. A call
        waits for the subscription until its ``deadline`` at most (DeadlineExceeded);
        the subscription goes on, for the calls after it."""
        directory = self.by_key.get(ref.key)
        if directory is not None and directory.ready:
            return directory
        if self.closed:
            raise ChannelClosed(f"the client for {self._where} is closed")
        if directory is None:
            directory = self.by_key[ref.key] = Directory(ref.key)
        if self.single_address is not None:
            directory.update([fixed_url(ref, self.single_address)])
            return directory
        if self.static is not None:
            directory.update(self.static.subscribe(ref.spec.name).providers)
            return directory
        discovery = directory.discovery
        if discovery is None:
            loop = asyncio.get_running_loop()
            discovery = directory.discovery = asyncio.ensure_future(
                asyncio.to_thread(self._subscribe, ref, directory, loop)
            )
            discovery.add_done_callback(lambda done: _discovered(directory, done))
        left = None if deadline is None else deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(discovery), left)
        except TimeoutError:
            assert method is not None  # only a call has a deadline
            raise DeadlineExceeded(
                f"{method.qualname}() did not finish within its "
                f"{ref.timeouts[method.name]} s timeout: still subscribing to the "
                f"providers of {label(ref.key)} in {self._where}"
            ) from None
        return directory

    def _subscribe(
        self, ref: Reference, directory: Directory, loop: asyncio.AbstractEventLoop
    ) -> None:
        # in a thread: opening ZooKeeper and subscribing block for round trips
        if self.registry is None:
            spec = self.registry_spec
            self.registry = open_registry(spec) if isinstance(spec, str) else spec
        registry = self.registry
        assert registry is not None
        name, group, version = ref.key

        def changed(providers: frozenset[ServiceURL]) -> None:  # on the loop
            if not providers and directory.urls:
                # Dubbo's empty protection: a ZooKeeper that came back without its data
                # lists nobody until the providers register again; calling the last ones
                # beats failing every call with NoProvider meanwhile
                logger.warning(
                    "the registry lists no provider of %s; keeping the last %d",
                    name,
                    len(directory.urls),
                )
                return
            before = directory.addresses
            directory.update(providers)
            logger.info("providers of %s: %s", name, changes(before, directory.addresses))
            self._changed()

        subscription = registry.subscribe(name, changed, group=group, version=version, loop=loop)
        directory.subscription = subscription
        directory.update(subscription.providers)
        consumer = ServiceURL.consumer(
            name,
            reachable_host(),
            application=self._application,
            group=group,
            version=version,
            methods=ref.methods,
        )
        registry.register(consumer)
        self.consumer_urls.append(consumer)

    def listed(self) -> set[str]:
        """The address of every provider some directory lists."""
        return {url.address for d in self.by_key.values() for url in d.urls}

    async def close(self) -> None:
        """End the subscriptions, and the registry if it is ours (else our nodes in it)."""
        self.closed = True
        # a subscription still being made (in a thread) is closed below once it is
        discoveries = [d.discovery for d in self.by_key.values() if d.discovery]
        await asyncio.gather(*discoveries, return_exceptions=True)
        for directory in self.by_key.values():
            if directory.subscription is not None:
                directory.subscription.close()
        registry, self.registry = self.registry, None
        if registry is not None:
            if isinstance(self.registry_spec, str):  # ours: closing removes our nodes
                await asyncio.to_thread(registry.close)
            else:
                urls, self.consumer_urls = self.consumer_urls, []
                for url in urls:
                    await asyncio.to_thread(registry.unregister, url)


def is_cluster(address: str | Registry) -> bool:
    """Whether ``address`` is a list or a registry (not one ``host:port``)."""
    if not isinstance(address, str):
        return True
    return "," in address or address.startswith((ZOOKEEPER_SCHEME, "static://"))


def _discovered(directory: Directory, discovery: asyncio.Future[None]) -> None:
    """A subscription that failed is made again by the next call."""
    if discovery.cancelled() or discovery.exception() is not None:
        directory.discovery = None


def changes(before: frozenset[str], after: frozenset[str]) -> str:
    """A change of providers in one bounded line: how many, and the first few that came
    and went (a registry may list thousands)."""
    parts = [f"{len(after)} listed"]
    for sign, addresses in (("+", after - before), ("-", before - after)):
        if addresses:
            named = heapq.nsmallest(NAMED_IN_LOG, addresses)
            more = len(addresses) - len(named)
            line = " ".join(sign + address for address in named)
            parts.append(line + (f" (and {more} more)" if more else ""))
    return "; ".join(parts)


def fixed_url(ref: Reference, address: str) -> ServiceURL:
    """The URL of the one provider of a plain address."""
    host, _, port = address.rpartition(":")
    return ServiceURL(ref.spec.name, host.strip("[]"), int(port) if port.isdigit() else 0)


def label(key: ServiceKey) -> str:
    """An export's key as messages name it."""
    name, group, version = key
    return name + (f" group={group}" if group else "") + (f" version={version}" if version else "")
