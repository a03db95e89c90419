"""Drives one protocol :class:`~backchannel.protocol.Connection` over one gRPC stream.

Used by both ends: the provider wraps the server side of ``Connect``, the consumer the
client side. One reader task takes frames off the stream and never waits on user code
(incoming calls run in tasks of their own); one writer task sends what the protocol
queued, coalescing every frame that is ready into one ``Batch`` message, and awaits
gRPC's flow control between writes. The first failure of the stream is stored and fails
every pending call at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from backchannel import codec
from backchannel.callbacks import CURRENT_CALL
from backchannel.errors import (
    CallCancelled,
    DeadlineExceeded,
    LocalProtocolError,
    MessageTooLarge,
    StreamBroken,
    TransportError,
    Unauthenticated,
)
from backchannel.protocol import (
    CallReceived,
    CancelReceived,
    Connection,
    FaultReceived,
    GoAwayReceived,
    HandshakeDone,
    PeerMistake,
    ReleaseReceived,
    ResultReceived,
    State,
)
from backchannel.settings import Limits
from backchannel.v1 import envelope_pb2 as pb

logger = logging.getLogger("backchannel")

#: what a gRPC read returns at the end of the stream
EOF = grpc.aio.EOF  # type: ignore[attr-defined]

#: frames per Batch message, and roughly how many bytes one Batch may hold
MAX_BATCH_FRAMES = 32
MAX_BATCH_BYTES = 1 << 20

Read = Callable[[], Awaitable[Any]]
Future = asyncio.Future[pb.Result]
Write = Callable[[pb.Frame], Awaitable[None]]


class Dispatcher(Protocol):
    """One side's handling of what the peer sends on one session."""

    async def dispatch(self, call: pb.Call) -> pb.Value:
        """Run one call; return its encoded result or raise its exception."""
        ...

    def released(self, callback_id: int) -> None:
        """The peer ended a callback instance."""
        ...

    def ended(self, cause: BaseException) -> None:
        """The stream ended."""
        ...


