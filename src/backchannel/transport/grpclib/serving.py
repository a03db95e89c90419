"""A provider's side of grpclib: the listening socket, one HTTP/2 connection per
consumer (grpclib's protocol, with a handshake deadline), each Connect stream served by
hand as a :class:`~backchannel.transport.grpclib.incoming.ServerCall`, the other RPCs
(Invoke, Describe, health, reflection) by grpclib's request handler over their mappings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import _DispatchServerEvents
from grpclib.protocol import AbstractHandler, H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import request_handler
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import RemoteSettingsChanged
from h2.settings import SettingCodes

from backchannel.settings import Keepalive, Limits
from backchannel.transport.grpclib import services
from backchannel.transport.grpclib.incoming import Ended, ServerCall
from backchannel.transport.grpclib.liveness import FLOOD_SLACK, shut, watch
from backchannel.transport.grpclib.options import (
    configuration,
    listening_socket,
    server_tls,
    wire_limit,
)
from backchannel.transport.grpclib.status import RawDetails
from backchannel.transport.health import SERVING
from backchannel.transport.seam import SERVICE_NAME, Code, Guard, Handlers, Parse, Serialize

logger = logging.getLogger("backchannel")

CONNECT_PATH = f"/{SERVICE_NAME}/Connect"
#: RPCs other than Connect (Invoke, Describe, health, reflection) one connection may
#: have open at once; more are refused (REFUSED_STREAM). Connect streams are bounded by
#: Limits.max_streams, over the whole provider
OTHER_STREAMS = 1024


class _Connection(AbstractHandler):
    """One consumer connection's RPCs: a task each, cancelled when the peer resets it."""

    def __init__(self, server: GrpclibServer) -> None:
        self._server = server
        self.tasks: dict[H2Stream, asyncio.Task[None]] = {}
        #: how many of them are Connect streams
        self.connects = 0

    def accept(
        self, stream: H2Stream, headers: Sequence[tuple[str, str]], release: Callable[[], None]
    ) -> None:
        server = self._server
        path = next((value for key, value in headers if key == ":path"), "")
        if path == CONNECT_PATH and isinstance(stream, ServerCall):
            work: Any = server.serve_connect(stream, headers, release)
        elif len(self.tasks) - self.connects >= OTHER_STREAMS and isinstance(stream, ServerCall):
            stream.reset_now(ErrorCodes.REFUSED_STREAM)
            release()
            return
        elif path not in server.mapping and isinstance(stream, ServerCall):
            # grpclib's own answer lacks the content-type a Go client (grpcurl) requires
            stream.end_call(Code.UNIMPLEMENTED, "Method not found!")
            release()
            return
        else:
            work = request_handler(
                server.mapping,
                stream,
                list(headers),
                server.codec,
                server.details_codec,
                server.dispatch,
                release,
            )
        task = asyncio.get_running_loop().create_task(work)
        self.tasks[stream] = task
        server.tasks.add(task)
        connect = path == CONNECT_PATH
        self.connects += connect
        task.add_done_callback(lambda _task: self._done(stream, _task, connect))

    def _done(self, stream: H2Stream, task: asyncio.Task[None], connect: bool) -> None:
        self.tasks.pop(stream, None)
        self.connects -= connect
        self._server.tasks.discard(task)

    def cancel(self, stream: H2Stream) -> None:
        task = self.tasks.pop(stream, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()


class _Protocol(H2Protocol):
    """grpclib's HTTP/2 protocol for one consumer connection: streams made as
    :class:`ServerCall`, and closed when its HTTP/2 handshake does not come in time."""

    def __init__(self, server: GrpclibServer) -> None:
        super().__init__(_Connection(server), server.config, server.h2_config)
        self._server = server
        self._handshake: asyncio.TimerHandle | None = None
        #: bytes of replies to what the peer sent (PING and SETTINGS acknowledgements,
        #: resets) queued while the socket's buffer is over its high-water mark
        self._owed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio and grpclib set it only on sockets made with proto IPPROTO_TCP, which
            # an accepted socket of socket.create_server's is not: without it Nagle holds
            # a second small write until the first is acknowledged (up to 40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        server = self._server
        server.protocols.add(self)
        connection = self.connection
        watch(connection)
        h2 = connection._connection
        # told to the peer (h2 ends the connection of one that opens more); the Connect
        # streams past max_streams and the others past OTHER_STREAMS are refused before
        h2.update_settings(
            {SettingCodes.MAX_CONCURRENT_STREAMS: server.limits.max_streams + OTHER_STREAMS}
        )
        connection.flush()

        def create_stream(*, stream_id: int | None = None, wrapper: Any = None) -> ServerCall:
            return ServerCall(
                connection,
                h2,
                connection._transport,
                parse=server.parse,
                limit=server.limit,
                stream_id=stream_id,
            )

        # grpclib makes each stream with this: ours take the DATA as it comes
        connection.create_stream = create_stream  # type: ignore[method-assign]
        self._handshake = asyncio.get_running_loop().call_later(
            server.limits.handshake_timeout, self._no_handshake, transport
        )
        processor = self.processor
        process = processor.process

        def first_events(event: Any) -> None:
            # the handshake is done with the peer's preface and SETTINGS, not its first
            # byte; then grpclib's own process again, so no cost per event after it
            if isinstance(event, RemoteSettingsChanged):
                self._handshaken()
            process(event)

        processor.process = first_events  # type: ignore[method-assign]

    def _handshaken(self) -> None:
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        with contextlib.suppress(AttributeError):
            del self.processor.process

    def _no_handshake(self, transport: asyncio.BaseTransport) -> None:
        logger.info(
            "closed a connection that sent no HTTP/2 handshake within %s s "
            "(Limits.handshake_timeout)",
            self._server.limits.handshake_timeout,
        )
        transport.close()

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        transport = (
            None if connection.write_ready.is_set() else connection.__dict__.get("_transport")
        )
        if transport is None:  # (grpclib drops _transport on close)
            super().data_received(data)
            return
        # the peer does not read: what it makes this side answer is counted, as nothing
        # else bounds it (the DATA written for it is, by flow control and write_ready)
        before = transport.get_write_buffer_size()
        super().data_received(data)
        self._owed += transport.get_write_buffer_size() - before
        if self._owed > FLOOD_SLACK and not transport.is_closing():
            logger.warning(
                "aborted a connection from %s that sends without reading the replies: "
                "%d bytes of them unsent",
                transport.get_extra_info("peername"),
                self._owed,
            )
            transport.abort()

    def resume_writing(self) -> None:
        self._owed = 0
        super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._handshake is not None:
            self._handshake.cancel()
        self._server.protocols.discard(self)
        super().connection_lost(exc)


class GrpclibServer:
    """A grpclib provider for the envelope service, listening from :meth:`start` (and
    again on a later start); health and reflection beside it when asked."""

    def __init__(
        self,
        address: str,
        handlers: Handlers,
        *,
        credentials: object | None,
        limits: Limits,
        keepalive: Keepalive | None,
        parse: Parse,
        serialize: Serialize,
        health: bool,
        health_guard: Guard | None,
        reflection: bool,
        reflection_guard: Guard | None,
    ) -> None:
        self._address = address
        self._handlers = handlers
        self._tls = server_tls(credentials)
        self.limits = limits
        self.limit = wire_limit(limits)
        self.config: Configuration = configuration(keepalive).__for_server__()
        self.h2_config = H2Configuration(
            client_side=False,
            header_encoding="ascii",
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.parse = parse
        self.serialize = serialize
        self.codec = ProtoCodec()
        #: a failed Invoke's status details, made by the handler (services.envelope)
        self.details_codec = RawDetails()
        self.dispatch = _DispatchServerEvents()
        self.health: services.Health | None = services.Health(health_guard) if health else None
        served = [SERVICE_NAME]
        self.mapping = services.envelope(handlers)
        if self.health is not None:
            self.mapping.update(self.health.mapping())
            served.append(services.HEALTH_SERVICE)
        if reflection:
            self.mapping.update(services.reflection(served, reflection_guard))
        self.protocols: set[_Protocol] = set()
        #: the RPCs being served, on every connection
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        sock = listening_socket(self._address)
        try:
            self._server = await loop.create_server(
                lambda: _Protocol(self),
                sock=sock,
                ssl=self._tls,
                ssl_handshake_timeout=self.limits.handshake_timeout if self._tls else None,
            )
        except BaseException:
            sock.close()
            raise
        self._stopped = asyncio.Event()
        if self.health is not None:
            self.health.state.set("", SERVING)
            self.health.state.set(SERVICE_NAME, SERVING)
        port: int = sock.getsockname()[1]
        return port

    async def going_away(self) -> None:
        if self.health is not None:
            self.health.state.going_away()

    async def stop(self) -> None:
        """Stop at once: every RPC still open is cancelled, every connection closed."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        for protocol in list(self.protocols):
            protocol.handler.close()  # cancels its RPCs: a Connect ends with CANCELLED
        # every RPC ends before the loop may stop, those of connections lost meanwhile
        # (cancelled by grpclib as they go) included: a coroutine left suspended would
        # hold its session, its timers and their loop for good
        while self.tasks and loop.time() < deadline:
            for task in self.tasks:
                task.cancel()
            await asyncio.wait(set(self.tasks), timeout=deadline - loop.time())
        for protocol in list(self.protocols):
            with contextlib.suppress(Exception):
                h2 = protocol.connection._connection
                h2.close_connection(ErrorCodes.NO_ERROR)
                protocol.connection.flush()
            shut(protocol.connection)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        self._stopped.set()

    async def wait_for_termination(self, timeout: float | None) -> bool:
        if self._server is None:
            return False
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return True
        return False

    async def serve_connect(
        self, call: ServerCall, headers: Sequence[tuple[str, str]], release: Callable[[], None]
    ) -> None:
        """Serve one Connect stream; its status goes in the trailers at the end."""
        call.opened(headers, self.serialize)
        try:
            await self._handlers.connect(call)
        except Ended:
            pass
        except asyncio.CancelledError:
            call.end_call(Code.CANCELLED, "the provider cancelled the call")
            raise
        except Exception as exc:
            logger.exception("a Connect stream failed")
            call.end_call(Code.UNKNOWN, f"Unexpected {type(exc)}: {exc}")
        else:
            call.end_call(Code.OK, "")
        finally:
            release()
