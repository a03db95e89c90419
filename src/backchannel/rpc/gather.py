"""Calling many reverse proxies at once: :func:`gather`.

A provider that notifies its listeners one after the other waits for a round trip per
listener: with a thousand of them, a thousand round trips back to back. :func:`gather`
collects the proxy calls of a generator expression instead of making them, then starts
every one of them in one turn of the provider's event loop: arguments that are the same
objects as the previous call's are encoded once, and the calls to one stream leave in
the same batch (the session writes at the end of the loop turn). Calls of one method with
the same arguments to many listeners of one consumer go as one Multicast frame when the
consumer takes them (docs/callbacks.md), as single Calls otherwise. It waits for all of
them with no task per call (a done-callback per call's future and a counter) and gives
back each call's result, or the exception it raised, in the order of the calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from backchannel.errors import CallbackGone, CallCancelled, ChannelClosed, StreamBroken
from backchannel.rpc import attachments
from backchannel.rpc.provider_callbacks import COLLECTING, PendingCall
from backchannel.transport import observe
from backchannel.transport.handoff import inbox
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

T = TypeVar("T")
P = ParamSpec("P")

if TYPE_CHECKING:
    from backchannel.transport.outgoing import Sink


# typed for the two ways it is called (docs/typing.md): on the loop, proxies typed with an
# interface's asynchronous twin make awaitables, and gather is awaited; from a thread, sync
# proxies give values. The first overload wins for awaitables (hence the overlap).
@overload
def gather(calls: Iterable[Awaitable[T]]) -> Awaitable[list[T | BaseException]]: ...  # type: ignore[overload-overlap]
@overload
def gather(calls: Iterable[T]) -> list[T | BaseException]: ...
def gather(calls: Iterable[Any]) -> Any:
    """Make many reverse proxy calls at once; each call's result or exception, in order.

    Pass a generator expression of proxy calls::

        outcomes = backchannel.gather(listener.changed(msg) for listener in listeners)

    The calls are collected while the generator runs (nothing is sent yet), then all
    started together: an argument that is the very object the previous call passed (the
    shared ``msg``) is encoded once, and the calls to one consumer's stream travel in one
    batch. The outcome is a list with one entry per call, in order: what the listener
    returned, or the exception the call raised (``CallbackGone`` once the listener's
    consumer went away, ``DeadlineExceeded`` after ``callback_timeout``, the listener's
    own error). One call failing never stops the others.

    - **From a thread** (a plain provider method, a background pusher) it blocks that
      thread until every call is over and returns the list.
    - **On the provider's event loop** (an ``async def`` provider method) it returns an
      awaitable of the list; the calls are sent before it returns, so they keep their
      order with calls made after it: ``outcomes = await backchannel.gather(...)``.
    - On a thread that runs another event loop it raises ``RuntimeError``: blocking there
      would stop that loop, and the calls' futures belong to the provider's loop.

    Calls to one listener keep their order, whether made through ``gather`` or one by one.
    A list of calls made on the loop beforehand (``[l.changed(m) for l in listeners]``, each
    already started) is accepted too, without the shared encoding; from a thread such a
    list would have made the calls one by one, so it is refused with a ``TypeError``.
    """
    token = COLLECTING.set(True)
    try:
        items = list(calls)
    finally:
        COLLECTING.reset(token)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    checked = None  # the table of the last item checked: its stream's loop is known good
    for index, item in enumerate(items):
        if type(item) is PendingCall and item.proxy._table is checked:
            continue
        _check_item(index, item, running)
        if type(item) is PendingCall:
            checked = item.proxy._table
    if running is not None:
        return _gather_on_loop(running, items)
    return _gather_from_thread(items)


@overload
def gather_each(  # type: ignore[overload-overlap]
    methods: Iterable[Callable[P, Awaitable[T]]], /, *args: P.args, **kwargs: P.kwargs
) -> Awaitable[list[T | BaseException]]: ...
@overload
def gather_each(
    methods: Iterable[Callable[P, T]], /, *args: P.args, **kwargs: P.kwargs
) -> list[T | BaseException]: ...
def gather_each(methods: Iterable[Callable[..., Any]], /, *args: Any, **kwargs: Any) -> Any:
    """:func:`gather` of one call per method, each with the same arguments::

        outcomes = backchannel.gather_each((l.changed for l in listeners), msg)

    The same as ``gather(l.changed(msg) for l in listeners)``, in a form type checkers
    accept for methods that return None (mypy refuses to use the value of such a call:
    ``[func-returns-value]``) and that checks the arguments against the methods'
    parameters. The methods are reverse proxy methods; blocks or is awaited as
    :func:`gather` is.
    """
    return gather(method(*args, **kwargs) for method in methods)


def _check_item(index: int, item: object, running: asyncio.AbstractEventLoop | None) -> None:
    """Refuse what is not a collected proxy call (or, on the loop, a started one)."""
    if isinstance(item, PendingCall):
        loop = item.proxy._table.session.loop
    elif running is not None and isinstance(item, asyncio.Future):
        loop = item.get_loop()
    else:
        how = (
            "pass a generator expression, gather(listener.changed(msg) for listener in "
            "listeners), so that gather() collects the calls instead of their being made "
            "one by one before it runs"
        )
        raise TypeError(
            f"gather(): item {index} is a {type(item).__name__}, not a reverse proxy call; {how}"
        )
    if running is not None and loop is not running:
        raise RuntimeError(
            "gather() was called on the thread of an event loop that is not the provider's "
            "(the listeners' streams run on another loop): blocking here would stop this "
            "loop; call it from the provider's loop (await) or from a plain thread"
        )


class _Outcomes:
    """Collects the outcomes of started calls into their slots; ``done`` fires once all
    are in. Runs on one loop only, so it needs no lock."""

    __slots__ = ("done", "remaining", "results")

    def __init__(self, results: list[Any], remaining: int, done: Any) -> None:
        self.results = results
        self.remaining = remaining
        #: called with the results once ``remaining`` reaches 0
        self.done = done

    def fill(self, slot: int, outcome: Any) -> None:
        self.results[slot] = outcome
        self.remaining -= 1
        if not self.remaining:
            self.done(self.results)

    def watch(self, slot: int, pending: PendingCall | None, future: asyncio.Future[Any]) -> None:
        def finished(done: asyncio.Future[Any]) -> None:
            self.fill(slot, _outcome(pending, done))

        future.add_done_callback(finished)


class _Slot:
    """Takes one started call's outcome straight into its slot of :class:`_Outcomes`, in
    place of a future and its done-callback (one loop turn and a few objects less per
    call); the session settles it as it would the future (see ``Sink`` in
    :mod:`backchannel.transport.outgoing`)."""

    __slots__ = ("finished", "outcomes", "pending", "slot")

    def __init__(self, outcomes: _Outcomes, slot: int, pending: PendingCall) -> None:
        self.outcomes = outcomes
        self.slot = slot
        self.pending = pending
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: Any, /) -> None:
        if not self.finished:
            self.finished = True
            self.outcomes.fill(self.slot, result)

    def set_exception(self, exception: BaseException, /) -> None:
        if not self.finished:
            self.finished = True
            if isinstance(exception, StreamBroken):  # as a lone proxy call says
                exception = self.pending.proxy.gone_error(self.pending.method, exception)
            self.outcomes.fill(self.slot, exception)

    def cancel(self) -> bool:
        if self.finished:
            return False
        self.finished = True
        self.outcomes.fill(self.slot, CallCancelled("the call was cancelled before it finished"))
        return True


def _outcome(pending: PendingCall | None, done: asyncio.Future[Any]) -> Any:
    """What a finished call's slot holds: its result, or the exception it raised."""
    if done.cancelled():
        return CallCancelled("the call was cancelled before it finished")
    exc = done.exception()
    if exc is None:
        return done.result()
    if pending is not None and isinstance(exc, StreamBroken):  # as a lone proxy call says
        return pending.proxy.gone_error(pending.method, exc)
    return exc


