"""Where providers are: service URLs in Dubbo's format, and registries that hold them.

A provider registers one :class:`ServiceURL` per export; a consumer subscribes to an
interface and keeps the current set of its providers. Two registries:

* :class:`StaticRegistry` (``"127.0.0.1:50051,127.0.0.1:50052"`` or ``static://...``):
  a fixed list, the embedded default that needs no server;
* :class:`ZookeeperRegistry` (``zookeeper://127.0.0.1:2181``): Dubbo's own layout,
  ``/dubbo/{interface}/providers/{URL-encoded provider URL}`` as ephemeral znodes under
  persistent parents, so a Dubbo registry browser shows backchannel providers beside
  Java ones.

kazoo runs its own threads; nothing here blocks in them (kazoo's listeners must return
at once) and a subscriber's listener runs on the subscriber's event loop when it gave
one, through :mod:`backchannel.transport.handoff`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

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

from backchannel.cluster.loadbalance import MAX_WEIGHT
from backchannel.errors import BackchannelError, ChannelClosed
from backchannel.transport.handoff import inbox
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

PROVIDER = "provider"
CONSUMER = "consumer"
#: the provider URLs' scheme; a consumer's URL uses Dubbo's ``consumer://``
PROTOCOL = "backchannel"
#: Dubbo's default weight of a provider
DEFAULT_WEIGHT = 100
#: Dubbo's root znode
DEFAULT_ROOT = "/dubbo"
ZOOKEEPER_SCHEME = "zookeeper://"
STATIC_SCHEME = "static://"

# keys ServiceURL keeps in its own fields; every other key travels in ``parameters``
_OWN_KEYS = frozenset(
    {
        "application",
        "callbacks",
        "category",
        "group",
        "interface",
        "methods",
        "release",
        "side",
        "timestamp",
        "version",
        "weight",
    }
)
# Dubbo writes parameter values raw (URL.toFullString): these would change the URL's shape
_UNSAFE_IN_VALUES = frozenset("&=?#/ \t\r\n")

#: the numbers a URL may carry, inclusive (docs/cluster.md, "Numbers in a URL"): what a
#: Java Dubbo peer can write there (an ``int`` or a ``long``), so every URL Dubbo itself
#: accepts is read, and a value outside is refused, not guessed at
JAVA_INT_MAX = 2**31 - 1
JAVA_LONG_MAX = 2**63 - 1
BOUNDS: dict[str, tuple[int, int]] = {
    "weight": (0, MAX_WEIGHT),
    "callbacks": (0, JAVA_INT_MAX),
    "timestamp": (0, JAVA_LONG_MAX),
    # the registry address's ``?session=MS`` (Dubbo's ``session``, an int)
    "session": (1, JAVA_INT_MAX),
}
#: a provider URL's port (a consumer's URL has none: 0)
PORTS = (1, 65535)
# digits read at most: a longer number is out of every bound without converting it
_MOST_DIGITS = len(str(JAVA_LONG_MAX))
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


class RegistryError(BackchannelError):
    """A registry could not be reached, or refused what was asked of it."""


def release() -> str:
    """This backchannel's version, for the URLs' ``release`` key."""
    try:
        return importlib.metadata.version("backchannel")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def encode(text: str) -> str:
    """Java's ``URLEncoder.encode(text, "UTF-8")``, which Dubbo's ``URL.encode`` is.

    It leaves letters, digits and ``.-*_`` alone and writes a space as ``+``; Python's
    ``quote_plus`` also leaves ``~``, which Java escapes."""
    return urllib.parse.quote_plus(text, safe="*").replace("~", "%7E")


def decode(text: str) -> str:
    """Java's ``URLDecoder.decode(text, "UTF-8")`` (``+`` is a space)."""
    return urllib.parse.unquote_plus(text, errors="strict")


def _check_value(key: str, value: str) -> str:
    unsafe = _UNSAFE_IN_VALUES.intersection(value)
    if unsafe:
        raise ValueError(
            f"the URL parameter {key}={value!r} contains {''.join(sorted(unsafe))!r}, "
            "which Dubbo's URL format cannot carry (values are written raw)"
        )
    return value


