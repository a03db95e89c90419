"""What a provider exports, and running one incoming call against it.

Shared by the ``Connect`` stream and the unary ``Invoke`` so both paths check and run
calls the same way.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.message import Message

from backchannel.errors import InvalidArguments, MethodNotFound, ServiceNotFound
from backchannel.rpc import attachments, filters
from backchannel.rpc.callbacks import service_label
from backchannel.rpc.interface import (
    InterfaceSpec,
    Method,
    MethodSpec,
    apply_settings,
    interface_spec,
)
from backchannel.rpc.provider_callbacks import ProviderCallbacks, ReverseProxy
from backchannel.settings import BULK_BYTES, BULK_ITEMS, DEFAULT_MAX_ATTACHMENT_BYTES
from backchannel.transport.handoff import run_in_pool
from backchannel.transport.pools import CallPools
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

if TYPE_CHECKING:
    from backchannel.transport.session import Session

#: the seed's callbacks="1000": live callback instances per service per stream
DEFAULT_CALLBACK_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class ExportedMethod:
    """One method of an export, bound to the implementation."""

    spec: MethodSpec
    function: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True)
class Export:
    """One exported service: an implementation under a name, group and version."""

    spec: InterfaceSpec
    impl: object
    group: str
    version: str
    callbacks: int
    methods: dict[str, ExportedMethod]
    #: the server's filters, then the export's own (empty: calls run unfiltered)
    filters: tuple[filters.Link, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """(name, group, version): what identifies the export."""
        return (self.spec.name, self.group, self.version)

    def label(self) -> str:
        """The export in words, for messages."""
        return service_label(self.key)

    def info(self) -> pb.ServiceInfo:
        """The export as the handshake and Describe show it."""
        return pb.ServiceInfo(
            name=self.spec.name,
            group=self.group,
            version=self.version,
            callbacks=self.callbacks,
            methods=self._method_infos,  # copied in: the cached ones are never handed out
        )

    @functools.cached_property
    def _method_infos(self) -> list[pb.MethodInfo]:
        """Each method's MethodInfo, made once: reading the type hints is slow, and every
        Connect stream's handshake carries them."""
        infos = []
        for m in self.methods.values():
            info = method_info(m.spec)
            info.callback_arguments.extend(sorted(m.spec.callbacks))
            info.remover_arguments.extend(sorted(m.spec.removers))
            for index in sorted(m.spec.callbacks):
                listener = m.spec.listener_interface(index)
                if listener is not None:  # what the provider may call on it
                    info.callback_interfaces.add(
                        argument=index,
                        name=listener.name,
                        methods=[method_info(spec) for spec in listener.methods.values()],
                    )
            infos.append(info)
        return infos


def method_info(spec: MethodSpec) -> pb.MethodInfo:
    """A method's name, parameters and their declared types (left out when it declares
    none), and whether it is one-way."""
    types = [spec.parameter_type_text(i) for i in range(len(spec.parameters))]
    return pb.MethodInfo(
        name=spec.name,
        parameters=spec.parameters,
        required=spec.required,
        one_way=spec.one_way,
        parameter_types=types if any(types) else (),  # none declared: none stated
    )


#: Method settings that only a reference uses (a provider's callback timeout is
#: Server(callback_timeout=...)); export() refuses them rather than ignore them
CONSUMER_SETTINGS = (
    "async_",
    "oninvoke",
    "onreturn",
    "onthrow",
    "retries",
    "resubscribe",
    "timeout",
    "callbacks",
)


