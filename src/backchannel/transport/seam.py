"""The transport seam: the little backchannel asks of the RPC library that carries it.

Everything above ``transport/`` (``rpc/``, ``cluster/``, the facades) reaches the network
through the names here and nothing else; one module (or package) per library implements
them beside this one (``transport/grpcio``, on ``grpc.aio``). What a transport implements,
as a :class:`Transport`:

- **A consumer's stream.** ``channel(address, ...)`` gives a :class:`Channel` to one
  provider address, with the client's credentials (the library's own object, opaque here),
  keepalive and message-size limits, and its connect timeout; ``Channel.connect(metadata)``
  opens one Connect stream, a :class:`Stream`. The stream moves bytes: ``write(message)``
  hands ``message`` to the ``serialize`` the channel was made with and sends the bytes,
  returning once the transport took them (its flow control); ``read()`` returns the next
  message as ``parse`` made it from its bytes, or the transport's :attr:`Transport.eof`
  once the provider ended the stream with OK. A stream that ends with another status, or
  breaks, raises the library's error from ``read``/``write``: :meth:`Transport.translate`
  turns it into backchannel's (:class:`~backchannel.errors.TransportError`), naming the peer.
- **A provider.** ``server(address, handlers, ...)`` gives a :class:`Server` (not bound
  until ``start``) serving the envelope service :data:`SERVICE_NAME`: each Connect stream
  goes to ``handlers.connect`` as an :class:`IncomingStream`, each Invoke and Describe to
  ``handlers.invoke`` / ``handlers.describe`` with its :class:`Rpc`; and, when asked, the
  standard health service and server reflection (for grpcurl), each behind its
  :data:`Guard` when one is given. An RPC is ended with a status by ``Rpc.abort``, or
  refused before it is served by ``Rpc.refuse``.
- **One unary call**, ``unary(address, method, ...)``, for the command line; a status
  other than OK is raised as :class:`StatusError`, with the Error its details held.
- **Statuses** are :class:`Code`: gRPC's numbers, which are part of the HTTP/2 wire any
  gRPC transport speaks (the ``grpc-status`` trailer).

The per-message path stays as cheap as the library allows: the session calls a stream's
``read`` and ``write`` itself, so a transport gives the library's own callables there (its
bound methods), never a wrapper coroutine per message; ``parse`` and ``serialize`` run
where the library (de)serializes. Each session is told its transport's ``eof`` and
``translate`` when it is made.

A second transport is a module (or package) beside ``transport/grpcio`` implementing
:class:`Transport`, chosen in :mod:`backchannel.transport.default`; nothing in ``rpc/``
or ``cluster/`` changes.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, Protocol

from google.protobuf.message import Message

from backchannel.errors import StreamBroken, TransportError
from backchannel.settings import Keepalive, Limits
from backchannel.v1 import envelope_pb2 as pb

#: the envelope service every transport serves and connects to
SERVICE_NAME = "backchannel.v1.Envelope"


class Code(enum.IntEnum):
    """An RPC's status: gRPC's codes, by their numbers on the wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class StatusError(TransportError):
    """A unary RPC (:meth:`Transport.unary`) ended with a status other than OK; a failed
    Invoke's :class:`~backchannel.v1.envelope_pb2.Error` is ``error`` (read from the
    status details, :mod:`backchannel.transport.status_details`)."""

    def __init__(self, code: Code, details: str, error: pb.Error | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        #: the Error the status details held (a failed Invoke), else None
        self.error = error


class _EndOfStream:
    """The type of :data:`EOF`."""

    def __repr__(self) -> str:
        return "EOF"


#: what a stream's read returns at its end when the transport has no marker of its own
#: (a stream the tests drive by hand); a transport names its own as :attr:`Transport.eof`
EOF = _EndOfStream()

#: bytes -> a received message (the session's frame parser, which never raises)
Parse = Callable[[bytes], Any]
#: a message to send -> bytes
Serialize = Callable[[Any], bytes]
#: a transport's error (or any exception from a stream) -> backchannel's, naming the peer
Translate = Callable[[BaseException, str], TransportError]


def translate(exc: BaseException, peer: str) -> TransportError:
    """What no transport knows better: backchannel's own errors as they are, anything
    else a broken stream (a transport's :meth:`Transport.translate` first reads its
    library's statuses, then falls back on this)."""
    if isinstance(exc, TransportError):
        return exc
    error = StreamBroken(f"the stream to {peer} broke: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class Stream(Protocol):
    """A consumer's open Connect stream."""

    async def read(self) -> Any:
        """The next message, :attr:`Transport.eof` at the end; raises when it fails."""
        ...

    async def write(self, message: Any) -> None:
        """Send one message; returns when the transport took it."""
        ...

    def cancel(self) -> bool:
        """End the stream at once (the provider sees it cancelled)."""
        ...

    async def done_writing(self) -> None:
        """Half-close: nothing more is written; the provider's side may still come."""
        ...


class Channel(Protocol):
    """A consumer's connection to one provider address, on which streams are opened."""

    def connect(self, metadata: Sequence[tuple[str, str]]) -> Stream:
        """Open a Connect stream sending ``metadata``; it connects in the background (the
        first read or write fails if it cannot)."""
        ...

    async def close(self) -> None:
        """Close the connection and every stream on it."""
        ...


class Rpc(Protocol):
    """An RPC a provider serves, as its handler sees it."""

    def peer(self) -> str:
        """The caller's address, as the transport names it."""
        ...

    def metadata(self) -> Mapping[str, str]:
        """What the caller sent with the RPC (binary values decoded as UTF-8)."""
        ...

    async def abort(self, code: Code, message: str) -> NoReturn:
        """End the RPC with ``code`` and ``message``; raises (the handler is done)."""
        ...

    async def refuse(self, code: Code, message: str) -> NoReturn:
        """End the RPC with ``code`` and ``message`` before serving it, so the caller
        sees that status whatever it was sending (a stream's first message is read
        first where the library needs it); raises."""
        ...


class IncomingStream(Rpc, Protocol):
    """A Connect stream a provider serves."""

    async def read(self) -> Any:
        """The consumer's next message, :attr:`Transport.eof` at the end."""
        ...

    async def write(self, message: Any) -> None:
        """Send one message; returns when the transport took it."""
        ...


#: refuses an RPC (with :meth:`Rpc.refuse`) unless its metadata is accepted
Guard = Callable[[Rpc], Awaitable[None]]


class Handlers(Protocol):
    """What a provider does with the RPCs of the envelope service."""

    async def connect(self, stream: IncomingStream) -> None:
        """Serve one Connect stream until it ends."""
        ...

    async def invoke(self, call: pb.Call, rpc: Rpc) -> pb.Result:
        """Run one unary call. A Result holding an error is not sent as it is: the
        transport ends the RPC with the Error's code, and the Error in the status
        details (:func:`backchannel.transport.status_details.failure`), so grpcurl and
        scripts see the failure in the status."""
        ...

    async def describe(self, request: pb.DescribeRequest, rpc: Rpc) -> pb.DescribeResponse:
        """Say what the provider exports."""
        ...


class HealthService(Protocol):
    """The standard health service as a transport serves it."""

    #: refuses a health check unless authenticated; None: open to all
    guard: Guard | None


class Server(Protocol):
    """A provider's listening endpoint for the envelope service."""

    @property
    def health(self) -> HealthService | None:
        """The health service (None: not served)."""
        ...

    async def start(self) -> int:
        """Bind (OSError when it cannot), start serving; the port bound."""
        ...

    async def going_away(self) -> None:
        """Tell health checks the provider is going away (it stops soon)."""
        ...

    async def stop(self) -> None:
        """Stop at once: every RPC still open is cancelled."""
        ...

    async def wait_for_termination(self, timeout: float | None) -> bool:
        """Wait until stopped, or ``timeout`` seconds: True when the timeout passed first."""
        ...


class Transport(Protocol):
    """One RPC library, as backchannel uses it."""

    #: what a stream's read returns at the end of the stream
    eof: object

    def translate(self, exc: BaseException, peer: str) -> TransportError:
        """The library's error from a stream as backchannel's, naming the peer."""
        ...

    def is_plaintext(self, credentials: object | None) -> bool:
        """Whether a channel with ``credentials`` (None: none) has no TLS; TypeError,
        saying what to pass, for credentials of another transport's kind."""
        ...

    def channel(
        self,
        address: str,
        *,
        credentials: object | None,
        limits: Limits,
        keepalive: Keepalive | None,
        connect_timeout: float,
        parse: Parse,
        serialize: Serialize,
    ) -> Channel:
        """A channel to ``address``; its streams carry messages through ``serialize`` and
        ``parse``. It connects when a stream is opened."""
        ...

    def server(
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
    ) -> Server:
        """A server for ``address`` (not bound yet) calling ``handlers``; its Connect
        streams carry messages through ``parse`` and ``serialize``. The health service
        and reflection are served when asked, each behind its guard when one is given."""
        ...

    async def unary(
        self,
        address: str,
        method: str,
        request: Message,
        response_type: type[Message],
        timeout: float,
    ) -> Any:
        """Call ``method`` of the envelope service at ``address`` once, over plaintext;
        :class:`StatusError` when it ends with another status than OK."""
        ...