@dataclass(frozen=True)
class ServiceURL:
    """One provider's (or consumer's) URL, as Dubbo writes it into the registry.

    ``backchannel://{host}:{port}/{interface}?application=..&group=..&methods=a,b&...``
    with the keys in sorted order (Dubbo's ``URL.toFullString``). Build one with
    :meth:`provider` or :meth:`consumer`; :meth:`parse` reads any Dubbo URL, keeping the
    keys it has no field for in ``parameters``."""

    interface: str
    host: str
    port: int = 0
    side: str = PROVIDER
    application: str = ""
    group: str = ""
    version: str = ""
    methods: tuple[str, ...] = ()
    #: the provider's limit of callback instances per consumer (Dubbo's ``callbacks``)
    callbacks: int | None = None
    weight: int = DEFAULT_WEIGHT
    #: when the provider started, in milliseconds since the epoch (0: not said)
    timestamp: int = 0
    release: str = ""
    protocol: str = PROTOCOL
    #: every other key, sorted, as read (a Java provider's ``dubbo``, ``pid``, ...)
    parameters: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def provider(
        cls,
        interface: str,
        host: str,
        port: int,
        *,
        application: str = "",
        group: str = "",
        version: str = "",
        methods: Iterable[str] = (),
        callbacks: int | None = None,
        weight: int = DEFAULT_WEIGHT,
        timestamp: int | None = None,
    ) -> ServiceURL:
        """A provider's URL; ``timestamp`` defaults to now."""
        if not PORTS[0] <= port <= PORTS[1]:
            raise ValueError(f"a provider URL needs a port in 1..65535, not {port}")
        check_weight(weight)
        url = cls(
            interface=interface,
            host=host,
            port=port,
            side=PROVIDER,
            application=application,
            group=group,
            version=version,
            methods=tuple(methods),
            callbacks=callbacks,
            weight=weight,
            timestamp=_now_ms() if timestamp is None else timestamp,
            release=release(),
        )
        url.to_string()  # refuse now what could not be written later
        return url

    @classmethod
    def consumer(
        cls,
        interface: str,
        host: str,
        *,
        application: str = "",
        group: str = "",
        version: str = "",
        methods: Iterable[str] = (),
        timestamp: int | None = None,
    ) -> ServiceURL:
        """A consumer's URL: ``consumer://{host}/{interface}?...&category=consumers``."""
        url = cls(
            interface=interface,
            host=host,
            side=CONSUMER,
            application=application,
            group=group,
            version=version,
            methods=tuple(methods),
            weight=DEFAULT_WEIGHT,
            timestamp=_now_ms() if timestamp is None else timestamp,
            release=release(),
            protocol=CONSUMER,
        )
        url.to_string()
        return url

    @functools.cached_property  # read for every provider on every call's choice
    def address(self) -> str:
        """``host:port`` (``[v6]:port``), what a consumer connects to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port else host

    @property
    def category(self) -> str:
        """The znode folder it belongs in: ``providers`` or ``consumers``."""
        return "consumers" if self.side == CONSUMER else "providers"

    def query(self) -> dict[str, str]:
        """The URL's parameters, every key as written."""
        query = dict(self.parameters)
        query["interface"] = self.interface
        query["side"] = self.side
        if self.side == CONSUMER:
            query["category"] = "consumers"
        else:
            query["weight"] = str(self.weight)
            if self.callbacks is not None:
                query["callbacks"] = str(self.callbacks)
        for key, value in (
            ("application", self.application),
            ("group", self.group),
            ("version", self.version),
            ("methods", ",".join(self.methods)),
            ("release", self.release),
        ):
            if value:
                query[key] = value
        if self.timestamp:
            query["timestamp"] = str(self.timestamp)
        return query

    def to_string(self) -> str:
        """The URL, keys sorted and values raw, exactly as Dubbo's ``toFullString``."""
        if not self.interface or _UNSAFE_IN_VALUES.intersection(self.interface) - {"/"}:
            raise ValueError(f"{self.interface!r} is not an interface name a URL can carry")
        query = "&".join(
            f"{key}={_check_value(key, value)}" for key, value in sorted(self.query().items())
        )
        return f"{self.protocol}://{self.address}/{self.interface}?{query}"

    __str__ = to_string

    @classmethod
    def parse(cls, text: str) -> ServiceURL:
        """Read a URL written by :meth:`to_string` or by Dubbo (not URL-encoded).

        A ValueError names what is wrong: no scheme, host or interface; a number that is
        not one, or out of its bounds (:data:`BOUNDS`; a provider's port in 1..65535)."""
        parts = urllib.parse.urlsplit(text)
        if not parts.scheme or not parts.hostname:
            raise ValueError(f"not a service URL (no scheme://host): {_quote(text)}")
        try:
            port = parts.port or 0
        except ValueError as exc:
            raise ValueError(f"not a service URL ({exc}): {_quote(text)}") from None
        query: dict[str, str] = {}
        for pair in parts.query.split("&") if parts.query else ():
            key, _, value = pair.partition("=")
            if key:
                query[key] = value
        interface = query.get("interface") or parts.path.lstrip("/")
        if not interface:
            raise ValueError(f"not a service URL (no interface): {_quote(text)}")
        side = query.get("side") or (CONSUMER if parts.scheme == CONSUMER else PROVIDER)
        if side != CONSUMER and not PORTS[0] <= port <= PORTS[1]:
            raise ValueError(f"a provider URL needs a port in 1..65535, not {port}: {_quote(text)}")
        return cls(
            interface=interface,
            host=parts.hostname,
            port=port,
            side=side,
            application=query.get("application", ""),
            group=query.get("group", ""),
            version=query.get("version", ""),
            methods=tuple(m for m in query.get("methods", "").split(",") if m),
            callbacks=_int(query, "callbacks", None, text),
            weight=_int(query, "weight", DEFAULT_WEIGHT, text) or 0,
            timestamp=_int(query, "timestamp", 0, text) or 0,
            release=query.get("release", ""),
            protocol=parts.scheme,
            parameters=tuple(sorted((k, v) for k, v in query.items() if k not in _OWN_KEYS)),
        )

    def matches(self, interface: str, group: str = "", version: str = "") -> bool:
        """Whether a consumer of (interface, group, version) may use this provider, as
        Dubbo's ``UrlUtils.isMatch``: ``*`` matches any group or version, and a group
        may be a comma-separated list."""
        if interface not in ("*", self.interface):
            return False
        group_ok = group == "*" or group == self.group or self.group in group.split(",")
        return group_ok and version in ("*", self.version)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_weight(weight: int) -> int:
    """``weight`` if it is a provider's weight (an int in 0..MAX_WEIGHT), else ValueError."""
    if not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"a provider's weight must be an int in 0..{MAX_WEIGHT}, not {weight!r}")
    return weight