class Exports:
    """The provider's exported services, and the code that runs calls against them."""

    def __init__(self, pools: CallPools, error_types: codec.ErrorTypes) -> None:
        self._by_key: dict[tuple[str, str, str], Export] = {}
        self._pools = pools
        self.error_types = error_types
        #: the server's filters (``Server(filters=...)``), around every forward call
        self.filters: tuple[filters.Link, ...] = ()
        #: Limits.max_attachment_bytes of the server: a call over it is refused
        self.attachment_limit = DEFAULT_MAX_ATTACHMENT_BYTES
        #: ``propagate_attachments``: what calls made while serving a call carry of its own
        self.propagate: attachments.Propagate = False

    @property
    def pools(self) -> CallPools:
        """The pools the exported ``def`` methods run in."""
        return self._pools

    def add(
        self,
        interface: type,
        impl: object,
        *,
        group: str | None = None,
        version: str | None = None,
        callbacks: int = DEFAULT_CALLBACK_LIMIT,
        methods: Sequence[Method] = (),
        filters: Sequence[filters.FilterLike] = (),
    ) -> Export:
        """Export ``impl`` as ``interface``; every problem is a clear error, raised now."""
        spec = interface_spec(interface)
        for settings in methods:
            consumer_only = [
                name
                for name in CONSUMER_SETTINGS
                if getattr(settings, name) not in (None, False, 0)
            ]
            if consumer_only:
                hint = (
                    " (a provider limits callbacks per service: export(..., callbacks=N))"
                    if "callbacks" in consumer_only
                    else ""
                )
                raise ValueError(
                    f"{spec.name}.{settings.name}: {', '.join(consumer_only)} are consumer "
                    f"settings: give them to client.reference(), not to export(){hint}"
                )
        effective = apply_settings(spec, methods)
        if not isinstance(callbacks, int) or callbacks < 0:
            raise ValueError(f"callbacks must be an int >= 0, got {callbacks!r}")
        bound: dict[str, ExportedMethod] = {}
        for name, method in effective.items():
            function = getattr(impl, name, None)
            if not callable(function):
                raise TypeError(f"{type(impl).__name__} does not implement {spec.name}.{name}()")
            bound[name] = ExportedMethod(method, function, inspect.iscoroutinefunction(function))
        chain = self.filters + _chain_of(filters)
        export = Export(spec, impl, group or "", version or "", callbacks, bound, chain)
        if export.key in self._by_key:
            raise ValueError(f"{export.label()} is already exported")
        self._by_key[export.key] = export
        return export

    def remove(self, key: tuple[str, str, str]) -> None:
        """Export ``key`` no more (an export refused after it was added); nothing if absent."""
        self._by_key.pop(key, None)

    def services(self) -> tuple[pb.ServiceInfo, ...]:
        """Every export as ServiceInfo."""
        return tuple(export.info() for export in self._by_key.values())

    def find(self, name: str, group: str, version: str) -> Export:
        """The export for a call, or :class:`ServiceNotFound` saying what exists."""
        export = self._by_key.get((name, group, version))
        if export is not None:
            return export
        same_name = [service_label(key) for key in self._by_key if key[0] == name]
        if same_name:
            raise ServiceNotFound(
                f"{service_label((name, group, version))} is not exported here; "
                f"{name} is exported as: {', '.join(same_name)}"
            )
        known = ", ".join(sorted({key[0] for key in self._by_key})) or "nothing"
        raise ServiceNotFound(f"no service {name!r} is exported here (exported: {known})")

    def method(self, call: pb.Call) -> tuple[Export, ExportedMethod]:
        """The export and method a call targets, or a clear error."""
        export = self.find(call.service, call.group, call.version)
        method = export.methods.get(call.method)
        if method is None:
            known = ", ".join(sorted(export.methods)) or "none"
            raise MethodNotFound(
                f"{export.label()} has no method {call.method!r} (its methods: {known})"
            )
        return export, method

    async def run(
        self, call: pb.Call, callbacks: ProviderCallbacks | None, peer: str = ""
    ) -> pb.Value:
        """Decode the arguments, run the method, and encode what it returned.

        A ``def`` method does all three in the pool, so a big argument or result is
        decoded and encoded there, not on the loop that serves every other stream; an
        ``async def`` method runs on the loop, and its decoding and encoding move to the
        pool only for bulk data (:data:`~backchannel.settings.BULK_BYTES`,
        :data:`~backchannel.settings.BULK_ITEMS`), so small calls take no thread hop.
        Arguments with callbacks are decoded on the loop, where the callback table is.

        ``callbacks`` is the stream's callback table; None on the unary Invoke, where a
        method with callback arguments cannot be called (``peer`` names its caller).
        """
        export, method = self.method(call)
        session = callbacks.session if callbacks is not None else None  # the pool's lane
        spec = method.spec
        where = f"{spec.qualname}()"
        # attachments (or a context holding some) to check and make readable
        attached = call.attachments or attachments.STATE.get() is not None
        removed: list[ReverseProxy] = []
        args: list[object] | None = None  # None: plain arguments, decoded where they run
        if spec.callbacks or spec.removers:
            if callbacks is None:
                raise InvalidArguments(
                    f"{where} takes callback arguments, which need a stream: call it "
                    "through Connect (a backchannel client, or `backchannel listen` from "
                    "a shell), not Invoke"
                )
            if call.json_args:
                raise InvalidArguments(
                    f"{where} takes callback arguments, which json_args cannot carry: "
                    "give args with callback_value references"
                )
            try:
                if attached:  # refused: its callbacks too, as for bad arguments
                    attachments.serving(call, self.attachment_limit, self.propagate, where)
                args, commit, removed = callbacks.decode_args(
                    spec, export.key, export.callbacks, call.args
                )
                spec.check_count(len(args))
            except Exception:
                callbacks.refuse(spec, call.args)  # the consumer un-exports them too
                raise
            commit()
        elif attached:
            attachments.serving(call, self.attachment_limit, self.propagate, where)
        what = f"the result of {where}"
        try:
            if export.filters:
                if session is not None:
                    peer = session.peer
                return await self._filtered(export, method, call, args, session, peer)
            if not method.is_async:
                context = contextvars.copy_context()
                work = functools.partial(
                    context.run, _run_sync, method.function, call, spec, where, args
                )
                # a call nested in one this side waits for never queues for a thread;
                # others queue (when they must) in their stream's lane, taking turns
                pool = self._pools.executor_for(call, session)
                return await run_in_pool(pool, work)  # one loop wake-up per batch
            if args is None:
                if call.ByteSize() > BULK_BYTES:
                    args = await run_in_pool(
                        self._pools.regular.lane(session),
                        lambda: plain_arguments(call, spec, where),
                    )
                else:
                    args = plain_arguments(call, spec, where)
            result = await method.function(*args)
            if is_bulk(result):
                return await run_in_pool(
                    self._pools.regular.lane(session), lambda: codec.encode(result, what)
                )
            return codec.encode(result, what)
        finally:
            for proxy in removed:  # told, so the consumer un-exports them even when it
                # no longer waits for the result (timed out, cancelled)
                callbacks.release(proxy.callback_id, tell_peer=True)  # type: ignore[union-attr]

    async def _filtered(
        self,
        export: Export,
        method: ExportedMethod,
        call: pb.Call,
        args: list[object] | None,
        session: Session | None,
        peer: str,
    ) -> pb.Value:
        """Run a call through the export's filters: the arguments decoded first (on the
        loop; bulk ones in the pool), the method with what the filters leave in the
        invocation, its result encoded after them."""
        spec = method.spec
        where = f"{spec.qualname}()"
        lane = self._pools.regular.lane(session)
        if args is None:
            if call.ByteSize() > BULK_BYTES:
                args = await run_in_pool(lane, lambda: plain_arguments(call, spec, where))
            else:
                args = plain_arguments(call, spec, where)
        seen = attachments.attachments()
        invocation = filters.Invocation(
            "provider",
            "call",
            export.spec.name,
            spec.name,
            args,
            dict(seen),
            group=export.group,
            version=export.version,
            peer=peer,
        )

        async def call_method(invocation: filters.Invocation) -> Any:
            if invocation.attachments != seen:  # a filter changed what the method reads
                attachments.set_incoming(invocation.attachments)
            arguments = list(invocation.args)
            if method.is_async:
                return await method.function(*arguments)
            context = contextvars.copy_context()
            work = functools.partial(context.run, method.function, *arguments)
            return await run_in_pool(self._pools.executor_for(call, session), work)

        result = await filters.run(export.filters, invocation, call_method)
        what = f"the result of {where}"
        if is_bulk(result):
            return await run_in_pool(lane, lambda: codec.encode(result, what))
        return codec.encode(result, what)


