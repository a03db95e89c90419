"""Parameter callbacks: the consumer's table of exported listener objects, the provider's
table of reverse proxies, and the reverse proxy itself.

Both tables live and die with one stream. Callback ids are allocated per stream by the
consumer (never ``id()``: it is reused after garbage collection); the provider keeps one
:class:`ReverseProxy` per id, so the same listener passed twice arrives as the same
proxy object.

An instance ends when the consumer releases it, a remover argument receives it, the
provider calls :meth:`ReverseProxy.release`, or the stream ends; calling its proxy after
that raises :class:`CallbackGone` at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import threading
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backchannel.errors import (
    CallbackGone,
    ChannelClosed,
    EncodeError,
    InvalidArguments,
    MethodNotFound,
    StreamBroken,
    TooManyCallbacks,
    UnknownCallback,
)
from backchannel.rpc.interface import InterfaceSpec, MethodSpec, find_interface_spec
from backchannel.transport.handoff import Deferred, post_quietly, run_in_pool, submit
from backchannel.transport.portal import wait_on_loop
from backchannel.transport.session import CURRENT_CALL
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

if TYPE_CHECKING:
    from backchannel.transport.pools import CallPools
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


# ------------------------------------------------------------------ consumer


@dataclass(eq=False)
class ExportedCallback:
    """A listener object the consumer exported on one stream."""

    id: int
    obj: object
    interface: InterfaceSpec | None
    #: the exported services (name, group, version) whose limit this instance counts against
    services: set[ServiceKey] = field(default_factory=set)
    #: calls to one instance run one at a time, in arrival order
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: the incoming call id that holds ``lock`` now (0 when none)
    holder: int = 0


class ConsumerCallbacks:
    """The consumer's side of one stream: its exported listeners, and running their calls."""

    def __init__(self, session: Session, pools: CallPools) -> None:
        self._session = session
        self._pools = pools
        self._by_id: dict[int, ExportedCallback] = {}
        self._by_object: dict[int, ExportedCallback] = {}  # id(obj) is safe: we hold obj
        self._per_service: collections.Counter[ServiceKey] = collections.Counter()
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
    ) -> tuple[list[ExportedCallback], list[ExportedCallback]]:
        """Encode a forward call's arguments into ``into`` (its Call's ``args``, filled in
        place), exporting its callback arguments.

        ``service`` is the exported service the call goes to: its limit counts the
        instances passed to it. Returns (instances newly exported by this call, instances
        it removes). Nothing is exported when this raises.
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
        return fresh, removed

    def remove(self, entry: ExportedCallback) -> None:
        """Un-export one instance (idempotent); drops the strong reference to its object."""
        if self._by_id.pop(entry.id, None) is None:
            return
        self._by_object.pop(id(entry.obj), None)
        for service in entry.services:
            self._per_service[service] -= 1
            if not self._per_service[service]:
                del self._per_service[service]
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
        function = _listener_method(entry, call.method)
        where = f"{_interface_name(entry) or 'callback'}.{call.method}()"
        args = codec.decode_args(call.args, where)
        if entry.holder and entry.holder in self._session.ancestors(call.parent_id):
            # re-entrant: the call that holds this instance is waiting for this one
            return await self._invoke(call, function, args, where, None)
        await entry.lock.acquire()
        entry.holder = call.id
        thread: list[concurrent.futures.Future[None]] = []
        try:
            return await self._invoke(call, function, args, where, thread)
        finally:
            if thread and not thread[0].done():
                # cancelled (timed out, the provider gave up) while a plain listener still
                # runs in its thread: the next call to this instance waits until it ends
                loop = asyncio.get_running_loop()
                thread[0].add_done_callback(
                    lambda _: post_quietly(loop, self._unlock, entry, call.id)
                )
            else:
                self._unlock(entry, call.id)

    @staticmethod
    def _unlock(entry: ExportedCallback, call_id: int) -> None:
        if entry.holder == call_id:
            entry.holder = 0
        entry.lock.release()

    async def _invoke(
        self,
        call: pb.Call,
        function: Callable[..., Any],
        args: list[object],
        where: str,
        thread: list[concurrent.futures.Future[None]] | None,
    ) -> pb.Value:
        if inspect.iscoroutinefunction(function):
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


# ------------------------------------------------------------------ provider

# ---- hook for backchannel.rpc.broadcast (gather): a proxy call collected, not yet made

#: True while :func:`backchannel.gather` collects proxy calls: each returns a PendingCall
COLLECTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "backchannel_collecting", default=False
)


class PendingCall(typing.NamedTuple):
    """A reverse proxy call made while :func:`backchannel.gather` collects: not sent yet."""

    proxy: ReverseProxy
    method: str
    one_way: bool
    args: tuple[Any, ...]
    parent: int


# ---- end of the hook


class ReverseProxy:
    """The provider's handle on a consumer's listener.

    Calling a method sends a ``Call`` to the consumer on the stream that carried the
    listener and returns what the listener returned (or raises what it raised):

    - from a thread (a sync provider method, a background thread), it blocks that
      thread until the result is in;
    - from the event loop (an ``async def`` provider method), it sends the call at once
      and returns an awaitable future: ``await listener.changed(msg)``.

    Calls to one instance are delivered in the order they were made. After the instance
    ended, every call raises :class:`CallbackGone` at once.
    """

    def __init__(
        self,
        table: ProviderCallbacks,
        callback_id: int,
        interface_name: str,
        spec: InterfaceSpec | None,
    ) -> None:
        self._table = table
        self._id = callback_id
        self._interface_name = interface_name
        self._spec = spec
        self._gone: str | None = None
        self._ended_event = threading.Event()
        self._labels: dict[str, str] = {}
        if spec is not None:
            for name, method in spec.methods.items():
                setattr(self, name, functools.partial(self._call, name, method))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # only for listeners of no known interface: any public method name may be called
        if name.startswith("_") or self.__dict__.get("_spec") is not None:
            raise AttributeError(name)
        return functools.partial(self._call, name, None)

    def __repr__(self) -> str:
        state = f"gone: {self._gone}" if self._gone else "live"
        return f"<ReverseProxy {self._interface_name or 'callback'} #{self._id} {state}>"

    @property
    def callback_id(self) -> int:
        """The instance's id on its stream."""
        return self._id

    @property
    def alive(self) -> bool:
        """False once the instance ended."""
        return self._gone is None

    def release(self) -> None:
        """End the instance on both sides (thread-safe; idempotent)."""
        loop = self._table.session.loop
        if self._table.session.in_loop_thread():
            self._table.release(self._id, tell_peer=True)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._table.release, self._id, True)
        self._ended("released by the provider")

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the instance ended (released, removed, or its stream ended)."""
        return self._ended_event.wait(timeout)

    def _ended(self, why: str) -> None:
        if self._gone is None:
            self._gone = why
            self._ended_event.set()

    def _check_alive(self, method: str) -> None:
        if self._gone is not None:
            raise CallbackGone(
                f"{self._interface_name or 'callback'} #{self._id}.{method}(): "
                f"the callback instance ended ({self._gone})"
            )

    def _call(self, method: str, spec: MethodSpec | None, *args: Any, **kwargs: Any) -> Any:
        if spec is not None:
            args = spec.bind(args, kwargs)  # InvalidArguments (a TypeError) saying what
        elif kwargs:
            raise InvalidArguments(
                f"{self._interface_name or 'callback'} #{self._id}.{method}(): keyword "
                f"arguments ({', '.join(kwargs)}) cannot travel to a listener of no known "
                "interface; pass them positionally"
            )
        one_way = spec.one_way if spec is not None else False
        session = self._table.session
        parent = parent_in(session, CURRENT_CALL.get())
        if COLLECTING.get():  # hook: backchannel.gather() collects the call, starts it later
            return PendingCall(self, method, one_way, args, parent)
        self._check_alive(method)
        if session.in_loop_thread():
            return self._start(method, one_way, args, parent, chain=True)
        try:
            return wait_on_loop(session.loop, lambda: self._start(method, one_way, args, parent))
        except ChannelClosed:  # the loop is closed: so is the stream
            self._ended("the stream ended")
            self._check_alive(method)
            raise
        except StreamBroken as exc:  # the stream ended while the call was in flight
            raise self._gone_error(method, exc) from exc

    def _gone_error(self, method: str, cause: BaseException) -> CallbackGone:
        """The stream ended under a call: the instance is gone (CallbackGone, not the bare
        StreamBroken, so a push loop that catches CallbackGone drops the listener)."""
        self._ended(f"the stream ended: {cause}")
        return CallbackGone(
            f"{self._interface_name or 'callback'} #{self._id}.{method}(): the callback "
            f"instance ended while the call was in flight ({cause})"
        )

    # ---- hook for backchannel.rpc.broadcast (gather): start a collected call, do not wait
    def begin(self, pending: PendingCall, values: Sequence[pb.Value] | None) -> asyncio.Future[Any]:
        """On the loop: send a call :func:`backchannel.gather` collected and return its
        future without waiting; ``values`` are its arguments encoded already (shared by
        many calls), or None to encode them here. A StreamBroken is left untranslated:
        :meth:`gone_error` makes the CallbackGone."""
        return self._start(pending.method, pending.one_way, pending.args, pending.parent, values)

    def gone_error(self, method: str, cause: BaseException) -> CallbackGone:
        """The CallbackGone for a call whose stream ended under it (see :meth:`begin`)."""
        return self._gone_error(method, cause)

    def label(self, method: str) -> str:
        """The call in words, for messages: ``Interface #id.method()``."""
        where = self._labels.get(method)
        if where is None:
            where = self._labels[method] = (
                f"{self._interface_name or 'callback'} #{self._id}.{method}()"
            )
        return where

    # ---- end of the hook

    def _start(
        self,
        method: str,
        one_way: bool,
        args: tuple[Any, ...],
        parent: int,
        values: Sequence[pb.Value] | None = None,
        chain: bool = False,
    ) -> asyncio.Future[Any]:
        """On the loop: send the call now, return a future for its decoded outcome.

        With ``chain`` (the caller awaits on the loop), a stream that ends under the call
        fails it with CallbackGone rather than the bare StreamBroken.
        """
        self._check_alive(method)
        where = self.label(method)
        if values is None:
            values = codec.encode_args(args, (), where, None)
        call = pb.Call(
            method=method, args=values, callback_id=self._id, parent_id=parent, one_way=one_way
        )
        session = self._table.session
        table = self._table

        def decode(result: pb.Result) -> Any:
            if result.HasField("error"):
                error = codec.decode_error(result.error, session.error_types)
                if isinstance(error, CallbackGone):  # the consumer no longer has it
                    table.release(call.callback_id)
                raise error
            what = f"the result of {where}"
            if codec.is_bulk_value(result.value):  # off the loop every stream shares
                value = result.value
                pool = table.pools.for_waiter(session)
                return Deferred(run_in_pool(pool, lambda: codec.decode(value, what)))
            return codec.decode(result.value, what)

        def broken(error: BaseException) -> BaseException:
            if isinstance(error, StreamBroken):  # the instance went with its stream
                return self._gone_error(method, error)
            return error

        return session.start_call(
            call, table.timeout, label=where, decode=decode, broken=broken if chain else None
        )


