"""Dubbo's ZooKeeper registry: ``/dubbo/{interface}/providers/{URL-encoded provider URL}``
as ephemeral znodes under persistent parents, so a Dubbo registry browser shows
backchannel providers beside Java ones.

kazoo runs its own threads; nothing here blocks in them (kazoo's listeners must return
at once) and a subscriber's listener runs on the subscriber's event loop when it gave
one, through :class:`~backchannel.cluster.registry.Subscription`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.recipe.watchers import ChildrenWatch
from kazoo.retry import KazooRetry

from backchannel.cluster.registry import (
    ZOOKEEPER_SCHEME,
    Listener,
    RegistryError,
    Subscription,
)
from backchannel.cluster.service_url import PROTOCOL, ServiceURL, _int, decode, encode
from backchannel.errors import ChannelClosed
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel.registry")

# kazoo's lines said on every connection attempt (several a second while ZooKeeper is
# down) or on a change of state this module logs itself: at DEBUG, so an outage costs
# one line per change of state, not one per retry
_KAZOO_PER_ATTEMPT = frozenset(
    {
        "Connecting to %s(%s):%s, use_ssl: %r",
        "Connection dropped: %s",
        "Connection time-out: %s",
        "Cannot resolve %s: %s",
        "Transition to CONNECTING",
        "Closing connection to %s:%s",
        "Zookeeper connection lost",
        "Zookeeper connection established, state: %s",
        "Zookeeper session closed, state: %s",
        "Session has expired",
        # the connection retries end so only when this module stops the client
        "Failed connecting to Zookeeper within the connection retry policy.",
    }
)
# those of them that say why a connection failed
_KAZOO_FAILURES = frozenset(
    {"Connection dropped: %s", "Connection time-out: %s", "Cannot resolve %s: %s"}
)

# what an operation meets while ZooKeeper cannot be reached
_UNREACHABLE = (ConnectionLoss, SessionExpiredError, ConnectionClosedError, KazooTimeoutError)

#: Dubbo's root znode
DEFAULT_ROOT = "/dubbo"

# tries at making a URL's node while another session's is in the way (each deletes it)
_CREATE_ATTEMPTS = 3
#: the most of a znode's name a log line quotes
ZNODE_TEXT_LIMIT = 1000


# pragma: no mutate start -- kazoo's logging: reached only with a real ZooKeeper (docs/testing.md)
class _KazooLog(logging.LoggerAdapter[logging.Logger]):
    """kazoo's logger (``kazoo.client``, as configured), its per-attempt and per-state
    lines (:data:`_KAZOO_PER_ATTEMPT`) lowered to DEBUG. The last reason it gave for a
    failed connection is kept in ``reason``, for this module's own line to say."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("kazoo.client"), {})
        self.reason = ""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg in _KAZOO_PER_ATTEMPT:
            if msg in _KAZOO_FAILURES:
                self.reason = wire_text(str(msg) % args)
            level = logging.DEBUG
        kwargs.setdefault("stacklevel", 2)  # the record names kazoo's line, not this one
        super().log(level, msg, *args, **kwargs)


# pragma: no mutate end


