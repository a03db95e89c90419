"""The provider: serves the envelope service for the exported implementations.

:class:`AsyncServer` is the asyncio core; :class:`Server` is the same for sync code and
holds no logic of its own: it runs an :class:`AsyncServer` on a background loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import backchannel.telemetry  # noqa: F401  (fills transport.observe's slots when OTel is here)
from backchannel.cluster.registration import Registration
from backchannel.cluster.registry import Registry
from backchannel.cluster.service_url import (
    DEFAULT_WEIGHT,
    ServiceURL,
    check_weight,
)
from backchannel.errors import ChannelClosed
from backchannel.rpc.attachments import propagation
from backchannel.rpc.exports import DEFAULT_CALLBACK_LIMIT, Exports
from backchannel.rpc.filters import FilterLike, chain_of
from backchannel.rpc.interface import Method
from backchannel.rpc.provider import GOING_AWAY, ProviderHandlers, StreamHook
from backchannel.settings import DEFAULT_TIMEOUT, Keepalive, Limits
from backchannel.transport.auth import Authenticator
from backchannel.transport.default import resolve as resolve_transport
from backchannel.transport.pools import CallPools
from backchannel.transport.portal import LoopThread
from backchannel.transport.seam import HealthService
from backchannel.transport.session import Session, parse_frame, serialize
from backchannel.wire import codec

if TYPE_CHECKING:
    import ssl

    import grpc

logger = logging.getLogger("backchannel")


class AsyncServer:
    """An asyncio provider listening on ``address`` (``"127.0.0.1:0"`` picks a free port).

    ::

        server = AsyncServer("127.0.0.1:0")
        server.export(CallbackService, CallbackServiceImpl())
        async with server:
            ...

    Plain (``def``) methods run in a pool of ``max_workers`` threads; a call nested in a
    call this provider waits for (a listener's call back) runs at once, on up to
    ``max_reentrant_workers`` extra threads when the pool is full (docs/callbacks.md).

    With an ``authenticator``, every ``Connect``, ``Invoke`` and ``Describe`` must pass
    it; so must server reflection (``authenticate_reflection=True``, the default: it
    serves the descriptors of every message type the process imported) and, with
    ``authenticate_health=True``, the health service (open by default, for probes that
    send no token). ``reflection=False`` / ``health=False`` turn them off.

    With a ``registry``, every export is registered there under the bound address, or
    ``advertise_host`` / ``advertise_port`` when consumers reach the server elsewhere
    (behind NAT, in a container with a mapped port); docs/cluster.md.
    ``on_connect(peer)`` runs when a consumer's stream opens (its Hello is in) and
    ``on_disconnect(peer)`` when it ends, ``peer`` a :class:`~backchannel.rpc.provider.Peer`
    (address, identity, application, and why it ended); plain or ``async def``
    functions (docs/callbacks.md, "When a consumer goes away").
    ``filters`` run around every call it serves and every callback it makes, the first
    outermost (docs/filters.md); ``propagate_attachments`` (True or a list of keys)
    carries a call's attachments into the callbacks and nested calls made while serving
    it (docs/attachments.md).
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        application: str = "",
        max_workers: int = 32,
        max_reentrant_workers: int = 256,
        send_tracebacks: bool = False,
        errors: Iterable[type[BaseException]] = (),
        callback_timeout: float | None = DEFAULT_TIMEOUT,
        reflection: bool = True,
        health: bool = True,
        limits: Limits = Limits(),
        keepalive: Keepalive | None = Keepalive(),
        credentials: grpc.ServerCredentials | ssl.SSLContext | None = None,
        transport: str | None = None,
        authenticator: Authenticator | None = None,
        authenticate_reflection: bool = True,
        authenticate_health: bool = False,
        registry: str | Registry | None = None,
        advertise_host: str | None = None,
        advertise_port: int | None = None,
        on_connect: StreamHook | None = None,
        on_disconnect: StreamHook | None = None,
        filters: Iterable[FilterLike] = (),
        propagate_attachments: bool | Iterable[str] = False,
    ) -> None:
        self._requested_address = address
        transport_ = resolve_transport(transport)
        self._listening = False  # between start() and stop()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._authenticator = authenticator
        self._reflection = reflection
        self._error_types = codec.ErrorTypes(errors)
        self._pools = CallPools(
            max_workers, max_reentrant_workers, role="provider", owners="Server or AsyncServer"
        )
        self._exports = Exports(self._pools, self._error_types)
        # filters (docs/filters.md) and attachments (docs/attachments.md)
        self._exports.filters = chain_of(filters)
        self._exports.propagate = propagation(propagate_attachments)
        self._exports.attachment_limit = limits.max_attachment_bytes
        #: the exports' provider URLs in the registry, when there is one
        self._registration = Registration(
            registry,
            self._exports,
            lambda: self._listening and not self._stopping,
            application=application,
            bound_host=address.rpartition(":")[0],
            advertise_host=advertise_host,
            advertise_port=advertise_port,
        )
        #: what is done with each RPC (a Session per Connect stream), and the open streams
        self._handlers = ProviderHandlers(
            self._exports,
            self._error_types,
            transport_,
            application=application,
            limits=limits,
            send_tracebacks=send_tracebacks,
            callback_timeout=callback_timeout,
            authenticator=authenticator,
            # a consumer's stream opening and ending: fn(Peer), docs/callbacks.md
            on_connect=on_connect,
            on_disconnect=on_disconnect,
        )
        authenticate = self._handlers.authenticate
        # health and reflection reveal no exports; each is behind the authenticator
        # when its setting says so (docs/grpcurl.md)
        self._reflection_guard = authenticate if authenticate_reflection else None
        #: the transport's endpoint (bound on start)
        self._listener = transport_.server(
            address,
            self._handlers,
            credentials=credentials,
            limits=limits,
            keepalive=keepalive,
            parse=parse_frame,
            serialize=serialize,
            health=health,
            health_guard=authenticate if authenticate_health else None,
            reflection=reflection,
            reflection_guard=self._reflection_guard,
        )
        self._port = 0

    # ---------------------------------------------------------------- exports

    def export(
        self,
        interface: type,
        impl: object,
        *,
        group: str | None = None,
        version: str | None = None,
        callbacks: int = DEFAULT_CALLBACK_LIMIT,
        methods: Sequence[Method] = (),
        weight: int = DEFAULT_WEIGHT,
        filters: Sequence[FilterLike] = (),
    ) -> None:
        """Serve ``impl`` as ``interface`` under ``group`` and ``version``.

        Two exports that differ only by group or version coexist. ``callbacks`` limits
        the live callback instances per stream for this service. ``weight`` is the
        load-balancing weight written into its provider URL when a registry is used.
        ``filters`` run inside the server's, around this export's calls (docs/filters.md).

        With a registry, an export made while the server runs is registered at once,
        and withdrawn on stop like the others: called on the server's loop, in a task
        (one round trip; a failure is logged as a warning); from another thread (the
        sync :class:`Server`), before this returns, a failure raised. A value its URL
        cannot carry (``&`` in a group, say) is refused here, the export undone.
        """
        check_weight(weight)
        export = self._exports.add(
            interface,
            impl,
            group=group,
            version=version,
            callbacks=callbacks,
            methods=methods,
            filters=filters,
        )
        try:
            self._registration.add(export.key, export.info(), weight)
        except ValueError:
            self._exports.remove(export.key)
            raise
        if self._registration.spec is None:
            return
        loop = self._loop
        if not self._listening or self._stopping or loop is None:
            return  # start() registers it
        self._registration.register_new(loop)

    def register_error(self, cls: type[BaseException]) -> None:
        """Receive ``cls`` as itself (not as RemoteError) when a consumer's listener raises
        it. (What provider methods raise, consumers register on their side.)"""
        self._error_types.register(cls)

    # --------------------------------------------------------------- lifetime

    @property
    def port(self) -> int:
        """The port listened on (after :meth:`start`)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to give to a client (after :meth:`start`)."""
        host = self._requested_address.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self._port}"

    async def start(self) -> None:
        """Bind and start serving."""
        if self._listening:
            raise RuntimeError("the server is already started")
        self._port = self._registration.port = await self._listener.start()
        self._listening = True
        self._loop = asyncio.get_running_loop()
        self._handlers.listening(self._loop, self.address)
        logger.info("backchannel provider listening on %s", self.address)
        if self._registration.spec is not None:
            try:
                await self._registration.register_all()
            except BaseException:
                self._listening = False
                await self._listener.stop()
                raise

    @property
    def advertised_address(self) -> str:
        """``host:port`` written into the registry: ``advertise_host``, or the bound host
        unless it is a wildcard (then this machine's first non-loopback address); and
        ``advertise_port``, or the bound port."""
        return self._registration.advertised_address

    def provider_urls(self) -> list[ServiceURL]:
        """One provider URL per export, as :meth:`start` registers them."""
        return self._registration.provider_urls()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving.

        Every consumer is told go-away: its new calls fail with ShuttingDown (a new
        stream is refused), while calls already running finish and their results are
        sent, for up to ``grace`` seconds; then the streams end and with them every
        callback. Without ``grace``, running calls are cancelled at once.
        """
        if not self._listening:
            return
        self._listening = False
        self._handlers.stopping = True
        await self._registration.withdraw()
        await self._listener.going_away()
        for session in list(self._sessions):
            session.go_away(GOING_AWAY)
        if grace:
            try:
                await asyncio.wait_for(self._handlers.all_idle(), grace)
            except TimeoutError:
                logger.warning("calls still running after %s s of grace; cancelling them", grace)
        await self._listener.stop()
        self._pools.shutdown()
        if self._handlers.peer_log is not None:  # what it held back is told now, not never
            self._handlers.peer_log.summarize()

    async def __aenter__(self) -> AsyncServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server is stopped (by :meth:`stop` from another task), or for
        at most ``timeout`` seconds; as grpc's, True when the timeout passed first.

        Returns False at once when the server is not running (never started, or stopped).
        """
        if not self._listening:
            return False
        return await self._listener.wait_for_termination(timeout)

    @property
    def session_count(self) -> int:
        """How many Connect streams are open."""
        return len(self._sessions)

    # the parts that hold what the server used to (tests read them by these names)

    @property
    def _sessions(self) -> set[Session]:
        return self._handlers.sessions

    @property
    def _stopping(self) -> bool:
        return self._handlers.stopping

    @property
    def _registering(self) -> set[asyncio.Task[None]]:
        return self._registration.registering

    @property
    def _registry(self) -> Registry | None:
        return self._registration.registry

    @property
    def _registered(self) -> list[ServiceURL]:
        return self._registration.registered

    @property
    def _health(self) -> HealthService | None:
        return self._listener.health


