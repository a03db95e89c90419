"""A consumer's link to one provider address: its channel, its Connect stream, the
backoff between attempts to open one, and the resubscribe calls made on it.

An :class:`~backchannel.client.AsyncClient` holds one link for a plain address, or one
per provider of a cluster; each link is opened lazily, on the first call it is chosen for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from backchannel.cluster.backoff import Backoff
from backchannel.cluster.reference import Reference
from backchannel.errors import (
    ChannelClosed,
    CredentialsNotSent,
    ServiceNotFound,
    StreamBroken,
    TransportError,
    forget_frames,
)
from backchannel.rpc.attachments import Propagate
from backchannel.rpc.consumer_callbacks import ConsumerCallbacks
from backchannel.rpc.filters import Link
from backchannel.rpc.interface import MethodSpec
from backchannel.settings import Keepalive, Limits
from backchannel.transport import observe
from backchannel.transport.auth import carries_credentials, is_loopback, token_refusal
from backchannel.transport.default import resolve as resolve_transport
from backchannel.transport.pools import CallPools
from backchannel.transport.seam import Channel, Stream, Transport
from backchannel.transport.session import Outgoing, Session, parse_frame, serialize
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.protocol import Connection, Role
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")

#: a resubscribe=True call to replay: (reference, method, positional arguments)
Subscription = tuple[Reference, MethodSpec, tuple[Any, ...]]
#: what makes two subscriptions the same: the reference, the method, the very objects
SubscriptionKey = tuple[int, str, tuple[int, ...]]


class ConsumerSide:
    """The consumer's handling of one stream: the provider's declarations and callbacks."""

    def __init__(
        self, session: Session, pools: CallPools, settings: LinkSettings | None = None
    ) -> None:
        self.callbacks = ConsumerCallbacks(session, pools)
        if settings is not None:  # the client's filters and attachment settings
            self.callbacks.filters = settings.filters
            self.callbacks.propagate = settings.propagate_attachments
            self.callbacks.attachment_limit = settings.limits.max_attachment_bytes
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


#: addresses one client remembers having warned the token is not sent to; past it no
#: more are warned of (one line says so): a registry listing ten thousand plaintext
#: addresses costs a thousand lines once, not a line per address each time it is listed
TOKEN_WARNINGS = 1000


#: streams a client starts opening in one turn of its event loop, at most: each costs
#: about 0.3-0.6 ms there (a gRPC channel, a call, a session), and a burst of a thousand
#: (a broadcast, a registry listing a thousand providers) in one turn would hold every
#: timer of the loop (every call's deadline) for a fraction of a second
OPENED_PER_TURN = 16


class TurnGate:
    """Runs at most ``per_turn`` starts per turn of the event loop; the others run, in
    order, in the turns after (no busy waiting: one callback per turn). A start is
    queued, not a task waiting: a thousand queued cost a thousand deque entries, not a
    thousand task steps in one turn of the loop."""

    def __init__(self, per_turn: int = OPENED_PER_TURN) -> None:
        self._per_turn = per_turn
        self._passed = 0
        self._waiting: collections.deque[Callable[[], bool]] = collections.deque()
        self._armed = False

    def admit(self, start: Callable[[], bool]) -> None:
        """Call ``start`` now if this turn has room, else in a later turn. It returns
        whether it started anything (False: its caller gave up), which takes no room."""
        if self._passed < self._per_turn and not self._waiting:
            if start():
                self._passed += 1
                self._arm()
            return
        self._waiting.append(start)
        self._arm()

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self._armed = False
        self._passed = 0
        waiting = self._waiting
        while waiting and self._passed < self._per_turn:
            if waiting.popleft()():
                self._passed += 1
        if waiting or self._passed:
            self._arm()


class LinkSettings:
    """What every link of one client shares: how to open a stream."""

    #: the client's filters, around the listener calls of its streams
    filters: tuple[Link, ...] = ()
    #: the client's ``propagate_attachments`` (docs/attachments.md)
    propagate_attachments: Propagate = False

    def __init__(
        self,
        *,
        application: str,
        connect_timeout: float,
        limits: Limits,
        keepalive: Keepalive | None,
        credentials: object | None,
        metadata: Sequence[tuple[str, str]],
        error_types: codec.ErrorTypes,
        pools: CallPools,
        send_token_over_plaintext: bool = False,
        transport: Transport | None = None,
    ) -> None:
        self.application = application
        self.connect_timeout = connect_timeout
        self.limits = limits
        self.keepalive = keepalive
        self.credentials = credentials
        self.metadata = tuple(metadata)
        self.error_types = error_types
        self.pools = pools
        self.send_token_over_plaintext = send_token_over_plaintext
        #: what the streams run on (None: the default, grpcio unless the environment says)
        self.transport = resolve_transport() if transport is None else transport
        # credentials of another transport's kind are refused here, with what to pass
        self.transport.is_plaintext(credentials)
        #: spreads the opening of many streams over turns of the loop
        self.gate = TurnGate()
        #: addresses warned of the token not being sent to (at most TOKEN_WARNINGS):
        #: a link retired and made again for a flapping znode is not warned of again
        self._token_warned: set[str] = set()

    def warn_token_refused(self, address: str) -> None:
        """Warn that the token is not sent to ``address``, once per address per client
        (for the first :data:`TOKEN_WARNINGS` addresses; then once that the rest are not)."""
        warned = self._token_warned
        if address in warned:
            return
        if len(warned) > TOKEN_WARNINGS:
            return
        warned.add(address)
        if len(warned) <= TOKEN_WARNINGS:
            logger.warning("%s", token_refusal([wire_text(address)]))
        else:  # the one past the limit: said once, the set grows no more
            logger.warning(
                "not sending the token to %s nor to more plaintext addresses off this "
                "machine; not warning of each any more (at most %d a client, TOKEN_WARNINGS)",
                wire_text(address),
                TOKEN_WARNINGS,
            )

    def token_refused(self, address: str) -> bool:
        """Whether the metadata must not go to ``address``: it holds a credential, the
        connection would be plaintext, the address is not loopback, and the application
        did not opt in (gRPC sends call credentials only on a secure channel)."""
        return (
            self.transport.is_plaintext(self.credentials)
            and not self.send_token_over_plaintext
            and carries_credentials(self.metadata)
            and not is_loopback(address)
        )


class ProviderLink:
    """One provider address as a consumer uses it.

    ``on_ended(link)`` runs on the loop when a stream that was open ends (the client
    then replays the resubscribe calls that were made on it); ``backoff`` spaces the
    attempts to open a stream."""

    def __init__(
        self,
        address: str,
        settings: LinkSettings,
        on_ended: Callable[[ProviderLink], None],
        backoff: Backoff,
    ) -> None:
        self.address = address
        self.settings = settings
        self._on_ended = on_ended
        self._channel: Channel | None = None
        self._stream: Stream | None = None
        self.session: Session | None = None
        self._reader: asyncio.Task[None] | None = None
        #: the running attempt to open a stream, shared by the calls that wait for it
        self._attempt: asyncio.Future[Session] | None = None
        #: the task of the running attempt, once the gate started it
        self._opening: asyncio.Task[Session] | None = None
        self.closed = False
        self.backoff = backoff
        #: calls this consumer has in flight on the link, opening its stream included
        #: (for ``leastactive``, and to know when an unlisted provider's stream is idle)
        self.active = 0
        #: no registry lists the provider any more: closed once idle (see the client)
        self.unlisted = False
        #: calls started on the link's streams, ever
        self.sent = 0
        #: resubscribe=True calls that succeeded on the open stream, in order
        self.subscriptions: dict[SubscriptionKey, Subscription] = {}
        #: the token must not go there: no stream is ever opened (CredentialsNotSent)
        self.token_refused = settings.token_refused(address)
        if self.token_refused:
            # once per address and client, not per link: a registry's address is
            # anyone's who can write a znode, and a flapping one makes link after link
            settings.warn_token_refused(address)

    @property
    def available(self) -> bool:
        """Worth choosing for a new call: its stream is usable, or none is open, no
        attempt to open one is running and no backoff after a failed one. A provider
        going away (GoAway) is not: its running calls finish, it gets no new ones; nor
        is one the token may not go to."""
        if self.token_refused:
            return False
        session = self.session
        if session is not None:
            if session.usable:
                return True
            if session.cause is None:  # going away, still finishing its calls
                return False
        return self._attempt is None and self.backoff.wait() == 0

    @property
    def connecting(self) -> bool:
        """An attempt to open a stream is running (a call may wait for it)."""
        return self._attempt is not None

    @property
    def side(self) -> ConsumerSide | None:
        """The open stream's callbacks and declarations (None before the first stream)."""
        return self.session.dispatcher if self.session else None  # type: ignore[return-value]

    async def ensure_session(self, timeout: float | None, wait_backoff: bool = True) -> Session:
        """The usable stream, opening one if needed; attempts after a failure are spaced
        by exponential backoff with jitter, and a caller waits at most ``timeout``
        (TimeoutError).

        One attempt at a time runs for the link, as a task of its own bounded by
        ``connect_timeout``: a caller whose time runs out stops waiting for it, the
        attempt goes on, and the next caller finds its outcome. With
        ``wait_backoff=False`` (a cluster, where another provider may serve the call)
        a running backoff fails the call at once instead of making it wait."""
        if self.closed:
            raise ChannelClosed(f"the client for {self.address} is closed")
        if self.token_refused:  # checked before any channel exists: nothing is sent
            raise CredentialsNotSent(token_refusal([self.address]))
        session = self.session
        if session is not None and session.usable:
            return session
        if self._attempt is None:
            wait = self.backoff.wait()
            if wait and not wait_backoff:
                raise self.backing_off(wait)
        # the attempt is shared: a caller that gives up must not cancel it
        return await asyncio.wait_for(asyncio.shield(self.attempt()), timeout)

    def attempt(self) -> asyncio.Future[Session]:
        """The running attempt to open a stream, or a new one: its task starts after the
        backoff, when the client's :class:`TurnGate` lets it."""
        attempt = self._attempt
        if attempt is None:
            loop = asyncio.get_running_loop()
            attempt = self._attempt = loop.create_future()
            # the task runs in the context of the call that asked for it, as if it had
            # been created here (one copy for it and the callbacks: not one each)
            context = contextvars.copy_context()
            attempt.add_done_callback(self._attempt_done, context=context)
            start = functools.partial(self._start, attempt, context)
            wait = self.backoff.wait()
            if wait:
                loop.call_later(wait, self.settings.gate.admit, start)
            else:
                self.settings.gate.admit(start)
        return attempt

    def _start(self, attempt: asyncio.Future[Session], context: contextvars.Context) -> bool:
        if attempt.done():  # cancelled: the client closes
            return False
        task = asyncio.get_running_loop().create_task(self._attempt_session(), context=context)
        self._opening = task
        task.add_done_callback(functools.partial(self._opened, attempt), context=context)
        return True

    def _opened(self, attempt: asyncio.Future[Session], task: asyncio.Task[Session]) -> None:
        """The task of an attempt ended: the attempt's outcome is its outcome."""
        if self._opening is task:
            self._opening = None
        if task.cancelled():
            attempt.cancel()
        elif (error := task.exception()) is not None:
            if not attempt.done():
                attempt.set_exception(error)
        elif not attempt.done():
            attempt.set_result(task.result())

    def backing_off(self, wait: float) -> StreamBroken:
        """What a call gets that may not wait ``wait`` s for the next attempt."""
        return StreamBroken(
            f"{self.address} failed its last connection attempt; the next one is in {wait:.2f} s"
        )

    @property
    def backoff_left(self) -> float:
        """Seconds before a stream may be opened, when none is open or being opened and
        the last attempt failed (else 0)."""
        session = self.session
        if (session is not None and session.usable) or self._attempt is not None:
            return 0.0
        return self.backoff.wait()

    def _attempt_done(self, attempt: asyncio.Future[Session]) -> None:
        if self._attempt is attempt:
            self._attempt = None
        if attempt.cancelled():
            return
        error = attempt.exception()  # read: nobody may wait for it any more
        if error is not None:
            # the future keeps its traceback (to raise it again): the locals of its
            # frames, which the task has left, go now (the failed stream's session, gRPC
            # call and reader), so they are freed at once, not by a full garbage collection
            traceback.clear_frames(error.__traceback__)
            forget_frames(error)

    async def _attempt_session(self) -> Session:
        session = self.session
        if session is not None and session.cause is not None:
            await self._drop_channel()  # broken: start afresh
        if self.closed:
            raise ChannelClosed(f"the client for {self.address} is closed")
        try:
            session = await self._open_session()
        except TransportError:
            self.backoff.failed()
            # a new channel next time: gRPC's own reconnect backoff (up to minutes)
            # would otherwise refuse our attempts after the provider is back; but not
            # while a going-away stream still finishes its calls on this channel
            if self.session is None or self.session.cause is not None:
                await self._drop_channel()
            raise
        self.backoff.succeeded()
        return session

    async def _open_session(self) -> Session:
        settings = self.settings
        transport = settings.transport
        if self._channel is None:
            self._channel = transport.channel(
                self.address,
                credentials=settings.credentials,
                limits=settings.limits,
                keepalive=settings.keepalive,
                connect_timeout=settings.connect_timeout,
                parse=parse_frame,
                serialize=serialize,
            )
        stream = self._channel.connect(settings.metadata)
        connection: Connection[Outgoing] = Connection(
            Role.CONSUMER,
            settings.application,
            max_calls_in_flight=settings.limits.max_calls_in_flight,
            max_message_size=settings.limits.max_message_size,
        )
        session = Session(
            connection,
            stream.write,
            lambda session: ConsumerSide(session, settings.pools, settings),
            settings.error_types,
            peer=self.address,
            limits=settings.limits,
            eof=transport.eof,
            translate=transport.translate,
        )
        if observe.AVAILABLE:  # OpenTelemetry: the stream's addresses, for spans and gauges
            observe.track(session, self.address)
        connection.start()
        session.flush()
        reader = asyncio.create_task(
            session.run(stream.read), name=f"backchannel-reader {self.address}"
        )
        try:
            services = await asyncio.wait_for(
                asyncio.shield(session.handshake), settings.connect_timeout
            )
        except TimeoutError:
            stream.cancel()
            session.discard()
            raise StreamBroken(
                f"no handshake from {self.address} within {settings.connect_timeout} s"
            ) from None
        except StreamBroken as exc:
            session.discard()
            raise StreamBroken(f"cannot connect to {self.address}: {exc}") from exc
        except BaseException:  # cancelled (the client closes): nothing may stay behind
            stream.cancel()
            reader.cancel()
            session.discard()
            raise
        session.dispatcher.learn(services)  # type: ignore[attr-defined]
        self.session, self._stream, self._reader = session, stream, reader
        reader.add_done_callback(self._stream_ended)
        return session

    def _stream_ended(self, reader: asyncio.Task[None]) -> None:
        if not self.closed:
            self._on_ended(self)

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        """End the stream (half-close, then cancel) and the channel."""
        self.closed = True
        if self._attempt is not None:
            self._attempt.cancel()  # an attempt the gate has not started never starts
        opening = self._opening
        if opening is not None:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        session, self.session = self.session, None
        reader, self._reader = self._reader, None
        if session is not None and session.cause is None:
            # half-close politely; a broken stream has nothing left to close
            assert self._stream is not None  # opened with the session
            with contextlib.suppress(Exception):
                await self._stream.done_writing()
            if reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(reader), 1.0)
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
