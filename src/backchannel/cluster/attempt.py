"""One attempt of a call on one provider: its stream opened if need be, the call encoded
and sent, its outcome decoded; :class:`NotSent` when it never reached the provider."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from backchannel.cluster.consumer import Consumer
from backchannel.cluster.providers import ConsumerSide, ProviderLink
from backchannel.cluster.reference import Reference
from backchannel.errors import (
    ChannelClosed,
    DeadlineExceeded,
    ShuttingDown,
    StreamBroken,
    TransportError,
)
from backchannel.rpc import attachments
from backchannel.rpc.callbacks import parent_in
from backchannel.rpc.interface import MethodSpec
from backchannel.transport.handoff import run_in_pool
from backchannel.transport.session import Deferred, Session
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

# errors a call gets when the provider refused it before looking at its arguments (the
# stream's own refusals), so it did not take the callbacks the call carried; the consumer
# drops them and tells the provider (the provider itself sends a Release for each
# callback it refuses after reading the arguments)
_REFUSED_UNREAD = frozenset({"backchannel.RemoteProtocolError", "backchannel.ShuttingDown"})
# ... and these too when the provider did not announce the method in its handshake
_NOT_FOUND = frozenset({"backchannel.ServiceNotFound", "backchannel.MethodNotFound"})

#: the incoming callback call a call is made in, if any: (its stream, its id)
CurrentCall = tuple[Session, int] | None

#: the cause of the DeadlineExceeded of a call whose time ran out opening a stream
CONNECTING = TimeoutError("opening a stream")


class NotSent(Exception):
    """A call that never reached a provider (no stream, refused at connect, refused
    unread by a provider going away): it may always be sent elsewhere."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def left(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (a time.monotonic() value; None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


def _identity(args: tuple[Any, ...]) -> tuple[int, ...]:
    """What makes two subscriptions the same: the very same argument objects."""
    return tuple(id(arg) for arg in args)


async def invoke_on(
    consumer: Consumer,
    link: ProviderLink,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
    deadline: float | None,
    timeout: float | None,
    hedge: bool = False,
) -> Any:
    """One attempt on one provider; :class:`NotSent` when it never reached it.

    ``timeout`` is what the call may wait once sent on a stream that is open; opening
    one comes out of the time left before ``deadline``, and with ``hedge`` (another
    provider may take the call) it waits for that at most half the time left: the
    attempt goes on without it, and the call is not sent."""
    link.active += 1  # from now: a call opening the stream holds the link too
    try:
        session = link.session
        if session is None or not session.usable:
            if consumer.closed:
                raise ChannelClosed(f"the client for {consumer.where} is closed")
            remaining = left(deadline)
            patience = remaining / 2 if hedge and remaining is not None else remaining
            try:
                session = await link.ensure_session(
                    patience, wait_backoff=consumer.single is not None
                )
            except ChannelClosed:
                raise
            except TransportError as exc:
                raise NotSent(exc) from None
            except TimeoutError:
                if patience != remaining:
                    raise NotSent(
                        StreamBroken(
                            f"no stream to {link.address} within {patience:.3f} s "
                            "(half the time left; still connecting)"
                        )
                    ) from None
                raise DeadlineExceeded(
                    f"{method.qualname}() did not finish within its "
                    f"{ref.timeouts[method.name]} s timeout: no stream to {link.address} "
                    "yet"
                ) from CONNECTING
            timeout = left(deadline)
        state = attachments.STATE.get()  # of the caller's context (the task's)
        attached = None if state is None else state.outgoing
        call, future = start(consumer, session, ref, method, positional, current, timeout, attached)
        link.sent += 1
        try:
            result = await future
        except DeadlineExceeded as exc:
            whole = ref.timeouts[method.name]
            if timeout == whole:
                raise
            # the stream had only what was left: the caller set the whole timeout
            raise DeadlineExceeded(
                f"{call.service}.{call.method} did not finish within {whole} s "
                f"({exc} once sent to {link.address})"
            ) from exc
        except ShuttingDown as exc:  # refused unread: it never ran
            raise NotSent(exc) from None
        except StreamBroken as exc:
            if not call.id:  # it was waiting for a slot: never sent
                raise NotSent(exc) from None
            raise
        except asyncio.CancelledError:
            if call.id and future.cancelled():  # sent, and not answered yet
                session.abandon(call.id, "cancelled by the caller")
            raise
    finally:
        link.active -= 1
        if link.unlisted and not link.active:
            consumer.retire_if_idle(link)
    if method.name in ref.resubscribe:
        key = (id(ref), method.name, _identity(positional))
        subscription = (ref, method, positional)
        consumer.orphans.pop(key, None)
        if link.session is session and session.cause is None:
            link.subscriptions[key] = subscription
        else:  # its stream ended meanwhile: replay it like the others
            consumer.orphans[key] = subscription
            consumer.kick_resubscriber()
    return result


def start(
    consumer: Consumer,
    session: Session,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
    timeout: float | None,
    attached: attachments.Attachments | None = None,
) -> tuple[pb.Call, asyncio.Future[Any]]:
    """On the loop: encode and send one call on ``session``, to be answered within
    ``timeout``; return it and the future of its decoded outcome (the exception it
    raises, or its result). ``attached``: the attachments it carries, read in the
    caller's context (not here: this may run in a hand-off from another thread)."""
    side: ConsumerSide = session.dispatcher  # type: ignore[assignment]
    key = ref.key
    service = side.services.get(key)
    info = side.methods.get((*key, method.name))
    call = pb.Call(
        service=ref.spec.name,
        group=ref.group,
        version=ref.version,
        method=method.name,
        one_way=info.one_way if info is not None else method.one_way,
    )
    if attached:  # checked against this side's limit before anything is exported
        limit = consumer.settings.limits.max_attachment_bytes
        attachments.put(call, attached, limit, f"{method.qualname}()")
    fresh, removed = side.callbacks.encode_args(  # in place: no copy into the Call
        method,
        key,
        positional,
        info,
        service.callbacks if service else None,
        call.args,
        ref.callbacks,
    )
    listeners = [entry.obj for entry in removed]  # a Release may clear entry.obj first

    def decode(result: pb.Result) -> Any:
        if result.HasField("error"):
            # what the provider refused or removed it says with Release frames, which
            # arrive before this Result; only refusals it sends without reading the
            # arguments are left to us, and we tell it, so both tables agree
            kind = result.error.type
            if fresh and (kind in _REFUSED_UNREAD or (info is None and kind in _NOT_FOUND)):
                side.callbacks.drop(fresh, tell_peer=True)
            listeners.clear()
            raise codec.decode_error(result.error, consumer.error_types)
        consumer.removed(side, removed, listeners)
        listeners.clear()  # no strong reference left behind in this closure
        if not result.HasField("value"):
            return None
        what = f"the result of {method.qualname}()"
        if codec.is_bulk_value(result.value):  # off the loop the other calls share
            pool = consumer.pools.for_waiter(session)  # not behind a thread waiting for it
            return Deferred(run_in_pool(pool, lambda: codec.decode(result.value, what)))
        return codec.decode(result.value, what)

    parent = parent_in(session, current)
    try:
        future = session.start_call(call, timeout, parent, decode=decode)
    except BaseException:  # not sent (MessageTooLarge): nothing was exported
        side.callbacks.drop(fresh)
        raise

    if fresh:

        def unsent(done: asyncio.Future[Any]) -> None:
            if not call.id:  # expired or cancelled while queued for a slot
                side.callbacks.drop(fresh)

        future.add_done_callback(unsent)
    return call, future
