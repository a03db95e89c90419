"""The consumer: one Connect stream per provider address, references that call through it.

:class:`AsyncClient` is the asyncio core; :class:`Client` gives sync code the same API
and holds no logic of its own: it runs an :class:`AsyncClient` on a background loop
thread and waits for the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from backchannel import codec
from backchannel.errors import ChannelClosed, StreamBroken
from backchannel.interface import (
    InterfaceSpec,
    Method,
    MethodSpec,
    check_method_names,
    interface_spec,
)
from backchannel.portal import LoopThread
from backchannel.protocol import Connection, Role
from backchannel.session import Session
from backchannel.v1 import envelope_pb2 as pb

logger = logging.getLogger("backchannel")

T = TypeVar("T")

#: Dubbo's default call timeout, in seconds
DEFAULT_TIMEOUT = 1.0
CONNECT_PATH = "/backchannel.v1.Envelope/Connect"


class _ConsumerDispatcher:
    """Runs the calls a provider sends to this consumer (callbacks)."""

    async def dispatch(self, call: pb.Call, session: Session) -> pb.Value:
        raise LookupError(f"callback {call.callback_id} is not exported by this consumer")

    def released(self, callback_id: int, session: Session) -> None:
        """Nothing to release yet."""


class Reference:
    """What a proxy method needs to make its call: the target and per-method settings."""

    def __init__(
        self,
        spec: InterfaceSpec,
        group: str,
        version: str,
        timeout: float | None,
        methods: dict[str, Method],
    ) -> None:
        self.spec = spec
        self.group = group
        self.version = version
        self.timeouts = {
            name: methods[name].timeout if name in methods and methods[name].timeout else timeout
            for name in spec.methods
        }


class Proxy:
    """A reference's proxy: one attribute per interface method."""

    def __init__(
        self,
        reference: Reference,
        invoke: Callable[[Reference, MethodSpec, tuple[Any, ...], dict[str, Any]], Any],
    ) -> None:
        self._reference = reference
        for name, method in reference.spec.methods.items():
            call = functools.partial(_call_proxy, invoke, reference, method)
            functools.update_wrapper(call, getattr(reference.spec.cls, name))
            setattr(self, name, call)

    def __repr__(self) -> str:
        ref = self._reference
        return f"<backchannel proxy {ref.spec.name} group={ref.group!r} version={ref.version!r}>"


def _call_proxy(
    invoke: Callable[[Reference, MethodSpec, tuple[Any, ...], dict[str, Any]], Any],
    reference: Reference,
    method: MethodSpec,
    *args: Any,
    **kwargs: Any,
) -> Any:
    return invoke(reference, method, args, kwargs)


def make_reference(
    interface: type,
    group: str | None,
    version: str | None,
    timeout: float | None,
    methods: Sequence[Method],
) -> Reference:
    """Check a reference's settings and bundle them."""
    spec = interface_spec(interface)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    return Reference(spec, group or "", version or "", timeout, check_method_names(spec, methods))


