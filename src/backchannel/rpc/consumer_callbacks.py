"""The consumer's side of parameter callbacks on one stream: the table of listener objects it
exported (with their callback ids, allocated per stream), encoding a forward call's callback
and remover arguments into it, and running the provider's calls on those listeners, one at
a time per instance (docs/callbacks.md).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backchannel.errors import (
    CallbackGone,
    EncodeError,
    InvalidArguments,
    MethodNotFound,
    TooManyCallbacks,
    UnknownCallback,
)
from backchannel.rpc import attachments, filters
from backchannel.rpc.callbacks import ServiceKey, limit_error, listener_interface, service_label
from backchannel.rpc.interface import InterfaceSpec, MethodSpec, find_interface_spec
from backchannel.rpc.turns import Turns
from backchannel.settings import DEFAULT_MAX_ATTACHMENT_BYTES
from backchannel.transport.handoff import post_quietly, submit
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

if TYPE_CHECKING:
    from backchannel.transport.pools import CallPools
    from backchannel.transport.session import Session


@dataclass(eq=False)
class ExportedCallback:
    """A listener object the consumer exported on one stream."""

    id: int
    obj: object
    interface: InterfaceSpec | None
    #: the exported services (name, group, version) whose limit this instance counts against
    services: set[ServiceKey] = field(default_factory=set)
    #: the (name, group, version, method) it was passed to, for Method(callbacks=N)
    passed_to: set[MethodKey] = field(default_factory=set)
    #: calls to one instance run one at a time, in arrival order
    lock: Turns = field(default_factory=Turns)
    #: the incoming call id that holds ``lock`` now (0 when none)
    holder: int = 0
    #: method name -> (its function, whether it is ``async def``, the call in words, its
    #: result in words), so that is worked out once per name (a listener's names: bounded
    #: by its methods). The function, not the bound method: that would hold a listener
    #: held weakly
    methods: dict[str, tuple[object, bool, str, str]] = field(default_factory=dict)


class ConsumerCallbacks:
    """The consumer's side of one stream: its exported listeners, and running their calls."""

    #: the client's filters, around every listener call (none: unfiltered)
    filters: tuple[filters.Link, ...] = ()
    #: Limits.max_attachment_bytes of the client: a callback carrying more is refused
    attachment_limit = DEFAULT_MAX_ATTACHMENT_BYTES
    #: ``propagate_attachments``: what calls a listener makes carry of its call's own
    propagate: attachments.Propagate = False

    def __init__(self, session: Session, pools: CallPools) -> None:
        self._session = session
        self._pools = pools
        self._by_id: dict[int, ExportedCallback] = {}
        self._by_object: dict[int, ExportedCallback] = {}  # id(obj) is safe: we hold obj
        self._per_service: collections.Counter[ServiceKey] = collections.Counter()
        self._per_method: collections.Counter[MethodKey] = collections.Counter()
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._by_id)

    def find(self, obj: object) -> ExportedCallback | None:
        """The live instance of ``obj`` on this stream, if any."""
        return self._by_object.get(id(obj))

    def encode_args(
        self,
        method: MethodSpec,
        service: ServiceKey,
        args: Sequence[object],
        info: pb.MethodInfo | None,
        limit: int | None,
        into: codec.Args,
        own_limit: int | None = None,
    ) -> tuple[list[ExportedCallback], list[ExportedCallback]]:
        """Encode a forward call's arguments into ``into`` (its Call's ``args``, filled in
        place), exporting its callback arguments.

        ``service`` is the exported service the call goes to: its limit (``limit``, the
        provider's; ``own_limit``, the reference's) counts the instances passed to it, and
        ``method.callback_limit`` those passed to the method. Returns (instances newly
        exported by this call, instances it removes). Nothing is exported when this raises.
        """
        callbacks, removers = declared_arguments(method, info)
        where = f"{method.qualname}()"
        if not callbacks and not removers:  # the common case, fast
            with contextlib.suppress(EncodeError):  # the loop below explains the error
                codec.encode_args(args, method.parameters, where, None, into)
                return [], []
            del into[:]
        fresh: list[ExportedCallback] = []
        involved: list[ExportedCallback] = []
        removed: list[ExportedCallback] = []
        for index, arg in enumerate(args):
            name = f" {method.parameters[index]!r}" if index < len(method.parameters) else ""
            place = f"argument {index}{name} of {where}"
            if index in callbacks and arg is not None:
                entry = self.find(arg) or next((e for e in fresh if e.obj is arg), None)
                if entry is None:
                    interface = _listener_interface(method, index, arg)
                    _check_listener(arg, place, interface)
                    entry = ExportedCallback(self._next_id, arg, interface)
                    self._next_id += 1
                    fresh.append(entry)
                if entry not in involved:
                    involved.append(entry)
                ref = into.add().callback_value
                ref.id, ref.interface = entry.id, _interface_name(entry)
            elif index in removers and arg is not None:
                entry = self.find(arg)
                if entry is None:
                    raise UnknownCallback(
                        f"{place}: this object was never added as a callback on this stream "
                        "(or was already removed), so there is nothing to remove"
                    )
                removed.append(entry)
                into.add().callback_value.id = entry.id
            else:
                _encode_plain(into.add(), arg, place, index)
        counted = [entry for entry in involved if service not in entry.services]
        by_method = (*service, method.name)
        to_method = [entry for entry in involved if by_method not in entry.passed_to]
        if own_limit is not None or method.callback_limit is not None:
            self._check_own_limits(method, service, own_limit, counted, to_method)
        if limit is not None and counted:
            live = self._per_service[service]
            if live + len(counted) > limit:
                raise limit_error(service, limit, live, len(counted))
        for entry in fresh:
            self._by_id[entry.id] = entry
            self._by_object[id(entry.obj)] = entry
        for entry in counted:
            entry.services.add(service)
            self._per_service[service] += 1
        for entry in to_method:
            entry.passed_to.add(by_method)
            self._per_method[by_method] += 1
        return fresh, removed

    def _check_own_limits(
        self,
        method: MethodSpec,
        service: ServiceKey,
        own_limit: int | None,
        counted: list[ExportedCallback],
        to_method: list[ExportedCallback],
    ) -> None:
        """Refuse a call that would pass this consumer's own limits (Dubbo's consumer-side
        ``callbacks``): the reference's per service, the Method's per method."""
        if own_limit is not None and counted:
            live = self._per_service[service]
            if live + len(counted) > own_limit:
                raise _own_limit_error(
                    service_label(service),
                    "reference(..., callbacks=N) ([[reference]] callbacks = N in TOML)",
                    own_limit,
                    live,
                    len(counted),
                )
        limit = method.callback_limit
        if limit is not None and to_method:
            live = self._per_method[(*service, method.name)]
            if live + len(to_method) > limit:
                raise _own_limit_error(
                    f"{service_label(service)} {method.name}()",
                    f"Method({method.name!r}, callbacks=N) ([[reference.method]] callbacks "
                    "= N in TOML)",
                    limit,
                    live,
                    len(to_method),
                )

    def remove(self, entry: ExportedCallback) -> None:
        """Un-export one instance (idempotent); drops the strong reference to its object."""
        if self._by_id.pop(entry.id, None) is None:
            return
        self._by_object.pop(id(entry.obj), None)
        for service in entry.services:
            self._per_service[service] -= 1
            if not self._per_service[service]:
                del self._per_service[service]
        for key in entry.passed_to:
            self._per_method[key] -= 1
            if not self._per_method[key]:
                del self._per_method[key]
        entry.obj = None

    def drop(self, entries: Sequence[ExportedCallback], tell_peer: bool = False) -> None:
        """Un-export instances; with ``tell_peer``, send the provider a Release for each
        that was live, so both tables agree (the provider ignores ids it does not hold)."""
        for entry in entries:
            live = entry.id in self._by_id
            self.remove(entry)
            if tell_peer and live:
                self._session.connection.send_release(entry.id)
        if tell_peer:
            self._session.flush()

    def remove_id(self, callback_id: int) -> None:
        """Un-export the instance with this id, if it is live (the provider released it)."""
        entry = self._by_id.get(callback_id)
        if entry is not None:
            self.remove(entry)

    def clear(self) -> None:
        """The stream ended: every instance ends."""
        for entry in list(self._by_id.values()):
            self.remove(entry)

    async def run(self, call: pb.Call) -> pb.Value:
        """Run a callback call from the provider on the listener it targets."""
        entry = self._by_id.get(call.callback_id)
        if entry is None:
            raise CallbackGone(
                f"callback {call.callback_id} is not exported on this stream "
                "(released, removed or never added)"
            )
        name = call.method
        known = entry.methods.get(name)  # a name found before is allowed: fetch it directly
        function = getattr(entry.obj, name, None) if known is not None else None
        if (
            function is None
            or known is None
            or getattr(function, "__func__", function) is not known[0]
        ):
            function = _listener_method(entry, name)
            plain = getattr(function, "__func__", function)
            where = f"{_interface_name(entry) or 'callback'}.{name}()"
            known = entry.methods[name] = (
                plain,
                inspect.iscoroutinefunction(function),
                where,
                f"the result of {where}",
            )
        _, is_async, where, result_where = known
        if call.attachments or attachments.STATE.get() is not None:
            attachments.serving(call, self.attachment_limit, self.propagate, where)
        args = codec.decode_args(call.args, where)
        thread: list[concurrent.futures.Future[None]] | None = None
        if self.filters:  # the listener's method behind them, in its turn as usual
            thread = []  # where a plain listener's thread is noted, as below
            function = self._filtered(call, entry, function, is_async, thread)
            is_async = True
        if entry.holder and entry.holder in self._session.ancestors(call.parent_id):
            # re-entrant: the call that holds this instance is waiting for this one
            return await self._invoke(call, function, is_async, args, where, None)
        call_id = call.id
        lock = entry.lock
        if not lock.take():  # the listener is busy: wait for its turn
            await lock.acquire()
        entry.holder = call_id
        if is_async and thread is None:  # awaited here: no coroutine of _invoke around it
            try:
                return codec.encode(await function(*args), result_where)
            finally:
                if entry.holder == call_id:  # as _unlock does
                    entry.holder = 0
                lock.release()
        if thread is None:
            thread = []
        try:
            return await self._invoke(call, function, is_async, args, where, thread)
        finally:
            if thread and not thread[-1].done():
                # cancelled (timed out, the provider gave up) while a plain listener still
                # runs in its thread: the next call to this instance waits until it ends
                loop = asyncio.get_running_loop()
                thread[-1].add_done_callback(
                    lambda _: post_quietly(loop, self._unlock, entry, call_id)
                )
            else:
                self._unlock(entry, call_id)

    def _filtered(
        self,
        call: pb.Call,
        entry: ExportedCallback,
        function: Callable[..., Any],
        is_async: bool,
        thread: list[concurrent.futures.Future[None]],
    ) -> Callable[..., Any]:
        """``function`` behind the client's filters, as an ``async`` callable; a plain
        listener's running thread is put in ``thread`` (its turn lasts until it ends)."""
        seen = attachments.attachments()

        async def listener(invocation: filters.Invocation) -> Any:
            if invocation.attachments != seen:  # a filter changed what the listener reads
                attachments.set_incoming(invocation.attachments)
            if is_async:
                return await function(*invocation.args)
            context = contextvars.copy_context()
            pool = self._pools.executor_for(call, self._session)
            outcome, running = submit(
                pool, functools.partial(context.run, function, *invocation.args)
            )
            thread.append(running)
            return await outcome

        async def filtered(*args: Any) -> Any:
            invocation = filters.Invocation(
                "consumer",
                "callback",
                _interface_name(entry),
                call.method,
                list(args),
                dict(seen),
                peer=self._session.peer,
            )
            return await filters.run(self.filters, invocation, listener)

        return filtered

    @staticmethod
    def _unlock(entry: ExportedCallback, call_id: int) -> None:
        if entry.holder == call_id:
            entry.holder = 0
        entry.lock.release()

    async def _invoke(
        self,
        call: pb.Call,
        function: Callable[..., Any],
        is_async: bool,
        args: list[object],
        where: str,
        thread: list[concurrent.futures.Future[None]] | None,
    ) -> pb.Value:
        if is_async:
            result = await function(*args)
        else:
            context = contextvars.copy_context()
            # a call nested in one this side waits for never queues for a thread;
            # others queue (when they must) in their stream's lane, taking turns
            pool = self._pools.executor_for(call, self._session)
            outcome, running = submit(pool, functools.partial(context.run, function, *args))
            if thread is not None:
                thread.append(running)
            result = await outcome
        return codec.encode(result, f"the result of {where}")