class Session:
    """One live Connect stream, either end."""

    def __init__(
        self,
        connection: Connection[Future],
        write: Write,
        dispatcher: Callable[[Session], Dispatcher],
        error_types: codec.ErrorTypes,
        *,
        peer: str,
        limits: Limits,
        send_tracebacks: bool = False,
    ) -> None:
        self.connection = connection
        self.peer = peer
        self.error_types = error_types
        self._write = write
        self._send_tracebacks = send_tracebacks
        self._loop = asyncio.get_running_loop()
        self._limits = limits
        # what the peer accepts, until its handshake says otherwise
        self._peer_max_calls = limits.max_calls_in_flight
        self._peer_max_message = limits.max_message_size
        self._sent: dict[int, _Outgoing] = {}
        self._waiting: collections.deque[_Outgoing] = collections.deque()
        # the call tree, for re-entrancy: outgoing call id -> the incoming call it was
        # made during, and incoming call id -> the outgoing call it was made during
        self._outgoing_parent: dict[int, int] = {}
        self._incoming_parent: dict[int, int] = {}
        self._queue: list[pb.Frame] = []
        self._wake = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._drained = asyncio.Event()  # set while the writer has nothing left to send
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
        """True when called from code running on this session's loop."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

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

    # ---------------------------------------------------------------- writing

    def flush(self) -> None:
        """Hand what the protocol queued to the writer task."""
        frames = self.connection.take_outbox()
        if frames:
            self._queue.extend(frames)
            self._drained.clear()
            self._wake.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._drained.set()
                    if self._stopping:
                        return
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                frames, self._queue = self._queue, []
                for message in coalesce(frames, min(MAX_BATCH_BYTES, self._peer_max_message)):
                    await self._write(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream failed under us: the reader sees it too
            self.lost(_translate(exc, self.peer))

    # ---------------------------------------------------------------- reading

    async def run(self, read: Read) -> None:
        """Read frames until the stream ends; then fail what is pending and return."""
        self._writer = asyncio.create_task(
            self._write_loop(), name=f"backchannel-writer {self.peer}"
        )
        cause: BaseException
        try:
            while True:
                frame = await read()
                if frame is EOF:
                    cause = StreamBroken(f"the peer {self.peer} closed the stream")
                    break
                self._handle(self.connection.receive(frame))
                self.flush()
        except asyncio.CancelledError:
            self.lost(StreamBroken(f"the stream to {self.peer} was closed"))
            self._writer.cancel()
            raise
        except Exception as exc:
            cause = _translate(exc, self.peer)
        self.lost(cause)
        await self._drain_writer()

    async def _drain_writer(self) -> None:
        """Let the writer send what is queued (a last Fault, say) for a moment, then stop it."""
        writer = self._writer
        if writer is None or writer.done():
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(writer), 0.5)
        except (TimeoutError, Exception):
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if type(event) is ResultReceived:
                future = event.token
                if not future.done():
                    future.set_result(event.result)
                self._finished(event.result.id)
            elif type(event) is CallReceived:
                call = event.call
                task = self._loop.create_task(self._serve(call))
                if not call.one_way:
                    self._running[call.id] = task
            elif type(event) is CancelReceived:
                victim = self._running.pop(event.call_id, None)
                if victim is not None:
                    victim.cancel(f"cancelled by the peer: {event.reason}")
            elif type(event) is HandshakeDone:
                own = self._limits
                self._peer_max_calls = min(
                    own.max_calls_in_flight,
                    event.peer_max_calls_in_flight or own.max_calls_in_flight,
                )
                self._peer_max_message = min(
                    own.max_message_size, event.peer_max_message_size or own.max_message_size
                )
                if not self.handshake.done():
                    self.handshake.set_result(event.services)
            elif type(event) is ReleaseReceived:
                self.dispatcher.released(event.callback_id)
            elif type(event) is GoAwayReceived:
                logger.info("%s is going away: %s", self.peer, event.reason)
            elif type(event) is FaultReceived:
                logger.warning("%s reports a protocol fault: %s", self.peer, event.message)
            elif type(event) is PeerMistake:
                logger.warning("protocol mistake by %s: %s", self.peer, event.message)

    async def _serve(self, call: pb.Call) -> None:
        """Run one incoming call and send its result."""
        CURRENT_CALL.set(
            (self, call.id)
        )  # this task's own context: calls made here are its children
        if call.parent_id:
            self._incoming_parent[call.id] = call.parent_id
        try:
            value = await self.dispatcher.dispatch(call)
            result = pb.Result(id=call.id, value=value)
        except asyncio.CancelledError:
            if call.id in self._running and self.cause is None:
                # cancelled locally, not by the peer: the peer still waits for an answer
                del self._running[call.id]
                error = codec.encode_error(
                    CallCancelled("cancelled by the provider"), self.error_types
                )
                self._answer(pb.Result(id=call.id, error=error))
            raise
        except Exception as exc:
            error = codec.encode_error(exc, self.error_types, self._send_tracebacks)
            result = pb.Result(id=call.id, error=error)
        finally:
            self._incoming_parent.pop(call.id, None)
        if result.ByteSize() > self._peer_max_message:
            too_large = MessageTooLarge(
                f"the result of {_call_name(call)} is {result.ByteSize()} bytes, over the "
                f"message size limit of {self._peer_max_message} bytes (max_message_size)"
            )
            result = pb.Result(id=call.id, error=codec.encode_error(too_large, self.error_types))
        if not call.one_way and self._running.pop(call.id, None) is not None:
            self._answer(result)

    def _answer(self, result: pb.Result) -> None:
        try:
            self.connection.send_result(result)
        except LocalProtocolError:  # the stream ended meanwhile
            return
        self.flush()

    # ---------------------------------------------------------------- calling

    def start_call(
        self, call: pb.Call, timeout: float | None, parent: int = 0, label: str = ""
    ) -> Future:
        """Send a call (now, or as soon as the in-flight limit allows); return a future
        for its Result.

        ``parent`` is the id of the incoming call this one is made during (0: none). On
        timeout the future fails with DeadlineExceeded and the peer gets a Cancel. A call
        over the peer's message size limit raises MessageTooLarge before anything is sent.
        """
        label = label or _call_name(call)
        size = call.ByteSize()
        if size > self._peer_max_message:
            raise MessageTooLarge(
                f"{label}: the call is {size} bytes, over the message size limit of "
                f"{self._peer_max_message} bytes (max_message_size)"
            )
        if parent:
            call.parent_id = parent
        outgoing = _Outgoing(call, self._loop.create_future(), label, timeout)
        if timeout is not None:
            outgoing.timer = self._loop.call_later(timeout, self._expire, outgoing)
        if self._waiting or self.connection.pending_outgoing >= self._peer_max_calls:
            self._waiting.append(outgoing)  # back-pressure: sent when a call finishes
        else:
            self._send(outgoing)
        return outgoing.future

    def _send(self, outgoing: _Outgoing) -> None:
        call = outgoing.call
        call_id = self.connection.send_call(call, outgoing.future)
        self.flush()
        if call.one_way:
            outgoing.settle()
            outgoing.future.set_result(pb.Result(id=call_id, value=codec.NULL))
            return
        self._sent[call_id] = outgoing
        if call.parent_id:
            self._outgoing_parent[call_id] = call.parent_id

    def _admit(self) -> None:
        """Send waiting calls while the in-flight limit allows."""
        while self._waiting and self.connection.pending_outgoing < self._peer_max_calls:
            outgoing = self._waiting.popleft()
            if not outgoing.future.done():  # else it expired or was cancelled waiting
                self._send(outgoing)

    def _finished(self, call_id: int) -> None:
        """An outgoing call is over (answered, expired, cancelled): free its slot."""
        outgoing = self._sent.pop(call_id, None)
        if outgoing is not None:
            outgoing.settle()
        self._outgoing_parent.pop(call_id, None)
        if self._waiting:
            self._admit()

    def _expire(self, outgoing: _Outgoing) -> None:
        outgoing.timer = None
        if outgoing.call.id:
            self.abandon(outgoing.call.id, f"deadline of {outgoing.timeout} s exceeded")
        if not outgoing.future.done():
            outgoing.future.set_exception(
                DeadlineExceeded(f"{outgoing.label} did not finish within {outgoing.timeout} s")
            )

    def abandon(self, call_id: int, reason: str) -> None:
        """Stop waiting for an outgoing call and tell the peer to stop running it."""
        self.connection.send_cancel(call_id, reason)
        self.flush()
        self._finished(call_id)

    async def call(self, call: pb.Call, timeout: float | None, parent: int = 0) -> pb.Result:
        """Send a call and wait for its result; a cancelled caller cancels the call."""
        future = self.start_call(call, timeout, parent)
        try:
            return await future
        except asyncio.CancelledError:
            if call.id:  # else it was still waiting for a slot: nothing was sent
                self.abandon(call.id, "cancelled by the caller")
            raise

    def ancestors(self, parent_id: int) -> set[int]:
        """The incoming calls up the chain from an outgoing call ``parent_id``."""
        chain: set[int] = set()
        incoming = self._outgoing_parent.get(parent_id, 0)
        while incoming and incoming not in chain:
            chain.add(incoming)
            incoming = self._outgoing_parent.get(self._incoming_parent.get(incoming, 0), 0)
        return chain

    # ----------------------------------------------------------------- ending

    def lost(self, cause: BaseException) -> None:
        """The stream ended: fail every pending call with ``cause``, cancel running ones."""
        if self.cause is not None:
            return
        self.cause = cause
        futures, _running_ids = self.connection.connection_lost(cause)
        for future in futures:
            if not future.done():
                future.set_exception(type(cause)(str(cause)))
        for task in self._running.values():
            task.cancel("the stream ended")
        self._running.clear()
        if not self.handshake.done():
            self.handshake.set_exception(type(cause)(str(cause)))
            self.handshake.exception()  # retrieved: nobody may be waiting
        for outgoing in [*self._sent.values(), *self._waiting]:
            outgoing.settle()
            if not outgoing.future.done():
                outgoing.future.set_exception(type(cause)(str(cause)))
        self._sent.clear()
        self._waiting.clear()
        self._outgoing_parent.clear()
        self.dispatcher.ended(cause)
        self._closed.set()
        logger.debug("stream with %s ended: %s", self.peer, cause)

    def go_away(self, reason: str) -> None:
        """Tell the peer this side accepts no new calls."""
        self.connection.send_go_away(reason)
        self.flush()

    async def wait_idle(self) -> None:
        """Wait until no call the peer sent is still running and their results are sent."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        if self.cause is None:
            await self._drained.wait()