#: a started call, as gather holds it: its future, or the _Slot its outcome goes to
Started = asyncio.Future[Any] | _Slot


def _start_all(slots: Sequence[int], items: Sequence[Any], outcomes: _Outcomes) -> list[Started]:
    """On the calls' loop: start each collected call, in runs of consecutive calls of
    one method passing the same objects (their arguments encoded once; see
    :func:`_start_run`). Returns the calls started (to cancel them)."""
    started: list[Started] = []
    run: list[int] = []
    first: Any = None  # the first call of the run
    for slot in slots:
        item = items[slot]
        if (
            run
            and type(item) is PendingCall
            and item.method == first.method
            and item.one_way == first.one_way
            and item.attached is first.attached
            and _same_objects(item.args, first.args)
        ):
            run.append(slot)
            continue
        if run:
            _start_run(run, items, outcomes, started)
            run = []
        if isinstance(item, PendingCall):
            run.append(slot)
            first = item
        else:  # a call started on the loop already
            started.append(item)
            outcomes.watch(slot, None, item)
    if run:
        _start_run(run, items, outcomes, started)
    return started


def _start_run(
    run: list[int], items: Sequence[Any], outcomes: _Outcomes, started: list[Started]
) -> None:
    """Start a run of calls of one method with the same argument objects: the arguments
    encoded once, and the calls of the run to one stream that takes Multicast frames sent
    as one (a frame per stream: the call once, and a call id and callback id per
    listener). The others go as single Calls, in order."""
    first: PendingCall = items[run[0]]
    values: Sequence[pb.Value] | None
    try:
        values = codec.encode_args(first.args, (), first.proxy.label(first.method), None)
    except Exception:  # encoding failed: then each call of the run says so
        values = None
    groups: dict[tuple[Any, int], list[int]] = {}
    if first.proxy._table.filters:  # each call goes alone through them: no Multicast
        values = None
    if values is not None and len(run) > 1:
        for slot in run:
            pending: PendingCall = items[slot]
            groups.setdefault((pending.proxy._table.session, pending.parent), []).append(slot)
    else:
        groups[(None, 0)] = run
    for (session, _), slots in groups.items():
        if values is not None and len(slots) > 1 and session.multicast and session.usable:
            pendings = [items[slot] for slot in slots]
            sinks = [_Slot(outcomes, slot, items[slot]) for slot in slots]
            begun = begin_multicast(pendings, values, sinks)
            for slot, pending, outcome in zip(slots, pendings, begun, strict=True):
                if type(outcome) is _Slot:  # its outcome goes straight to its slot
                    started.append(outcome)
                elif isinstance(outcome, asyncio.Future):
                    started.append(outcome)
                    outcomes.watch(slot, pending, outcome)
                else:
                    outcomes.fill(slot, outcome)
            continue
        for slot in slots:
            item = items[slot]
            try:
                future = item.proxy.begin(item, values)
            except Exception as exc:  # this call only: CallbackGone, EncodeError, too large
                outcomes.fill(slot, exc)
                continue
            started.append(future)
            outcomes.watch(slot, item, future)