def declared_arguments(
    method: MethodSpec, info: pb.MethodInfo | None
) -> tuple[frozenset[int], frozenset[int]]:
    """(callback, remover) argument indexes: the provider's, checked against the consumer's.

    A consumer that declares a callback the provider does not expect is a clear error,
    never a silent attempt to serialise the listener.
    """
    if info is None:
        return method.callbacks, method.removers
    if not (
        info.callback_arguments or info.remover_arguments or method.callbacks or method.removers
    ):
        return _NONE, _NONE
    callbacks = frozenset(info.callback_arguments)
    removers = frozenset(info.remover_arguments)
    for index in sorted(method.callbacks - callbacks):
        raise InvalidArguments(
            f"{method.qualname}(): this side declares argument {index} a callback, but the "
            f"provider declares {sorted(callbacks) or 'no'} callback arguments"
        )
    for index in sorted(method.removers - removers):
        raise InvalidArguments(
            f"{method.qualname}(): this side declares argument {index} a remover, but the "
            f"provider declares {sorted(removers) or 'no'} remover arguments"
        )
    return callbacks, removers


_NONE: frozenset[int] = frozenset()

#: what a consumer's per-method callback limit counts against: (name, group, version, method)
MethodKey = tuple[str, str, str, str]


def _own_limit_error(
    what: str, setting: str, limit: int, live: int, adding: int
) -> TooManyCallbacks:
    """The error for a call that would pass one of this consumer's own callback limits."""
    return TooManyCallbacks(
        f"this consumer allows {what} at most {limit} live listener "
        f"instance{'s' if limit != 1 else ''} per stream; {live} "
        f"{'is' if live == 1 else 'are'} live and this call adds {adding}. The call was not "
        "sent. Release some (client.release(listener) or a remover method), or raise the "
        f"limit with {setting}"
    )


