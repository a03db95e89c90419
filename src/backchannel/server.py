"""The provider: serves the envelope service for the exported implementations.

:class:`AsyncServer` is the asyncio core; :class:`Server` is the same for sync code and
holds no logic of its own: it runs an :class:`AsyncServer` on a background loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from backchannel import telemetry
from backchannel.cluster.registries import open_registry
from backchannel.cluster.registry import Registry
from backchannel.cluster.service_url import (
    DEFAULT_WEIGHT,
    ServiceURL,
    check_weight,
    reachable_host,
)
from backchannel.errors import ChannelClosed, Unauthenticated, UnknownCallback
from backchannel.rpc.exports import DEFAULT_CALLBACK_LIMIT, Exports, to_json
from backchannel.rpc.interface import Method
from backchannel.rpc.provider_callbacks import ProviderCallbacks
from backchannel.settings import DEFAULT_TIMEOUT, Keepalive, Limits, server_options
from backchannel.transport import reflection
from backchannel.transport.auth import Authenticator, set_identity
from backchannel.transport.peerlog import PeerLog
from backchannel.transport.pools import CallPools
from backchannel.transport.portal import LoopThread
from backchannel.transport.session import Outgoing, Session, parse_frame, serialize
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.protocol import PROTOCOL_VERSION, Connection, Role
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")

SERVICE_NAME = "backchannel.v1.Envelope"
_GOING_AWAY = "server shutting down"


class _ProviderSide:
    """The provider's handling of one consumer's stream: forward calls and its callbacks."""

    def __init__(self, exports: Exports, session: Session, callback_timeout: float | None) -> None:
        self._exports = exports
        self.callbacks = ProviderCallbacks(session, callback_timeout, exports.pools)

    async def dispatch(self, call: pb.Call) -> pb.Value:
        if call.callback_id:
            raise UnknownCallback(
                f"callback {call.callback_id}: a provider exports no callbacks; "
                "callback ids name objects on the consumer"
            )
        return await self._exports.run(call, self.callbacks)

    def released(self, callback_id: int) -> None:
        self.callbacks.release(callback_id)

    def ended(self, cause: BaseException) -> None:
        self.callbacks.clear(f"the stream ended: {cause}")


class _Health(HealthServicer):  # type: ignore[misc]
    """The standard health service; behind ``guard`` (the authenticator) when set."""

    def __init__(self) -> None:
        super().__init__()
        self.guard: reflection.Guard | None = None

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if self.guard is not None:
            await self.guard(context, False)
        return await super().Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.guard is not None:
            await self.guard(context, False)
        await super().Watch(request, context)

    # every method of the service is overridden here, behind the guard: the test
    # (test_grpcurl.py) calls each one the service descriptor names without a token
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        if self.guard is not None:
            await self.guard(context, False)
        try:
            result = super().List(request, context)
        except NotImplementedError:  # the generated stub (grpcio-health-checking 1.85)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        if inspect.isawaitable(result):  # a later version's async List
            result = await result
        return result


async def _refuse(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> None:
    """End a Connect stream with a status, after reading the consumer's hello.

    Aborting while the consumer's first write is in flight makes gRPC report INTERNAL to
    it instead of our status (grpc/grpc#36066), so the hello is read first.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(context.read(), 2.0)
    await context.abort(code, message)


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
        credentials: grpc.ServerCredentials | None = None,
        authenticator: Authenticator | None = None,
        authenticate_reflection: bool = True,
        authenticate_health: bool = False,
        registry: str | Registry | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self._requested_address = address
        # a str is opened on start() and closed on stop(); a Registry object is the
        # caller's: only what this server registered is withdrawn from it
        self._registry_spec = registry
        self._registry: Registry | None = None
        self._advertise_host = advertise_host
        self._weights: dict[tuple[str, str, str], int] = {}
        self._registered: list[ServiceURL] = []
        # held while URLs are registered or withdrawn (in a thread), so an export made
        # while running is registered once, and before stop() withdraws everything
        self._registry_lock = asyncio.Lock()
        #: registrations of exports made on the loop while running (kept from the GC)
        self._registering: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._credentials = credentials
        self._authenticator = authenticator
        self._limits = limits
        self._keepalive = keepalive
        self._reflection = reflection
        self._health: _Health | None = _Health() if health else None
        # health and reflection reveal no exports; each is behind the authenticator
        # when its setting says so (docs/grpcurl.md)
        self._reflection_guard = self._authenticate if authenticate_reflection else None
        if self._health is not None and authenticate_health:
            self._health.guard = self._authenticate
        self._application = application
        self._send_tracebacks = send_tracebacks
        self._error_types = codec.ErrorTypes(errors)
        self._pools = CallPools(
            max_workers, max_reentrant_workers, role="provider", owners="Server or AsyncServer"
        )
        self._exports = Exports(self._pools, self._error_types)
        self._callback_timeout = callback_timeout
        self._grpc: grpc.aio.Server | None = None
        self._port = 0
        self._sessions: set[Session] = set()
        self._streams = 0  # Connect streams in _connect, authenticating ones included
        self._full = False  # max_streams was reached (logged once until back under it)
        self._full_logged = False  # ... and that was logged at WARNING
        #: the endings of streams whose peer broke a limit, and refusals past
        #: max_streams: one line each would let peers reopening streams flood the log
        self._peer_log: PeerLog | None = None
        self._stopping = False

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
    ) -> None:
        """Serve ``impl`` as ``interface`` under ``group`` and ``version``.

        Two exports that differ only by group or version coexist. ``callbacks`` limits
        the live callback instances per stream for this service. ``weight`` is the
        load-balancing weight written into its provider URL when a registry is used.

        With a registry, an export made while the server runs is registered at once,
        and withdrawn on stop like the others: called on the server's loop, in a task
        (one round trip; a failure is logged as a warning); from another thread (the
        sync :class:`Server`), before this returns, a failure raised. A value its URL
        cannot carry (``&`` in a group, say) is refused here, the export undone.
        """
        check_weight(weight)
        export = self._exports.add(
            interface, impl, group=group, version=version, callbacks=callbacks, methods=methods
        )
        self._weights[export.key] = weight
        if self._registry_spec is None:
            return
        try:  # refuse now what could not be registered (host and port do not matter)
            self._provider_url(export.info(), "127.0.0.1", 1)
        except ValueError:
            self._exports.remove(export.key)
            del self._weights[export.key]
            raise
        loop = self._loop
        if self._grpc is None or self._stopping or loop is None:
            return  # start() registers it
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(self._register_running())
            self._registering.add(task)
            task.add_done_callback(self._registered_in_task)
        else:  # another thread: wait for it, and let a failure be raised
            asyncio.run_coroutine_threadsafe(self._register_running(), loop).result()

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
        if self._grpc is not None:
            raise RuntimeError("the server is already started")
        server = grpc.aio.server(options=server_options(self._limits, self._keepalive))
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    self._connect,
                    request_deserializer=parse_frame,
                    response_serializer=serialize,
                ),
                "Invoke": grpc.unary_unary_rpc_method_handler(
                    self._invoke,
                    request_deserializer=pb.Call.FromString,
                    response_serializer=pb.Result.SerializeToString,
                ),
                "Describe": grpc.unary_unary_rpc_method_handler(
                    self._describe,
                    request_deserializer=pb.DescribeRequest.FromString,
                    response_serializer=pb.DescribeResponse.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        served = [SERVICE_NAME]
        if self._health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
            await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            served.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        if self._reflection:
            # grpcurl resolves Any payloads through reflection over the default pool,
            # where every generated message module this process imported is registered
            reflection.enable(server, served, self._reflection_guard)
        try:
            if self._credentials is None:
                self._port = server.add_insecure_port(self._requested_address)
            else:
                self._port = server.add_secure_port(self._requested_address, self._credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self._requested_address}: {exc}") from exc
        await server.start()
        self._grpc = server
        self._loop = asyncio.get_running_loop()
        self._peer_log = PeerLog(
            self._loop,
            "Connect streams ended or refused for a limit",
            logger,
            per="a provider",
            sender="their peers",
        )
        logger.info("backchannel provider listening on %s", self.address)
        if self._registry_spec is not None:
            try:
                async with self._registry_lock:
                    await asyncio.to_thread(self._register, self._exports.services())
            except BaseException:
                self._grpc = None
                await server.stop(0)
                raise

    @property
    def advertised_address(self) -> str:
        """``host:port`` written into the registry: ``advertise_host``, or the bound host
        unless it is a wildcard (then this machine's first non-loopback address)."""
        host = reachable_host(self._requested_address.rpartition(":")[0], self._advertise_host)
        return f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"

    def provider_urls(self) -> list[ServiceURL]:
        """One provider URL per export, as :meth:`start` registers them."""
        host = self._advertised_host()
        return [
            self._provider_url(service, host, self._port) for service in self._exports.services()
        ]

    def _advertised_host(self) -> str:
        return reachable_host(self._requested_address.rpartition(":")[0], self._advertise_host)

    def _provider_url(self, service: pb.ServiceInfo, host: str, port: int) -> ServiceURL:
        return ServiceURL.provider(
            service.name,
            host,
            port,
            application=self._application,
            group=service.group,
            version=service.version,
            methods=[method.name for method in service.methods],
            callbacks=service.callbacks,
            weight=self._weights.get(
                (service.name, service.group, service.version), DEFAULT_WEIGHT
            ),
        )

    def _register(self, services: Sequence[pb.ServiceInfo]) -> None:
        # in a thread, holding the registry lock: ZooKeeper's round trips block. Every
        # export not registered yet is (all of them on start; a new one while running),
        # from ``services``, taken on the loop: export() may add to them meanwhile
        registry = self._registry
        if registry is None:
            spec = self._registry_spec
            registry = open_registry(spec) if isinstance(spec, str) else spec
            assert registry is not None
            self._registry = registry
        done = {(url.interface, url.group, url.version) for url in self._registered}
        host = self._advertised_host()
        for service in services:
            url = self._provider_url(service, host, self._port)
            if (url.interface, url.group, url.version) in done:
                continue
            registry.register(url)
            self._registered.append(url)
            logger.info("registered %s", url)

    async def _register_running(self) -> None:
        """Register the exports made since start, unless the server is stopping."""
        async with self._registry_lock:
            if self._grpc is not None and not self._stopping and self._registry is not None:
                # the exports are read here, on the loop, where export() adds to them
                await asyncio.to_thread(self._register, self._exports.services())

    def _registered_in_task(self, task: asyncio.Task[None]) -> None:
        self._registering.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "could not register an export made while running: %s",
                wire_text(task.exception()),
            )

    def _unregister(self) -> None:
        registry, self._registry = self._registry, None
        urls, self._registered = self._registered, []
        if registry is None:
            return
        try:
            for url in urls:
                registry.unregister(url)
        finally:
            if isinstance(self._registry_spec, str):  # ours: its session ends too
                registry.close()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving.

        Every consumer is told go-away: its new calls fail with ShuttingDown (a new
        stream is refused), while calls already running finish and their results are
        sent, for up to ``grace`` seconds; then the streams end and with them every
        callback. Without ``grace``, running calls are cancelled at once.
        """
        server, self._grpc = self._grpc, None
        if server is None:
            return
        self._stopping = True
        # after the registrations under way (the lock is fair): they are withdrawn too
        async with self._registry_lock:
            if self._registry is not None:
                # first: consumers stop choosing this provider while its calls finish
                try:
                    await asyncio.to_thread(self._unregister)
                except Exception as exc:  # the session's end removes the nodes all the same
                    logger.warning("could not unregister from the registry: %s", wire_text(exc))
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        for session in list(self._sessions):
            session.go_away(_GOING_AWAY)
        if grace:
            try:
                await asyncio.wait_for(self._all_idle(), grace)
            except TimeoutError:
                logger.warning("calls still running after %s s of grace; cancelling them", grace)
        await server.stop(0)
        self._pools.shutdown()
        if self._peer_log is not None:  # what it held back is told now, not never
            self._peer_log.summarize()

    async def _all_idle(self) -> None:
        """Wait until every session is idle, sessions that join meanwhile included."""
        waited: set[Session] = set()
        while fresh := self._sessions - waited:
            waited |= fresh
            await asyncio.gather(*(session.wait_idle() for session in fresh))

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
        if self._grpc is None:
            return False
        return bool(await self._grpc.wait_for_termination(timeout))

    # ------------------------------------------------------------- handlers

    async def _connect(
        self, requests: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self._stopping:
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, "the provider is shutting down")
        limit = self._limits.max_streams
        if self._streams >= limit:
            if not self._full:  # once, not per refused stream: a flood would flood the log
                self._full = True
                # and rate-limited: a peer closing and reopening a stream would repeat it
                assert self._peer_log is not None
                self._full_logged = self._peer_log.line(
                    "refusing new Connect streams: %d are open (Limits.max_streams)", limit
                )
            await _refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this provider holds {limit} Connect streams already (Limits.max_streams); "
                "try again later",
            )
        self._streams += 1
        try:
            await self._serve_stream(context)
        finally:
            self._streams -= 1
            if self._full and self._streams < limit:
                self._full = False
                if self._full_logged:  # said only after a refusal logged at WARNING
                    self._full_logged = False
                    logger.info("accepting new Connect streams again (Limits.max_streams)")

    async def _serve_stream(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Authenticate one Connect stream and run its session until it ends."""
        await self._authenticate(context, stream=True)
        connection: Connection[Outgoing] = Connection(
            Role.PROVIDER,
            self._application,
            self._exports.services(),
            self._limits.max_calls_in_flight,
            self._limits.max_message_size,
        )
        session = Session(
            connection,
            context.write,
            lambda session: _ProviderSide(self._exports, session, self._callback_timeout),
            self._error_types,
            peer=context.peer(),
            limits=self._limits,
            send_tracebacks=self._send_tracebacks,
        )
        session.end_log = self._peer_log
        self._sessions.add(session)
        if telemetry.AVAILABLE:  # OpenTelemetry: the stream's addresses, for spans and gauges
            telemetry.track(session, self.address)
        if self._stopping:
            # it passed the check above before stop() began and was authenticated after
            # stop() told every session go-away: tell it too, before its first call
            session.go_away(_GOING_AWAY)
        # a stream that sends no Hello would be held (with its memory) for ever
        no_hello = asyncio.get_running_loop().call_later(
            self._limits.handshake_timeout, self._no_hello, session
        )
        try:
            await session.run(context.read)
        finally:
            no_hello.cancel()
            self._sessions.discard(session)
        if session.ending is not None:  # it broke a limit: say which, not CANCELLED
            await context.abort(*session.ending)

    def _no_hello(self, session: Session) -> None:
        if not session.handshake.done():
            session.end(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{session.peer} sent no Hello within {self._limits.handshake_timeout} s "
                "(Limits.handshake_timeout); the stream is ended",
            )

    async def _invoke(
        self, call: pb.Call, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Result:
        await self._authenticate(context)
        try:
            if telemetry.AVAILABLE and telemetry.collecting():  # the server span around it
                value = await telemetry.serve(
                    None, call, self._run_unary, context.peer(), self.address
                )
            else:
                value = await self._run_unary(call)
        except Exception as exc:
            error = codec.encode_error(exc, self._error_types, self._send_tracebacks)
            return pb.Result(id=call.id, error=error)
        result = pb.Result(id=call.id, value=value)
        if call.json_args:
            result.json = to_json(codec.decode(value, "the result"))
        return result

    async def _run_unary(self, call: pb.Call) -> pb.Value:
        return await self._exports.run(call, None)

    async def _describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DescribeResponse:
        await self._authenticate(context)
        return pb.DescribeResponse(
            application=self._application,
            protocol_version=PROTOCOL_VERSION,
            services=self._exports.services(),
        )

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], stream: bool = False
    ) -> None:
        """Refuse the RPC unless the authenticator accepts its metadata; keep the identity."""
        if self._authenticator is None:
            set_identity(None)
            return
        metadata = {
            key: value if isinstance(value, str) else value.decode(errors="replace")
            for key, value in context.invocation_metadata() or ()
        }
        try:
            identity = self._authenticator(metadata)
            if inspect.isawaitable(identity):
                identity = await identity
        except Unauthenticated as exc:
            logger.info("refused %s: %s", context.peer(), wire_text(exc))
            if stream:
                await _refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        set_identity(identity)

    @property
    def session_count(self) -> int:
        """How many Connect streams are open."""
        return len(self._sessions)


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
        credentials: grpc.ServerCredentials | None = None,
        authenticator: Authenticator | None = None,
        authenticate_reflection: bool = True,
        authenticate_health: bool = False,
        registry: str | Registry | None = None,
        advertise_host: str | None = None,
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
            authenticator=authenticator,
            authenticate_reflection=authenticate_reflection,
            authenticate_health=authenticate_health,
            registry=registry,
            advertise_host=advertise_host,
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
