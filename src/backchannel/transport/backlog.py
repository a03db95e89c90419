"""The one-way calls from the peer that wait for an in-flight slot, on one
:class:`~backchannel.transport.session.Session`: starting them as slots free, and holding
the peer back (by not reading it) while too many wait.

Their sender cannot count one-way calls (no Result says when one ended), so the
protocol keeps those past the limit waiting, in order (:mod:`backchannel.wire.receiving`)
rather than refusing them. Past ``Limits.max_waiting_one_way`` of them (or
``max_queued_bytes`` of their bytes) the reader stops: HTTP/2 flow control then holds
the peer's writes, a price feed pushing ticks at a slow listener is slowed to its pace,
not cut off. It reads on while this side awaits a result from the peer, which a call
running here may wait for (else neither would ever end); past twice the budget the
protocol drops them, telling the peer once.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING

from backchannel.transport import observe

if TYPE_CHECKING:
    from backchannel.settings import Limits
    from backchannel.transport.outgoing import Outgoing
    from backchannel.v1 import envelope_pb2 as pb
    from backchannel.wire.protocol import Connection


class Backlog:
    """Starts the peer's waiting one-way calls and holds the peer back while too many
    wait: a part of :class:`~backchannel.transport.session.Session`."""

    # declared for the type checker only: the Session defines them
    if TYPE_CHECKING:
        connection: Connection[Outgoing]
        cause: BaseException | None
        _loop: asyncio.AbstractEventLoop

        def _start_serving(self, call: pb.Call, traced: bool) -> None: ...

    #: set while the reader waits for the waiting one-way calls to drain
    _backlog_hold: asyncio.Event | None = None

    def _init_backlog(self, limits: Limits) -> None:
        """How many one-way calls may wait for a slot before the peer is not read."""
        self.connection.max_waiting_one_way = limits.max_waiting_one_way
        self.connection.max_waiting_bytes = limits.max_queued_bytes

    async def _hold_for_backlog(self) -> None:
        """Too many one-way calls wait: read nothing more from the peer until half of
        them have started, unless this side awaits a result from it, or the stream ends."""
        connection = self.connection
        while connection.one_way_full and not connection.pending_outgoing and not self.cause:
            hold = self._backlog_hold = asyncio.Event()
            try:
                await hold.wait()
            finally:
                self._backlog_hold = None

    def _wake_reader(self) -> None:
        """Something the held reader waits for changed: it looks again."""
        if self._backlog_hold is not None:
            self._backlog_hold.set()

    def _release_one_way(self) -> None:
        """In-flight slots freed: one-way calls that waited for one start, in order, each
        on a later loop turn in a context of its own (not the call's that freed it)."""
        connection = self.connection
        while (call := connection.next_one_way()) is not None:
            self._loop.call_soon(self._start_waited, call, context=contextvars.Context())
        if self._backlog_hold is not None and connection.one_way_drained:
            self._backlog_hold.set()

    def _start_waited(self, call: pb.Call) -> None:
        if self.cause is None:
            self._start_serving(call, observe.AVAILABLE and observe.collecting())