def _same_objects(args: tuple[Any, ...], shared: tuple[Any, ...]) -> bool:
    if len(args) != len(shared):
        return False
    if len(args) == 1:  # the usual event, without a generator
        return args[0] is shared[0]
    return all(arg is other for arg, other in zip(args, shared, strict=True))


async def _wait(aggregate: asyncio.Future[list[Any]], started: list[Started]) -> Any:
    try:
        return await aggregate
    except asyncio.CancelledError:  # the caller gave up: so do the calls
        for future in started:
            future.cancel()
        raise


def _gather_on_loop(loop: asyncio.AbstractEventLoop, items: list[Any]) -> Awaitable[list[Any]]:
    """On the calls' own loop: start them all now; an awaitable of the outcomes."""
    aggregate: asyncio.Future[list[Any]] = loop.create_future()
    if not items:
        aggregate.set_result([])
        return _wait(aggregate, [])

    def done(results: list[Any]) -> None:
        if not aggregate.done():
            aggregate.set_result(results)

    outcomes = _Outcomes([None] * len(items), len(items), done)
    started = _start_all(range(len(items)), items, outcomes)
    return _wait(aggregate, started)


def _gather_from_thread(items: list[PendingCall]) -> list[Any]:
    """From a thread: start the calls on their loops (one hand-off per loop) and block
    until all are over."""
    results: list[Any] = [None] * len(items)
    by_loop: dict[asyncio.AbstractEventLoop, list[int]] = {}
    for slot, item in enumerate(items):
        by_loop.setdefault(item.proxy._table.session.loop, []).append(slot)
    waits: list[concurrent.futures.Future[None]] = []
    for loop, slots in by_loop.items():
        finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        waits.append(finished)
        outcomes = _Outcomes(results, len(slots), lambda _, f=finished: f.set_result(None))

        def begin(slots: list[int] = slots, outcomes: _Outcomes = outcomes) -> None:
            _start_all(slots, items, outcomes)

        if observe.AVAILABLE:  # OpenTelemetry: the calls are made in the caller's span
            begin = observe.carry(begin)
        try:
            inbox(loop).post(begin)
        except ChannelClosed as exc:  # the loop is closed: so are its streams
            for slot in slots:
                results[slot] = _closed(items[slot], exc)
            finished.set_result(None)
    for wait in waits:
        wait.result()
    return results


