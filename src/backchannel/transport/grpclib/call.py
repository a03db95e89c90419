"""One gRPC call on a grpclib connection, both directions: the incoming messages of
:class:`~backchannel.transport.grpclib.inbox.Inbox`, and the outgoing ones framed here by
hand (the 5-byte prefix and one HTTP/2 DATA frame, written at once when flow control
allows: no codec, no task, no wait), and the end of the call (trailers, a reset)."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, FrameTooLargeError, StreamClosedError

from backchannel.transport.grpclib.inbox import Inbox
from backchannel.transport.seam import Serialize

_PREFIX = struct.Struct(">BI")


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
        if self._error is not None:
            raise self._error
        data = self._serialize(message)
        frame = _PREFIX.pack(0, len(data)) + data
        if self.connection.write_ready.is_set():
            h2 = self._h2_connection
            try:
                h2.send_data(self.id, frame)
            except (FlowControlError, FrameTooLargeError):
                pass  # over the window or one frame: grpclib's path waits and splits
            else:
                self._transport.write(h2.data_to_send())
                return
        await self.send_data(frame)

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
