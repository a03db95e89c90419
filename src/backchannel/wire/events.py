"""What a :class:`~backchannel.wire.protocol.Connection` reports: one event per thing that
happened on the stream, for the transport to act on, and the failed Result a connection
sends for a call it cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from backchannel.v1 import envelope_pb2 as pb

#: whatever the transport wants back when a call's result arrives (a future, typically)
Token = TypeVar("Token")


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The handshake finished; ``services`` is what the provider exports (consumer side)."""

    peer_application: str
    services: tuple[pb.ServiceInfo, ...]
    #: the most calls the peer runs at once on this stream (0: not stated)
    peer_max_calls_in_flight: int = 0
    #: the largest frame the peer accepts (0: not stated)
    peer_max_message_size: int = 0


# CallReceived and ResultReceived come once per call: not frozen, which makes one three
# times dearer (568 ns against 207: object.__setattr__ per field), and nothing changes them


@dataclass(slots=True)
class CallReceived:
    """The peer asks this side to run a method."""

    call: pb.Call


@dataclass(slots=True)
class ResultReceived(Generic[Token]):
    """The peer answered a call this side sent; ``token`` is what the sender registered."""

    result: pb.Result
    token: Token


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """The peer no longer wants the result of a call it sent."""

    call_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseReceived:
    """The peer ended a callback instance."""

    callback_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer accepts no new calls on this stream."""

    reason: str


@dataclass(frozen=True, slots=True)
class FaultReceived:
    """The peer says this side broke the protocol."""

    message: str
    call_id: int


@dataclass(frozen=True, slots=True)
class PeerMistake:
    """The peer broke the protocol; it was told with a Fault or an error Result."""

    message: str


@dataclass(frozen=True, slots=True)
class Unparseable:
    """A received message, or a frame of a Batch, that did not parse as a Frame: what
    could still be read of it (see :mod:`backchannel.wire.frames`)."""

    size: int
    reason: str
    #: the id of the Call it holds, when one can be read (0: none)
    call_id: int = 0
    one_way: bool = False
    #: the id of the Result it holds, when one can be read (0: none)
    result_id: int = 0
    #: the call ids of the targets of the Multicast it holds, when they can be read (the
    #: first 500 at most: a provider puts no more in one frame)
    targets: tuple[int, ...] = ()


Event = (
    HandshakeDone
    | CallReceived
    | ResultReceived[Token]
    | CancelReceived
    | ReleaseReceived
    | GoAwayReceived
    | FaultReceived
    | PeerMistake
)


def error_result(call_id: int, code: int, type_name: str, message: str) -> pb.Result:
    """A failed Result for ``call_id``."""
    error = pb.Error(code=code, type=type_name, message=message)  # type: ignore[arg-type]
    return pb.Result(id=call_id, error=error)
