"""Admitting the peer's one-way calls: whether each runs now, waits for an in-flight
slot, or is dropped.

A one-way call's sender cannot count it against the receiver's in-flight limit (no
Result says when it ended), so one past the limit is not refused: it waits, in order,
until :meth:`~backchannel.wire.protocol.Connection.next_one_way` gives it a slot.
One-way calls are counted apart from calls that want a result, so they never cost a
sender that keeps to the limit a refused call.
"""

from __future__ import annotations

from typing import Any, Protocol

from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.events import Event

#: what admitting a call decides: it runs now, waits for a slot (a one-way call past
#: the in-flight limit), or was refused (the peer was told, when it can be)
_RUN = 1
_WAIT = 2
_REFUSED = 0


class Admitting(Protocol):
    """What admitting a one-way call uses of the connection (its receiving part)."""

    going_away: bool
    max_calls_in_flight: int
    max_waiting_one_way: int
    one_way_waiting: int
    _one_way: dict[int, int]
    _one_way_count: int
    _dropping_one_way: bool
    _told_going_away: bool

    def _put(self, frame: pb.Frame) -> None: ...
    def _mistake(self, events: list[Event[Any]], message: str, call_id: int = 0) -> None: ...
    def _over_waiting_budget(self) -> bool: ...


def admit_one_way(connection: Admitting, call_id: int, events: list[Event[Any]]) -> int:
    """A one-way call: its sender cannot know when one ended (no Result), so past the
    in-flight limit it waits for a slot, in order, rather than being refused. Dropped
    only after this side's GoAway (a race, not a mistake: one Fault, no warning), or past
    twice the waiting budget (the transport stops reading the peer at the budget, so
    only while this side awaits a result from it: one Fault until half have run)."""
    if connection.going_away:
        if not connection._told_going_away:  # a race with the GoAway, not a mistake
            connection._told_going_away = True
            message = (
                "shutting down: this side accepts no new calls on this stream "
                f"(one-way call {call_id} and any later ones dropped)"
            )
            connection._put(pb.Frame(fault=pb.Fault(message=message, call_id=call_id)))
        return _REFUSED
    limit = connection.max_calls_in_flight
    if not connection.one_way_waiting and not 0 < limit <= connection._one_way_count:
        connection._one_way[call_id] = connection._one_way.get(call_id, 0) + 1
        connection._one_way_count += 1
        return _RUN
    if not connection._over_waiting_budget():
        return _WAIT
    if not connection._dropping_one_way:  # once until the backlog drains to half
        connection._dropping_one_way = True
        message = (
            f"too many one-way calls waiting on this stream: this side runs {limit} at "
            f"once and keeps at most {2 * connection.max_waiting_one_way} waiting for a "
            f"slot (twice max_waiting_one_way; their bytes at most twice max_queued_bytes"
            f"); one-way call {call_id} and the next ones are dropped until half have run"
        )
        connection._mistake(events, message, call_id)
    return _REFUSED
