"""Call deadlines with one event-loop timer per distinct timeout, not one per call.

A stream makes tens of thousands of calls a second, nearly all with the same timeout
(the reference's), so their deadlines arrive in the order the calls were made: a FIFO
queue per timeout value holds them, and one timer, armed for the queue's head, expires
what is due. A call that finishes only marks its entry (O(1)), where a timer per call
would cost a handle, a heap push and a cancellation each (and, with a thousand calls
outstanding, a thousand-entry heap to sift through).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

#: entries of finished calls a queue may hold before it is compacted
_COMPACT_AT = 4096
#: a deadline this close to the timer's firing counts as due (the loop's clock is coarse)
_SLACK = 0.001


class Entry:
    """One call's deadline; ``target`` is None once the call no longer needs it."""

    __slots__ = ("deadline", "target")

    def __init__(self, deadline: float, target: Any) -> None:
        self.deadline = deadline
        self.target = target

    def cancel(self) -> None:
        """The call finished: let its deadline pass unnoticed."""
        self.target = None


class Group(Entry):
    """One deadline shared by many calls (the targets of a Multicast, all sent at once with
    one timeout): one entry in the queue for all of them. Each call that finishes cancels
    its share; the entry is dropped when the last one has. On expiry, ``expire`` gets the
    list of calls, and fails those still waiting."""

    __slots__ = ("remaining",)

    def __init__(self, deadline: float, targets: list[Any]) -> None:
        super().__init__(deadline, targets)
        self.remaining = len(targets)

    def cancel(self) -> None:
        """One of its calls finished."""
        self.remaining -= 1
        if self.remaining <= 0:
            self.target = None


class Deadlines:
    """Calls ``expire(target)`` for each target whose deadline passed and was not cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[Any], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._queues: dict[float, collections.deque[Entry]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self._compact_at: dict[float, int] = {}

    def add(self, target: Any, timeout: float) -> Entry:
        """Expire ``target`` in ``timeout`` seconds unless the entry is cancelled first."""
        entry = Entry(self._loop.time() + timeout, target)
        self._queue(entry, timeout)
        return entry

    def add_group(self, targets: list[Any], timeout: float) -> Group:
        """Expire ``targets`` (given to ``expire`` as that list) in ``timeout`` seconds,
        unless each cancelled its share of the group first."""
        group = Group(self._loop.time() + timeout, targets)
        self._queue(group, timeout)
        return group

    def _queue(self, entry: Entry, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = collections.deque()
            self._compact_at[timeout] = _COMPACT_AT
        # finished calls at the head are dropped as we go; a long call at the head keeps
        # those behind it, so the queue is compacted now and then (amortized O(1))
        while queue and queue[0].target is None:
            queue.popleft()
        queue.append(entry)
        if len(queue) > self._compact_at[timeout]:
            live = [kept for kept in queue if kept.target is not None]
            queue.clear()
            queue.extend(live)
            self._compact_at[timeout] = max(_COMPACT_AT, 2 * len(live))
        if timeout not in self._timers:
            self._timers[timeout] = self._loop.call_at(queue[0].deadline, self._fire, timeout)

    def _fire(self, timeout: float) -> None:
        del self._timers[timeout]
        queue = self._queues[timeout]
        due = self._loop.time() + _SLACK
        while queue:
            entry = queue[0]
            if entry.target is None:
                queue.popleft()
            elif entry.deadline > due:
                self._timers[timeout] = self._loop.call_at(entry.deadline, self._fire, timeout)
                return
            else:
                queue.popleft()
                target, entry.target = entry.target, None
                self._expire(target)
        del self._queues[timeout]
        del self._compact_at[timeout]

    def close(self) -> None:
        """Stop every timer; nothing expires any more."""
        self._expire = _expire_nothing  # a bound method of the owner: a reference cycle
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queues.clear()
        self._compact_at.clear()


def _expire_nothing(target: Any) -> None:
    """What a closed :class:`Deadlines` calls for a deadline added after it closed."""
