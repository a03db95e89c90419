"""A provider's handling of the envelope's RPCs, whatever transport carries them: each
Connect stream becomes a :class:`~backchannel.transport.session.Session` serving the
exports, Invoke runs one call, Describe tells the exports; each RPC first passes the
authenticator. The transport calls these (:class:`~backchannel.transport.seam.Handlers`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from backchannel.errors import Unauthenticated, UnknownCallback
from backchannel.rpc import hooks
from backchannel.rpc.exports import Exports, to_json
from backchannel.rpc.provider_callbacks import ProviderCallbacks
from backchannel.settings import Limits
from backchannel.transport import observe
from backchannel.transport.auth import Authenticator, current_identity, set_identity
from backchannel.transport.peerlog import PeerLog
from backchannel.transport.seam import Code, IncomingStream, Rpc, Transport
from backchannel.transport.session import Outgoing, Session
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.protocol import PROTOCOL_VERSION, Connection, Role
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")

#: what a stopping provider tells every consumer (GoAway)
GOING_AWAY = "server shutting down"


@dataclasses.dataclass(frozen=True)
class Peer:
    """A consumer's Connect stream, as a provider's ``on_connect`` and ``on_disconnect``
    hooks see it."""

    #: the transport's name for the consumer's end (``ipv4:127.0.0.1:52114``)
    address: str
    #: what the provider's authenticator returned for it; None without one
    identity: Any
    #: the application name its Hello gave (``Client(application=...)``), or "": as
    #: the consumer chose it, escaped and cut to 300 characters (safe to log)
    application: str
    #: ``on_disconnect``: why the stream ended; None in ``on_connect``
    reason: str | None = None


#: ``on_connect`` / ``on_disconnect``: ``fn(peer)``, a plain or an ``async def`` function
StreamHook = Callable[[Peer], object]


class ProviderSide:
    """The provider's handling of one consumer's stream: forward calls and its callbacks."""

    def __init__(self, exports: Exports, session: Session, callback_timeout: float | None) -> None:
        self._exports = exports
        self.callbacks = ProviderCallbacks(session, callback_timeout, exports.pools)
        if exports.filters:  # the server's filters see its callbacks too
            self.callbacks.filters = exports.filters
        self.callbacks.attachment_limit = exports.attachment_limit

    async def dispatch(self, call: pb.Call) -> pb.Value:
        if call.callback_id:
            raise UnknownCallback(
                f"callback {call.callback_id}: a provider exports no callbacks; "
                "callback ids name objects on the consumer"
            )
        return await self._exports.run(call, self.callbacks)

    def released(self, callback_id: int) -> None:
        self.callbacks.release(callback_id, why="released by the consumer")

    def ended(self, cause: BaseException) -> None:
        self.callbacks.clear(f"the stream ended: {cause}")


class ProviderHandlers:
    """What a provider does with each RPC of the envelope service (the transport calls
    :meth:`connect`, :meth:`invoke` and :meth:`describe`), and its open streams."""

    def __init__(
        self,
        exports: Exports,
        error_types: codec.ErrorTypes,
        transport: Transport,
        *,
        application: str,
        limits: Limits,
        send_tracebacks: bool,
        callback_timeout: float | None,
        authenticator: Authenticator | None,
        on_connect: StreamHook | None = None,
        on_disconnect: StreamHook | None = None,
    ) -> None:
        self._exports = exports
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._error_types = error_types
        self._transport = transport
        self._application = application
        self._limits = limits
        self._send_tracebacks = send_tracebacks
        self._callback_timeout = callback_timeout
        self._authenticator = authenticator
        #: ``host:port`` of the provider, for telemetry (set once it listens)
        self.address = ""
        #: the sessions of the open Connect streams
        self.sessions: set[Session] = set()
        self._streams = 0  # Connect streams in connect(), authenticating ones included
        self._full = False  # max_streams was reached (logged once until back under it)
        self._full_logged = False  # ... and that was logged at WARNING
        #: the endings of streams whose peer broke a limit, and refusals past
        #: max_streams: one line each would let peers reopening streams flood the log
        self.peer_log: PeerLog | None = None
        #: set by the server's stop(): new streams are refused, late ones told go-away
        self.stopping = False

    def listening(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        """The provider listens at ``address`` (``host:port``) and serves on ``loop``."""
        self.address = address
        self.peer_log = PeerLog(
            loop,
            "Connect streams ended or refused for a limit",
            logger,
            per="a provider",
            sender="their peers",
        )

    async def all_idle(self) -> None:
        """Wait until every session is idle, sessions that join meanwhile included."""
        waited: set[Session] = set()
        while fresh := self.sessions - waited:
            waited |= fresh
            await asyncio.gather(*(session.wait_idle() for session in fresh))

    async def connect(self, stream: IncomingStream) -> None:
        if self.stopping:
            await stream.refuse(Code.UNAVAILABLE, "the provider is shutting down")
        limit = self._limits.max_streams
        if self._streams >= limit:
            if not self._full:  # once, not per refused stream: a flood would flood the log
                self._full = True
                # and rate-limited: a peer closing and reopening a stream would repeat it
                assert self.peer_log is not None
                self._full_logged = self.peer_log.line(
                    "refusing new Connect streams: %d are open (Limits.max_streams)", limit
                )
            await stream.refuse(
                Code.RESOURCE_EXHAUSTED,
                f"this provider holds {limit} Connect streams already (Limits.max_streams); "
                "try again later",
            )
        self._streams += 1
        try:
            await self._serve_stream(stream)
        finally:
            self._streams -= 1
            if self._full and self._streams < limit:
                self._full = False
                if self._full_logged:  # said only after a refusal logged at WARNING
                    self._full_logged = False
                    logger.info("accepting new Connect streams again (Limits.max_streams)")

    async def _serve_stream(self, stream: IncomingStream) -> None:
        """Authenticate one Connect stream and run its session until it ends."""
        await self.authenticate(stream)
        connection: Connection[Outgoing] = Connection(
            Role.PROVIDER,
            self._application,
            self._exports.services(),
            self._limits.max_calls_in_flight,
            self._limits.max_message_size,
        )
        session = Session(
            connection,
            stream.write,
            lambda session: ProviderSide(self._exports, session, self._callback_timeout),
            self._error_types,
            peer=stream.peer(),
            limits=self._limits,
            send_tracebacks=self._send_tracebacks,
            eof=self._transport.eof,
            translate=self._transport.translate,
        )
        session.end_log = self.peer_log
        self.sessions.add(session)
        if observe.AVAILABLE:  # OpenTelemetry: the stream's addresses, for spans and gauges
            observe.track(session, self.address)
        if self.stopping:
            # it passed the check above before stop() began and was authenticated after
            # stop() told every session go-away: tell it too, before its first call
            session.go_away(GOING_AWAY)
        # a stream that sends no Hello would be held (with its memory) for ever
        no_hello = asyncio.get_running_loop().call_later(
            self._limits.handshake_timeout, self._no_hello, session
        )
        hooked = self._on_connect is not None or self._on_disconnect is not None
        if hooked:  # its identity, for the hooks; on_connect once its Hello is in
            identity = current_identity()
            session.handshake.add_done_callback(lambda _: self._connected(session, identity))
        try:
            await session.run(stream.read)
        finally:
            no_hello.cancel()
            self.sessions.discard(session)
            if hooked:
                self._disconnected(session, identity)
        if session.ending is not None:  # it broke a limit: say which, not CANCELLED
            await stream.abort(*session.ending)

    def _connected(self, session: Session, identity: object) -> None:
        """On the loop: the consumer's Hello is in (or the stream ended before it)."""
        if self._on_connect is None or not _opened(session):
            return
        peer = Peer(session.peer, identity, wire_text(session.peer_application))
        self._fire(self._on_connect, peer, "on_connect")

    def _disconnected(self, session: Session, identity: object) -> None:
        """On the loop: a stream ended; ``on_disconnect`` hears of those that opened."""
        if self._on_disconnect is None or not _opened(session):
            return
        if session.ending is not None:  # this side ended it: a limit the consumer broke
            reason = f"ended by the provider: {session.ending[1]}"
        elif self.stopping:
            reason = "the provider stopped"
        elif session.cause is not None:
            reason = wire_text(session.cause)
        else:
            reason = "the stream ended"
        peer = Peer(session.peer, identity, wire_text(session.peer_application), reason)
        self._fire(self._on_disconnect, peer, "on_disconnect")

    def _fire(self, hook: StreamHook, peer: Peer, name: str) -> None:
        what = f"the provider's {name} hook for {peer.address}"
        loop = asyncio.get_running_loop()
        hooks.fire(hook, peer, what, loop, self._exports.pools.regular, on_loop=True)

    def _no_hello(self, session: Session) -> None:
        if not session.handshake.done():
            session.end(
                Code.DEADLINE_EXCEEDED,
                f"{session.peer} sent no Hello within {self._limits.handshake_timeout} s "
                "(Limits.handshake_timeout); the stream is ended",
            )

    async def invoke(self, call: pb.Call, rpc: Rpc) -> pb.Result:
        await self.authenticate(rpc)
        try:
            if observe.AVAILABLE and observe.collecting():  # the server span around it
                run = functools.partial(self._run_unary, peer=rpc.peer())
                value = await observe.serve(None, call, run, rpc.peer(), self.address)
            else:
                value = await self._run_unary(call, rpc.peer())
        except Exception as exc:
            error = codec.encode_error(exc, self._error_types, self._send_tracebacks)
            return pb.Result(id=call.id, error=error)
        result = pb.Result(id=call.id, value=value)
        if call.json_args:
            result.json = to_json(codec.decode(value, "the result"))
        return result

    async def _run_unary(self, call: pb.Call, peer: str = "") -> pb.Value:
        return await self._exports.run(call, None, peer)

    async def describe(self, request: pb.DescribeRequest, rpc: Rpc) -> pb.DescribeResponse:
        await self.authenticate(rpc)
        return pb.DescribeResponse(
            application=self._application,
            protocol_version=PROTOCOL_VERSION,
            services=self._exports.services(),
        )

    async def authenticate(self, rpc: Rpc) -> None:
        """Refuse the RPC unless the authenticator accepts its metadata; keep the identity."""
        if self._authenticator is None:
            set_identity(None)
            return
        metadata = rpc.metadata()
        try:
            identity = self._authenticator(metadata)
            if inspect.isawaitable(identity):
                identity = await identity
        except Unauthenticated as exc:
            logger.info("refused %s: %s", rpc.peer(), wire_text(exc))
            await rpc.refuse(Code.UNAUTHENTICATED, str(exc))
        set_identity(identity)


def _opened(session: Session) -> bool:
    """True when the stream's handshake finished (the consumer's Hello was taken)."""
    handshake = session.handshake
    return handshake.done() and not handshake.cancelled() and handshake.exception() is None