def _encode_plain(value: pb.Value, arg: object, place: str, index: int) -> None:
    try:
        codec.encode_into(value, arg, place)
    except EncodeError as exc:
        if not _looks_like_listener(arg):
            raise
        raise EncodeError(
            f"{exc}. If it is a listener, declare the argument a callback: "
            f"Argument(index={index}, callback=True) at export, or @backchannel.method("
            f"arguments=[Argument(index={index})]) on the interface"
        ) from None


def _looks_like_listener(arg: object) -> bool:
    """True when the object's class (or a base, ``object`` aside) defines public methods
    of its own in Python: a listener, not a value of a type the codec lacks (a datetime,
    a set)."""
    if isinstance(arg, type) or not hasattr(type(arg), "__mro__"):
        return False
    return any(
        not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, staticmethod))
        for klass in type(arg).__mro__[:-1]
        for name, value in vars(klass).items()
    )


def _check_listener(arg: object, place: str, interface: InterfaceSpec | None) -> None:
    """Refuse, before anything is sent, what cannot be the declared listener."""
    if isinstance(arg, str | bytes | int | float | bool | list | tuple | dict | set):
        raise InvalidArguments(
            f"{place} is declared a callback; pass a listener object, not {type(arg).__name__}"
        )
    if interface is None:
        return
    missing = [name for name in interface.methods if not callable(getattr(arg, name, None))]
    if missing:
        raise InvalidArguments(
            f"{place} is declared a callback of interface {interface.name}, but the "
            f"{type(arg).__name__} passed does not implement "
            f"{', '.join(name + '()' for name in missing)}; give it "
            f"{'that method' if len(missing) == 1 else 'those methods'} (or subclass "
            f"{interface.cls.__name__})"
        )


def _listener_interface(method: MethodSpec, index: int, arg: object) -> InterfaceSpec | None:
    return listener_interface(method, index) or find_interface_spec(type(arg))


def _interface_name(entry: ExportedCallback) -> str:
    return entry.interface.name if entry.interface else ""


def _listener_method(entry: ExportedCallback, name: str) -> Callable[..., Any]:
    """The listener's method ``name``; only interface methods (or public ones) are callable."""
    allowed = (
        name in entry.interface.methods
        if entry.interface is not None
        else bool(name) and not name.startswith("_")
    )
    function = getattr(entry.obj, name, None) if allowed else None
    if not callable(function):
        label = _interface_name(entry) or type(entry.obj).__name__
        raise MethodNotFound(f"callback {entry.id} ({label}) has no method {name!r}")
    return function  # type: ignore[no-any-return]