def _int(query: dict[str, str], key: str, default: int | None, text: str) -> int | None:
    """The number at ``key`` (``default`` when absent or empty), within ``BOUNDS[key]``.

    Only ASCII digits with an optional sign are a number (not ``int()``'s underscores,
    spaces or other scripts' digits); a longer one than any bound is refused unconverted."""
    value = query.get(key)
    if value is None or value == "":
        return default
    low, high = BOUNDS[key]
    digits = value[1:] if value[0] in "+-" else value
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(
            f"the URL parameter {key}={_quote(value, 40)} is not a number: {_quote(text)}"
        )
    if len(digits) > _MOST_DIGITS or not low <= int(value) <= high:
        raise ValueError(
            f"the URL parameter {key}={_quote(value, 40)} is out of its bounds "
            f"{low}..{high}: {_quote(text)}"
        )
    return int(value)


def _quote(text: str, limit: int = 200) -> str:
    """``text`` for an error message: quoted, escaped and cut (it may come off a znode)."""
    return f"'{wire_text(text, limit)}'"


# pragma: no mutate start -- subscriptions: reached only with a real ZooKeeper (docs/testing.md)
Listener = Callable[[frozenset[ServiceURL]], None]


class Subscription:
    """A consumer's view of one service's providers: ``providers`` is the current set,
    and the listener is told of every change after the first (with the whole new set).

    With a ``loop``, both the set and the listener change on that loop only; without
    one, in the registry's thread (then the listener must not block)."""

    def __init__(
        self,
        interface: str,
        group: str,
        version: str,
        listener: Listener | None,
        loop: asyncio.AbstractEventLoop | None,
        providers: frozenset[ServiceURL] = frozenset(),
    ) -> None:
        self.interface = interface
        self.group = group
        self.version = version
        self.providers = providers
        self.closed = False
        self._listener = listener
        self._loop = loop
        # a burst of updates (a thousand providers registering one by one) is delivered
        # as its latest state only: one list waits at most, one delivery is posted at
        # most, and deliveries take at most a tenth of the loop's time (see _flush)
        self._lock = threading.Lock()
        self._latest: list[ServiceURL] | None = None
        self._posted = False
        self._not_before = 0.0

    def matches(self, url: ServiceURL) -> bool:
        """Whether ``url`` is a provider of what this subscription follows."""
        return url.matches(self.interface, self.group, self.version)

    def offer(self, urls: Iterable[ServiceURL]) -> None:
        """From any thread: the providers are now ``urls`` (those that match are kept).
        Offers that arrive faster than the subscriber's loop takes them replace each
        other: only the latest is delivered."""
        if self._loop is None:
            self._deliver(frozenset(u for u in urls if self.matches(u)))
            return
        latest = urls if isinstance(urls, list) else list(urls)
        with self._lock:
            self._latest = latest
            if self._posted:
                return
            self._posted = True
        try:
            inbox(self._loop).post(self._flush)
        except ChannelClosed:  # the subscriber's loop is gone: nobody to tell
            self.closed = True

    def _flush(self) -> None:
        # on the loop; a delivery this soon after a costly one waits its turn
        loop = self._loop
        assert loop is not None
        if loop.time() < self._not_before:
            loop.call_at(self._not_before, self._flush_now)
        else:
            self._flush_now()

    def _flush_now(self) -> None:
        with self._lock:
            urls, self._latest = self._latest, None
            self._posted = False
        if urls is None:
            return
        started = time.perf_counter()
        self._deliver(frozenset(u for u in urls if self.matches(u)))
        # the next delivery waits nine times what this one cost (listener included):
        # nothing for a few providers, a fraction of a second for ten thousand
        assert self._loop is not None
        self._not_before = self._loop.time() + 9 * (time.perf_counter() - started)

    def _deliver(self, providers: frozenset[ServiceURL]) -> None:
        if self.closed or providers == self.providers:
            return
        self.providers = providers
        if self._listener is not None:
            try:
                self._listener(providers)
            except Exception:  # it must not stop the inbox (or kazoo's watch) it runs in
                logger.exception("the listener of %s's providers raised", self.interface)

    def close(self) -> None:
        """Stop following changes."""
        self.closed = True


