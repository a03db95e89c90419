"""Filters: code run around every call, on the consumer and the provider, forward calls
and callbacks alike (Dubbo's Filter chain, gRPC's interceptors; docs/filters.md).

A filter sees an :class:`Invocation` and the rest of the chain (``proceed``). Every call
passes through the library's event loop on both sides (the sync facades hand calls to a
loop thread), so one ``async`` chain serves the sync and the asyncio APIs; filters run on
that loop and must not block it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

#: the rest of the chain and the call itself: ``await proceed(invocation)``
Proceed = Callable[["Invocation"], Awaitable[Any]]
#: one link of a chain, as the library keeps it: ``filter(invocation, proceed)``
Link = Callable[["Invocation", Proceed], Awaitable[Any]]


class Invocation:
    """One call as a filter sees it.

    ``args`` (the positional arguments, decoded) and ``attachments`` may be changed (or
    replaced) before ``proceed``: the call goes on with what they hold then.
    """

    __slots__ = (
        "args",
        "attachments",
        "group",
        "kind",
        "method",
        "peer",
        "service",
        "side",
        "version",
    )

    def __init__(
        self,
        side: Literal["consumer", "provider"],
        kind: Literal["call", "callback"],
        service: str,
        method: str,
        args: list[Any],
        attachments: dict[str, str],
        *,
        group: str = "",
        version: str = "",
        peer: str = "",
    ) -> None:
        #: "consumer" or "provider": the side this filter runs on
        self.side = side
        #: "call" (a forward call) or "callback" (provider to consumer)
        self.kind = kind
        #: the service's interface name (a callback: the listener's interface, if known)
        self.service = service
        #: the method's name
        self.method = method
        #: the export's group and version ("" for callbacks and when none)
        self.group = group
        self.version = version
        #: the positional arguments; changeable
        self.args = args
        #: the call's attachments; changeable (a consumer's or a provider's callback:
        #: what is sent; the receiving side: what the method reads with attachments())
        self.attachments = attachments
        #: the other side's address, when known ("" otherwise)
        self.peer = peer

    def __repr__(self) -> str:
        return (
            f"<Invocation {self.side} {self.kind} {self.service}.{self.method} "
            f"args={self.args!r} attachments={self.attachments!r}>"
        )


class Filter:
    """Base class of filters: override :meth:`filter`, or the plain :meth:`before`,
    :meth:`after` and :meth:`error` it calls.

    ::

        class Timing(backchannel.Filter):
            async def filter(self, invocation, proceed):
                start = time.perf_counter()
                try:
                    return await proceed(invocation)
                finally:
                    log(invocation.method, time.perf_counter() - start)

    :meth:`filter` may return a result without calling ``proceed`` (short-circuit), raise
    instead, change ``invocation.args`` or ``invocation.attachments`` first, or catch
    what ``proceed`` raises and raise another error (map it) or return a value.
    Everything runs on the library's event loop: never block in a filter.
    """

    async def filter(self, invocation: Invocation, proceed: Proceed) -> Any:
        """Run around one call; the default calls :meth:`before`, the rest of the chain,
        then :meth:`after` (or :meth:`error`)."""
        self.before(invocation)
        try:
            result = await proceed(invocation)
        except Exception as exc:
            return self.error(invocation, exc)
        return self.after(invocation, result)

    def before(self, invocation: Invocation) -> None:
        """Before the call; raise to refuse it (the caller gets the exception)."""

    def after(self, invocation: Invocation, result: Any) -> Any:
        """After the call succeeded; return the result the caller gets."""
        return result

    def error(self, invocation: Invocation, exc: Exception) -> Any:
        """The call raised ``exc``: raise it (the default), raise another, or return a
        result for the caller."""
        raise exc


#: what ``filters=`` takes: Filter instances, or ``async def f(invocation, proceed)``
FilterLike = Filter | Link


def chain_of(filters: Iterable[FilterLike]) -> tuple[Link, ...]:
    """``filters=`` checked, as the links :func:`run` takes (first is outermost)."""
    links: list[Link] = []
    for index, item in enumerate(filters):
        if isinstance(item, Filter):
            links.append(item.filter)
        elif callable(item):
            links.append(item)
        else:
            raise TypeError(
                f"filters[{index}] is a {type(item).__name__}: give backchannel.Filter "
                "instances or async functions (invocation, proceed)"
            )
    return tuple(links)


def run(links: tuple[Link, ...], invocation: Invocation, call: Proceed) -> Awaitable[Any]:
    """Run ``invocation`` through ``links`` (first outermost) and then ``call``."""
    proceed = call
    for link in reversed(links):
        proceed = _step(link, proceed)
    return proceed(invocation)


def _step(link: Link, rest: Proceed) -> Proceed:
    def proceed(invocation: Invocation) -> Awaitable[Any]:
        return link(invocation, rest)

    return proceed