def _chain_of(given: Sequence[filters.FilterLike]) -> tuple[filters.Link, ...]:
    return filters.chain_of(given)


def _run_sync(
    function: Callable[..., Any],
    call: pb.Call,
    spec: MethodSpec,
    where: str,
    args: list[object] | None,
) -> pb.Value:
    """In a pool thread: decode the arguments (unless done already), call a ``def``
    method, and encode its result."""
    if args is None:
        args = plain_arguments(call, spec, where)
    return codec.encode(function(*args), f"the result of {where}")


def plain_arguments(call: pb.Call, spec: MethodSpec, where: str) -> list[object]:
    """The decoded and counted arguments of a call without callback arguments (args or
    json_args)."""
    args = json_arguments(call, where) if call.json_args else codec.decode_args(call.args, where)
    spec.check_count(len(args))
    return args


def is_bulk(result: object) -> bool:
    """Whether encoding ``result`` is worth a thread hop: a list, tuple or dict with more
    than BULK_ITEMS items (encoding costs per item, not per byte)."""
    return isinstance(result, dict | list | tuple) and len(result) > BULK_ITEMS


def json_arguments(call: pb.Call, where: str) -> list[object]:
    """The arguments of a call typed as JSON (grpcurl users), checked."""
    if call.args:
        raise InvalidArguments(f"{where}: give args or json_args, not both")
    try:
        args = json.loads(call.json_args)
    except ValueError as exc:
        raise InvalidArguments(f"{where}: json_args is not valid JSON: {exc}") from None
    if not isinstance(args, list):
        raise InvalidArguments(f"{where}: json_args must be a JSON array of arguments")
    return args


def to_json(value: object) -> str:
    """A decoded result as JSON for people; bytes as base64, messages as their JSON form."""

    def fallback(obj: object) -> object:
        if isinstance(obj, bytes):
            return base64.b64encode(obj).decode()
        if isinstance(obj, Message):
            return json_format.MessageToDict(obj)
        raise TypeError(type(obj).__name__)

    return json.dumps(value, default=fallback)
