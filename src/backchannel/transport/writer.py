"""The writing part of a :class:`~backchannel.transport.session.Session`: batching with
back-pressure.

What the protocol queued is sent one write at a time, coalescing every frame that is
ready into one ``Batch`` message; each write's completion (gRPC's flow control) starts
the next, through done-callbacks rather than a task. The bytes waiting to be written are
counted, so a peer that reads slower than it asks is read from (and sent calls) no more
until they drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from backchannel.wire import frames

if TYPE_CHECKING:
    import collections

    from backchannel.settings import Limits
    from backchannel.transport.outgoing import Outgoing
    from backchannel.v1 import envelope_pb2 as pb
    from backchannel.wire.protocol import Connection

#: frames per Batch message, and roughly how many bytes one Batch may hold
MAX_BATCH_FRAMES = 32
MAX_BATCH_BYTES = 1 << 20
#: frames per Batch message after the first of a write burst: the first is small, so the
#: peer starts on it while the rest is written; the rest go in fewer, bigger messages (a
#: write costs tens of microseconds: the 1,000 results of a fan-out, 32 a message, cost
#: more to write than to make)
MAX_LATER_BATCH_FRAMES = 256
#: frames the writer packs into messages at a time (~1 ms), so a long queue of small
#: frames never holds the loop while it is packed all at once
_COALESCE_FRAMES = 64 * MAX_BATCH_FRAMES

Write = Callable[[bytes], Awaitable[None]]


class Writer:
    """Sends what the protocol queued, as few messages as the batch limits allow: a
    part of :class:`~backchannel.transport.session.Session`, whose ``__init__`` sets up
    the state below."""

    # declared for the type checker only: at run time a stub here would hide the part
    # of the Session that defines the method
    if TYPE_CHECKING:
        # the writer's state
        _queue: list[bytes]
        _messages: collections.deque[bytes]
        _writing: _Driven | None
        _write_context: contextvars.Context
        _write_soon: bool
        _drained: asyncio.Event
        _queue_bytes: int
        _message_bytes: int
        # what it uses of the rest of the session
        connection: Connection[Outgoing]
        cause: BaseException | None
        _loop: asyncio.AbstractEventLoop
        _limits: Limits
        _write: Write
        _handling: bool
        _peer_max_message: int
        _writable: asyncio.Event
        calls_held: bool
        _stall: asyncio.TimerHandle | None
        _waiting: collections.deque[Outgoing]

        def _over_limit(self) -> None: ...
        def _feed_held(self) -> None: ...
        def _write_failed(self, exc: BaseException) -> None: ...
        def _admit(self) -> None: ...

    def flush(self) -> None:
        """Send what the protocol queued: at the end of this turn of the event loop when
        no write is under way (so what this turn produces goes as one batch), else when
        the current write completes."""
        if self._handling:
            return  # the reader writes what acting on its message produced, once done
        idle = self._writing is None and not self._write_soon
        if self._enqueue() and idle:
            self._write_soon = True
            self._loop.call_soon(self._write_next)

    def _write_now(self) -> None:
        """Send what is queued without waiting for the end of the loop turn."""
        if self._enqueue() and self._writing is None:
            self._write_next()

    def _enqueue(self) -> bool:
        """Move what the protocol queued to the writer's queue; True if any is waiting."""
        frames = self.connection.take_encoded()
        if frames:
            self._queue.extend(frames)
            self._drained.clear()
            self._queue_bytes += sum(map(len, frames))
            if self._queue_bytes + self._message_bytes > self._limits.max_queued_bytes:
                self._over_limit()
        return bool(self._queue)

    def _write_next(self) -> None:
        """Start the next write. Its first step runs here, so the message is handed to
        gRPC without waiting for a loop turn; the rest is driven by done-callbacks
        (``_Driven``) outside every task, so no caller's cancellation can reach it (a
        cancelled write ends the RPC)."""
        self._write_soon = False
        if self._writing is not None:
            return  # the completion of the current write carries on
        while True:
            if not self._messages:
                if not self._queue:
                    self._drained.set()
                    return
                if len(self._queue) <= _COALESCE_FRAMES:
                    frames, self._queue = self._queue, []
                    self._queue_bytes = 0
                else:  # a bounded piece: coalescing 100,000 frames at once takes ~80 ms
                    frames = self._queue[:_COALESCE_FRAMES]
                    del self._queue[:_COALESCE_FRAMES]
                    self._queue_bytes -= sum(map(len, frames))
                limit = min(MAX_BATCH_BYTES, self._peer_max_message)
                self._messages.extend(coalesce(frames, limit))
                self._message_bytes = sum(map(len, self._messages))
            message = self._messages.popleft()
            self._message_bytes -= len(message)
            if self.calls_held:  # over the limit, or draining back from it
                self._drained_some()
            writing = self._write(message)
            try:
                waiting_on = writing.send(None)  # type: ignore[attr-defined]
            except StopIteration:
                continue  # written already
            except Exception as exc:
                self._write_failed(exc)
                return
            self._writing = _Driven(
                self._loop,
                self._write_context,
                writing,  # type: ignore[arg-type]
                waiting_on,
                self._written,
            )
            return

    def _drained_some(self) -> None:
        """The writer took a message while calls are held: back under max_queued_bytes,
        read and send again; under half of it, calls not started yet start a few at a
        time; once the queue is empty, they are no longer held."""
        queued = self._queue_bytes + self._message_bytes
        limit = self._limits.max_queued_bytes
        if queued > limit:
            return
        if not self._writable.is_set():
            self._writable.set()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            if self._waiting:  # not from here: sending one would start a second write
                self._loop.call_soon(self._admit)
        if queued <= limit // 2:
            self._feed_held()

    def _written(self, exc: BaseException | None) -> None:
        """A write ended. The next one starts at the end of this loop turn, so what the
        calls it woke produce goes with it (as flush does)."""
        self._writing = None
        if isinstance(exc, asyncio.CancelledError):
            return
        if exc is not None:
            self._write_failed(exc)
        elif not self._messages and not self._queue:
            self._drained.set()
        elif not self._write_soon:
            self._write_soon = True
            self._loop.call_soon(self._write_next)

    async def _drain_writer(self) -> None:
        """Let what is queued (a last Fault, say) be written for a moment, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), 0.5)
        if self._writing is not None:
            self._writing.cancel()


def coalesce(encoded: list[bytes], max_bytes: int = MAX_BATCH_BYTES) -> list[bytes]:
    """Pack serialized frames into as few messages as the batch limits allow: the first
    of :data:`MAX_BATCH_FRAMES`, the others of :data:`MAX_LATER_BATCH_FRAMES`.

    A batch is put together from the frames' bytes (a ``Frame`` whose ``batch`` holds
    them), not by copying the frames into a new message.
    """
    if len(encoded) == 1:
        return encoded
    messages: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    most = MAX_BATCH_FRAMES
    for data in encoded:
        if batch and (len(batch) >= most or size + len(data) > max_bytes):
            messages.append(frames.batch_frame(batch))
            batch, size = [], 0
            most = MAX_LATER_BATCH_FRAMES
        batch.append(data)
        size += len(data)
    if batch:
        messages.append(frames.batch_frame(batch))
    return messages


def serialize(message: pb.Frame | bytes) -> bytes:
    """The stream's serializer: the writer hands it frames it has serialized already."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Driven:
    """Drives a coroutine whose first step already ran, without a task: each future it
    waits on wakes it through a done-callback, and ``done`` gets what it ended with
    (None, or its exception). A task would take two more callbacks per write: its first
    step, and its done-callback.
    """

    __slots__ = ("_context", "_coroutine", "_done", "_loop", "_waiting")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
        coroutine: Coroutine[Any, Any, None],
        waiting_on: Any,
        done: Callable[[BaseException | None], None],
    ) -> None:
        self._loop = loop
        self._context = context
        self._coroutine = coroutine
        self._done = done
        self._waiting: asyncio.Future[Any] | None = None
        self._wait(waiting_on)

    def _wait(self, waiting_on: Any) -> None:
        if waiting_on is None:  # a bare yield: go on at the next turn, as a task would
            self._waiting = None
            self._loop.call_soon(self._step, context=self._context)
            return
        if not getattr(waiting_on, "_asyncio_future_blocking", False):
            self._coroutine.close()
            self._done(RuntimeError(f"a write waited on {waiting_on!r}, not a future"))
            return
        waiting_on._asyncio_future_blocking = False
        self._waiting = waiting_on
        waiting_on.add_done_callback(self._step, context=self._context)

    def _step(self, _future: object = None) -> None:
        try:
            waiting_on = self._coroutine.send(None)
        except StopIteration:
            self._done(None)
        except (Exception, asyncio.CancelledError) as exc:
            self._done(exc)
        else:
            self._wait(waiting_on)

    def cancel(self) -> None:
        """Cancel what it waits on: the coroutine then ends with CancelledError."""
        if self._waiting is not None:
            self._waiting.cancel()
