"""The provider's side of parameter callbacks on one stream: a :class:`ReverseProxy` per live
callback instance a consumer passed, made when a forward call's arguments are decoded, and
calls through it, sent to the consumer on that stream (and collected unsent while
:func:`backchannel.gather` asks).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import functools
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from backchannel.errors import (
    CallbackGone,
    ChannelClosed,
    InvalidArguments,
    StreamBroken,
    UnknownCallback,
)
from backchannel.rpc import attachments, filters
from backchannel.rpc.callbacks import ServiceKey, limit_error, listener_interface, parent_in
from backchannel.rpc.gone import Lifetime
from backchannel.rpc.interface import InterfaceSpec, MethodSpec
from backchannel.settings import DEFAULT_MAX_ATTACHMENT_BYTES
from backchannel.transport.handoff import Deferred, run_in_pool
from backchannel.transport.portal import wait_on_loop
from backchannel.transport.session import CURRENT_CALL
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

if TYPE_CHECKING:
    from backchannel.transport.pools import CallPools
    from backchannel.transport.session import Session


# ---- hook for backchannel.rpc.gather (gather): a proxy call collected, not yet made

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
    #: the attachments it carries (read where it was made)
    attached: attachments.Attachments | None = None


# ---- end of the hook


class ReverseProxy(Lifetime):
    """The provider's handle on a consumer's listener.

    Calling a method sends a ``Call`` to the consumer on the stream that carried the
    listener and returns what the listener returned (or raises what it raised):

    - from a thread (a sync provider method, a background thread), it blocks that
      thread until the result is in;
    - from the event loop (an ``async def`` provider method), it sends the call at once
      and returns an awaitable future: ``await listener.changed(msg)``.

    Calls to one instance are delivered in the order they were made. After the instance
    ended, every call raises :class:`CallbackGone` at once; :meth:`on_gone`,
    ``await`` :meth:`gone` and :meth:`wait_gone` tell when that happens.
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
        self._init_lifetime()
        self._labels: dict[str, str] = {}
        self._decoders: dict[str, Callable[[pb.Result], Any]] = {}
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

    def release(self) -> None:
        """End the instance on both sides (thread-safe; idempotent)."""
        loop = self._table.session.loop
        if self._table.session.in_loop_thread():
            self._table.release(self._id, tell_peer=True, why=_BY_PROVIDER)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._table.release, self._id, True, _BY_PROVIDER)
        self._ended(_BY_PROVIDER)

    def _hook_site(self) -> tuple[asyncio.AbstractEventLoop, concurrent.futures.Executor, bool]:
        table = self._table
        return table.session.loop, table.pools.regular, table.session.in_loop_thread()

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
        state = attachments.STATE.get()  # read here: the call may start in a hand-off
        attached = None if state is None else state.outgoing
        if COLLECTING.get():  # hook: backchannel.gather() collects the call, starts it later
            return PendingCall(self, method, one_way, args, parent, attached)
        self._check_alive(method)
        if self._table.filters:  # through them, on the loop (a task: they are coroutines)
            start = functools.partial(self._filtered, method, one_way, args, parent, attached)
        elif session.in_loop_thread():
            return self._start(method, one_way, args, parent, chain=True, attached=attached)
        else:
            start = functools.partial(self._start, method, one_way, args, parent, attached=attached)
        if session.in_loop_thread():
            return start()
        try:
            return wait_on_loop(session.loop, start)
        except ChannelClosed:  # the loop is closed: so is the stream
            self._ended("the stream ended")
            self._check_alive(method)
            raise
        except StreamBroken as exc:  # the stream ended while the call was in flight
            raise self._gone_error(method, exc) from exc

    def _filtered(
        self,
        method: str,
        one_way: bool,
        args: tuple[Any, ...],
        parent: int,
        attached: attachments.Attachments | None,
    ) -> asyncio.Future[Any]:
        """On the loop: a call through the server's filters, as a task."""
        return asyncio.ensure_future(self._through_filters(method, one_way, args, parent, attached))

    async def _through_filters(
        self,
        method: str,
        one_way: bool,
        args: tuple[Any, ...],
        parent: int,
        attached: attachments.Attachments | None,
    ) -> Any:
        invocation = filters.Invocation(
            "provider",
            "callback",
            self._interface_name,
            method,
            list(args),
            dict(attached or ()),
            peer=self._table.session.peer,
        )

        def send(invocation: filters.Invocation) -> asyncio.Future[Any]:
            given = invocation.attachments
            carried = attachments.Attachments(given) if given else None  # checked here
            return self._start(
                method, one_way, tuple(invocation.args), parent, chain=True, attached=carried
            )

        return await filters.run(self._table.filters, invocation, send)

    def _gone_error(self, method: str, cause: BaseException) -> CallbackGone:
        """The stream ended under a call: the instance is gone (CallbackGone, not the bare
        StreamBroken, so a push loop that catches CallbackGone drops the listener)."""
        self._ended(f"the stream ended: {cause}")
        return CallbackGone(
            f"{self._interface_name or 'callback'} #{self._id}.{method}(): the callback "
            f"instance ended while the call was in flight ({cause})"
        )

    # ---- hook for backchannel.rpc.gather (gather): start a collected call, do not wait
    def begin(self, pending: PendingCall, values: Sequence[pb.Value] | None) -> asyncio.Future[Any]:
        """On the loop: send a call :func:`backchannel.gather` collected and return its
        future without waiting; ``values`` are its arguments encoded already (shared by
        many calls), or None to encode them here. A StreamBroken is left untranslated:
        :meth:`gone_error` makes the CallbackGone."""
        if self._table.filters:  # filters see each call (and may change its arguments)
            return self._filtered(*pending[1:])
        return self._start(
            pending.method,
            pending.one_way,
            pending.args,
            pending.parent,
            values,
            attached=pending.attached,
        )

    def gone_now(self, method: str) -> CallbackGone:
        """The CallbackGone a call of ``method`` raises on an instance that ended."""
        try:
            self._check_alive(method)
        except CallbackGone as exc:
            return exc
        raise RuntimeError(f"{self!r} is live")

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
        attached: attachments.Attachments | None = None,
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
        if attached:
            attachments.put(call, attached, self._table.attachment_limit, where)

        def broken(error: BaseException) -> BaseException:
            if isinstance(error, StreamBroken):  # the instance went with its stream
                return self._gone_error(method, error)
            return error

        return self._table.session.start_call(
            call,
            self._table.timeout,
            label=where,
            decode=self.decoder(method),
            broken=broken if chain else None,
        )

    def decoder(self, method: str) -> Callable[[pb.Result], Any]:
        """What turns a Result of a call of ``method`` into its value (or raises its
        error); made once per method."""
        decode = self._decoders.get(method)
        if decode is None:
            decode = self._decoders[method] = self._make_decoder(method)
        return decode

    def _make_decoder(self, method: str) -> Callable[[pb.Result], Any]:
        session = self._table.session
        table = self._table
        callback_id = self._id
        what = f"the result of {self.label(method)}"

        def decode(result: pb.Result) -> Any:
            if result.HasField("error"):
                error = codec.decode_error(result.error, session.error_types)
                if isinstance(error, CallbackGone):  # the consumer no longer has it
                    table.release(callback_id, why="released: the consumer no longer has it")
                raise error
            value = result.value
            if codec.is_bulk_value(value):  # off the loop every stream shares
                pool = table.pools.for_waiter(session)
                return Deferred(run_in_pool(pool, lambda: codec.decode(value, what)))
            return codec.decode(value, what)

        return decode


class ProviderCallbacks:
    """The provider's side of one stream: a reverse proxy per live callback instance."""

    #: the server's filters, around every call through its proxies (none: unfiltered)
    filters: tuple[filters.Link, ...] = ()
    #: Limits.max_attachment_bytes of the server: a call carrying more is not sent
    attachment_limit = DEFAULT_MAX_ATTACHMENT_BYTES

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

    def release(self, callback_id: int, tell_peer: bool = False, why: str | None = None) -> None:
        """End one instance (idempotent), for the reason ``why``; with ``tell_peer``, send
        Release to the consumer. Without ``why``, telling the peer is a remover method's
        doing (the consumer asked for it); not telling it, a plain release."""
        if why is None:
            why = _BY_CONSUMER if tell_peer else "released"
        proxy = self._proxies.pop(callback_id, None)
        if proxy is None:
            return
        for service in self._services.pop(callback_id, ()):
            self._per_service[service] -= 1
            if not self._per_service[service]:
                del self._per_service[service]
        proxy._ended(why)
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


#: why an instance ended that the provider released, and that the consumer released
_BY_PROVIDER = "released by the provider"
_BY_CONSUMER = "released by the consumer"


def _name(spec: InterfaceSpec | None) -> str:
    return spec.name if spec else ""