class Server:
    """The provider for sync code: an :class:`AsyncServer` on a background loop thread.

    ::

        with Server("127.0.0.1:0") as server:   # started
            server.export(CallbackService, CallbackServiceImpl())
            ...
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        application: str = "",
        max_workers: int = 32,
        max_reentrant_workers: int = 256,
        send_tracebacks: bool = False,
        errors: Iterable[type[BaseException]] = (),
        callback_timeout: float | None = DEFAULT_TIMEOUT,
        reflection: bool = True,
        health: bool = True,
        limits: Limits = Limits(),
        keepalive: Keepalive | None = Keepalive(),
        credentials: grpc.ServerCredentials | ssl.SSLContext | None = None,
        transport: str | None = None,
        authenticator: Authenticator | None = None,
        authenticate_reflection: bool = True,
        authenticate_health: bool = False,
        registry: str | Registry | None = None,
        advertise_host: str | None = None,
        advertise_port: int | None = None,
        on_connect: StreamHook | None = None,
        on_disconnect: StreamHook | None = None,
        filters: Iterable[FilterLike] = (),
        propagate_attachments: bool | Iterable[str] = False,
    ) -> None:
        self._core = AsyncServer(
            address,
            application=application,
            max_workers=max_workers,
            max_reentrant_workers=max_reentrant_workers,
            send_tracebacks=send_tracebacks,
            errors=errors,
            callback_timeout=callback_timeout,
            reflection=reflection,
            health=health,
            limits=limits,
            keepalive=keepalive,
            credentials=credentials,
            transport=transport,
            authenticator=authenticator,
            authenticate_reflection=authenticate_reflection,
            authenticate_health=authenticate_health,
            registry=registry,
            advertise_host=advertise_host,
            advertise_port=advertise_port,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            filters=filters,
            propagate_attachments=propagate_attachments,
        )
        self._portal: LoopThread | None = None
        #: set by stop(): what wait_for_termination waits on (None when not running)
        self._stopped: threading.Event | None = None

    def export(
        self,
        interface: type,
        impl: object,
        *,
        group: str | None = None,
        version: str | None = None,
        callbacks: int = DEFAULT_CALLBACK_LIMIT,
        methods: Sequence[Method] = (),
        weight: int = DEFAULT_WEIGHT,
        filters: Sequence[FilterLike] = (),
    ) -> None:
        """Serve ``impl`` as ``interface``; see :meth:`AsyncServer.export`."""
        self._core.export(
            interface,
            impl,
            group=group,
            version=version,
            callbacks=callbacks,
            methods=methods,
            weight=weight,
            filters=filters,
        )

    def register_error(self, cls: type[BaseException]) -> None:
        """See :meth:`AsyncServer.register_error`."""
        self._core.register_error(cls)

    @property
    def port(self) -> int:
        """The port listened on (after :meth:`start`)."""
        return self._core.port

    @property
    def address(self) -> str:
        """``host:port`` to give to a client (after :meth:`start`)."""
        return self._core.address

    @property
    def advertised_address(self) -> str:
        """See :attr:`AsyncServer.advertised_address`."""
        return self._core.advertised_address

    def start(self) -> None:
        """Bind and start serving on a background thread."""
        if self._portal is not None:
            raise RuntimeError("the server is already started")
        self._portal = LoopThread("backchannel-server")
        try:
            self._portal.run(self._core.start())
        except BaseException:  # not listening (or not registered): no loop left behind
            portal, self._portal = self._portal, None
            portal.close()
            raise
        self._stopped = threading.Event()

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; see :meth:`AsyncServer.stop`."""
        portal, self._portal = self._portal, None
        if portal is None:
            return
        try:
            with contextlib.suppress(ChannelClosed):
                portal.run(self._core.stop(grace))
            portal.close()
        finally:
            stopped, self._stopped = self._stopped, None
            if stopped is not None:
                stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server is stopped (by :meth:`stop` from another thread), or for
        at most ``timeout`` seconds; as grpc's, True when the timeout passed first.

        Returns False at once when the server is not running (never started, or
        stopped). Ctrl-C interrupts the wait with KeyboardInterrupt, as usual.
        """
        stopped = self._stopped
        if stopped is None:
            return False
        # an Event of this thread's own, not a wait on the loop: stop() closes the loop,
        # and a wait handed to it could be left unanswered
        return not stopped.wait(timeout)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