def _closed(pending: PendingCall, cause: ChannelClosed) -> CallbackGone:
    pending.proxy._ended("the stream ended")
    return CallbackGone(
        f"{pending.proxy.label(pending.method)}: the callback instance ended ({cause})"
    )


def begin_multicast(
    pendings: Sequence[PendingCall],
    values: Sequence[pb.Value],
    sinks: Sequence[Sink] | None = None,
) -> list[Sink | Exception]:
    """On the loop: start calls :func:`backchannel.gather` collected for instances on one
    stream, all of one method with the same encoded arguments, as Multicast frames (the
    stream must take them); each call's future (or its entry of ``sinks``, which then
    takes its outcome: see :meth:`~backchannel.transport.session.Session.start_multicast`),
    or the exception that stopped it (a CallbackGone). Should the multicast fail as a
    whole, each call is sent alone and says for itself what went wrong (a future each)."""
    first = pendings[0]
    table = first.proxy._table
    outcomes: list[Sink | Exception] = []
    targets: list[tuple[int, str, Callable[[pb.Result], Any]]] = []
    live: list[int] = []
    method = first.method
    for index, pending in enumerate(pendings):
        proxy = pending.proxy
        if proxy._gone is not None:
            outcomes.append(proxy.gone_now(method))
            continue
        outcomes.append(_NOT_YET)
        # the label and decoder made before, or made now
        label = proxy._labels.get(method) or proxy.label(method)
        decode = proxy._decoders.get(method) or proxy.decoder(method)
        targets.append((proxy._id, label, decode))
        live.append(index)
    if not targets:
        return outcomes
    if sinks is not None and len(live) < len(pendings):
        sinks = [sinks[index] for index in live]
    call = pb.Call(method=first.method, args=values, one_way=first.one_way)
    if first.attached:
        try:
            attachments.put(call, first.attached, table.attachment_limit, first.proxy.label(method))
        except Exception as exc:
            return [exc if outcome is _NOT_YET else outcome for outcome in outcomes]
    try:
        started = table.session.start_multicast(call, targets, table.timeout, first.parent, sinks)
    except Exception:
        for index in live:
            try:
                outcomes[index] = pendings[index].proxy.begin(pendings[index], values)
            except Exception as exc:
                outcomes[index] = exc
        return outcomes
    for index, sink in zip(live, started, strict=True):
        outcomes[index] = sink
    return outcomes


#: a place in begin_multicast's outcomes not filled yet
_NOT_YET = Exception("not started")
