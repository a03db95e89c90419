"""The consumer core: one link per provider address, the provider each call goes to,
the resubscribe calls waiting for a stream, and closing it all."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from backchannel.cluster.backoff import Backoff
from backchannel.cluster.directory import Directories, Directory, label
from backchannel.cluster.loadbalance import NoProvider
from backchannel.cluster.providers import (
    ConsumerSide,
    LinkSettings,
    ProviderLink,
    Subscription,
    SubscriptionKey,
)
from backchannel.cluster.reference import Reference
from backchannel.cluster.registry import Registry
from backchannel.errors import CredentialsNotSent, UnknownCallback
from backchannel.rpc.consumer_callbacks import ExportedCallback
from backchannel.transport.auth import token_refusal
from backchannel.transport.pools import CallPools
from backchannel.transport.session import Session
from backchannel.wire import codec

logger = logging.getLogger("backchannel")

#: the task that replays the orphaned resubscribe calls (cluster/resubscribe.py)
Replay = Callable[["Consumer"], Coroutine[Any, Any, None]]


class Consumer:
    """What an :class:`~backchannel.client.AsyncClient` calls through: its links, their
    directories and lifecycle."""

    def __init__(
        self,
        address: str | Registry,
        where: str,
        settings: LinkSettings,
        pools: CallPools,
        error_types: codec.ErrorTypes,
        replay: Replay,
    ) -> None:
        #: the address as error messages name it
        self.where = where
        self.settings = settings
        self.pools = pools
        self.error_types = error_types
        self.closed = False
        #: one link per provider address, made when first chosen
        self.links: dict[str, ProviderLink] = {}
        self.directories = Directories(address, where, settings.application, self.retire_unlisted)
        #: the directories' own table (never replaced), read by every call without a hop
        self.directory_of = self.directories.by_key
        #: a plain address: its one link (and the fast paths that go with it)
        self.single: ProviderLink | None = None
        single = self.directories.single_address
        if single is not None:
            if settings.token_refused(single):  # known now: say so now
                raise CredentialsNotSent(token_refusal([single]))
            self.single = self.link(single)
        # resubscribe=True calls whose stream ended: replayed, in order, on a live provider
        self.orphans: dict[SubscriptionKey, Subscription] = {}
        self._replay = replay
        self._resubscriber: asyncio.Task[None] | None = None
        #: streams being closed because their provider is no longer registered
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> Session | None:
        """The stream of a single-address client (None for a cluster)."""
        return self.single.session if self.single is not None else None

    def link(self, address: str) -> ProviderLink:
        """The link to ``address``, made on first use."""
        link = self.links.get(address)
        if link is None:
            link = self.links[address] = ProviderLink(
                address, self.settings, self.link_ended, Backoff()
            )
        return link

    # ------------------------------------------------------------ choosing

    def choose(
        self,
        ref: Reference,
        directory: Directory,
        positional: tuple[Any, ...],
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> ProviderLink:
        """One provider for a call: among the available ones not tried yet if any, else
        those not tried yet whose stream is being opened, else any not tried yet, else
        any (all backing off: one may be back)."""
        if self.single is not None:
            return self.single
        urls = directory.urls
        if len(urls) == 1:
            return self.link(urls[0].address)
        if not urls:
            raise NoProvider(
                f"no provider of {label(ref.key)} in {self.where} (none registered, or all gone)"
            )
        links = self.links
        if not exclude:  # the usual case: every stream open and usable, choose among all
            for url in urls:
                session = links[url.address].session if url.address in links else None
                if session is None or not session.usable:
                    break
            else:
                return self.link(ref.balance.select(urls, positional).address)
        candidates = [
            url
            for url in urls
            if url.address not in exclude
            and (url.address not in links or links[url.address].available)
        ]
        if len(candidates) == len(urls):
            chosen = ref.balance.select(urls, positional)  # the strategy's cached tuple
        else:
            if not candidates:
                untried = [u for u in urls if u.address not in exclude]
                candidates = [
                    u for u in untried if u.address in links and links[u.address].connecting
                ]
                # one the token may go to fails with its own error, which says more
                sendable = [
                    u
                    for u in untried
                    if u.address not in links or not links[u.address].token_refused
                ]
                candidates = candidates or sendable or untried or list(urls)
            chosen = ref.balance.select(tuple(candidates), positional)
        return self.link(chosen.address)

    def retire_unlisted(self) -> None:
        """On the loop: close the stream of each provider no directory lists any more
        (its znodes are gone, its process may be alive), once its running calls are done."""
        listed = self.directories.listed()
        for address, link in list(self.links.items()):
            link.unlisted = address not in listed
            if link.unlisted:
                self.retire_if_idle(link)

    def retire_if_idle(self, link: ProviderLink) -> None:
        """Close an unlisted link that has no call in flight, replaying its resubscribe
        calls elsewhere. One whose stream carries other callbacks is kept: its provider
        may still call them, and nothing would bring them back."""
        if self.closed or link.active or self.links.get(link.address) is not link:
            return
        side = link.side
        if side is not None and len(side.callbacks) > _replayable(link, side):
            return
        del self.links[link.address]
        logger.info("closing the stream to %s: it is no longer registered", link.address)
        if link.subscriptions:
            self.orphans.update(link.subscriptions)
            link.subscriptions = {}
            self.kick_resubscriber()
        closing = asyncio.get_running_loop().create_task(link.close())
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)

    # ----------------------------------------------------------- callbacks

    def removed(
        self, side: ConsumerSide, entries: list[ExportedCallback], listeners: list[object]
    ) -> None:
        """Un-export what a remover call removed, and forget its subscriptions."""
        for listener in listeners:
            self.forget(listener)
        side.callbacks.drop(entries)

    def forget(self, listener: object) -> None:
        """Drop the subscriptions that carry ``listener``: it is not to be replayed."""
        for table in (self.orphans, *(link.subscriptions for link in self.links.values())):
            for key, (_ref, _method, args) in list(table.items()):
                if any(arg is listener for arg in args):
                    del table[key]

    def release(self, listener: object) -> None:
        """End a callback instance this client exported (Dubbo has no such thing), on
        every provider's stream it was passed on."""
        found = False
        for link in self.links.values():
            session, side = link.session, link.side
            entry = side.callbacks.find(listener) if side else None
            if session is None or side is None or entry is None:
                continue
            found = True
            side.callbacks.remove(entry)
            session.connection.send_release(entry.id)
            session.flush()
        if not found:
            raise UnknownCallback(
                f"{listener!r} is not a live callback on the stream to {self.where}"
            )
        self.forget(listener)

    @property
    def callback_count(self) -> int:
        """How many callback instances this client has exported on its current streams."""
        return sum(len(link.side.callbacks) for link in self.links.values() if link.side)

    def link_ended(self, link: ProviderLink) -> None:
        """A provider's stream is gone: replay its subscriptions, in the background, on
        a live provider of the same export (the same one, once back, if it is the only
        one)."""
        if self.closed:
            return
        if link.subscriptions:
            self.orphans.update(link.subscriptions)
            link.subscriptions = {}
        self.kick_resubscriber()

    def kick_resubscriber(self) -> None:
        """Start replaying the orphaned resubscribe calls, unless that is under way."""
        if self.closed or not self.orphans:
            return
        if self._resubscriber is None or self._resubscriber.done():
            # in a context of its own: not the attachments of whichever call kicked it
            self._resubscriber = asyncio.get_running_loop().create_task(
                self._replay(self), context=contextvars.Context()
            )

    # ------------------------------------------------------------- closing

    async def close(self) -> None:
        """End every stream (half-close, then cancel) and channel, and the registry."""
        self.closed = self.directories.closed = True
        if self._resubscriber is not None:
            self._resubscriber.cancel()
        links = list(self.links.values())
        await asyncio.gather(*(link.close() for link in links), *self._retiring)
        await self.directories.close()
        self.pools.shutdown()


def _replayable(link: ProviderLink, side: ConsumerSide) -> int:
    """How many of the stream's callback instances its resubscribe calls carry (those
    are made again elsewhere when it closes)."""
    carried = {
        id(arg)
        for _ref, _method, args in link.subscriptions.values()
        for arg in args
        if side.callbacks.find(arg) is not None
    }
    return len(carried)
