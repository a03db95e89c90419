"""The consumer: one Connect stream per provider address, references that call through it.

:class:`AsyncClient` is the asyncio core; :class:`Client` gives sync code the same API
and holds no logic of its own: it runs an :class:`AsyncClient` on a background loop
thread and waits for the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from backchannel import codec, telemetry
from backchannel.auth import bearer_metadata
from backchannel.callbacks import CURRENT_CALL, ConsumerCallbacks, ExportedCallback, parent_in
from backchannel.errors import (
    ChannelClosed,
    ServiceNotFound,
    ShuttingDown,
    StreamBroken,
    TransportError,
    UnknownCallback,
)
from backchannel.handoff import run_in_pool
from backchannel.interface import Method, MethodSpec
from backchannel.notify import HookPool, MethodHooks, wrap_async, wrap_sync
from backchannel.pools import CallPools
from backchannel.portal import LoopThread, wait_on_loop
from backchannel.protocol import Connection, Role
from backchannel.reference import Proxy, Reference
from backchannel.session import Deferred, Outgoing, Session, parse_frame, serialize
from backchannel.settings import (
    BULK_BYTES,
    DEFAULT_TIMEOUT,
    Keepalive,
    Limits,
    channel_options,
)
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wiretext import wire_text

logger = logging.getLogger("backchannel")

T = TypeVar("T")

CONNECT_PATH = "/backchannel.v1.Envelope/Connect"

# errors a call gets when the provider refused it before looking at its arguments (the
# stream's own refusals), so it did not take the callbacks the call carried; the consumer
# drops them and tells the provider (the provider itself sends a Release for each
# callback it refuses after reading the arguments)
_REFUSED_UNREAD = frozenset({"backchannel.RemoteProtocolError", "backchannel.ShuttingDown"})
# ... and these too when the provider did not announce the method in its handshake
_NOT_FOUND = frozenset({"backchannel.ServiceNotFound", "backchannel.MethodNotFound"})

CurrentCall = tuple[Session, int] | None
#: a resubscribe=True call to replay: (reference, method, positional arguments)
Subscription = tuple[Reference, MethodSpec, tuple[Any, ...]]


def _identity(args: tuple[Any, ...]) -> tuple[int, ...]:
    """What makes two subscriptions the same: the very same argument objects."""
    return tuple(id(arg) for arg in args)


class Backoff:
    """Exponential backoff with jitter between connection attempts."""

    def __init__(self, first: float = 0.05, most: float = 2.0, factor: float = 2.0) -> None:
        self._first, self._most, self._factor = first, most, factor
        self._delay = 0.0
        self._not_before = 0.0

    def wait(self) -> float:
        """Seconds to wait before the next attempt (0 after a success)."""
        return max(0.0, self._not_before - time.monotonic())

    def failed(self) -> None:
        """An attempt failed: the next one waits longer, with jitter (a half to all of it)."""
        self._delay = min(self._most, self._delay * self._factor if self._delay else self._first)
        self._not_before = time.monotonic() + self._delay * random.uniform(0.5, 1.0)

    def succeeded(self) -> None:
        """Connected: the next failure starts from the first delay again."""
        self._delay = 0.0
        self._not_before = 0.0


class _ConsumerSide:
    """The consumer's handling of one stream: the provider's declarations and callbacks."""

    def __init__(self, session: Session, pools: CallPools) -> None:
        self.callbacks = ConsumerCallbacks(session, pools)
        self.services: dict[tuple[str, str, str], pb.ServiceInfo] = {}
        self.methods: dict[tuple[str, str, str, str], pb.MethodInfo] = {}

    def learn(self, services: Iterable[pb.ServiceInfo]) -> None:
        """Index the provider's exports from its Welcome."""
        for service in services:
            key = (service.name, service.group, service.version)
            self.services[key] = service
            for method in service.methods:
                self.methods[(*key, method.name)] = method

    async def dispatch(self, call: pb.Call) -> pb.Value:
        if not call.callback_id:
            raise ServiceNotFound(
                f"a consumer exports no services (got a call to {call.service}.{call.method}); "
                "it only runs callbacks it passed to the provider"
            )
        return await self.callbacks.run(call)

    def released(self, callback_id: int) -> None:
        self.callbacks.remove_id(callback_id)

    def ended(self, cause: BaseException) -> None:
        self.callbacks.clear()


