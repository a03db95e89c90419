"""A chat room: members join with a listener; what one says, every member hears.

The room forgets a member the moment its listener is gone (it left, or its consumer
closed, died or lost the connection): ``proxy.on_gone`` tells it, so there is no sweep
and no polling of ``proxy.alive``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import backchannel
from backchannel import Argument


@backchannel.interface("chat.Member")
class Member:
    """What a member's consumer implements: the room calls it back."""

    @backchannel.method(one_way=True)  # the room does not wait for a slow member
    def heard(self, who: str, text: str) -> None:
        """``who`` said ``text`` (``who`` is ``"*"`` for the room's own news)."""
        raise NotImplementedError


@backchannel.interface("chat.Room")
class Room:
    """What the provider implements."""

    @backchannel.method(arguments=[Argument(index=1)])
    def join(self, name: str, member: Member) -> list[str]:
        """Join as ``name``; ``member`` hears what is said. Returns who is in the room."""
        raise NotImplementedError

    @backchannel.method(arguments=[Argument(index=1, callback=False)])
    def leave(self, name: str, member: Member) -> None:
        """Leave the room (the listener is released on both sides)."""
        raise NotImplementedError

    def say(self, name: str, text: str) -> int:
        """Say ``text`` as ``name``; returns how many members it was sent to."""
        raise NotImplementedError

    def who(self) -> list[str]:
        """The members' names."""
        raise NotImplementedError


class ChatRoom:
    """The room, for an :class:`~backchannel.AsyncServer`: every method runs on its loop.

    ``on_leave(name, reason)`` is called when a member is forgotten (for logs and tests).
    """

    def __init__(self, on_leave: Callable[[str, str], object] | None = None) -> None:
        #: name -> the member's reverse proxy
        self.members: dict[str, Any] = {}
        self._on_leave = on_leave

    async def join(self, name: str, member: Member) -> list[str]:
        if not name or name == "*":
            raise ValueError(f"{name!r} cannot be a member's name")
        if name in self.members:
            raise ValueError(f"the name {name!r} is taken")
        proxy: Any = member  # a backchannel.ReverseProxy
        self.members[name] = proxy
        # forget the member when its listener is gone, whatever the reason: no sweep
        proxy.on_gone(functools.partial(self._gone, name))
        await self._tell_all("*", f"{name} joined", skip=name)
        return sorted(self.members)

    async def leave(self, name: str, member: Member) -> None:
        # a remover: the listener ends once this returns, and _gone forgets the member
        if self.members.get(name) is not member:
            raise ValueError(f"{name!r} is not a member with that listener")

    async def say(self, name: str, text: str) -> int:
        if name not in self.members:
            raise ValueError(f"{name!r} is not a member: join first")
        return await self._tell_all(name, text)

    async def who(self) -> list[str]:
        return sorted(self.members)

    async def _gone(self, name: str, proxy: Any) -> None:
        """The member's listener is gone (an ``async def`` on_gone hook: on the loop)."""
        if self.members.get(name) is not proxy:
            return
        del self.members[name]
        reason = proxy.gone_reason
        if self._on_leave is not None:
            self._on_leave(name, reason)
        await self._tell_all("*", f"{name} left ({reason})")

    async def _tell_all(self, who: str, text: str, skip: str = "") -> int:
        members = [member for name, member in self.members.items() if name != skip]
        told = await asyncio.gather(*(_tell(member, who, text) for member in members))
        return sum(told)


async def _tell(member: Any, who: str, text: str) -> bool:
    try:
        await member.heard(who, text)
    except backchannel.CallbackGone:  # it went meanwhile: its on_gone hook forgets it
        return False
    return True