class Registry(Protocol):
    """What providers register in and consumers subscribe to."""

    def register(self, url: ServiceURL) -> None:
        """Announce ``url`` (a provider's or a consumer's) until unregistered or closed."""

    def unregister(self, url: ServiceURL) -> None:
        """Withdraw ``url``; nothing happens if it is not registered."""

    def subscribe(
        self,
        interface: str,
        listener: Listener | None = None,
        *,
        group: str = "",
        version: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        """Follow the providers of (interface, group, version): the subscription holds
        the current set, and ``listener`` hears of each change (on ``loop`` if given)."""
        ...

    def close(self) -> None:
        """Withdraw everything registered through this registry and stop following."""


# pragma: no mutate end


class StaticRegistry:
    """A fixed list of provider addresses (``"h1:p1,h2:p2"``, ``static://`` optional):
    every interface is served by all of them, with Dubbo's default weight. Registering
    only records the URL, as nobody else reads it."""

    def __init__(self, addresses: str | Iterable[str]) -> None:
        if isinstance(addresses, str):
            text = addresses.removeprefix(STATIC_SCHEME)
            addresses = text.split(",")
        self.addresses = tuple(a.strip() for a in addresses if a.strip())
        if not self.addresses:
            raise ValueError("a static registry needs at least one host:port")
        self._hosts = tuple(_split_address(a) for a in self.addresses)
        self.registered: set[ServiceURL] = set()

    def register(self, url: ServiceURL) -> None:
        self.registered.add(url)

    def unregister(self, url: ServiceURL) -> None:
        self.registered.discard(url)

    def subscribe(
        self,
        interface: str,
        listener: Listener | None = None,
        *,
        group: str = "",
        version: str = "",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        # the list says nothing of groups and versions: the consumer's own are assumed
        providers = frozenset(
            ServiceURL(interface, host, port, group=group, version=version)
            for host, port in self._hosts
        )
        return Subscription(interface, group, version, listener, loop, providers)

    def close(self) -> None:
        self.registered.clear()


# pragma: no mutate start -- the ZooKeeper registry: needs a real ZooKeeper (docs/testing.md)
def _split_address(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"a static registry address must be host:port, not {address!r}")
    return host.strip("[]"), int(port)


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


#: hosts a server may bind to that no peer can connect to
_ANY_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def reachable_host(bound: str = "", advertise: str | None = None) -> str:
    """The host to write into a URL for a server bound to ``bound``: ``advertise`` when
    given, the bound host unless it is a wildcard (``0.0.0.0``, ``[::]``), else this
    machine's first non-loopback address, else ``127.0.0.1``."""
    if advertise:
        return advertise.strip("[]")
    if bound not in _ANY_HOSTS:
        return bound.strip("[]")
    return _first_non_loopback() or "127.0.0.1"


def _first_non_loopback() -> str | None:
    # the address the default route leaves from; a UDP connect sends nothing
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
        host = str(s.getsockname()[0])
        if not host.startswith("127.") and host != "0.0.0.0":
            return host
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            host = str(info[4][0])
            if not host.startswith("127."):
                return host
    return None


# pragma: no mutate end


def open_registry(address: str, **options: Any) -> Registry:
    """The registry an address names: ``zookeeper://host:port[,host:port]`` or a static
    list (``static://h1:p1,h2:p2``, or just ``h1:p1,h2:p2``)."""
    if address.startswith(ZOOKEEPER_SCHEME):
        return ZookeeperRegistry(address, **options)
    if "://" in address and not address.startswith(STATIC_SCHEME):
        scheme = address.partition("://")[0]
        raise ValueError(f"unknown registry {scheme}:// in {address!r} (zookeeper://, static://)")
    return StaticRegistry(address)
