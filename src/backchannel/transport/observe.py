"""Where OpenTelemetry hooks in: the slots that transport/ and rpc/ (and cluster/) call.

:mod:`backchannel.telemetry` fills them when it is imported and OpenTelemetry is
installed (the Client and Server facades import it), and sets :data:`AVAILABLE`; until
then every slot is a stub that refuses to run. So the layers below the facades never
import telemetry, and a call site costs what it did: one module attribute test,
``if observe.AVAILABLE and observe.collecting():`` on the hot paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from backchannel.v1 import envelope_pb2 as pb

T = TypeVar("T")


class Carry(Protocol):
    """``carry(function)``: ``function``, to run in another thread in the caller's
    context (its current span)."""

    def __call__(self, function: Callable[..., T], /) -> Callable[..., T]: ...


class Serve(Protocol):
    """``serve(session, call, dispatch, peer, server_address)``: ``dispatch(call)`` run
    inside a server span (``session`` None for the unary Invoke)."""

    def __call__(
        self,
        session: Any,
        call: pb.Call,
        dispatch: Callable[[pb.Call], Awaitable[pb.Value]],
        peer: str = "",
        server_address: str = "",
        /,
    ) -> Coroutine[Any, Any, pb.Value]: ...


class HooksAsync(Protocol):
    """``hooks_async(service, method, run)``: the notify-wrapped coroutine function
    ``run``, inside the call's span."""

    def __call__(
        self, service: str, method: str, run: Callable[..., Coroutine[Any, Any, T]], /
    ) -> Callable[..., Coroutine[Any, Any, T]]: ...


def _not_installed(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("OpenTelemetry's hooks are not installed: test observe.AVAILABLE first")


#: True once backchannel.telemetry has filled the slots below (OpenTelemetry is installed)
AVAILABLE = False

# the slots; each call site tests AVAILABLE first. A session is typed Any: this layer
# sits below the session, which imports it
#: whether a tracer or meter provider is configured (the hot paths' second test)
collecting: Callable[[], bool] = _not_installed
carry: Carry = _not_installed
#: ``track(session, server_address)``: a session started; its addresses, for the spans
track: Callable[[Any, str], None] = _not_installed
#: ``sending(session, call, future)``: a client span for a call about to be sent
sending: Callable[[Any, pb.Call, Awaitable[Any]], None] = _not_installed
serve: Serve = _not_installed
#: ``hooks_sync(service, method, call)``: the sync notify-wrapped ``call``, in its span
hooks_sync: Callable[[str, str, Callable[..., Any]], Callable[..., Any]] = _not_installed
hooks_async: HooksAsync = _not_installed