class ProviderCallbacks:
    """The provider's side of one stream: a reverse proxy per live callback instance."""

    def __init__(self, session: Session, timeout: float | None, pools: CallPools) -> None:
        self.session = session
        self.timeout = timeout
        #: the provider's pools: a listener's big result is decoded in one of them
        self.pools = pools
        self._proxies: dict[int, ReverseProxy] = {}
        #: the exported services each live instance counts against (as on the consumer)
        self._services: dict[int, set[ServiceKey]] = {}
        self._per_service: collections.Counter[ServiceKey] = collections.Counter()

    def __len__(self) -> int:
        return len(self._proxies)

    def decode_args(
        self, method: MethodSpec, service: ServiceKey, limit: int, values: Sequence[pb.Value]
    ) -> tuple[list[object], Callable[[], None], list[ReverseProxy]]:
        """Decode a forward call's arguments, making proxies for its callback arguments.

        ``service`` is the export the call targets; its limit counts the instances
        passed to it. Returns (args, commit, removed): nothing is registered until
        ``commit()`` runs, so a call that fails before its method starts leaves the
        table as it was (:meth:`refuse` then tells the consumer).
        """
        where = f"{method.qualname}()"
        args: list[object] = []
        fresh: dict[int, ReverseProxy] = {}
        involved: dict[int, ReverseProxy] = {}
        removed: list[ReverseProxy] = []
        for index, value in enumerate(values):
            place = f"argument {index} of {where}"
            kind = value.WhichOneof("kind")
            if index in method.callbacks and kind == "callback_value":
                ref = value.callback_value
                if ref.id == 0:  # Call.callback_id 0 means a forward call: never callable
                    raise InvalidArguments(
                        f"{place}: callback id 0 is not allowed; give a callback a non-zero id"
                    )
                proxy = self._proxies.get(ref.id) or fresh.get(ref.id)
                if proxy is None:
                    spec = listener_interface(method, index)
                    proxy = ReverseProxy(self, ref.id, ref.interface or _name(spec), spec)
                    fresh[ref.id] = proxy
                involved[ref.id] = proxy
                args.append(proxy)
            elif index in method.removers and kind == "callback_value":
                proxy = self._proxies.get(value.callback_value.id)
                if proxy is None:
                    raise UnknownCallback(
                        f"{place}: callback {value.callback_value.id} was never added on this "
                        "stream (or was already removed)"
                    )
                removed.append(proxy)
                args.append(proxy)
            elif index in method.callbacks | method.removers and kind != "null_value":
                raise InvalidArguments(f"{place} is declared a callback; got a {kind} value")
            else:
                args.append(codec.decode(value, place))
        counted = [i for i in involved if service not in self._services.get(i, ())]
        if counted:
            live = self._per_service[service]
            if live + len(counted) > limit:
                raise limit_error(service, limit, live, len(counted))

        def commit() -> None:
            for callback_id, proxy in fresh.items():
                self._proxies[callback_id] = proxy
                self._services[callback_id] = set()
            for callback_id in counted:
                services = self._services.get(callback_id)
                if services is not None and service not in services:
                    services.add(service)
                    self._per_service[service] += 1

        return args, commit, removed

    def refuse(self, method: MethodSpec, values: Sequence[pb.Value]) -> None:
        """A forward call failed before its method ran: send the consumer a Release for
        each callback it carried that is not live here, so the consumer un-exports what
        the provider never took (the call's Result follows the Releases)."""
        ids = {
            value.callback_value.id
            for index, value in enumerate(values)
            if index in method.callbacks and value.WhichOneof("kind") == "callback_value"
        }
        ids.discard(0)
        refused = sorted(ids - self._proxies.keys())
        for callback_id in refused:
            self.session.connection.send_release(callback_id)
        if refused:
            self.session.flush()

    def release(self, callback_id: int, tell_peer: bool = False) -> None:
        """End one instance (idempotent); with ``tell_peer``, send Release to the consumer."""
        proxy = self._proxies.pop(callback_id, None)
        if proxy is None:
            return
        for service in self._services.pop(callback_id, ()):
            self._per_service[service] -= 1
            if not self._per_service[service]:
                del self._per_service[service]
        proxy._ended("released")
        if tell_peer:
            self.session.connection.send_release(callback_id)
            self.session.flush()

    def clear(self, why: str) -> None:
        """The stream ended: every proxy raises CallbackGone from now on."""
        for proxy in self._proxies.values():
            proxy._ended(why)
        self._proxies.clear()
        self._services.clear()
        self._per_service.clear()


def _name(spec: InterfaceSpec | None) -> str:
    return spec.name if spec else ""
