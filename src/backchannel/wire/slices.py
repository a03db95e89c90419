"""Cutting what arrived into slices of bounded work: a big Batch, or a Multicast with many
targets, is acted on a slice at a time, so no single message holds the reader for long.

A frame weighs 1, and a Multicast 1 more per target (each is a call); :func:`slices` cuts
a list of frames into pieces of about ``size`` weight, a Multicast's targets going into
:class:`Targets` pieces of at most ``size``. The reader acts on one piece per loop turn.

A Multicast's targets each become a Call holding the call's arguments, so what one frame
may stand for is bounded too: :func:`multicast_budget` bytes (the call's size times its
targets), checked by the receiver and kept to by the sender.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from backchannel.settings import DEFAULT_MAX_MESSAGE_SIZE
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.events import Unparseable

#: what one Multicast may stand for, in messages of the receiver's max_message_size: its
#: targets are calls of their own, each holding the call's arguments, so a frame of
#: max_message_size may make at most eight times that in calls (what a Batch of the same
#: calls would make the sender pay for eight frames), not a thousand times
MULTICAST_BUDGET_MESSAGES = 8


def multicast_budget(max_message_size: int) -> int:
    """The bytes one Multicast may stand for, its call's size times its targets, at a
    receiver of ``max_message_size`` (0: gRPC's default)."""
    return MULTICAST_BUDGET_MESSAGES * (max_message_size or DEFAULT_MAX_MESSAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Targets:
    """The targets ``start`` to ``stop`` of one received Multicast: a slice of it."""

    multicast: pb.Multicast
    start: int
    stop: int


Piece = pb.Frame | Unparseable | Targets


def weight(frames: Sequence[pb.Frame | Unparseable]) -> int:
    """How many calls' worth of work ``frames`` hold: a frame each, plus a Multicast's targets."""
    total = len(frames)
    for frame in frames:
        if type(frame) is pb.Frame and frame.WhichOneof("kind") == "multicast":
            total += len(frame.multicast.targets)
    return total


def slices(frames: Sequence[pb.Frame | Unparseable], size: int) -> Iterator[list[Piece]]:
    """``frames`` in pieces of about ``size`` weight, in order, each made as it is taken;
    a Multicast of more than ``size`` targets is cut into :class:`Targets` of at most
    ``size`` (an empty one stays whole: the protocol refuses it)."""
    piece: list[Piece] = []
    filled = 0
    for frame in frames:
        count = 0
        if type(frame) is pb.Frame and frame.WhichOneof("kind") == "multicast":
            count = len(frame.multicast.targets)
        if count <= size:
            if piece and filled + 1 + count > size:
                yield piece
                piece, filled = [], 0
            piece.append(frame)
            filled += 1 + count
            continue
        multicast = frame.multicast  # type: ignore[union-attr]
        for start in range(0, count, size):
            stop = min(start + size, count)
            if piece and filled + stop - start > size:
                yield piece
                piece, filled = [], 0
            piece.append(Targets(multicast, start, stop))
            filled += stop - start
    if piece:
        yield piece
