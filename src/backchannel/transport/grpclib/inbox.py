"""One HTTP/2 stream's incoming gRPC messages: framed from its DATA as they arrive, each
refused from its 5-byte length prefix when it is over the limit (before its body is
buffered), handed to the reader, and acknowledged to HTTP/2 flow control once read.

:class:`Inbox` is the stream object grpclib's protocol layer makes and feeds (a subclass
of ``grpclib.protocol.Stream``, its own ``buffer``): ``add`` gets each DATA chunk,
``__ended__`` the peer's END_STREAM and ``__terminated__`` a reset or a lost connection.
Its :meth:`~Inbox.read` is the session's ``read`` itself; ``recv_data`` serves grpclib's
own message reader (health, reflection, Invoke) from the same framing.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import Any

from grpclib.protocol import Connection, Stream
from h2.connection import H2Connection

from backchannel.transport.grpclib.status import (
    EOF,
    Status,
    reset_error,
    stream_error,
    terminated_error,
)
from backchannel.transport.seam import Parse

_PREFIX = struct.Struct(">BI")
#: how grpclib names a reset by the peer (protocol.py, process_stream_reset)
_RESET = "Stream reset by remote party, error_code: "
#: what a waiting read is woken with at the end of the stream
_END: Any = object()


class Inbox(Stream):
    """The receiving side of one gRPC call on a grpclib connection."""

    def __init__(
        self,
        connection: Connection,
        h2_connection: H2Connection,
        transport: asyncio.Transport,
        *,
        parse: Parse,
        limit: int,
        stream_id: int | None = None,
    ) -> None:
        self._setup(parse, limit)
        super().__init__(connection, h2_connection, transport, stream_id=stream_id)

    def _setup(self, parse: Parse, limit: int) -> None:
        """The receiving state (before the HTTP/2 stream exists, on a consumer)."""
        self._parse = parse
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._messages: deque[tuple[bytes, int]] = deque()  # (message, bytes owed to acks)
        self._waiter: asyncio.Future[Any] | None = None
        self._pending = bytearray()  # the message being received (prefix included)
        self._known = False  # its prefix is read: it is _expect bytes long in all
        self._expect = 0
        self._ended = False  # END_STREAM came
        self._error: BaseException | None = None  # what reads raise from now on
        self._discarding = False  # refused an oversized message: the rest is dropped
        self._body: bytes | None = None  # recv_data: the body after its prefix was read

    def init_stream(self, stream_id: int, connection: Connection) -> None:
        super().init_stream(stream_id, connection)
        self.buffer = self  # type: ignore[assignment]  # grpclib feeds DATA to buffer.add

    # ------------------------------------------------------------ from HTTP/2

    def add(self, data: bytes, ack_size: int) -> None:
        """A DATA chunk of ``ack_size`` flow-controlled bytes arrived."""
        if self._discarding:
            self._ack(ack_size)
            return
        ack_now = ack_size  # acknowledged now: all but the messages left queued
        view = memoryview(data)
        size = len(view)
        offset = 0
        carried = len(self._pending)  # bytes of a message under way, acknowledged already
        while offset < size:
            pending = self._pending
            if not pending and size - offset >= 5:  # a whole prefix here: the usual case
                length = self._length(view[offset : offset + 5])
                if length < 0:
                    self._ack(ack_now)
                    return
                end = offset + 5 + length
                if end <= size:
                    ack_now -= self._deliver(bytes(view[offset + 5 : end]), end - offset)
                    offset = end
                    continue
                self._pending = bytearray(view[offset:])
                self._expect = 5 + length
                self._known = True
                break
            if not self._known:  # a prefix split across chunks
                take = min(5 - len(pending), size - offset)
                pending += view[offset : offset + take]
                offset += take
                if len(pending) < 5:
                    break
                length = self._length(bytes(pending[:5]))
                if length < 0:
                    self._ack(ack_now)
                    return
                self._known = True
                self._expect = 5 + length
            take = min(self._expect - len(pending), size - offset)
            pending += view[offset : offset + take]
            offset += take
            if len(pending) < self._expect:
                break
            ack_now -= self._deliver(bytes(pending[5:]), self._expect - carried)
            carried = 0
            self._pending = bytearray()
            self._known = False
        if ack_now:
            self._ack(ack_now)

    def _length(self, prefix: bytes | memoryview) -> int:
        """The message length a prefix announces, or -1 when it is refused."""
        flag, length = _PREFIX.unpack(prefix)
        length = int(length)
        if flag:
            self._refuse(Status.INTERNAL, "a compressed message, but no compression was agreed")
            return -1
        if length > self._limit:
            self._refuse(
                Status.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({length} vs. {self._limit})",
            )
            return -1
        return length

    def _deliver(self, message: bytes, arrived: int) -> int:
        """A whole message: to the waiting reader (its bytes acknowledged now), else
        queued (acknowledged when read). The bytes the acknowledgement still owes."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(message)
                return 0
        self._messages.append((message, arrived))
        return arrived

    def _ack(self, size: int) -> None:
        if size and self.id is not None:
            self.connection.ack(self.id, size)

    def _refuse(self, status: Status, message: str) -> None:
        """A message this side will not take: end the call with ``status``."""
        self._discarding = True
        self._pending = bytearray()
        self._known = False
        self._fail(stream_error(status, message))
        self.refused(status, message)

    def refused(self, status: Status, message: str) -> None:
        """Tell the peer the call ended with ``status`` (each side its own way)."""

    def __ended__(self) -> None:
        self._ended = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(_END)

    def __terminated__(self, reason: str) -> None:
        """The peer reset the stream, or the connection ended (grpclib's ``reason``)."""
        if reason.startswith(_RESET):
            code = reason.rpartition(" ")[2]
            self._fail(reset_error(int(code) if code.isdigit() else 0))
        else:
            self._fail(terminated_error(reason))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(self._error)

    def unacked_size(self) -> int:
        """Bytes received but not acknowledged (grpclib acknowledges them on release)."""
        return sum(owed for _message, owed in self._messages)

    # ------------------------------------------------------------- reading

    async def read(self) -> Any:
        """The next message as ``parse`` makes it; the end marker at the end."""
        if self._messages:
            message, owed = self._messages.popleft()
            if owed:
                self._ack(owed)
            # one loop turn per message that waited, as a read of the wire takes: a
            # backlog read without one would run every call it holds before a result
            # (or another stream) got a turn, past max_queued_bytes' back-pressure
            await asyncio.sleep(0)
            return self._parse(message)
        if self._error is not None:
            raise self._error
        if self._ended:
            return self.finish()
        waiter = self._waiter = self._loop.create_future()
        message = await waiter
        if message is _END:
            return self.finish()
        return self._parse(message)

    def finish(self) -> Any:
        """What a read returns at the end of the stream (or raises)."""
        return EOF

    async def recv_data(self, size: int) -> bytes:
        """grpclib's message reader: the 5-byte prefix, then the body it announced."""
        if self._body is not None:
            body, self._body = self._body, None
            assert len(body) == size
            return body
        assert size == 5, size
        if self._messages:
            message, owed = self._messages.popleft()
            if owed:
                self._ack(owed)
        elif self._error is not None:
            raise self._error
        elif self._ended:
            return b""
        else:
            waiter = self._waiter = self._loop.create_future()
            message = await waiter
            if message is _END:
                return b""
        self._body = message
        return _PREFIX.pack(0, len(message))
