"""The consumer: one Connect stream per provider address, references that call through it,
choosing a provider per call when there are several (a list or a registry).

:class:`AsyncClient` is the asyncio core; :class:`Client` gives sync code the same API
and holds no logic of its own: it runs an :class:`AsyncClient` on a background loop
thread and waits for the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import heapq
import logging
import random
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from backchannel.cluster.backoff import Backoff
from backchannel.cluster.loadbalance import LeastActiveLoadBalance, LoadBalance, NoProvider
from backchannel.cluster.providers import (
    ConsumerSide,
    LinkSettings,
    ProviderLink,
    Subscription,
    SubscriptionKey,
)
from backchannel.cluster.reference import Proxy, Reference
from backchannel.cluster.registry import (
    ZOOKEEPER_SCHEME,
    Registry,
    ServiceURL,
    StaticRegistry,
    open_registry,
    reachable_host,
)
from backchannel.cluster.registry import Subscription as RegistrySubscription
from backchannel.errors import (
    ChannelClosed,
    CredentialsNotSent,
    DeadlineExceeded,
    ShuttingDown,
    StreamBroken,
    TransportError,
    UnknownCallback,
)
from backchannel.rpc.callbacks import ExportedCallback, parent_in
from backchannel.rpc.interface import Method, MethodSpec
from backchannel.rpc.notify import HookPool, MethodHooks, wrap_async, wrap_sync
from backchannel.settings import DEFAULT_TIMEOUT, Keepalive, Limits
from backchannel.transport.auth import bearer_metadata, token_refusal
from backchannel.transport.handoff import run_in_pool
from backchannel.transport.pools import CallPools
from backchannel.transport.portal import LoopThread, wait_on_loop
from backchannel.transport.session import CURRENT_CALL, Deferred, Session
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.text import wire_text

if TYPE_CHECKING:
    import grpc

logger = logging.getLogger("backchannel")

T = TypeVar("T")

# errors a call gets when the provider refused it before looking at its arguments (the
# stream's own refusals), so it did not take the callbacks the call carried; the consumer
# drops them and tells the provider (the provider itself sends a Release for each
# callback it refuses after reading the arguments)
_REFUSED_UNREAD = frozenset({"backchannel.RemoteProtocolError", "backchannel.ShuttingDown"})
# ... and these too when the provider did not announce the method in its handshake
_NOT_FOUND = frozenset({"backchannel.ServiceNotFound", "backchannel.MethodNotFound"})

CurrentCall = tuple[Session, int] | None
ServiceKey = tuple[str, str, str]


def _identity(args: tuple[Any, ...]) -> tuple[int, ...]:
    """What makes two subscriptions the same: the very same argument objects."""
    return tuple(id(arg) for arg in args)


class _NotSent(Exception):
    """A call that never reached a provider (no stream, refused at connect, refused
    unread by a provider going away): it may always be sent elsewhere."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _first_failure(outcomes: list[Any]) -> BaseException | None:
    """The first error among a broadcast's outcomes (what a call not sent failed with)."""
    for outcome in outcomes:
        if isinstance(outcome, _NotSent):
            return outcome.error
        if isinstance(outcome, BaseException):
            return outcome
    return None