def coalesce(frames: list[pb.Frame], max_bytes: int = MAX_BATCH_BYTES) -> list[pb.Frame]:
    """Pack ready frames into as few messages as the batch limits allow."""
    if len(frames) == 1:
        return frames
    messages: list[pb.Frame] = []
    batch: list[pb.Frame] = []
    size = 0
    for frame in frames:
        frame_size = frame.ByteSize()
        if batch and (len(batch) >= MAX_BATCH_FRAMES or size + frame_size > max_bytes):
            messages.append(_batch(batch))
            batch, size = [], 0
        batch.append(frame)
        size += frame_size
    if batch:
        messages.append(_batch(batch))
    return messages


class _Outgoing:
    """A call this side sends: waiting for a slot, then for its result."""

    __slots__ = ("call", "future", "label", "timeout", "timer")

    def __init__(self, call: pb.Call, future: Future, label: str, timeout: float | None) -> None:
        self.call = call
        self.future = future
        self.label = label
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None

    def settle(self) -> None:
        """Stop its timer: the outcome is known or no longer awaited."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _batch(frames: list[pb.Frame]) -> pb.Frame:
    return frames[0] if len(frames) == 1 else pb.Frame(batch=pb.Batch(frames=frames))


def _call_name(call: pb.Call) -> str:
    if call.callback_id:
        return f"callback {call.callback_id}.{call.method}"
    return f"{call.service}.{call.method}"


def _translate(exc: BaseException, peer: str) -> TransportError:
    """The one place grpc's stream errors become backchannel's."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAUTHENTICATED:
        error: TransportError = Unauthenticated(f"{peer} refused this consumer: {exc.details()}")
    elif isinstance(exc, grpc.aio.AioRpcError):
        error = StreamBroken(f"the stream to {peer} broke: {exc.code().name}: {exc.details()}")
    else:
        error = StreamBroken(f"the stream to {peer} broke: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
