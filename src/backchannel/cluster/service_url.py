"""Service URLs in Dubbo's format: what a provider registers and a consumer reads back.

``backchannel://{host}:{port}/{interface}?application=..&group=..&methods=a,b&...``, keys
sorted and values raw as Dubbo's ``URL.toFullString`` writes them; every number a URL
carries is read within documented bounds; znode names are encoded as Java's
``URLEncoder``. Pure: no registry, no I/O but :func:`reachable_host`'s address lookup.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import socket
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from backchannel.cluster.loadbalance import MAX_WEIGHT
from backchannel.wire.text import wire_text

PROVIDER = "provider"
CONSUMER = "consumer"
#: the provider URLs' scheme; a consumer's URL uses Dubbo's ``consumer://``
PROTOCOL = "backchannel"
#: Dubbo's default weight of a provider
DEFAULT_WEIGHT = 100

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


# pragma: no mutate start -- the host a server advertises: the machine's own addresses
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