async def _all_done(futures: Iterable[asyncio.Future[Any]], timeout: float | None) -> None:
    """Wait until every one of ``futures`` is done, or ``timeout`` passes: what
    ``asyncio.wait`` does, without copying the caller's context for each future (a
    broadcast waits on a thousand attempts, each call of it: those copies, held while it
    waits, were thousands of objects for the garbage collector to walk)."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    left = len(pending)

    def one_done(_future: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if not left and not waiter.done():
            waiter.set_result(None)

    context = contextvars.Context()  # runs no caller code: an empty context will do
    for future in pending:
        future.add_done_callback(one_done, context=context)
    timer = None if timeout is None else loop.call_later(timeout, _release, waiter)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for future in pending:
            future.remove_done_callback(one_done)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _is_cluster(address: str | Registry) -> bool:
    if not isinstance(address, str):
        return True
    return "," in address or address.startswith((ZOOKEEPER_SCHEME, "static://"))


class _Directory:
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


class _Failover:
    """Where a call that could not be sent goes next, and what it tried.

    Providers not tried yet, at random, best first by tier: 0, those whose stream is
    open; 1, those with none that may be connected to; 2, those whose stream is being
    opened. Never those backing off after a failed attempt, which would fail the call at
    once. Each tier is listed once per round, when the one before is used up; each pick
    then costs O(1). A provider whose stream was still being opened when the call
    stopped waiting for it (the hedge) is kept in :attr:`connecting`: once the others
    are used up the call waits for the first of those streams to open."""

    def __init__(self, client: AsyncClient, directory: _Directory) -> None:
        self._client = client
        self._directory = directory
        self.tried: set[str] = set()
        self.unreachable = 0
        #: the providers the call stopped waiting for while their stream was being opened
        self.connecting: list[ProviderLink] = []
        #: the last error of a provider not sent to: a refused token only if nothing else
        self.error: BaseException | None = None
        self._pool: list[str] | None = None
        self._tier = 0

    def unsent(self, link: ProviderLink, error: BaseException) -> BaseException:
        """The call could not be sent to ``link``; the error the call may end with."""
        self.tried.add(link.address)
        if link.connecting:  # only the call gave up waiting: the stream may open yet
            self.connecting.append(link)
        else:
            self.unreachable += 1
        if self.error is None or not isinstance(error, CredentialsNotSent):
            self.error = error
        return self.error

    def restart(self) -> None:
        """A new round (a retry): the tiers are listed again."""
        self._pool, self._tier = None, 0
        self.connecting.clear()

    def next(self) -> ProviderLink | None:
        """A provider to try, taken out of the best tier left; None when none is left."""
        while self._fill():
            link = self._pick()
            if link is not None:
                return link
        return None

    def more(self) -> bool:
        """Whether another provider may take the call after the one just picked."""
        return self._fill() or bool(self.connecting)

    def _fill(self) -> bool:
        """Whether a tier is left with providers in it (listing the next when needed)."""
        while self._tier < 3:
            if self._pool is None:
                self._pool = self._untried(self._tier)
            if self._pool:
                return True
            self._pool, self._tier = None, self._tier + 1
        return False

    def _untried(self, tier: int) -> list[str]:
        links = self._client._links
        tried = self.tried
        untried = [url.address for url in self._directory.urls if url.address not in tried]
        if tier == 0:
            return [a for a in untried if a in links and _open(links[a])]
        if tier == 1:
            return [
                a for a in untried if a not in links or (links[a].available and not _open(links[a]))
            ]
        return [a for a in untried if a in links and links[a].connecting]

    def _pick(self) -> ProviderLink | None:
        """A provider of the pool at random, taken out of it; None when the pool held
        none still listed and worth trying."""
        pool = self._pool
        assert pool is not None
        links = self._client._links
        while pool:
            index = random.randrange(len(pool))
            address = pool[index]
            pool[index] = pool[-1]
            pool.pop()
            if address in self.tried or address not in self._directory.addresses:
                continue
            link = links.get(address)
            if link is None or link.available or link.connecting:
                return self._client._link(address)
        return None

    async def first_opened(self, deadline: float | None) -> ProviderLink | None:
        """The first of :attr:`connecting` whose stream opens before ``deadline``, taken
        out of them; None when every attempt failed or the time ran out. It waits on
        the links' own attempts, shared with other calls, and cancels none."""
        waiting = self.connecting
        while waiting:
            for link in waiting:
                if _open(link):
                    waiting.remove(link)
                    return link
            # attempts already running (never a new one: ensure_session checks the token)
            attempts = [link.attempt() for link in waiting if link.connecting]
            if not attempts:
                waiting.clear()
                return None
            done, _ = await asyncio.wait(
                attempts, timeout=_left(deadline), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return None
            for attempt in done:
                failed = None if attempt.cancelled() else attempt.exception()
                if failed is not None:
                    self.unreachable += 1
                    self.error = failed
            # the links of the finished attempts are now open or backing off
            waiting[:] = [link for link in waiting if link.connecting or _open(link)]
        return None


class AsyncClient:
    """An asyncio consumer of the provider at ``address``, or of a cluster.

    ::

        async with AsyncClient("127.0.0.1:50051") as client:
            demo = client.reference(IDemoService, group="cn", version="1.0.0")
            person = await demo.get(2)

    ``address`` is one ``host:port``, a static list (``"h1:p1,h2:p2"`` or
    ``static://h1:p1,h2:p2``), a registry address (``zookeeper://host:port``) or a
    :class:`~backchannel.cluster.registry.Registry`. With a list or a registry, each call picks
    one provider by its reference's ``loadbalance`` and meets failures as its
    ``cluster`` mode says (docs/cluster.md).

    One Connect stream per provider is opened on the first call it is chosen for, and
    every call to it shares that stream; when it breaks, the next call opens a new
    one. Sync listener methods run in a thread pool of ``max_workers`` threads, ``async
    def`` ones on the loop; a listener call nested in a call this client waits for runs
    at once, on up to ``max_reentrant_workers`` extra threads when the pool is full
    (docs/callbacks.md).

    ``token`` (sent as ``authorization: Bearer <token>``) and any ``authorization`` entry
    of ``metadata`` go to a provider only over TLS (``credentials=``) or to a loopback
    address, unless ``send_token_over_plaintext=True``; any other address is refused with
    :class:`~backchannel.errors.CredentialsNotSent`, at once for a single address, per
    call for a list or a registry (docs/cluster.md, *Where the token goes*).
    """

    def __init__(
        self,
        address: str | Registry,
        *,
        application: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        errors: Iterable[type[BaseException]] = (),
        max_workers: int = 32,
        max_reentrant_workers: int = 256,
        limits: Limits = Limits(),
        keepalive: Keepalive | None = Keepalive(),
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        send_token_over_plaintext: bool = False,
    ) -> None:
        if isinstance(address, str) and ":" not in address:
            raise ValueError(
                f"address must be 'host:port', 'h1:p1,h2:p2' or a registry "
                f"('zookeeper://host:port'), got {address!r}"
            )
        if not isinstance(address, str) and not hasattr(address, "subscribe"):
            raise ValueError(f"address must be a str or a Registry, got {address!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.address = address if isinstance(address, str) else repr(address)
        #: the address as error messages name it: a list of a thousand is not repeated
        self._where = _shortened(self.address)
        self.timeout = timeout
        self._application = application
        self._connect_timeout = connect_timeout
        self._error_types = codec.ErrorTypes(errors)
        self._pools = CallPools(
            max_workers, max_reentrant_workers, role="callback", owners="Client or AsyncClient"
        )
        self._settings = LinkSettings(
            application=application,
            connect_timeout=connect_timeout,
            limits=limits,
            keepalive=keepalive,
            credentials=credentials,
            metadata=tuple(metadata) + (bearer_metadata(token) if token else ()),
            error_types=self._error_types,
            pools=self._pools,
            send_token_over_plaintext=send_token_over_plaintext,
        )
        self._closed = False
        #: one link per provider address, made when first chosen
        self._links: dict[str, ProviderLink] = {}
        #: a plain address: its one link (and the fast paths that go with it)
        self._single: ProviderLink | None = None
        #: a list or a registry: what to subscribe to, opened on the first call
        self._registry_spec: str | Registry | None = None
        self._registry: Registry | None = None
        self._static: StaticRegistry | None = None
        self._directories: dict[ServiceKey, _Directory] = {}
        self._consumer_urls: list[ServiceURL] = []
        if not _is_cluster(address):
            assert isinstance(address, str)
            if self._settings.token_refused(address):  # known now: say so now
                raise CredentialsNotSent(token_refusal([address]))
            self._single = self._link(address)
        elif isinstance(address, str) and not address.startswith(ZOOKEEPER_SCHEME):
            # a static list: no server, checked now
            registry = open_registry(address)
            assert isinstance(registry, StaticRegistry)
            self._static = registry
        else:
            self._registry_spec = address
        # resubscribe=True calls whose stream ended: replayed, in order, on a live provider
        self._orphans: dict[SubscriptionKey, Subscription] = {}
        self._resubscriber: asyncio.Task[None] | None = None
        #: streams being closed because their provider is no longer registered
        self._retiring: set[asyncio.Task[None]] = set()
        self._hooks = HookPool(max_workers)  # plain event-notify hooks run here

    @property
    def _session(self) -> Session | None:
        """The stream of a single-address client (None for a cluster)."""
        return self._single.session if self._single is not None else None

    def _link(self, address: str) -> ProviderLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = ProviderLink(
                address, self._settings, self._link_ended, Backoff()
            )
        return link

    def register_error(self, cls: type[BaseException]) -> None:
        """Receive ``cls`` as itself (not as RemoteError) when the provider raises it."""
        self._error_types.register(cls)

    def reference(
        self,
        interface: type[T],
        *,
        group: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        methods: Sequence[Method] = (),
        cluster: str = "failover",
        loadbalance: str | LoadBalance = "random",
        forks: int = 2,
    ) -> T:
        """A proxy whose methods are coroutines calling the provider's ``interface``.

        A method with ``Method(..., async_=True)`` returns a running Task instead; one with
        event-notify hooks runs them around each call (``async def`` hooks are awaited,
        plain ones run in a thread pool). A bad hook is a TypeError here. ``cluster``,
        ``loadbalance`` and ``forks`` matter when there is more than one provider
        (docs/cluster.md).
        """
        ref = self._reference(
            interface, group, version, timeout, methods, cluster, loadbalance, forks
        )
        return Proxy(ref, self._invoke_coroutine, self._notify)  # type: ignore[return-value]

    def _reference(
        self,
        interface: type,
        group: str | None,
        version: str | None,
        timeout: float | None,
        methods: Sequence[Method],
        cluster: str,
        loadbalance: str | LoadBalance,
        forks: int,
    ) -> Reference:
        if loadbalance == "leastactive":  # counted by this consumer, per provider address
            loadbalance = LeastActiveLoadBalance(lambda url: self._link(url.address).active)
        return Reference(
            interface,
            group,
            version,
            self.timeout if timeout is None else timeout,
            methods,
            cluster=cluster,
            loadbalance=loadbalance,
            forks=forks,
        )

    def _notify(self, ref: Reference, method: MethodSpec, hooks: MethodHooks) -> Any:
        def invoke(args: tuple[Any, ...]) -> Any:
            return self.invoke(ref, method, args, {}, CURRENT_CALL.get())

        return wrap_async(hooks, method, invoke, self._hooks)

    def _invoke_coroutine(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return self.invoke(ref, method, args, kwargs, CURRENT_CALL.get())

    # ------------------------------------------------------------ choosing

    async def _directory(
        self, ref: Reference, deadline: float | None = None, method: MethodSpec | None = None
    ) -> _Directory:
        """The providers of the reference's export, subscribed to on first use. A call
        waits for the subscription until its ``deadline`` at most (DeadlineExceeded);
        the subscription goes on, for the calls after it."""
        directory = self._directories.get(ref.key)
        if directory is not None and directory.ready:
            return directory
        if self._closed:
            raise ChannelClosed(f"the client for {self._where} is closed")
        if directory is None:
            directory = self._directories[ref.key] = _Directory(ref.key)
        if self._single is not None:
            directory.update([_fixed_url(ref, self._single.address)])
            return directory
        if self._static is not None:
            directory.update(self._static.subscribe(ref.spec.name).providers)
            return directory
        discovery = directory.discovery
        if discovery is None:
            loop = asyncio.get_running_loop()
            discovery = directory.discovery = asyncio.ensure_future(
                asyncio.to_thread(self._subscribe, ref, directory, loop)
            )
            discovery.add_done_callback(lambda done: _discovered(directory, done))
        try:
            await asyncio.wait_for(asyncio.shield(discovery), _left(deadline))
        except TimeoutError:
            assert method is not None  # only a call has a deadline
            raise DeadlineExceeded(
                f"{method.qualname}() did not finish within its "
                f"{ref.timeouts[method.name]} s timeout: still subscribing to the "
                f"providers of {_label(ref.key)} in {self._where}"
            ) from None
        return directory

    def _subscribe(
        self, ref: Reference, directory: _Directory, loop: asyncio.AbstractEventLoop
    ) -> None:
        # in a thread: opening ZooKeeper and subscribing block for round trips
        if self._registry is None:
            spec = self._registry_spec
            self._registry = open_registry(spec) if isinstance(spec, str) else spec
        registry = self._registry
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
            logger.info("providers of %s: %s", name, _changes(before, directory.addresses))
            self._retire_unlisted()

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
        self._consumer_urls.append(consumer)

    def _choose(
        self,
        ref: Reference,
        directory: _Directory,
        positional: tuple[Any, ...],
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> ProviderLink:
        """One provider for a call: among the available ones not tried yet if any, else
        those not tried yet whose stream is being opened, else any not tried yet, else
        any (all backing off: one may be back)."""
        if self._single is not None:
            return self._single
        urls = directory.urls
        if len(urls) == 1:
            return self._link(urls[0].address)
        if not urls:
            raise NoProvider(
                f"no provider of {_label(ref.key)} in {self._where} (none registered, or all gone)"
            )
        links = self._links
        if not exclude:  # the usual case: every stream open and usable, choose among all
            for url in urls:
                session = links[url.address].session if url.address in links else None
                if session is None or not session.usable:
                    break
            else:
                return self._link(ref.balance.select(urls, positional).address)
        candidates = [
            url
            for url in urls
            if url.address not in exclude
            and (url.address not in links or links[url.address].available)
        ]
        if len(candidates) == len(urls):
            chosen = ref.balance.select(urls, positional)  # the strategy's cached tuple
        else:
            if not candidates:
                untried = [u for u in urls if u.address not in exclude]
                candidates = [
                    u for u in untried if u.address in links and links[u.address].connecting
                ]
                # one the token may go to fails with its own error, which says more
                sendable = [
                    u
                    for u in untried
                    if u.address not in links or not links[u.address].token_refused
                ]
                candidates = candidates or sendable or untried or list(urls)
            chosen = ref.balance.select(tuple(candidates), positional)
        return self._link(chosen.address)

    def _retire_unlisted(self) -> None:
        """On the loop: close the stream of each provider no directory lists any more
        (its znodes are gone, its process may be alive), once its running calls are done."""
        listed = {url.address for d in self._directories.values() for url in d.urls}
        for address, link in list(self._links.items()):
            link.unlisted = address not in listed
            if link.unlisted:
                self._retire_if_idle(link)

    def _retire_if_idle(self, link: ProviderLink) -> None:
        """Close an unlisted link that has no call in flight, replaying its resubscribe
        calls elsewhere. One whose stream carries other callbacks is kept: its provider
        may still call them, and nothing would bring them back."""
        if self._closed or link.active or self._links.get(link.address) is not link:
            return
        side = link.side
        if side is not None and len(side.callbacks) > _replayable(link, side):
            return
        del self._links[link.address]
        logger.info("closing the stream to %s: it is no longer registered", link.address)
        if link.subscriptions:
            self._orphans.update(link.subscriptions)
            link.subscriptions = {}
            self._kick_resubscriber()
        closing = asyncio.get_running_loop().create_task(link.close())
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------- calling

    async def invoke(
        self,
        ref: Reference,
        method: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        current: CurrentCall = None,
    ) -> Any:
        """Make one call through a reference (what proxy methods do).

        ``current`` is the incoming callback call the caller runs in, if any: the call
        carries it as its parent so the provider's nested callbacks run at once. A call
        that could not be sent at all goes to another provider when there is one. A
        method declared with ``retries=N`` (``failover``, the default mode) is re-sent,
        on another provider when there is one, when its stream breaks or its provider
        goes away; any other call in flight then fails with the connection error.

        The method's timeout is the whole call's: subscribing, connecting, failing over
        and re-sending all come out of it, and when it is spent the call raises
        DeadlineExceeded (docs/cluster.md).
        """
        positional = method.bind(args, kwargs)
        timeout = ref.timeouts[method.name]
        deadline = None if timeout is None else time.monotonic() + timeout
        directory = self._directories.get(ref.key)  # known already: no coroutine to await
        if directory is None or not directory.ready:
            directory = await self._directory(ref, deadline, method)
            timeout = _left(deadline)
        mode = ref.clusters[method.name]
        if mode == "broadcast":
            return await self._broadcast(ref, method, positional, current, directory, deadline)
        if mode == "forking":
            return await self._forking(ref, method, positional, current, directory, deadline)
        attempts = 1 + (ref.retries.get(method.name, 0) if mode == "failover" else 0)
        link = self._choose(ref, directory, positional)
        # another provider may take the call: a stream being opened gets half the time
        hedge = len(directory.urls) > 1
        failover: _Failover | None = None  # made on the first failure: none on the usual path
        attempt = 1
        while True:
            try:
                return await self._invoke_on(
                    link, ref, method, positional, current, deadline, timeout, hedge
                )
            except _NotSent as unsent:
                failover = failover or _Failover(self, directory)
                error = failover.unsent(link, unsent.error)
                following = failover.next()
                hedge = failover.more()
                if following is None and failover.connecting:  # none left but those
                    following = await failover.first_opened(deadline)
                    hedge = False
                    error = failover.error or error
            except StreamBroken as exc:  # it may have reached the provider
                failover = failover or _Failover(self, directory)
                failover.tried.add(link.address)
                error = exc
                following = None
            except DeadlineExceeded as exc:
                if failover is None and exc.__cause__ is not _CONNECTING:
                    if mode == "failsafe":  # one attempt, sent: its own error says it all
                        return _ignored(method, exc)
                    raise
                failover = failover or _Failover(self, directory)
                failover.tried.add(link.address)
                return self._out_of_time(ref, method, mode, failover, exc)
            except Exception as exc:
                if mode == "failsafe":
                    return _ignored(method, exc)
                raise
            timeout = _left(deadline)
            if timeout is not None and timeout <= 0:
                return self._out_of_time(ref, method, mode, failover, error)
            if following is None:  # every provider tried: that was one attempt
                if attempt >= attempts:
                    error = self._with_refusals(directory, error)
                    if mode == "failsafe":
                        return _ignored(method, error)
                    raise error
                attempt += 1
                failover.restart()
                following = self._choose(ref, directory, positional, failover.tried)
                hedge = len(directory.urls) > 1
                logger.info(
                    "%s() failed (%s); retry %d of %d",
                    method.qualname,
                    wire_text(error),
                    attempt - 1,
                    attempts - 1,
                )
            elif len(failover.tried) == 1:  # one line per call, not one per provider tried
                logger.info(
                    "%s() not sent to %s (%s); failing over",
                    method.qualname,
                    wire_text(link.address),
                    wire_text(error),
                )
            link = following

    def _with_refusals(self, directory: _Directory, error: BaseException) -> BaseException:
        """The error of a call no provider is left to try, saying which listed providers
        the token may not go to (their links are not chosen once they exist): all of
        them, CredentialsNotSent; some, how many more (at most 10 named)."""
        links = self._links
        settings = self._settings
        refused = [
            address
            for address in directory.addresses
            if (
                links[address].token_refused
                if address in links
                else settings.token_refused(address)
            )
        ]
        if not refused:
            return error
        named = [wire_text(address) for address in heapq.nsmallest(_NAMED_IN_LOG, refused)]
        if len(refused) > len(named):
            named.append(f"and {len(refused) - len(named)} more")
        if len(refused) == len(directory.addresses) or isinstance(error, CredentialsNotSent):
            return CredentialsNotSent(token_refusal(named))
        # the unsent errors (TransportError, ShuttingDown) take a message and nothing else
        return type(error)(f"{error}; {len(refused)} more refused: {token_refusal(named)}")

    def _out_of_time(
        self,
        ref: Reference,
        method: MethodSpec,
        mode: str,
        failover: _Failover,
        last: BaseException,
    ) -> Any:
        """A call whose time ran out: DeadlineExceeded saying where it went (failsafe:
        logged, and None)."""
        connecting = len(failover.connecting)
        error = DeadlineExceeded(
            f"{method.qualname}() did not finish within its {ref.timeouts[method.name]} s "
            f"timeout: {len(failover.tried)} of the {len(self._directories[ref.key].urls)} "
            f"providers of {_label(ref.key)} tried, {failover.unreachable} unreachable"
            + (f", {connecting} still connecting" if connecting else "")
            + f"; last: {wire_text(last)}"
        )
        if mode == "failsafe":
            return _ignored(method, error)
        raise error from last

    async def _invoke_on(
        self,
        link: ProviderLink,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
        deadline: float | None,
        timeout: float | None,
        hedge: bool = False,
    ) -> Any:
        """One attempt on one provider; :class:`_NotSent` when it never reached it.

        ``timeout`` is what the call may wait once sent on a stream that is open; opening
        one comes out of the time left before ``deadline``, and with ``hedge`` (another
        provider may take the call) it waits for that at most half the time left: the
        attempt goes on without it, and the call is not sent."""
        link.active += 1  # from now: a call opening the stream holds the link too
        try:
            session = link.session
            if session is None or not session.usable:
                if self._closed:
                    raise ChannelClosed(f"the client for {self._where} is closed")
                left = _left(deadline)
                patience = left / 2 if hedge and left is not None else left
                try:
                    session = await link.ensure_session(
                        patience, wait_backoff=self._single is not None
                    )
                except ChannelClosed:
                    raise
                except TransportError as exc:
                    raise _NotSent(exc) from None
                except TimeoutError:
                    if patience != left:
                        raise _NotSent(
                            StreamBroken(
                                f"no stream to {link.address} within {patience:.3f} s "
                                "(half the time left; still connecting)"
                            )
                        ) from None
                    raise DeadlineExceeded(
                        f"{method.qualname}() did not finish within its "
                        f"{ref.timeouts[method.name]} s timeout: no stream to {link.address} "
                        "yet"
                    ) from _CONNECTING
                timeout = _left(deadline)
            call, future = self.start(session, ref, method, positional, current, timeout)
            link.sent += 1
            try:
                result = await future
            except DeadlineExceeded as exc:
                whole = ref.timeouts[method.name]
                if timeout == whole:
                    raise
                # the stream had only what was left: the caller set the whole timeout
                raise DeadlineExceeded(
                    f"{call.service}.{call.method} did not finish within {whole} s "
                    f"({exc} once sent to {link.address})"
                ) from exc
            except ShuttingDown as exc:  # refused unread: it never ran
                raise _NotSent(exc) from None
            except StreamBroken as exc:
                if not call.id:  # it was waiting for a slot: never sent
                    raise _NotSent(exc) from None
                raise
            except asyncio.CancelledError:
                if call.id and future.cancelled():  # sent, and not answered yet
                    session.abandon(call.id, "cancelled by the caller")
                raise
        finally:
            link.active -= 1
            if link.unlisted and not link.active:
                self._retire_if_idle(link)
        if method.name in ref.resubscribe:
            key = (id(ref), method.name, _identity(positional))
            subscription = (ref, method, positional)
            self._orphans.pop(key, None)
            if link.session is session and session.cause is None:
                link.subscriptions[key] = subscription
            else:  # its stream ended meanwhile: replay it like the others
                self._orphans[key] = subscription
                self._kick_resubscriber()
        return result

    async def _forking(
        self,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
        directory: _Directory,
        deadline: float | None,
    ) -> Any:
        """Dubbo's ``forking``: the call goes to ``forks`` providers at once, the first
        success is the result; it fails only when every one of them failed."""
        chosen: list[ProviderLink] = []
        for _ in range(min(ref.forks, len(directory.urls))):
            link = self._choose(ref, directory, positional, {c.address for c in chosen})
            if link in chosen:
                break
            chosen.append(link)
        timeout = _left(deadline)
        tasks = [
            asyncio.ensure_future(
                self._invoke_on(link, ref, method, positional, current, deadline, timeout)
            )
            for link in chosen
        ]
        for task in tasks:  # the losers run on; their outcomes are not wanted
            task.add_done_callback(_consume)
        error: BaseException | None = None
        for next_done in asyncio.as_completed(tasks):
            try:
                return await next_done
            except _NotSent as unsent:
                error = unsent.error
            except Exception as exc:
                error = exc
        if error is None:  # no provider at all
            raise NoProvider(f"no provider of {_label(ref.key)} in {self._where}")
        raise error

    async def _broadcast(
        self,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
        directory: _Directory,
        deadline: float | None,
    ) -> Any:
        """Dubbo's ``broadcast``: the call goes to every provider; it raises the first
        failure if any failed, else returns the last provider's result."""
        outcomes = await self._broadcast_outcomes(
            ref, method, positional, current, directory, deadline
        )
        failure = _first_failure(outcomes)
        if failure is None:
            return outcomes[-1]
        # the error's traceback holds this frame: it must not hold every provider's
        # error and attempt (a reference cycle, kept as long as the caller keeps the one)
        outcomes.clear()
        try:  # shared by the calls that waited on one attempt: no traceback to grow
            raise failure.with_traceback(None)
        finally:
            del failure

    async def _broadcast_outcomes(
        self,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
        directory: _Directory,
        deadline: float | None,
    ) -> list[Any]:
        """Each provider's outcome of a broadcast call: its result, or its error.

        The call goes at once to every provider whose stream is open; for the others it
        waits once on their shared attempts to open one (not a task each: there may be
        thousands, most of them unreachable), and goes to those that opened while time
        is left."""
        if not directory.urls:
            raise NoProvider(f"no provider of {_label(ref.key)} in {self._where}")
        links = [self._link(url.address) for url in directory.urls]
        outcomes: list[Any] = [None] * len(links)
        calls: dict[int, asyncio.Future[Any]] = {}
        try:
            attempts: dict[int, asyncio.Future[Session]] = {}
            for index, link in enumerate(links):
                if _open(link):
                    calls[index] = self._broadcast_to(
                        link, ref, method, positional, current, deadline
                    )
                    continue
                wait = link.backoff_left
                if wait:  # it would fail at once
                    outcomes[index] = link.backing_off(wait)
                elif self._closed:
                    raise ChannelClosed(f"the client for {self._where} is closed")
                else:
                    attempts[index] = link.attempt()
            if attempts:
                await _all_done(attempts.values(), _left(deadline))
            late: DeadlineExceeded | None = None
            for index, attempt in attempts.items():
                if attempt.done() and attempt.cancelled():
                    outcomes[index] = ChannelClosed(f"the client for {self._where} is closed")
                elif attempt.done() and attempt.exception() is not None:
                    outcomes[index] = attempt.exception()
                elif attempt.done() and (deadline is None or deadline > time.monotonic()):
                    calls[index] = self._broadcast_to(  # it opened the stream in time
                        links[index], ref, method, positional, current, deadline
                    )
                else:  # no stream yet, or no time left: a call sent now would only expire
                    late = late or DeadlineExceeded(
                        f"{method.qualname}() did not finish within its "
                        f"{ref.timeouts[method.name]} s timeout: no stream to some of the "
                        f"{len(links)} providers of {_label(ref.key)} yet (broadcast)"
                    )
                    outcomes[index] = late
            if calls:
                finished = await asyncio.gather(*calls.values(), return_exceptions=True)
                for index, outcome in zip(calls, finished, strict=True):
                    outcomes[index] = outcome
        except BaseException:  # cancelled, or the client closed: so do the calls sent
            for call in calls.values():
                if not call.cancel() and not call.cancelled():
                    call.exception()  # over already: retrieved, not logged as lost
            raise
        return outcomes

    def _broadcast_to(
        self,
        link: ProviderLink,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
        deadline: float | None,
    ) -> asyncio.Future[Any]:
        """One provider's call of a broadcast, with the time left, as a task."""
        return asyncio.ensure_future(
            self._invoke_on(link, ref, method, positional, current, deadline, _left(deadline))
        )

    def start(
        self,
        session: Session,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
        timeout: float | None,
    ) -> tuple[pb.Call, asyncio.Future[Any]]:
        """On the loop: encode and send one call on ``session``, to be answered within
        ``timeout``; return it and the future of its decoded outcome (the exception it
        raises, or its result)."""
        side: ConsumerSide = session.dispatcher  # type: ignore[assignment]
        key = ref.key
        service = side.services.get(key)
        info = side.methods.get((*key, method.name))
        call = pb.Call(
            service=ref.spec.name,
            group=ref.group,
            version=ref.version,
            method=method.name,
            one_way=info.one_way if info is not None else method.one_way,
        )
        fresh, removed = side.callbacks.encode_args(  # in place: no copy into the Call
            method, key, positional, info, service.callbacks if service else None, call.args
        )
        listeners = [entry.obj for entry in removed]  # a Release may clear entry.obj first

        def decode(result: pb.Result) -> Any:
            if result.HasField("error"):
                # what the provider refused or removed it says with Release frames, which
                # arrive before this Result; only refusals it sends without reading the
                # arguments are left to us, and we tell it, so both tables agree
                kind = result.error.type
                if fresh and (kind in _REFUSED_UNREAD or (info is None and kind in _NOT_FOUND)):
                    side.callbacks.drop(fresh, tell_peer=True)
                listeners.clear()
                raise codec.decode_error(result.error, self._error_types)
            self._removed(side, removed, listeners)
            listeners.clear()  # no strong reference left behind in this closure
            if not result.HasField("value"):
                return None
            what = f"the result of {method.qualname}()"
            if codec.is_bulk_value(result.value):  # off the loop the other calls share
                pool = self._pools.for_waiter(session)  # not behind a thread waiting for it
                return Deferred(run_in_pool(pool, lambda: codec.decode(result.value, what)))
            return codec.decode(result.value, what)

        parent = parent_in(session, current)
        try:
            future = session.start_call(call, timeout, parent, decode=decode)
        except BaseException:  # not sent (MessageTooLarge): nothing was exported
            side.callbacks.drop(fresh)
            raise
        if fresh:

            def unsent(done: asyncio.Future[Any]) -> None:
                if not call.id:  # expired or cancelled while queued for a slot
                    side.callbacks.drop(fresh)

            future.add_done_callback(unsent)
        return call, future

    # ----------------------------------------------------------- callbacks

    def _removed(
        self, side: ConsumerSide, entries: list[ExportedCallback], listeners: list[object]
    ) -> None:
        """Un-export what a remover call removed, and forget its subscriptions."""
        for listener in listeners:
            self._forget(listener)
        side.callbacks.drop(entries)

    def _forget(self, listener: object) -> None:
        """Drop the subscriptions that carry ``listener``: it is not to be replayed."""
        for table in (self._orphans, *(link.subscriptions for link in self._links.values())):
            for key, (_ref, _method, args) in list(table.items()):
                if any(arg is listener for arg in args):
                    del table[key]

    async def release(self, listener: object) -> None:
        """End a callback instance this client exported (Dubbo has no such thing), on
        every provider's stream it was passed on."""
        found = False
        for link in self._links.values():
            session, side = link.session, link.side
            entry = side.callbacks.find(listener) if side else None
            if session is None or side is None or entry is None:
                continue
            found = True
            side.callbacks.remove(entry)
            session.connection.send_release(entry.id)
            session.flush()
        if not found:
            raise UnknownCallback(
                f"{listener!r} is not a live callback on the stream to {self._where}"
            )
        self._forget(listener)

    @property
    def callback_count(self) -> int:
        """How many callback instances this client has exported on its current streams."""
        return sum(len(link.side.callbacks) for link in self._links.values() if link.side)

    def _link_ended(self, link: ProviderLink) -> None:
        """A provider's stream is gone: replay its subscriptions, in the background, on
        a live provider of the same export (the same one, once back, if it is the only
        one)."""
        if self._closed:
            return
        if link.subscriptions:
            self._orphans.update(link.subscriptions)
            link.subscriptions = {}
        self._kick_resubscriber()

    def _kick_resubscriber(self) -> None:
        if self._closed or not self._orphans:
            return
        if self._resubscriber is None or self._resubscriber.done():
            self._resubscriber = asyncio.get_running_loop().create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        """Make every orphaned resubscribe call again, in order, each on a provider
        chosen as for any call, until each one succeeded on a stream that is still
        open, or the client closes.

        A replay that fails for the connection's sake (no provider reachable, the stream
        breaks again, no answer in time, the provider is shutting down) is tried again
        after a backoff; one the provider refuses with any other error is logged and
        dropped (replaying it again would be refused again).
        """
        retry = Backoff()
        while not self._closed and self._orphans:
            key, (ref, method, args) = next(iter(self._orphans.items()))
            if any(
                key in link.subscriptions and link.session is not None and link.session.usable
                for link in self._links.values()
            ):  # made again meanwhile, by its caller (or broadcast to several)
                self._orphans.pop(key, None)
                continue
            try:
                timeout = ref.timeouts[method.name]
                deadline = None if timeout is None else time.monotonic() + timeout
                directory = await self._directory(ref, deadline, method)
                link = self._choose(ref, directory, args)
                await self._invoke_on(link, ref, method, args, None, deadline, _left(deadline))
            except (_NotSent, TransportError, ShuttingDown, TimeoutError, LookupError) as exc:
                error = exc.error if isinstance(exc, _NotSent) else exc
                logger.warning(
                    "resubscribing %s() failed: %s; trying again", method.qualname, wire_text(error)
                )
                retry.failed()
                await asyncio.sleep(retry.wait())
                continue
            except Exception as exc:
                logger.warning(
                    "resubscribing %s() was refused: %s; not replayed again",
                    method.qualname,
                    wire_text(exc),
                )
                self._orphans.pop(key, None)
                continue
            retry.succeeded()

    # ------------------------------------------------------------- closing

    async def close(self) -> None:
        """End every stream (half-close, then cancel) and channel, and the registry."""
        self._closed = True
        if self._resubscriber is not None:
            self._resubscriber.cancel()
        links = list(self._links.values())
        await asyncio.gather(*(link.close() for link in links), *self._retiring)
        # a subscription still being made (in a thread) is closed below once it is
        discoveries = [d.discovery for d in self._directories.values() if d.discovery]
        await asyncio.gather(*discoveries, return_exceptions=True)
        for directory in self._directories.values():
            if directory.subscription is not None:
                directory.subscription.close()
        registry, self._registry = self._registry, None
        if registry is not None:
            if isinstance(self._registry_spec, str):  # ours: closing removes our nodes
                await asyncio.to_thread(registry.close)
            else:
                urls, self._consumer_urls = self._consumer_urls, []
                for url in urls:
                    await asyncio.to_thread(registry.unregister, url)
        self._pools.shutdown()
        self._hooks.shutdown()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _replayable(link: ProviderLink, side: ConsumerSide) -> int:
    """How many of the stream's callback instances its resubscribe calls carry (those
    are made again elsewhere when it closes)."""
    carried = {
        id(arg)
        for _ref, _method, args in link.subscriptions.values()
        for arg in args
        if side.callbacks.find(arg) is not None
    }
    return len(carried)


#: the cause of the DeadlineExceeded of a call whose time ran out opening a stream
_CONNECTING = TimeoutError("opening a stream")


def _left(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (a time.monotonic() value; None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


def _discovered(directory: _Directory, discovery: asyncio.Future[None]) -> None:
    """A subscription that failed is made again by the next call."""
    if discovery.cancelled() or discovery.exception() is not None:
        directory.discovery = None


def _shortened(address: str, most: int = 200) -> str:
    """``address`` for a message: a long list is cut, saying how many it holds."""
    if len(address) <= most:
        return address
    return f"{address[:most]}... ({address.count(',') + 1} addresses)"


#: addresses a log line about a change of providers names, at most (each way)
_NAMED_IN_LOG = 10


def _changes(before: frozenset[str], after: frozenset[str]) -> str:
    """A change of providers in one bounded line: how many, and the first few that came
    and went (a registry may list thousands)."""
    parts = [f"{len(after)} listed"]
    for sign, addresses in (("+", after - before), ("-", before - after)):
        if addresses:
            named = heapq.nsmallest(_NAMED_IN_LOG, addresses)
            more = len(addresses) - len(named)
            line = " ".join(sign + address for address in named)
            parts.append(line + (f" (and {more} more)" if more else ""))
    return "; ".join(parts)


def _open(link: ProviderLink) -> bool:
    session = link.session
    return session is not None and session.usable


def _fixed_url(ref: Reference, address: str) -> ServiceURL:
    host, _, port = address.rpartition(":")
    return ServiceURL(ref.spec.name, host.strip("[]"), int(port) if port.isdigit() else 0)


def _label(key: ServiceKey) -> str:
    name, group, version = key
    return name + (f" group={group}" if group else "") + (f" version={version}" if version else "")


def _ignored(method: MethodSpec, error: BaseException) -> None:
    """Dubbo's ``failsafe``: the failure is logged, the caller gets None."""
    logger.warning("%s() failed, ignored (failsafe): %s", method.qualname, wire_text(error))
    return None


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Client:
    """A sync consumer of the provider at ``address``; same API as :class:`AsyncClient`.

    ::

        with Client("127.0.0.1:50051") as client:
            demo = client.reference(IDemoService, group="cn", version="1.0.0")
            person = demo.get(2)

    Calls may be made from any number of threads; they share one stream.
    """

    def __init__(
        self,
        address: str | Registry,
        *,
        application: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        errors: Iterable[type[BaseException]] = (),
        max_workers: int = 32,
        max_reentrant_workers: int = 256,
        limits: Limits = Limits(),
        keepalive: Keepalive | None = Keepalive(),
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        send_token_over_plaintext: bool = False,
    ) -> None:
        self._core = AsyncClient(
            address,
            application=application,
            timeout=timeout,
            connect_timeout=connect_timeout,
            errors=errors,
            max_workers=max_workers,
            max_reentrant_workers=max_reentrant_workers,
            limits=limits,
            keepalive=keepalive,
            credentials=credentials,
            metadata=metadata,
            token=token,
            send_token_over_plaintext=send_token_over_plaintext,
        )
        self._portal = LoopThread(f"backchannel-client {self._core.address}")
        self._hooks = HookPool(max_workers)  # hooks of async_=True calls run here

    @property
    def address(self) -> str:
        """The provider address (or the list, or the registry) given."""
        return self._core.address

    @property
    def callback_count(self) -> int:
        """See :attr:`AsyncClient.callback_count`."""
        return self._core.callback_count

    def register_error(self, cls: type[BaseException]) -> None:
        """See :meth:`AsyncClient.register_error`."""
        self._core.register_error(cls)

    def reference(
        self,
        interface: type[T],
        *,
        group: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        methods: Sequence[Method] = (),
        cluster: str = "failover",
        loadbalance: str | LoadBalance = "random",
        forks: int = 2,
    ) -> T:
        """A proxy whose methods call the provider's ``interface`` and block for the result.

        A method with ``Method(..., async_=True)`` returns a ``concurrent.futures.Future``
        at once instead; one with event-notify hooks runs them around each call (in the
        calling thread, or in a thread pool for async_=True). A bad hook is a TypeError here.
        ``cluster``, ``loadbalance`` and ``forks``: see :meth:`AsyncClient.reference`.
        """
        ref = self._core._reference(
            interface, group, version, timeout, methods, cluster, loadbalance, forks
        )
        return Proxy(ref, self._invoke_blocking, self._notify)  # type: ignore[return-value]

    def _notify(self, ref: Reference, method: MethodSpec, hooks: MethodHooks) -> Any:
        def blocking(args: tuple[Any, ...]) -> Any:
            return self._invoke_blocking(ref, method, args, {})

        def start(args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
            return self._portal.submit(self._core.invoke(ref, method, args, {}, CURRENT_CALL.get()))

        return wrap_sync(hooks, method, blocking, start, self._hooks)

    def _invoke_blocking(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # the caller's context (a callback it runs in) is read here, in its own thread
        current = CURRENT_CALL.get()
        core = self._core
        session = core._session
        if (
            session is None
            or not session.usable
            or method.name in ref.retries
            or method.name in ref.resubscribe
            or ref.clusters[method.name] != "failover"
            or self._portal.in_loop_thread()
        ):
            return self._portal.run(core.invoke(ref, method, args, kwargs, current))
        # the common case, with no task on the loop: send there, wait here
        positional = method.bind(args, kwargs)
        timeout = ref.timeouts[method.name]

        def start() -> asyncio.Future[Any]:
            if not session.usable:  # it went away meanwhile: the full path reconnects
                return asyncio.ensure_future(core.invoke(ref, method, positional, {}, current))
            return core.start(session, ref, method, positional, current, timeout)[1]

        return wait_on_loop(self._portal.loop, start)

    def release(self, listener: object) -> None:
        """See :meth:`AsyncClient.release`."""
        self._portal.run(self._core.release(listener))

    def close(self) -> None:
        """End the streams and stop the background loop."""
        with contextlib.suppress(ChannelClosed):
            self._portal.run(self._core.close())
        self._portal.close()
        self._hooks.shutdown()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