class AsyncClient:
    """An asyncio consumer of the provider at ``address``.

    ::

        async with AsyncClient("127.0.0.1:50051") as client:
            demo = client.reference(IDemoService, group="cn", version="1.0.0")
            person = await demo.get(2)

    One Connect stream is opened on the first call and every call shares it; when it
    breaks, the next call opens a new one. Sync listener methods run in a thread pool of
    ``max_workers`` threads, ``async def`` ones on the loop; a listener call nested in a
    call this client waits for runs at once, on up to ``max_reentrant_workers`` extra
    threads when the pool is full (docs/callbacks.md).
    """

    def __init__(
        self,
        address: str,
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
    ) -> None:
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"address must be 'host:port', got {address!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.address = address
        self.timeout = timeout
        self._application = application
        self._connect_timeout = connect_timeout
        self._limits = limits
        self._keepalive = keepalive
        self._credentials = credentials
        self._metadata = tuple(metadata) + (bearer_metadata(token) if token else ())
        self._error_types = codec.ErrorTypes(errors)
        self._pools = CallPools(
            max_workers, max_reentrant_workers, role="callback", owners="Client or AsyncClient"
        )
        self._channel: grpc.aio.Channel | None = None
        self._stream: Any = None
        self._session: Session | None = None
        self._reader: asyncio.Task[None] | None = None
        self._opening: asyncio.Lock | None = None
        self._closed = False
        self._backoff = Backoff()
        # resubscribe=True calls that succeeded: replayed after a reconnect
        self._subscriptions: dict[tuple[int, str, tuple[int, ...]], Subscription] = {}
        self._resubscriber: asyncio.Task[None] | None = None
        self._hooks = HookPool(max_workers)  # plain event-notify hooks run here

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
    ) -> T:
        """A proxy whose methods are coroutines calling the provider's ``interface``.

        A method with ``Method(..., async_=True)`` returns a running Task instead; one with
        event-notify hooks runs them around each call (``async def`` hooks are awaited,
        plain ones run in a thread pool). A bad hook is a TypeError here.
        """
        ref = Reference(
            interface, group, version, self.timeout if timeout is None else timeout, methods
        )
        return Proxy(ref, self._invoke_coroutine, self._notify)  # type: ignore[return-value]

    def _notify(self, ref: Reference, method: MethodSpec, hooks: MethodHooks) -> Any:
        def invoke(args: tuple[Any, ...]) -> Any:
            return self.invoke(ref, method, args, {}, CURRENT_CALL.get())

        return wrap_async(hooks, method, invoke, self._hooks)

    def _invoke_coroutine(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return self.invoke(ref, method, args, kwargs, CURRENT_CALL.get())

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
        carries it as its parent so the provider's nested callbacks run at once. A method
        declared with ``retries=N`` is re-sent on a new stream when its stream breaks;
        any other call in flight then fails with the connection error.
        """
        positional = method.bind(args, kwargs)
        attempts = 1 + ref.retries.get(method.name, 0)
        for attempt in range(1, attempts + 1):
            try:
                result = await self._invoke_once(ref, method, positional, current)
            except (StreamBroken, ShuttingDown) as exc:
                if attempt == attempts:
                    raise
                logger.info(
                    "%s() failed (%s); retry %d of %d",
                    method.qualname,
                    wire_text(exc),
                    attempt,
                    attempts - 1,
                )
                continue
            if method.name in ref.resubscribe:
                self._subscriptions[(id(ref), method.name, _identity(positional))] = (
                    ref,
                    method,
                    positional,
                )
            return result

    async def _invoke_once(
        self, ref: Reference, method: MethodSpec, positional: tuple[Any, ...], current: CurrentCall
    ) -> Any:
        session = self._session
        if session is None or not session.usable:
            session = await self._ensure_session(ref.timeouts[method.name])
        call, future = self.start(session, ref, method, positional, current)
        try:
            return await future
        except asyncio.CancelledError:
            if call.id and future.cancelled():  # sent, and not answered yet
                session.abandon(call.id, "cancelled by the caller")
            raise

    def start(
        self,
        session: Session,
        ref: Reference,
        method: MethodSpec,
        positional: tuple[Any, ...],
        current: CurrentCall,
    ) -> tuple[pb.Call, asyncio.Future[Any]]:
        """On the loop: encode and send one call on ``session``; return it and the future
        of its decoded outcome (the exception it raises, or its result)."""
        side: _ConsumerSide = session.dispatcher  # type: ignore[assignment]
        key = ref.key
        service = side.services.get(key)
        info = side.methods.get((*key, method.name))
        values, fresh, removed = side.callbacks.encode_args(
            method, key, positional, info, service.callbacks if service else None
        )
        listeners = [entry.obj for entry in removed]  # a Release may clear entry.obj first
        call = pb.Call(
            service=ref.spec.name,
            group=ref.group,
            version=ref.version,
            method=method.name,
            args=values,
            one_way=info.one_way if info is not None else method.one_way,
        )

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
            if result.value.ByteSize() > BULK_BYTES:  # off the loop the other calls share
                pool = self._pools.regular
                return Deferred(run_in_pool(pool, lambda: codec.decode(result.value, what)))
            return codec.decode(result.value, what)

        timeout = ref.timeouts[method.name]
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

    def _removed(
        self, side: _ConsumerSide, entries: list[ExportedCallback], listeners: list[object]
    ) -> None:
        """Un-export what a remover call removed, and forget its subscriptions."""
        for listener in listeners:
            self._forget(listener)
        side.callbacks.drop(entries)

    def _forget(self, listener: object) -> None:
        """Drop the subscriptions that carry ``listener``: it is not to be replayed."""
        for key, (_ref, _method, args) in list(self._subscriptions.items()):
            if any(arg is listener for arg in args):
                del self._subscriptions[key]

    async def release(self, listener: object) -> None:
        """End a callback instance this client exported (Dubbo has no such thing)."""
        session = self._session
        side: _ConsumerSide | None = session.dispatcher if session else None  # type: ignore[assignment]
        entry = side.callbacks.find(listener) if side else None
        if session is None or side is None or entry is None:
            raise UnknownCallback(
                f"{listener!r} is not a live callback on the stream to {self.address}"
            )
        self._forget(listener)
        side.callbacks.remove(entry)
        session.connection.send_release(entry.id)
        session.flush()

    @property
    def callback_count(self) -> int:
        """How many callback instances this client has exported on its current stream."""
        side: _ConsumerSide | None = self._session.dispatcher if self._session else None  # type: ignore[assignment]
        return len(side.callbacks) if side else 0

    async def _ensure_session(self, timeout: float | None = None) -> Session:
        """The usable stream, opening one if needed; attempts after a failure are spaced
        by exponential backoff with jitter, and a caller waits at most ``timeout``."""
        if self._closed:
            raise ChannelClosed(f"the client for {self.address} is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with asyncio.timeout(timeout), self._opening:
            session = self._session
            if session is not None and session.usable:
                return session
            if session is not None and session.cause is not None:
                await self._drop_channel()  # broken: start afresh
            await asyncio.sleep(self._backoff.wait())
            try:
                session = await self._open_session()
            except TransportError:
                self._backoff.failed()
                # a new channel next time: gRPC's own reconnect backoff (up to minutes)
                # would otherwise refuse our attempts after the provider is back; but not
                # while a going-away stream still finishes its calls on this channel
                if session is None or session.cause is not None:
                    await self._drop_channel()
                raise
            self._backoff.succeeded()
            return session

    async def _open_session(self) -> Session:
        if self._channel is None:
            options = [
                *channel_options(self._limits, self._keepalive),
                # our own backoff spaces attempts; gRPC's would refuse them for minutes,
                # and its shared subchannels would carry that state into a new channel
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.address, self._credentials, options=options
                )
        stub = self._channel.stream_stream(
            CONNECT_PATH,
            request_serializer=serialize,
            response_deserializer=parse_frame,
        )
        stream = stub(None, metadata=self._metadata)
        connection: Connection[Outgoing] = Connection(
            Role.CONSUMER,
            self._application,
            max_calls_in_flight=self._limits.max_calls_in_flight,
            max_message_size=self._limits.max_message_size,
        )
        session = Session(
            connection,
            stream.write,
            lambda session: _ConsumerSide(session, self._pools),
            self._error_types,
            peer=self.address,
            limits=self._limits,
        )
        if telemetry.AVAILABLE:  # OpenTelemetry: the stream's addresses, for spans and gauges
            telemetry.track(session, self.address)
        connection.start()
        session.flush()
        reader = asyncio.create_task(
            session.run(stream.read), name=f"backchannel-reader {self.address}"
        )
        try:
            services = await asyncio.wait_for(
                asyncio.shield(session.handshake), self._connect_timeout
            )
        except TimeoutError:
            stream.cancel()
            raise StreamBroken(
                f"no handshake from {self.address} within {self._connect_timeout} s"
            ) from None
        except StreamBroken as exc:
            raise StreamBroken(f"cannot connect to {self.address}: {exc}") from exc
        session.dispatcher.learn(services)  # type: ignore[attr-defined]
        self._session, self._stream, self._reader = session, stream, reader
        reader.add_done_callback(self._stream_ended)
        return session

    def _stream_ended(self, reader: asyncio.Task[None]) -> None:
        """The stream is gone: replay subscriptions on a new one, in the background."""
        if self._closed or not self._subscriptions:
            return
        if self._resubscriber is None or self._resubscriber.done():
            self._resubscriber = asyncio.get_running_loop().create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        """Reconnect (with backoff) and make every resubscribe call again, until each one
        succeeded on the stream that is open at the end, or the client closes.

        A replay that fails for the connection's sake (the stream breaks again, no answer
        in time, the provider is shutting down) is tried again after a backoff, on a new
        stream if need be; one the provider refuses with any other error is logged and
        dropped (replaying it again would be refused again).
        """
        retry = Backoff()
        on: Session | None = None
        todo: set[tuple[int, str, tuple[int, ...]]] = set()
        while not self._closed:
            try:
                session = await self._ensure_session(self._connect_timeout)
            except (TransportError, TimeoutError) as exc:
                logger.info("reconnecting to %s: %s", self.address, wire_text(exc))
                continue  # _ensure_session spaces the attempts
            if session is not on:  # a new stream: everything is to be replayed on it
                # (what was subscribed on it meanwhile, by its caller, is not in this set)
                on, todo = session, set(self._subscriptions)
            failed = False
            for key in list(todo):
                subscription = self._subscriptions.get(key)
                if subscription is None:  # removed or released meanwhile
                    todo.discard(key)
                    continue
                ref, method, args = subscription
                try:
                    await self._invoke_once(ref, method, args, None)
                except (TransportError, ShuttingDown, TimeoutError) as exc:
                    logger.warning(
                        "resubscribing %s() failed: %s; trying again",
                        method.qualname,
                        wire_text(exc),
                    )
                    failed = True
                    break
                except Exception as exc:
                    logger.warning(
                        "resubscribing %s() was refused: %s; not replayed again",
                        method.qualname,
                        wire_text(exc),
                    )
                    self._subscriptions.pop(key, None)
                todo.discard(key)
            if failed:
                retry.failed()
                await asyncio.sleep(retry.wait())
                continue
            if self._session is session and session.cause is None:
                return  # all replayed on the open stream; if it breaks, a new run starts
            logger.info("the stream to %s ended during the replay; again", self.address)

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)

    async def close(self) -> None:
        """End the stream (half-close, then cancel) and the channel."""
        self._closed = True
        if self._resubscriber is not None:
            self._resubscriber.cancel()
        session, self._session = self._session, None
        reader, self._reader = self._reader, None
        if session is not None and session.cause is None:
            # half-close politely; a broken stream has nothing left to close
            with contextlib.suppress(Exception):
                await self._stream.done_writing()
            if reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(reader), 1.0)
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        self._pools.shutdown()
        self._hooks.shutdown()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


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
        address: str,
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
        )
        self._portal = LoopThread(f"backchannel-client {address}")
        self._hooks = HookPool(max_workers)  # hooks of async_=True calls run here

    @property
    def address(self) -> str:
        """The provider address."""
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
    ) -> T:
        """A proxy whose methods call the provider's ``interface`` and block for the result.

        A method with ``Method(..., async_=True)`` returns a ``concurrent.futures.Future``
        at once instead; one with event-notify hooks runs them around each call (in the
        calling thread, or in a thread pool for async_=True). A bad hook is a TypeError here.
        """
        ref = Reference(
            interface, group, version, self._core.timeout if timeout is None else timeout, methods
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
            or self._portal.in_loop_thread()
        ):
            return self._portal.run(core.invoke(ref, method, args, kwargs, current))
        # the common case, with no task on the loop: send there, wait here
        positional = method.bind(args, kwargs)

        def start() -> asyncio.Future[Any]:
            if not session.usable:  # it went away meanwhile: the full path reconnects
                return asyncio.ensure_future(core.invoke(ref, method, positional, {}, current))
            return core.start(session, ref, method, positional, current)[1]

        return wait_on_loop(self._portal.loop, start)

    def release(self, listener: object) -> None:
        """See :meth:`AsyncClient.release`."""
        self._portal.run(self._core.release(listener))

    def close(self) -> None:
        """End the stream and stop the background loop."""
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
