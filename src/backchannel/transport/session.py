"""Drives one protocol :class:`~backchannel.wire.protocol.Connection` over one Connect stream.

Used by both ends: the provider wraps the server side of ``Connect``, the consumer the
client side. One reader task takes frames off the stream and never waits on user code
(an incoming call runs eagerly, and gets a task of its own only if it has to wait); the
writer sends what the protocol queued, one write at a time, coalescing every frame that
is ready into one ``Batch`` message: each write's completion (gRPC's flow control)
starts the next, through done-callbacks rather than a task. The first failure of the
stream is stored and fails every pending call at once.

:class:`Session` is made of four parts, one module each, sharing its state (mixins, so
no message pays an extra attribute hop): :class:`~backchannel.transport.writer.Writer`
(batching, back-pressure), :class:`~backchannel.transport.receiver.Receiver` (acting on
what the peer sends, serving its calls) and :class:`~backchannel.transport.outgoing.Calls`
(the table of outgoing calls and their deadlines), with
:class:`~backchannel.transport.multicasting.Multicasting` (one call to many callback
instances, as Multicast frames). This module keeps the stream's life:
the read loop, and how the stream ends. The transport's own end-of-stream marker and error
translation come in through the constructor (transport/seam.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, cast

from backchannel.errors import (
    StreamBroken,
    forget_frames,
)
from backchannel.settings import Limits
from backchannel.transport import receiver
from backchannel.transport.backlog import Backlog
from backchannel.transport.deadlines import Deadlines
from backchannel.transport.handoff import (
    Deferred as Deferred,  # re-exported: cluster/attempt.py and the tests import it here
)
from backchannel.transport.multicasting import Multicasting
from backchannel.transport.outgoing import COMPACT_WAITING_AT, Calls
from backchannel.transport.outgoing import Outgoing as Outgoing  # re-exported
from backchannel.transport.peerlog import PeerLog
from backchannel.transport.pools import CountedPool
from backchannel.transport.receiver import (
    Dispatcher,
    Receiver,
    SplitBatch,
    many_frames,
)
from backchannel.transport.receiver import parse_frame as parse_frame  # re-exported
from backchannel.transport.seam import EOF, Code, Translate, translate
from backchannel.transport.writer import Write, Writer, _Driven
from backchannel.transport.writer import serialize as serialize  # re-exported
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec
from backchannel.wire.protocol import Connection, Role, State, Unparseable
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")

#: (session, id of the incoming call) while this side runs a call the peer sent; calls
#: made meanwhile carry that id as their parent so the peer can tell re-entrant calls.
#: The receiver sets it (with itself, always a Session), hence the cast.
CURRENT_CALL = cast("contextvars.ContextVar[tuple[Session, int] | None]", receiver.CURRENT_CALL)


Read = Callable[[], Awaitable[Any]]


class Session(Writer, Receiver, Calls, Multicasting, Backlog):
    """One live Connect stream, either end."""

    def __init__(
        self,
        connection: Connection[Outgoing],
        write: Write,
        dispatcher: Callable[[Session], Dispatcher],
        error_types: codec.ErrorTypes,
        *,
        peer: str,
        limits: Limits,
        send_tracebacks: bool = False,
        eof: object = EOF,
        translate: Translate = translate,
    ) -> None:
        self.connection = connection
        self.peer = peer
        self.error_types = error_types
        self._write = write
        # the transport's: what its read returns at the end, and its errors as ours
        self._eof = eof
        self._translate = translate
        self._send_tracebacks = send_tracebacks
        self._loop = asyncio.get_running_loop()
        self._limits = limits
        self._init_backlog(limits)
        # what the peer accepts, until its handshake says otherwise
        self._peer_max_calls = limits.max_calls_in_flight
        self._peer_max_message = limits.max_message_size
        self._sent: dict[int, Outgoing] = {}
        self._deadlines = Deadlines(self._loop, self._expire)
        self._waiting: collections.deque[Outgoing] = collections.deque()
        self._compact_waiting_at = COMPACT_WAITING_AT
        self._loop_thread = threading.get_ident()
        # the call tree, for re-entrancy: each call's id -> the call it was made during
        self._outgoing_parent: dict[int, int] = {}
        self._incoming_parent: dict[int, int] = {}
        self._queue: list[bytes] = []  # serialized frames, to batch
        self._messages: collections.deque[bytes] = collections.deque()  # serialized, to write
        self._writing: _Driven | None = None  # the write under way
        self._write_context = contextvars.Context()  # where writes run: no caller's
        self._write_soon = False  # a _write_next is scheduled
        self._handling = False  # the reader is acting on a message: it writes when done
        # calls the peer sent that are running: their task, or None while running eagerly
        self._running: dict[int, asyncio.Task[None] | None] = {}
        self._one_way_tasks: set[asyncio.Task[None]] = set()  # strong references
        self._drained = asyncio.Event()  # set while the writer has nothing left to send
        # bytes waiting to be written: frames not yet serialized, and serialized messages
        self._queue_bytes = self._message_bytes = 0
        # set while they are under max_queued_bytes: the reader reads and calls are sent
        self._writable = asyncio.Event()
        self._writable.set()
        # while over max_queued_bytes: calls not started wait (see Receiver._park)
        self.calls_held = False
        self.held_pools: set[CountedPool] = set()
        self._parked: collections.deque[tuple[pb.Call, bool]] = collections.deque()
        self._unparking = False
        self._reader: asyncio.Task[Any] | None = None
        # a consumer weighs a Multicast's targets when it cuts what arrived into slices
        self._weigh_targets = connection.role is Role.CONSUMER
        self._stall: asyncio.TimerHandle | None = None  # ends a stream over the limit too long
        #: Multicast frames sent on this stream (one per group of targets; for tests, logs)
        self.multicast_frames = 0
        #: the status this side ended the stream with, when it did (a peer broke a limit)
        self.ending: tuple[Code, str] | None = None
        #: the rate-limited warnings about what the peer sent
        self.peer_log = PeerLog(self._loop, peer, logger)
        # Faults the peer may still send: max_faults at once, refilled at that a minute
        self._fault_allowance = float(limits.max_faults)
        self._fault_time = self._loop.time()
        self._closed = asyncio.Event()
        #: set once the handshake finished; holds the provider's services on the consumer
        self.handshake: asyncio.Future[tuple[pb.ServiceInfo, ...]] = self._loop.create_future()
        #: why the stream ended, once it has
        self.cause: BaseException | None = None
        #: this side's handling of the peer's calls on this stream
        self.dispatcher = dispatcher(self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the session runs on."""
        return self._loop

    def in_loop_thread(self) -> bool:
        """True when called from the thread that runs this session's loop."""
        return threading.get_ident() == self._loop_thread

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        """True while new calls may be sent on this stream."""
        return (
            self.cause is None
            and self.connection.state is State.OPEN
            and not self.connection.peer_going_away
        )

    @property
    def closed(self) -> asyncio.Event:
        """Set once the stream has ended and every pending call was failed."""
        return self._closed

    # ---------------------------------------------------------------- reading

    async def run(self, read: Read) -> None:
        """Read frames until the stream ends; then fail what is pending and return."""
        cause: BaseException
        eof = self._eof
        self._reader = asyncio.current_task()
        try:
            while True:
                if not self._writable.is_set():  # back-pressure: the peer does not read
                    await self._writable.wait()
                if self.connection.one_way_waiting:  # back-pressure: it sends too many
                    await self._hold_for_backlog()
                if self.cause is not None:
                    cause = self.cause
                    break
                frame = await read()
                if frame is eof:
                    cause = StreamBroken(f"the peer {self.peer} closed the stream")
                    break
                pieces = many_frames(frame, self._weigh_targets)
                if pieces is not None:
                    await self._receive_in_slices(pieces)
                    continue
                # what acting on one message produces is written as one batch: no loop turn
                self._handling = True
                try:
                    if type(frame) is Unparseable:
                        events = self.connection.receive_unparseable(
                            frame.size,
                            frame.reason,
                            frame.call_id,
                            frame.one_way,
                            frame.result_id,
                            frame.targets,
                        )
                    elif type(frame) is SplitBatch:
                        events = self.connection.receive_batch(frame.frames)
                    else:
                        events = self.connection.receive(frame)
                    self._handle(events)
                finally:
                    self._handling = False
                self._write_now()
        except asyncio.CancelledError:
            if self.ending is not None and self._reader is not None:
                self._reader.uncancel()  # this side ended it: the caller ends the RPC
                return
            self.lost(StreamBroken(f"the stream to {self.peer} was closed"))
            if self._writing is not None:
                self._writing.cancel()
            raise
        except Exception as exc:
            cause = self._translate(exc, self.peer)
        self.lost(cause)
        await self._drain_writer()

    # ----------------------------------------------------------------- ending

    def _over_limit(self) -> None:
        """More than max_queued_bytes waits to be written: the peer reads slower than it
        asks. Stop reading from it (and sending it calls) until the queue drains; past
        twice the limit, end the stream: only results of calls already running got here."""
        if self.cause is not None:
            return
        limit = self._limits.max_queued_bytes
        queued = self._queue_bytes + self._message_bytes
        if queued > 2 * limit:
            self.end(
                Code.RESOURCE_EXHAUSTED,
                f"{self.peer} did not read what was sent to it: {queued} bytes queued for "
                f"it, over twice the limit of {limit} bytes (max_queued_bytes); "
                "the stream is ended",
            )
        elif self._writable.is_set():
            self._writable.clear()
            self.calls_held = True  # calls not started yet wait: see _feed_held
            self._stall = self._loop.call_later(self._limits.max_write_stall, self._stalled)
            logger.info(
                "%s reads slower than it asks: %d bytes queued for it, over the limit of %d "
                "bytes (max_queued_bytes); not reading from it until they are written",
                self.peer,
                queued,
                limit,
            )

    def _stalled(self) -> None:
        """Over max_queued_bytes for max_write_stall seconds: the peer reads nothing more
        (or waits, as this side does, for the other to read first)."""
        self.end(
            Code.RESOURCE_EXHAUSTED,
            f"{self.peer} read nothing of what was queued for it for "
            f"{self._limits.max_write_stall} s (max_write_stall) while over the limit of "
            f"{self._limits.max_queued_bytes} bytes (max_queued_bytes); the stream is ended",
        )

    #: where :meth:`end` logs, when not at WARNING each time: the provider's one
    #: rate-limited log for all its streams, which peers could otherwise flood
    end_log: PeerLog | None = None

    def end(self, code: Code, why: str) -> None:
        """End the stream of a peer that broke a limit, dropping what is queued for it;
        the provider ends the RPC with ``code`` and ``why`` (:attr:`ending`)."""
        if self.cause is not None:
            return
        self.ending = (code, why)
        if self.end_log is not None:  # a provider's: rate-limited across its streams
            self.end_log.line("%s", why)
        else:
            logger.warning("%s", why)
        self._queue.clear()
        self._messages.clear()
        self._queue_bytes = self._message_bytes = 0
        self._drained.set()
        if self._writing is not None:
            self._writing.cancel()
        self.lost(StreamBroken(why))
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()  # it may wait for a frame the peer never sends

    def _write_failed(self, exc: BaseException) -> None:
        """The stream failed under a write: the reader sees it too."""
        self._messages.clear()
        self._queue.clear()
        self._queue_bytes = self._message_bytes = 0
        self._drained.set()
        self.lost(self._translate(exc, self.peer))

    def _count_fault(self) -> None:
        """A Fault came: past ``max_faults`` at once (refilled at that many a minute),
        the peer is not reporting this side's mistakes but flooding: end the stream."""
        now = self._loop.time()
        limit = self._limits.max_faults
        refill = (now - self._fault_time) * limit / 60.0
        self._fault_allowance = min(float(limit), self._fault_allowance + refill) - 1.0
        self._fault_time = now
        if self._fault_allowance < 0:
            self.end(
                Code.RESOURCE_EXHAUSTED,
                f"{self.peer} sent more than {limit} Faults (max_faults at once, or more "
                f"than {limit} a minute after that); the stream is ended",
            )

    def lost(self, cause: BaseException) -> None:
        """The stream ended: fail every pending call with ``cause``, cancel running ones."""
        forget_frames(cause)  # its frames would hold this session in a reference cycle
        if self.cause is not None:
            return
        self.cause = cause
        pending, _running_ids = self.connection.connection_lost(cause)
        for outgoing in pending:
            outgoing.fail_lost(cause)
        for task in [*self._running.values(), *self._one_way_tasks]:
            if task is not None:
                task.cancel("the stream ended")
        self._running.clear()
        if not self.handshake.done():
            self.handshake.set_exception(type(cause)(str(cause)))
            self.handshake.exception()  # retrieved: nobody may be waiting
        for outgoing in [*self._sent.values(), *self._waiting]:
            outgoing.settle()
            outgoing.fail_lost(cause)
        self._sent.clear()
        self._waiting.clear()
        self._deadlines.close()
        self._outgoing_parent.clear()
        self._writable.set()  # a reader held back by back-pressure sees the end
        self._wake_reader()
        self._parked.clear()  # never started: nothing to cancel
        self._resume_held()  # what the pools still hold was cancelled with its callers
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.dispatcher.ended(cause)
        self.peer_log.summarize()
        self._closed.set()
        logger.debug("stream with %s ended: %s", self.peer, wire_text(cause))

    def discard(self) -> None:
        """Drop this side's handling of a stream that never opened (its handshake failed
        or was given up): it holds the session, a reference cycle per failed attempt
        that only the cyclic garbage collector would free, and a thousand unreachable
        providers fail thousands of attempts. Nothing may hold the session after this."""
        self.dispatcher = _DISCARDED

    def go_away(self, reason: str) -> None:
        """Tell the peer this side accepts no new calls."""
        self.connection.send_go_away(reason)
        self.flush()

    async def wait_idle(self) -> None:
        """Wait until no call the peer sent is still running and their results are sent."""
        while tasks := [task for task in self._running.values() if task is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.cause is None:
            await self._drained.wait()


class _Discarded:
    """The dispatcher of a discarded session: nothing was exported on it, nothing runs."""

    async def dispatch(self, call: pb.Call) -> pb.Value:
        raise StreamBroken("the stream never opened")

    def released(self, callback_id: int) -> None:
        pass

    def ended(self, cause: BaseException) -> None:
        pass


_DISCARDED = _Discarded()
