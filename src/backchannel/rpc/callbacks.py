"""Parameter callbacks: what the consumer's side and the provider's share.

The consumer's table of exported listener objects is :mod:`backchannel.rpc.consumer_callbacks`;
the provider's table of reverse proxies, and the reverse proxy itself,
:mod:`backchannel.rpc.provider_callbacks`. Here: the call a new call is nested in, the
per-service limit of live instances and its error, and the interface a callback argument
is declared with.

Both tables live and die with one stream. Callback ids are allocated per stream by the
consumer (never ``id()``: it is reused after garbage collection); the provider keeps one
:class:`~backchannel.rpc.provider_callbacks.ReverseProxy` per id, so the same listener
passed twice arrives as the same proxy object.

An instance ends when the consumer releases it, a remover argument receives it, the
provider calls :meth:`~backchannel.rpc.provider_callbacks.ReverseProxy.release`, or the
stream ends; calling its proxy after that raises :class:`CallbackGone` at once.
"""

from __future__ import annotations

import types
import typing
from typing import TYPE_CHECKING

from backchannel.errors import TooManyCallbacks
from backchannel.rpc.interface import InterfaceSpec, MethodSpec, find_interface_spec

if TYPE_CHECKING:
    from backchannel.transport.session import Session


def parent_in(session: Session, current: tuple[Session, int] | None) -> int:
    """The parent call id for a call made on ``session`` in the ``current`` context."""
    if current is not None and current[0] is session:
        return current[1]
    return 0


#: what a callback limit counts against: one exported service, (name, group, version)
ServiceKey = tuple[str, str, str]


def service_label(key: ServiceKey) -> str:
    """An exported service in words, for messages: ``name (group='g', version='1')``."""
    name, group, version = key
    extras = [f"{k}={v!r}" for k, v in (("group", group), ("version", version)) if v]
    return f"{name} ({', '.join(extras)})" if extras else name


def limit_error(service: ServiceKey, limit: int, live: int, adding: int) -> TooManyCallbacks:
    """The error for a call that would pass an exported service's callback limit."""
    return TooManyCallbacks(
        f"{service_label(service)} allows at most {limit} live callback "
        f"instance{'s' if limit != 1 else ''} per stream; "
        f"{live} {'is' if live == 1 else 'are'} live and this call adds {adding}. "
        "Release some (client.release(listener) or a remover method), or raise the "
        "limit with export(..., callbacks=N)"
    )


def listener_interface(method: MethodSpec, index: int) -> InterfaceSpec | None:
    """The interface a callback argument is annotated with (``X`` or ``X | None``), if any."""
    hint = method.parameter_type(index)
    for candidate in typing.get_args(hint) if _is_union(hint) else (hint,):
        if isinstance(candidate, type):
            spec = find_interface_spec(candidate)
            if spec is not None:
                return spec
    return None


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