class AsyncClient:
    """An asyncio consumer of the provider at ``address``.

    ::

        async with AsyncClient("127.0.0.1:50051") as client:
            demo = client.reference(IDemoService, group="cn", version="1.0.0")
            person = await demo.get(2)

    One Connect stream is opened on the first call and every call shares it; when it
    breaks, the next call opens a new one.
    """

    def __init__(
        self,
        address: str,
        *,
        application: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        errors: Iterable[type[BaseException]] = (),
    ) -> None:
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"address must be 'host:port', got {address!r}")
        self.address = address
        self._application = application
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._error_types = codec.ErrorTypes(errors)
        self._dispatcher = _ConsumerDispatcher()
        self._channel: grpc.aio.Channel | None = None
        self._session: Session | None = None
        self._reader: asyncio.Task[None] | None = None
        self._opening: asyncio.Lock | None = None
        self._closed = False

    def register_error(self, cls: type[BaseException]) -> None:
        """Receive ``cls`` as itself (not as RemoteError) when the provider raises it."""
        self._error_types.register(cls)

    def reference(
        self,
        interface: type[T],
        *,
        group: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        methods: Sequence[Method] = (),
    ) -> T:
        """A proxy whose methods are coroutines calling the provider's ``interface``."""
        ref = make_reference(
            interface, group, version, self._timeout if timeout is None else timeout, methods
        )
        return Proxy(ref, self._invoke_coroutine)  # type: ignore[return-value]

    def _invoke_coroutine(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return self.invoke(ref, method, args, kwargs)

    async def invoke(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Make one call through a reference (what proxy methods do)."""
        positional = method.bind(args, kwargs)
        where = f"{method.qualname}()"
        call = pb.Call(
            service=ref.spec.name,
            group=ref.group,
            version=ref.version,
            method=method.name,
            args=codec.encode_args(positional, method.parameters, where, None),
        )
        session = await self._ensure_session()
        result = await session.call(call, ref.timeouts[method.name])
        if result.HasField("error"):
            raise codec.decode_error(result.error, self._error_types)
        if not result.HasField("value"):
            return None
        return codec.decode(result.value, f"the result of {where}")

    async def _ensure_session(self) -> Session:
        session = self._session
        if session is not None and session.usable:
            return session
        if self._closed:
            raise ChannelClosed(f"the client for {self.address} is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            session = self._session
            if session is not None and session.usable:
                return session
            return await self._open_session()

    async def _open_session(self) -> Session:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        stub = self._channel.stream_stream(
            CONNECT_PATH,
            request_serializer=pb.Frame.SerializeToString,
            response_deserializer=pb.Frame.FromString,
        )
        stream = stub(None)
        connection: Connection[asyncio.Future[pb.Result]] = Connection(
            Role.CONSUMER, self._application
        )
        session = Session(
            connection, stream.write, self._dispatcher, self._error_types, peer=self.address
        )
        connection.start()
        session.flush()
        self._reader = asyncio.create_task(
            session.run(stream.read), name=f"backchannel-reader {self.address}"
        )
        try:
            await asyncio.wait_for(asyncio.shield(session.handshake), self._connect_timeout)
        except TimeoutError:
            stream.cancel()
            raise StreamBroken(
                f"no handshake from {self.address} within {self._connect_timeout} s"
            ) from None
        except StreamBroken as exc:
            raise StreamBroken(f"cannot connect to {self.address}: {exc}") from exc
        self._session = session
        self._stream = stream
        return session

    async def close(self) -> None:
        """End the stream (half-close, then cancel) and the channel."""
        self._closed = True
        session, self._session = self._session, None
        reader, self._reader = self._reader, None
        if session is not None and session.cause is None:
            # half-close politely; a broken stream has nothing left to close
            with contextlib.suppress(Exception):
                await self._stream.done_writing()
            if reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(reader), 1.0)
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Client:
    """A sync consumer of the provider at ``address``; same API as :class:`AsyncClient`.

    ::

        with Client("127.0.0.1:50051") as client:
            demo = client.reference(IDemoService, group="cn", version="1.0.0")
            person = demo.get(2)

    Calls may be made from any number of threads; they share one stream.
    """

    def __init__(
        self,
        address: str,
        *,
        application: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        errors: Iterable[type[BaseException]] = (),
    ) -> None:
        self._core = AsyncClient(
            address,
            application=application,
            timeout=timeout,
            connect_timeout=connect_timeout,
            errors=errors,
        )
        self._portal = LoopThread(f"backchannel-client {address}")

    @property
    def address(self) -> str:
        """The provider address."""
        return self._core.address

    def register_error(self, cls: type[BaseException]) -> None:
        """See :meth:`AsyncClient.register_error`."""
        self._core.register_error(cls)

    def reference(
        self,
        interface: type[T],
        *,
        group: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        methods: Sequence[Method] = (),
    ) -> T:
        """A proxy whose methods call the provider's ``interface`` and block for the result."""
        ref = make_reference(
            interface,
            group,
            version,
            self._core._timeout if timeout is None else timeout,
            methods,
        )
        return Proxy(ref, self._invoke_blocking)  # type: ignore[return-value]

    def _invoke_blocking(
        self, ref: Reference, method: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return self._portal.run(self._core.invoke(ref, method, args, kwargs))

    def close(self) -> None:
        """End the stream and stop the background loop."""
        with contextlib.suppress(ChannelClosed):
            self._portal.run(self._core.close())
        self._portal.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
