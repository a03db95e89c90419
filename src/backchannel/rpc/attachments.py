"""Call attachments (implicit parameters): what the caller sets with :func:`attach`, what
the callee reads with :func:`attachments`, carried in ``Call.attachments``, checked
against the size limit on both sides (docs/attachments.md).

One context variable holds both halves: the attachments of the call being served
(``incoming``, what :func:`attachments` returns) and those the calls made in this context
carry (``outgoing``). Serving a call sets it in the call's own context, so a ``def``
method (run in a pool thread with a copy of that context) reads the same. It is None
until someone attaches or receives something, so a call without attachments pays one
``ContextVar.get``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

from backchannel.errors import InvalidArguments

if TYPE_CHECKING:
    from backchannel.v1 import envelope_pb2 as pb

#: propagation choice of a side: False (none), True (all) or the keys carried on
Propagate = bool | frozenset[str]


class Attachments(Mapping[str, str]):
    """A read-only mapping of attachments, checked (keys non-empty printable ASCII,
    values str), with its size in bytes (keys and values, UTF-8) worked out once."""

    __slots__ = ("_items", "size")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)
        size = 0
        for key, value in self._items.items():
            check_key(key)
            if not isinstance(value, str):
                raise InvalidArguments(
                    f"attachment {key!r}: values are str, got {type(value).__name__}"
                )
            size += len(key) + len(value.encode("utf-8", "surrogatepass"))
        #: bytes of keys and values together, as Limits.max_attachment_bytes counts them
        self.size = size

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Attachments({self._items!r})"


#: no attachments
EMPTY = Attachments()


def check_key(key: object) -> None:
    """Refuse a key that is not a non-empty str of printable ASCII."""
    if not isinstance(key, str) or not key or not (key.isascii() and key.isprintable()):
        raise InvalidArguments(
            f"attachment key {key!r}: keys are non-empty printable ASCII strings"
        )


class _State(NamedTuple):
    incoming: Attachments
    outgoing: Attachments


#: (the call being served's attachments, what calls made here carry); None: neither
STATE: contextvars.ContextVar[_State | None] = contextvars.ContextVar(
    "backchannel_attachments", default=None
)


def attachments() -> Mapping[str, str]:
    """The attachments of the call being served here (read-only); empty outside one.

    Readable in the provider's method (``def`` or ``async def``), in a listener's method
    on the consumer, and in filters (through their invocation)."""
    state = STATE.get()
    return EMPTY if state is None else state.incoming


@contextlib.contextmanager
def attach(values: Mapping[str, str] | None = None, /, **more: str) -> Iterator[Attachments]:
    """Attach key-values to the calls made inside the ``with`` block (forward calls,
    callbacks, on either API), over what is attached already::

        with backchannel.attach(tenant="t1", request_id="42"):
            ref.say("hi")

    Keys are non-empty printable ASCII, values str; anything else is InvalidArguments
    here. A call whose attachments exceed its side's ``Limits.max_attachment_bytes``
    raises InvalidArguments when it is sent."""
    state = STATE.get()
    added = Attachments({**(values or {}), **more})
    if state is None:
        merged = added
        incoming = EMPTY
    else:
        merged = Attachments({**state.outgoing, **added}) if state.outgoing else added
        incoming = state.incoming
    token = STATE.set(_State(incoming, merged))
    try:
        yield merged
    finally:
        STATE.reset(token)


def outgoing() -> Attachments | None:
    """What a call made now carries (None or empty: nothing)."""
    state = STATE.get()
    return None if state is None else state.outgoing


def set_outgoing(values: Mapping[str, str]) -> contextvars.Token[_State | None]:
    """Make ``values`` what calls made in this context carry (a filter's changes);
    undo with ``STATE.reset(token)``."""
    state = STATE.get()
    attached = values if isinstance(values, Attachments) else Attachments(values)
    return STATE.set(_State(EMPTY if state is None else state.incoming, attached))


def set_incoming(values: Mapping[str, str]) -> contextvars.Token[_State | None]:
    """Make ``values`` what :func:`attachments` returns in this context (a provider-side
    filter's changes); undo with ``STATE.reset(token)``."""
    state = STATE.get()
    seen = values if isinstance(values, Attachments) else Attachments(values)
    return STATE.set(_State(seen, EMPTY if state is None else state.outgoing))


def put(call: pb.Call, attached: Attachments, limit: int, where: str) -> None:
    """Copy ``attached`` into ``call``, or raise InvalidArguments when over ``limit``."""
    if attached.size > limit:
        raise InvalidArguments(
            f"{where}: its attachments are {attached.size} bytes, over the limit of "
            f"{limit} bytes (Limits.max_attachment_bytes)"
        )
    call.attachments.update(attached._items)


def serving(call: pb.Call, limit: int, propagate: Propagate, where: str) -> None:
    """In the context of a call being served: make its attachments what
    :func:`attachments` returns, and what the calls made while serving it carry when
    ``propagate`` says so; forget what the context held before (a stream's task may have
    been made in a caller's context). A call over ``limit`` or with a bad key is refused
    with InvalidArguments (INVALID_ARGUMENT), naming the limit."""
    received = call.attachments
    if not received:
        STATE.set(None)
        return
    size = 0
    for key, value in received.items():
        if not key or not (key.isascii() and key.isprintable()):
            raise InvalidArguments(
                f"{where}: attachment key {key[:64]!r} is not printable ASCII; the call is refused"
            )
        size += len(key) + len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise InvalidArguments(
                f"{where}: the call's attachments are over the limit of {limit} bytes "
                "(Limits.max_attachment_bytes); the call is refused"
            )
    incoming = Attachments(received.items())
    if propagate is True:
        carried = incoming
    elif propagate:
        carried = Attachments({k: v for k, v in incoming.items() if k in propagate})
    else:
        carried = EMPTY
    STATE.set(_State(incoming, carried))


def propagation(value: bool | Iterable[str]) -> Propagate:
    """A facade's ``propagate_attachments=`` checked: True, False, or the keys."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        raise ValueError("propagate_attachments takes True, False or a list of keys, not one str")
    keys = frozenset(value)
    for key in keys:
        check_key(key)
    return keys
