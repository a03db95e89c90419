"""One gRPC call on a grpclib connection, both directions: the incoming messages of
:class:`~backchannel.transport.grpclib.inbox.Inbox`, and the outgoing ones framed here by
hand (the 5-byte prefix and one HTTP/2 DATA frame, written at once when flow control
allows: no codec, no task, no wait), and the end of the call (trailers, a reset)."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, FrameTooLargeError, StreamClosedError
from h2.stream import StreamState

from backchannel.transport.grpclib.inbox import Inbox
from backchannel.transport.seam import Serialize

_PREFIX = struct.Struct(">BI")
#: an HTTP/2 DATA frame's header (length << 8 | type 0, flags, stream id) and the gRPC
#: message prefix (not compressed, length) after it
_DATA = struct.Struct(">IBIBI")
_OPEN_CONNECTION = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
#: the stream states in which a DATA frame leaves the state as it is
_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class Call(Inbox):
    """A call's stream: :meth:`write` is the session's ``write`` itself."""

    _serialize: Serialize
    #: runs once before the first write (opening the stream, sending headers), then None
    _before_write: Callable[[], Awaitable[None]] | None = None
    _released = False
    _release: Callable[[], None] | None = None

    async def write(self, message: Any) -> None:
        """Send one message; returns once HTTP/2 flow control took it."""
        if self._before_write is not None:
            await self._before_write()
        if not self.connection.write_ready.is_set():
            # the socket's buffer is over its high-water mark: a peer whose HTTP/2 window
            # is huge but who does not read would otherwise take every write at once
            await self.connection.write_ready.wait()
        if self._error is not None:
            raise self._error
        data = self._serialize(message)
        size = len(data) + 5
        h2 = self._h2_connection
        if (
            size <= h2.outbound_flow_control_window
            and size <= h2.max_outbound_frame_size
            and h2.state_machine.state in _OPEN_CONNECTION
        ):
            stream = h2.streams.get(self.id)  # type: ignore[arg-type]  # open: it has one
            if (
                stream is not None
                and size <= stream.outbound_flow_control_window
                and stream.state_machine.state in _SENDING
            ):
                # the DATA frame framed here, as h2's send_data would (its state stays
                # as it is in these states; only the windows shrink): ~5 us less each
                stream.outbound_flow_control_window -= size
                h2.outbound_flow_control_window -= size
                head = _DATA.pack(size << 8, 0, stream.stream_id, 0, size - 5)
                self._transport.write(h2.data_to_send() + head + data)
                return
        frame = _PREFIX.pack(0, len(data)) + data
        try:
            h2.send_data(self.id, frame)  # type: ignore[arg-type]
        except (FlowControlError, FrameTooLargeError):
            await self.send_data(frame)  # over the window or one frame: waits and splits
        else:
            self._transport.write(h2.data_to_send())

    def send_now(self, headers: list[tuple[str, str]], *, end: bool) -> bool:
        """Send ``headers`` (trailers when ``end``) at once; False when the stream or its
        connection is closed already."""
        if self.id is None or not self.closable:
            return False
        h2 = self._h2_connection
        try:
            h2.send_headers(self.id, headers, end_stream=end)
        except StreamClosedError:
            return False
        self._transport.write(h2.data_to_send())
        return True

    def reset_now(self, code: ErrorCodes = ErrorCodes.CANCEL) -> bool:
        """Reset the stream now (RST_STREAM ``code``); False when it was closed."""
        if self.id is None or not self.closable:
            return False
        self.reset_nowait(code)
        return True

    def release(self) -> None:
        """Forget the stream on its connection (once): it is over."""
        if not self._released and self._release is not None:
            self._released = True
            self._release()