# pragma: no mutate start -- the ZooKeeper registry: needs a real ZooKeeper (docs/testing.md)
class ZookeeperRegistry:
    """Dubbo's ZooKeeper registry: ``{root}/{encoded interface}/{providers|consumers}/
    {encoded URL}``, the last an ephemeral znode of this client's session.

    On a new session (the old one expired, and its ephemeral nodes with it) every URL
    registered is created again, and every subscription watches its folder again; a
    URL's node found belonging to another session (an old one the server has yet to
    expire) is deleted and created again, as Curator does.
    While ZooKeeper cannot be reached, subscriptions keep their last providers; once it
    has been unreachable for a whole session timeout, the session is given up and a new
    one started, as Curator does (a ZooKeeper that lost its data would refuse the old
    one forever: it has seen transactions the server never had).

    ``hosts`` may carry Dubbo's ``?session=MS`` (the session timeout in milliseconds,
    1..2**31-1), which wins over ``session_timeout``.

    The connection's changes of state are logged once each (kazoo's own line for every
    reconnection attempt is lowered to DEBUG): unreachable, session given up or lost,
    connected again."""

    def __init__(
        self,
        hosts: str,
        *,
        root: str = DEFAULT_ROOT,
        session_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        operation_timeout: float = 5.0,
    ) -> None:
        hosts, _, query = hosts.removeprefix(ZOOKEEPER_SCHEME).partition("?")
        self.hosts = hosts.rstrip("/")
        session = _int(dict(urllib.parse.parse_qsl(query)), "session", None, hosts)
        if session is not None:
            session_timeout = session / 1000
        self.root = "/" + root.strip("/")
        self.session_timeout = session_timeout
        self._lock = threading.Lock()
        #: held while the session is ended, by close() or to start a new one (never taken
        #: in kazoo's threads: ending a session waits for them)
        self._session_lock = threading.Lock()
        self._registered: set[ServiceURL] = set()
        #: each subscription and the watch that feeds it now (a new one per session)
        self._subscriptions: dict[Subscription, _Watch] = {}
        #: per folder, its children skipped and warned of once (see _Watch), shared by
        #: every subscription to it: one warning per bad znode, however many subscribe
        self._refused: dict[str, _Refused] = {}
        self._closed = False
        self._operation_timeout = operation_timeout
        #: counts disconnections, so a timer knows whether its own one is still going on
        self._outage = 0
        #: whether the coming LOST is the end of a session this registry gave up
        self._giving_up = False
        self._kazoo_log = _KazooLog()
        # reconnect soon after ZooKeeper comes back (kazoo's default backs off to an hour)
        self._client: Any = KazooClient(
            hosts=self.hosts,
            timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
            command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=1.0),
            logger=self._kazoo_log,
        )
        self._client.add_listener(self._state_changed)
        try:
            self._client.start(timeout=connect_timeout)
        except KazooTimeoutError:
            self._client.close()
            raise RegistryError(
                f"ZooKeeper at {self.hosts} did not answer within {connect_timeout} s"
            ) from None

    @property
    def connected(self) -> bool:
        """Whether the session is alive and the server reachable right now."""
        return bool(self._client.connected)

    @property
    def session_id(self) -> int | None:
        """The ZooKeeper session's id (None while disconnected)."""
        client_id = self._client.client_id
        return None if client_id is None else int(client_id[0])

    def path_of(self, url: ServiceURL) -> str:
        """The znode ``url`` is registered at."""
        return f"{self._category_path(url.interface, url.category)}/{encode(url.to_string())}"

    def _category_path(self, interface: str, category: str) -> str:
        return f"{self.root}/{encode(interface)}/{category}"

    def register(self, url: ServiceURL) -> None:
        """Create ``url``'s ephemeral znode (and its persistent parents). If ZooKeeper is
        unreachable the URL is still recorded, and created when the session is back."""
        self._check_open()
        with self._lock:
            self._registered.add(url)
        try:
            self._create(url)
        except _UNREACHABLE as exc:
            logger.warning("registering %s later, ZooKeeper is unreachable: %r", url, exc)

    def unregister(self, url: ServiceURL) -> None:
        self._check_open()
        with self._lock:
            self._registered.discard(url)
        try:
            self._await(self._client.delete_async(self.path_of(url)))
        except NoNodeError:
            pass
        except _UNREACHABLE as exc:  # its session's end removes it all the same
            logger.warning("could not remove %s from ZooKeeper now: %r", url, exc)

    def _create(self, url: ServiceURL) -> None:
        path = self.path_of(url)
        for _attempt in range(_CREATE_ATTEMPTS):
            try:
                self._await(self._client.create_async(path, b"", ephemeral=True, makepath=True))
                return
            except NodeExistsError:
                pass
            # this session made it (before a lost reply, or before a reconnect): done.
            # Another session's (ours before it was given up, which a server back with
            # its data expires a session timeout later, taking the node along; or a
            # former process's): replace it now, as Curator does
            stat = self._await(self._client.exists_async(path))
            if stat is None:
                continue  # gone meanwhile: create it
            if stat.ephemeralOwner == self.session_id:
                return
            logger.info(
                "replacing %s's znode, which belongs to session 0x%x, not this one",
                url,
                stat.ephemeralOwner,
            )
            with contextlib.suppress(NoNodeError, BadVersionError):  # changed meanwhile
                self._await(self._client.delete_async(path, version=stat.version))
        raise RegistryError(
            f"could not register {url}: its znode was made again by another session "
            f"{_CREATE_ATTEMPTS} times"
        )

    def _await(self, result: Any) -> Any:
        # kazoo queues requests while disconnected and its blocking calls wait for the
        # reconnection without a bound: never wait longer than one operation may take
        if not self._client.connected:
            raise ConnectionLoss("not connected")
        return result.get(timeout=self._operation_timeout)

    def subscribe(
        self,
        interface: str,
        listener: Listener | None = None,
        *,
        group: str = "",
        version: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        """Follow ``{root}/{interface}/providers`` (created if missing). Blocks for one
        round trip to ZooKeeper, for the current set."""
        self._check_open()
        path = self._category_path(interface, "providers")
        try:
            self._await(self._client.ensure_path_async(path))
        except _UNREACHABLE as exc:
            raise RegistryError(
                f"cannot subscribe to {path}: ZooKeeper {self.hosts} is unreachable ({exc!r})"
            ) from exc
        subscription = Subscription(interface, group, version, listener, loop)
        with self._lock:
            refused = self._refused.setdefault(path, _Refused())
        watch = _Watch(subscription, path, first=True, refused=refused)
        ChildrenWatch(self._client, path, watch.changed)
        with self._lock:
            self._subscriptions[subscription] = watch
        return subscription

    def _state_changed(self, state: str) -> None:
        # kazoo's connection thread: must return at once (its docs), so work is spawned.
        # One line per change of state (kazoo's own lines are at DEBUG: _KazooLog)
        if state == KazooState.LOST:
            if self._giving_up:  # said by _give_up_session
                self._giving_up = False
            else:
                logger.warning(
                    "ZooKeeper session at %s lost; registering again when back", self.hosts
                )
        elif state == KazooState.SUSPENDED:
            logger.warning(
                "ZooKeeper at %s unreachable (%s); subscribers keep their providers, reconnecting",
                self.hosts,
                self._kazoo_log.reason or "no reason given",
            )
            self._outage += 1
            timer = threading.Timer(self.session_timeout, self._give_up_session, (self._outage,))
            timer.daemon = True
            timer.start()
        elif state == KazooState.CONNECTED and not self._closed:
            self._giving_up = False
            self._kazoo_log.reason = ""
            logger.info(
                "ZooKeeper at %s %s (session 0x%x)",
                self.hosts,
                "reachable again" if self._outage else "connected",
                self.session_id or 0,
            )
            self._outage += 1
            self._client.handler.spawn(self._recover)

    def _give_up_session(self, outage: int) -> None:
        # a timer's thread, a whole session timeout after the disconnection: the server
        # has expired the session if it is up; if it lost its data it refuses it forever
        with self._session_lock:
            if self._closed or outage != self._outage or self._client.connected:
                return
            logger.warning(
                "ZooKeeper at %s unreachable for %s s: starting a new session",
                self.hosts,
                self.session_timeout,
            )
            self._giving_up = True
            self._client.stop()  # LOST: kazoo forgets the session and what it had seen
            self._client.start_async()

    def _recover(self) -> None:
        # on a new session every node is gone; on the same one only those that failed are
        # missing: creating what exists is a NodeExistsError, so both cases do the same
        with self._lock:
            urls = list(self._registered)
        for url in urls:
            try:
                self._create(url)
            except Exception as exc:  # the next CONNECTED tries again
                logger.warning("could not register %s again: %r", url, exc)
        # kazoo's ChildrenWatch stops for good on a folder that is missing (a ZooKeeper
        # that lost its data): make the folder, and a new watch (the old one stops)
        with self._lock:
            watches = list(self._subscriptions.items())
        for subscription, old in watches:
            try:
                self._await(self._client.ensure_path_async(old.path))
            except Exception as exc:  # the next CONNECTED tries again
                logger.warning("could not watch %s again: %r", old.path, exc)
                continue
            with self._lock:
                if self._closed or self._subscriptions.get(subscription) is not old:
                    continue
                old.active = False
                watch = self._subscriptions[subscription] = _Watch(
                    subscription, old.path, refused=old.refused
                )
            ChildrenWatch(self._client, watch.path, watch.changed)

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"the registry of ZooKeeper {self.hosts} is closed")

    def close(self) -> None:
        """End the session: ZooKeeper removes its ephemeral nodes at once."""
        with self._session_lock:
            if self._closed:
                return
            self._closed = True
            with self._lock:
                subscriptions, self._subscriptions = self._subscriptions, {}
            for subscription in subscriptions:
                subscription.close()
            self._client.remove_listener(self._state_changed)
            self._client.stop()
        self._client.close()

    def __enter__(self) -> ZookeeperRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Refused:
    """A folder's children that are not a URL we can read, each warned of once; shared
    by the folder's watches, which run in different threads (kazoo runs a watch's
    first call in the subscriber's thread, the others in its own), hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: set[str] = set()

    def first(self, child: str) -> bool:
        """Note ``child``; True if it was not noted before (then warn of it)."""
        with self._lock:  # check and add at once: two threads never both warn
            if child in self._children:
                return False
            self._children.add(child)
            return True

    def keep_only(self, listed: Iterable[str]) -> None:
        """Forget the children no longer listed: the set stays bounded."""
        with self._lock:
            self._children.intersection_update(listed)

    def __contains__(self, child: object) -> bool:
        with self._lock:
            return child in self._children


class _Watch:
    """What one ``ChildrenWatch`` of a folder feeds into its subscription; inactive
    once replaced by the watch of a new session.

    ``refused`` holds the folder's children that are not a URL we can read, each
    warned of once: one bad znode costs one log line while it stays listed, however
    often the folder changes (shared by every watch of the folder, a new session's
    included, so it is not warned of again)."""

    def __init__(
        self,
        subscription: Subscription,
        path: str,
        first: bool = False,
        refused: _Refused | None = None,
    ) -> None:
        self.subscription = subscription
        self.path = path
        self.active = True
        self.refused = _Refused() if refused is None else refused
        self._first = first
        #: each child's URL if it is a provider of the subscription (else None), kept
        #: from one update to the next: a burst of N children arriving one by one costs
        #: N parses, not N²/2, and an unchanged provider is the same object each time
        self._parsed: dict[str, ServiceURL | None] = {}

    def changed(self, children: list[str]) -> bool:
        # runs in kazoo's thread: parse and hand over, never block
        subscription = self.subscription
        if subscription.closed or not self.active:
            return False  # stops the watch
        known = self._parsed
        parsed = {}
        for child in children:
            url = known[child] if child in known else _parse_child(child, self.path, self.refused)
            parsed[child] = url if url is None or subscription.matches(url) else None
        self._parsed = parsed
        self.refused.keep_only(parsed)  # only what is listed now: bounded
        urls = [url for url in parsed.values() if url is not None]
        if self._first:  # still inside subscribe(): no listener call for the first set
            self._first = False
            subscription.providers = frozenset(urls)
        else:
            subscription.offer(urls)
        return True


def _parse_child(child: str, path: str, refused: _Refused) -> ServiceURL | None:
    """The provider URL a child znode's name is, or None (a Java ``dubbo://`` one is
    not ours to call).

    A child that is not a URL we can read (not one at all, or a number out of its
    bounds) is None too, with a warning naming it unless ``refused`` (the folder's
    children already warned of, shared by every watch of it) holds it already."""
    try:
        url = ServiceURL.parse(decode(child))
    except ValueError as exc:
        if refused.first(child):
            logger.warning(
                "ignoring the znode %s: %s",
                wire_text(f"{path}/{child}", ZNODE_TEXT_LIMIT),
                wire_text(exc),
            )
        return None
    return url if url.protocol == PROTOCOL else None


# pragma: no mutate end
