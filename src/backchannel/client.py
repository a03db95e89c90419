"""The consumer's facades: one Connect stream per provider address, references that call
through it, choosing a provider per call when there are several (a list or a registry).

:class:`AsyncClient` is the asyncio API over a :class:`~backchannel.cluster.consumer.Consumer`
(the links, directories and lifecycle, in cluster/); :class:`Client` gives sync code the
same API and holds no logic of its own: it runs an :class:`AsyncClient` on a background
loop thread and waits for the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import backchannel.telemetry  # noqa: F401  (fills transport.observe's slots when OTel is here)
from backchannel.cluster.attempt import CurrentCall
from backchannel.cluster.attempt import start as start_call
from backchannel.cluster.consumer import Consumer
from backchannel.cluster.directory import Directory, ServiceKey
from backchannel.cluster.invoke import invoke as cluster_invoke
from backchannel.cluster.loadbalance import LeastActiveLoadBalance, LoadBalance
from backchannel.cluster.providers import LinkSettings, ProviderLink
from backchannel.cluster.reference import Proxy, Reference
from backchannel.cluster.registry import Registry
from backchannel.cluster.resubscribe import resubscribe
from backchannel.errors import ChannelClosed
from backchannel.rpc import attachments
from backchannel.rpc.attachments import propagation
from backchannel.rpc.filters import FilterLike, chain_of
from backchannel.rpc.interface import A, Interface, Method, MethodSpec
from backchannel.rpc.notify import HookPool, MethodHooks, wrap_async, wrap_sync
from backchannel.settings import DEFAULT_TIMEOUT, Keepalive, Limits
from backchannel.transport.auth import bearer_metadata
from backchannel.transport.default import resolve as resolve_transport
from backchannel.transport.pools import CallPools
from backchannel.transport.portal import LoopThread, wait_on_loop
from backchannel.transport.session import CURRENT_CALL, Session
from backchannel.wire import codec

if TYPE_CHECKING:
    import ssl

    import grpc

T = TypeVar("T")


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

    ``filters`` run around every call of its references and every listener call it
    serves, the first outermost (docs/filters.md); ``propagate_attachments`` (True or a
    list of keys) carries a callback's attachments into the calls its listener makes
    (docs/attachments.md).
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
        credentials: grpc.ChannelCredentials | ssl.SSLContext | None = None,
        transport: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        send_token_over_plaintext: bool = False,
        filters: Iterable[FilterLike] = (),
        propagate_attachments: bool | Iterable[str] = False,
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
        # filters (docs/filters.md) and attachments (docs/attachments.md), checked first
        links = chain_of(filters)
        propagate = propagation(propagate_attachments)
        self.address = address if isinstance(address, str) else repr(address)
        self.timeout = timeout
        error_types = codec.ErrorTypes(errors)
        pools = CallPools(
            max_workers, max_reentrant_workers, role="callback", owners="Client or AsyncClient"
        )
        settings = LinkSettings(
            application=application,
            connect_timeout=connect_timeout,
            limits=limits,
            keepalive=keepalive,
            credentials=credentials,
            metadata=tuple(metadata) + (bearer_metadata(token) if token else ()),
            error_types=error_types,
            pools=pools,
            send_token_over_plaintext=send_token_over_plaintext,
            transport=resolve_transport(transport),
        )
        #: the address as error messages name it: a list of a thousand is not repeated
        where = _shortened(self.address)
        self._consumer = Consumer(address, where, settings, pools, error_types, resubscribe)
        # the consumer's own tables and link, never replaced: read here without a hop
        #: one link per provider address, made when first chosen
        self._links: dict[str, ProviderLink] = self._consumer.links
        #: a plain address: its one link (and the fast paths that go with it)
        self._single: ProviderLink | None = self._consumer.single
        self._directories: dict[ServiceKey, Directory] = self._consumer.directory_of
        self._hooks = HookPool(max_workers)  # plain event-notify hooks run here
        self._filters = settings.filters = links
        settings.propagate_attachments = propagate

    @property
    def _session(self) -> Session | None:
        """The stream of a single-address client (None for a cluster)."""
        return self._single.session if self._single is not None else None

    @property
    def _registry(self) -> Registry | None:
        """The registry subscribed to (None before the first call, or without one)."""
        return self._consumer.directories.registry

    def register_error(self, cls: type[BaseException]) -> None:
        """Receive ``cls`` as itself (not as RemoteError) when the provider raises it."""
        self._consumer.error_types.register(cls)

    # an interface with generated stubs (backchannel stubs, docs/typing.md) names its
    # asynchronous twin: the proxy is typed as that; any other class as itself
    @overload
    def reference(
        self,
        interface: type[Interface[A]],
        *,
        group: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        methods: Sequence[Method] = (),
        cluster: str = "failover",
        loadbalance: str | LoadBalance = "random",
        forks: int = 2,
        callbacks: int | None = None,
        filters: Sequence[FilterLike] = (),
    ) -> A: ...
    @overload
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
        callbacks: int | None = None,
        filters: Sequence[FilterLike] = (),
    ) -> T: ...
    def reference(
        self,
        interface: type[Any],
        *,
        group: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        methods: Sequence[Method] = (),
        cluster: str = "failover",
        loadbalance: str | LoadBalance = "random",
        forks: int = 2,
        callbacks: int | None = None,
        filters: Sequence[FilterLike] = (),
    ) -> Any:
        """A proxy whose methods are coroutines calling the provider's ``interface``.

        A method with ``Method(..., async_=True)`` returns a running Task instead; one with
        event-notify hooks runs them around each call (``async def`` hooks are awaited,
        plain ones run in a thread pool). A bad hook is a TypeError here. ``cluster``,
        ``loadbalance`` and ``forks`` matter when there is more than one provider
        (docs/cluster.md). ``callbacks`` limits the live listener instances this consumer
        passes to the service per stream (docs/callbacks.md; None: no limit of its own).
        ``filters`` run inside the client's, around this reference's calls only.
        """
        ref = self._reference(
            interface,
            group,
            version,
            timeout,
            methods,
            cluster,
            loadbalance,
            forks,
            callbacks,
            filters,
        )
        return Proxy(ref, self._invoke_coroutine, self._notify)

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
        callbacks: int | None = None,
        filters: Sequence[FilterLike] = (),
    ) -> Reference:
        if loadbalance == "leastactive":  # counted by this consumer, per provider address
            link = self._consumer.link
            loadbalance = LeastActiveLoadBalance(lambda url: link(url.address).active)
        return Reference(
            interface,
            group,
            version,
            self.timeout if timeout is None else timeout,
            methods,
            cluster=cluster,
            loadbalance=loadbalance,
            forks=forks,
            callbacks=callbacks,
            filters=self._filters + chain_of(filters),
        )

    def _notify(self, ref: Reference, method: MethodSpec, hooks: MethodHooks) -> Any:
        consumer = self._consumer

        def invoke(args: tuple[Any, ...]) -> Any:
            return cluster_invoke(consumer, ref, method, args, {}, CURRENT_CALL.get())

        return wrap_async(hooks, method, invoke, self._hooks)

    def _invoke_coroutine(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return cluster_invoke(self._consumer, ref, method, args, kwargs, CURRENT_CALL.get())

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
        return await cluster_invoke(self._consumer, ref, method, args, kwargs, current)

    async def release(self, listener: object) -> None:
        """End a callback instance this client exported (Dubbo has no such thing), on
        every provider's stream it was passed on."""
        self._consumer.release(listener)

    @property
    def callback_count(self) -> int:
        """How many callback instances this client has exported on its current streams."""
        return self._consumer.callback_count

    async def close(self) -> None:
        """End every stream (half-close, then cancel) and channel, and the registry."""
        await self._consumer.close()
        self._hooks.shutdown()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _shortened(address: str, most: int = 200) -> str:
    """``address`` for a message: a long list is cut, saying how many it holds."""
    if len(address) <= most:
        return address
    return f"{address[:most]}... ({address.count(',') + 1} addresses)"


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
        credentials: grpc.ChannelCredentials | ssl.SSLContext | None = None,
        transport: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        send_token_over_plaintext: bool = False,
        filters: Iterable[FilterLike] = (),
        propagate_attachments: bool | Iterable[str] = False,
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
            transport=transport,
            metadata=metadata,
            token=token,
            send_token_over_plaintext=send_token_over_plaintext,
            filters=filters,
            propagate_attachments=propagate_attachments,
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
        callbacks: int | None = None,
        filters: Sequence[FilterLike] = (),
    ) -> T:
        """A proxy whose methods call the provider's ``interface`` and block for the result.

        A method with ``Method(..., async_=True)`` returns a ``concurrent.futures.Future``
        at once instead; one with event-notify hooks runs them around each call (in the
        calling thread, or in a thread pool for async_=True). A bad hook is a TypeError here.
        ``cluster``, ``loadbalance``, ``forks`` and ``callbacks``: see
        :meth:`AsyncClient.reference`.
        """
        ref = self._core._reference(
            interface,
            group,
            version,
            timeout,
            methods,
            cluster,
            loadbalance,
            forks,
            callbacks,
            filters,
        )
        return Proxy(ref, self._invoke_blocking, self._notify)  # type: ignore[return-value]

    def _notify(self, ref: Reference, method: MethodSpec, hooks: MethodHooks) -> Any:
        consumer = self._core._consumer

        def blocking(args: tuple[Any, ...]) -> Any:
            return self._invoke_blocking(ref, method, args, {})

        def start(args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
            return self._portal.submit(
                cluster_invoke(consumer, ref, method, args, {}, CURRENT_CALL.get())
            )

        return wrap_sync(hooks, method, blocking, start, self._hooks)

    def _invoke_blocking(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # the caller's context (a callback it runs in) is read here, in its own thread
        current = CURRENT_CALL.get()
        core = self._core
        consumer = core._consumer
        session = core._session
        if (
            session is None
            or not session.usable
            or method.name in ref.retries
            or method.name in ref.resubscribe
            or ref.clusters[method.name] != "failover"
            or ref.filters  # filters and attachments: the coroutine, in the caller's context
            or attachments.STATE.get() is not None
            or self._portal.in_loop_thread()
        ):
            return self._portal.run(cluster_invoke(consumer, ref, method, args, kwargs, current))
        # the common case, with no task on the loop: send there, wait here
        positional = method.bind(args, kwargs)
        timeout = ref.timeouts[method.name]

        def start() -> asyncio.Future[Any]:
            if not session.usable:  # it went away meanwhile: the full path reconnects
                return asyncio.ensure_future(
                    cluster_invoke(consumer, ref, method, positional, {}, current)
                )
            return start_call(consumer, session, ref, method, positional, current, timeout)[1]

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
