"""Where a call that could not be sent goes next: the providers not tried yet, best
first (Dubbo's failover, and what every mode does with a call that never left)."""

from __future__ import annotations

import asyncio
import random

from backchannel.cluster.attempt import left
from backchannel.cluster.consumer import Consumer
from backchannel.cluster.directory import Directory
from backchannel.cluster.providers import ProviderLink
from backchannel.errors import CredentialsNotSent


class Failover:
    """Where a call that could not be sent goes next, and what it tried.

    Providers not tried yet, at random, best first by tier: 0, those whose stream is
    open; 1, those with none that may be connected to; 2, those whose stream is being
    opened. Never those backing off after a failed attempt, which would fail the call at
    once. Each tier is listed once per round, when the one before is used up; each pick
    then costs O(1). A provider whose stream was still being opened when the call
    stopped waiting for it (the hedge) is kept in :attr:`connecting`: once the others
    are used up the call waits for the first of those streams to open."""

    def __init__(self, consumer: Consumer, directory: Directory) -> None:
        self._consumer = consumer
        self._directory = directory
        self.tried: set[str] = set()
        self.unreachable = 0
        #: the providers the call stopped waiting for while their stream was being opened
        self.connecting: list[ProviderLink] = []
        #: the last error of a provider not sent to: a refused token only if nothing else
        self.error: BaseException | None = None
        self._pool: list[str] | None = None
        self._tier = 0

    def unsent(self, link: ProviderLink, error: BaseException) -> BaseException:
        """The call could not be sent to ``link``; the error the call may end with."""
        self.tried.add(link.address)
        if link.connecting:  # only the call gave up waiting: the stream may open yet
            self.connecting.append(link)
        else:
            self.unreachable += 1
        if self.error is None or not isinstance(error, CredentialsNotSent):
            self.error = error
        return self.error

    def restart(self) -> None:
        """A new round (a retry): the tiers are listed again."""
        self._pool, self._tier = None, 0
        self.connecting.clear()

    def next(self) -> ProviderLink | None:
        """A provider to try, taken out of the best tier left; None when none is left."""
        while self._fill():
            link = self._pick()
            if link is not None:
                return link
        return None

    def more(self) -> bool:
        """Whether another provider may take the call after the one just picked."""
        return self._fill() or bool(self.connecting)

    def _fill(self) -> bool:
        """Whether a tier is left with providers in it (listing the next when needed)."""
        while self._tier < 3:
            if self._pool is None:
                self._pool = self._untried(self._tier)
            if self._pool:
                return True
            self._pool, self._tier = None, self._tier + 1
        return False

    def _untried(self, tier: int) -> list[str]:
        links = self._consumer.links
        tried = self.tried
        untried = [url.address for url in self._directory.urls if url.address not in tried]
        if tier == 0:
            return [a for a in untried if a in links and is_open(links[a])]
        if tier == 1:
            return [
                a
                for a in untried
                if a not in links or (links[a].available and not is_open(links[a]))
            ]
        return [a for a in untried if a in links and links[a].connecting]

    def _pick(self) -> ProviderLink | None:
        """A provider of the pool at random, taken out of it; None when the pool held
        none still listed and worth trying."""
        pool = self._pool
        assert pool is not None
        links = self._consumer.links
        while pool:
            index = random.randrange(len(pool))
            address = pool[index]
            pool[index] = pool[-1]
            pool.pop()
            if address in self.tried or address not in self._directory.addresses:
                continue
            link = links.get(address)
            if link is None or link.available or link.connecting:
                return self._consumer.link(address)
        return None

    async def first_opened(self, deadline: float | None) -> ProviderLink | None:
        """The first of :attr:`connecting` whose stream opens before ``deadline``, taken
        out of them; None when every attempt failed or the time ran out. It waits on
        the links' own attempts, shared with other calls, and cancels none."""
        waiting = self.connecting
        while waiting:
            for link in waiting:
                if is_open(link):
                    waiting.remove(link)
                    return link
            # attempts already running (never a new one: ensure_session checks the token)
            attempts = [link.attempt() for link in waiting if link.connecting]
            if not attempts:
                waiting.clear()
                return None
            done, _ = await asyncio.wait(
                attempts, timeout=left(deadline), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return None
            for attempt in done:
                failed = None if attempt.cancelled() else attempt.exception()
                if failed is not None:
                    self.unreachable += 1
                    self.error = failed
            # the links of the finished attempts are now open or backing off
            waiting[:] = [link for link in waiting if link.connecting or is_open(link)]
        return None


def is_open(link: ProviderLink) -> bool:
    """Whether the link's stream is open and takes calls."""
    session = link.session
    return session is not None and session.usable
