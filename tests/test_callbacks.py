"""Parameter callbacks end to end, each scenario with a sync Client and an AsyncClient,
against a sync Server (plain provider methods) and an AsyncServer (``async def`` ones)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from asyncio import gather
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from conftest import RawStream, run
from helpers import consumer_process
from notifier import (
    NOTIFIER_METHODS,
    AsyncNotifierImpl,
    Consumer,
    Listener,
    Notifier,
    NotifierImpl,
)

import backchannel
from backchannel import Argument, Method
from backchannel.errors import (
    CallbackGone,
    CodecError,
    DecodeError,
    EncodeError,
    InvalidArguments,
    MethodNotFound,
    StreamBroken,
    TooManyCallbacks,
    UnknownCallback,
)
from backchannel.rpc.callbacks import limit_error, listener_interface, service_label
from backchannel.rpc.consumer_callbacks import (
    ConsumerCallbacks,
    _check_listener,
    _encode_plain,
    _listener_method,
    _looks_like_listener,
    declared_arguments,
)
from backchannel.rpc.interface import MethodSpec, apply_method, find_interface_spec
from backchannel.rpc.provider_callbacks import (
    COLLECTING,
    PendingCall,
    ProviderCallbacks,
    ReverseProxy,
)
from backchannel.transport.handoff import Deferred
from backchannel.transport.portal import LoopThread
from backchannel.transport.session import CURRENT_CALL
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


class AsyncProvider:
    """An AsyncServer on a loop thread of its own, with the export API the tests use."""

    def __init__(self) -> None:
        self.portal = LoopThread("test-provider")
        self._core = self.portal.run(_make_async_server())

    @property
    def address(self) -> str:
        return str(self._core.address)

    def export(self, *args: Any, **options: Any) -> None:
        self._core.export(*args, **options)

    def close(self) -> None:
        self.portal.run(self._core.stop())
        self.portal.close()


async def _make_async_server() -> backchannel.AsyncServer:
    server = backchannel.AsyncServer(max_workers=64)
    await server.start()
    return server


def provider_tables(server: Any) -> list[int]:
    """How many reverse proxies each open stream of the provider holds."""
    return [len(s.dispatcher.callbacks) for s in server._core._sessions]


def wait_until(condition: Any, poke: Any = None, timeout: float = 2) -> bool:
    """Wait (bounded) for ``condition()``; ``poke()`` makes a round trip between checks,
    which orders us after the frames sent before it (a Release, say)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        if poke is not None:
            poke()
        else:
            threading.Event().wait(0.01)
    return True


@pytest.fixture(params=["Server", "AsyncServer"])
def flavour(request: pytest.FixtureRequest) -> str:
    """The provider: a sync Server with plain methods, or an AsyncServer with async ones."""
    return str(request.param)


@pytest.fixture
def impl(flavour: str) -> NotifierImpl:
    return NotifierImpl() if flavour == "Server" else AsyncNotifierImpl()


@pytest.fixture
def provider(impl: NotifierImpl, flavour: str) -> Iterator[Any]:
    if flavour == "Server":
        server: Any = backchannel.Server(max_workers=64)
        server.start()
    else:
        server = AsyncProvider()
    try:
        server.export(Notifier, impl, methods=NOTIFIER_METHODS)
        server.export(Notifier, type(impl)(), group="small", callbacks=2, methods=NOTIFIER_METHODS)
        yield server
    finally:
        if flavour == "Server":
            server.stop()
        else:
            server.close()


@pytest.fixture(params=["sync", "async"])
def consumer(request: pytest.FixtureRequest, provider: backchannel.Server) -> Iterator[Consumer]:
    consumer = Consumer(request.param, provider.address)
    yield consumer
    consumer.close()


def test_callback_inside_add_listener_then_ten_pushes_in_order(
    consumer: Consumer, impl: NotifierImpl
) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    consumer.do(notifier.addListener("k", listener))
    assert listener.received == ["init"]  # delivered before addListener returned
    consumer.do(notifier.push("k", 10))
    assert listener.wait_for(11)
    assert listener.received == ["init"] + [f"push {i}" for i in range(10)]


def test_reverse_proxy_returns_the_listeners_result_from_threads_and_the_loop(
    consumer: Consumer,
) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    consumer.do(notifier.addListener("k", listener))
    assert consumer.do(notifier.poke("k", "a")) == "ok a"  # sync provider method: blocks
    assert consumer.do(notifier.apoke("k", "b")) == "ok b"  # async provider method: awaits


def test_limit_counts_instances_and_refuses_past_it(
    consumer: Consumer, provider: backchannel.Server
) -> None:
    small = consumer.reference(Notifier, group="small")
    a, b, c = consumer.listener(), consumer.listener(), consumer.listener()
    consumer.do(small.addListener("a", a))
    assert consumer.callback_count == 1
    consumer.do(small.removeListener("a", a))
    assert consumer.callback_count == 0 and provider_tables(provider) == [0]
    consumer.do(small.addListener("a", a))
    consumer.do(small.addListener("a2", a))  # the same object: still one instance
    assert consumer.callback_count == 1 and provider_tables(provider) == [1]
    consumer.do(small.addListener("b", b))
    assert consumer.callback_count == 2
    with pytest.raises(backchannel.TooManyCallbacks) as info:
        consumer.do(small.addListener("c", c))
    message = str(info.value)
    assert "test.Notifier" in message and "at most 2" in message and "2 are live" in message
    assert c.received == []  # nothing was exported
    assert consumer.callback_count == 2 and provider_tables(provider) == [2]
    assert consumer.do(small.ping(7)) == 7  # the stream goes on


def test_the_same_object_arrives_as_the_same_proxy(consumer: Consumer, impl: NotifierImpl) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    consumer.do(notifier.addListener("x", listener))
    consumer.do(notifier.addListener("y", listener))
    assert impl.added[0] is impl.added[1]
    consumer.do(notifier.removeListener("x", listener))
    assert "x" not in impl.listeners


def test_removing_an_object_never_added_is_a_clear_error(consumer: Consumer) -> None:
    notifier = consumer.reference(Notifier)
    with pytest.raises(backchannel.UnknownCallback, match="never added"):
        consumer.do(notifier.removeListener("k", consumer.listener()))
    with pytest.raises(backchannel.UnknownCallback, match="not a live callback"):
        consumer.release(consumer.listener())


def test_listener_exception_reaches_the_provider_as_its_type(consumer: Consumer) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    consumer.do(notifier.addListener("k", listener))
    assert consumer.do(notifier.poke("k", "raise")) == "ValueError: listener refused"
    with pytest.raises(ValueError, match="listener refused"):  # async provider, re-raised
        consumer.do(notifier.apoke("k", "raise"))
    assert consumer.do(notifier.poke("k", "fine")) == "ok fine"


def test_released_callbacks_raise_callback_gone_at_once(
    consumer: Consumer, impl: NotifierImpl, provider: backchannel.Server
) -> None:
    notifier = consumer.reference(Notifier)
    by_consumer, by_provider = consumer.listener(), consumer.listener()
    consumer.do(notifier.addListener("a", by_consumer))
    consumer.do(notifier.addListener("b", by_provider))
    consumer.release(by_consumer)  # (a) the consumer releases
    assert impl.listeners["a"].wait_ended(2)
    impl.listeners["b"].release()  # (c) the provider releases
    assert consumer.do(notifier.poke("a", "late")).startswith("CallbackGone")
    assert consumer.do(notifier.poke("b", "late")).startswith("CallbackGone")
    assert provider_tables(provider) == [0]
    deadline = time.monotonic() + 2
    while consumer.callback_count and time.monotonic() < deadline:
        consumer.do(notifier.ping(0))  # a round trip orders us after the Release frame
    assert consumer.callback_count == 0


def test_reentrant_listener_calls_the_provider(consumer: Consumer) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener(notifier)
    consumer.do(notifier.addListener("k", listener))
    assert consumer.do(notifier.poke("k", "reenter")) == "pong"
    assert consumer.do(notifier.apoke("k", "reenter")) == "pong"


def test_nested_chain_to_the_same_listener_does_not_deadlock(consumer: Consumer) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener(notifier)
    consumer.do(notifier.addListener("k", listener))
    # listener("chain") -> provider.poke -> the same listener("inner"), inside its parent
    assert consumer.do(notifier.poke("k", "chain")) == "ok inner"
    assert listener.received == ["init", "chain", "inner"]


def test_fifty_concurrent_calls_arrive_in_order(consumer: Consumer) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener(jitter=True)
    consumer.do(notifier.addListener("k", listener))
    consumer.do(notifier.burst("k", 50))
    assert listener.received == ["init"] + [f"burst {i}" for i in range(50)]


def test_two_consumers_each_get_only_their_own(provider: backchannel.Server) -> None:
    first, second = Consumer("sync", provider.address), Consumer("async", provider.address)
    try:
        one, two = first.listener(), second.listener()
        first.do(first.reference(Notifier).addListener("one", one))
        second.do(second.reference(Notifier).addListener("two", two))
        first.do(first.reference(Notifier).push("one", 3))
        second.do(second.reference(Notifier).push("two", 2))
        assert one.received == ["init", "push 0", "push 1", "push 2"]
        assert two.received == ["init", "push 0", "push 1"]
    finally:
        first.close()
        second.close()


def test_a_crafted_frame_cannot_reach_another_consumers_callback(
    consumer: Consumer, provider: backchannel.Server, impl: NotifierImpl
) -> None:
    notifier = consumer.reference(Notifier)
    victim = consumer.listener()
    consumer.do(notifier.addListener("victim", victim))
    foreign_id = impl.listeners["victim"].callback_id

    async def attack() -> None:
        stream = RawStream(provider.address)
        await stream.hello()
        ref = pb.Value(callback_value=pb.CallbackRef(id=foreign_id))
        remove = pb.Call(
            id=1,
            service="test.Notifier",
            method="removeListener",
            args=[pb.Value(string_value="victim"), ref],
        )
        await stream.send(pb.Frame(call=remove))
        error = (await stream.recv()).result.error
        assert error.type == "backchannel.UnknownCallback"
        assert f"callback {foreign_id} was never added on this stream" in error.message
        release = pb.Frame(release=pb.Release(callback_id=foreign_id))
        await stream.send(release)  # silently scoped to this stream: nothing to release
        direct = pb.Call(id=2, method="changed", callback_id=foreign_id)
        await stream.send(pb.Frame(call=direct))
        assert "a provider exports no callbacks" in (await stream.recv()).result.error.message
        await stream.close()

    run(attack())
    assert impl.listeners["victim"].alive
    assert consumer.do(notifier.poke("victim", "still mine")) == "ok still mine"


@pytest.mark.parametrize("mode", ["sync", "asyncio"])
def test_consumer_killed_every_proxy_gone_within_two_seconds(
    provider: backchannel.Server, impl: NotifierImpl, mode: str
) -> None:
    with consumer_process(provider.address, 3, mode) as process:
        proxies = list(impl.listeners.values())
        assert len(proxies) == 3 and all(p.alive for p in proxies)
        process.kill()
        started = time.monotonic()
        assert all(proxy.wait_ended(2) for proxy in proxies)
        assert time.monotonic() - started < 2
        for proxy in proxies:
            with pytest.raises(backchannel.CallbackGone):
                proxy.changed("anyone?")
        assert provider_tables(provider) in ([], [0])


def test_ten_thousand_add_remove_cycles_leave_nothing_behind(
    consumer: Consumer, provider: backchannel.Server, flavour: str
) -> None:
    """10,000 cycles (100 rounds of 100) with an AsyncClient on an AsyncServer: the
    callback tables at full length (a sync Client and a Server keep theirs in the same
    tables, behind a loop thread). A sync Client on a Server runs 2,000 (20 rounds, 2 s
    of its 10 s at full length) and the crossed pairs 1,000: enough for any leak of one
    entry a cycle to show, in a fifth of the time (a round of 100 is the same whatever
    the count)."""
    full = consumer.mode == "async" and flavour == "AsyncServer"
    rounds = 100 if full else 20 if (consumer.mode, flavour) == ("sync", "Server") else 10
    quiet = NotifierImpl(greet=False)  # no callback inside addListener: only the tables count
    provider.export(Notifier, quiet, group="quiet", methods=NOTIFIER_METHODS)
    notifier = consumer.reference(Notifier, group="quiet", timeout=10)
    alive: list[weakref.ref[Any]] = []

    async def add_remove_async(key: str, listener: Any) -> None:
        await notifier.addListener(key, listener)
        await notifier.removeListener(key, listener)

    async def all_of(*calls: Any) -> None:
        await gather(*calls)

    def add_remove(key: str, listener: Any) -> None:
        notifier.addListener(key, listener)
        notifier.removeListener(key, listener)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for round_ in range(rounds):
            listeners = [consumer.listener() for _ in range(100)]
            alive.extend(weakref.ref(listener) for listener in listeners)
            keys = [f"{round_}-{i}" for i in range(100)]
            if consumer.mode == "sync":
                list(pool.map(add_remove, keys, listeners))
            else:
                consumer.do(all_of(*map(add_remove_async, keys, listeners)))
            del listeners
    assert consumer.callback_count == 0
    assert provider_tables(provider) == [0]
    assert quiet.listeners == {}
    proxies = [weakref.ref(proxy) for proxy in quiet.added]
    assert len(proxies) == 100 * rounds
    quiet.added.clear()
    gc.collect()
    assert sum(ref() is not None for ref in alive) == 0  # the consumer let go of every one
    assert sum(ref() is not None for ref in proxies) == 0  # and the provider of its proxies


# ------------------------------------------------------------------ audit fixes


def test_the_limit_is_per_exported_service_not_per_name(
    consumer: Consumer, provider: backchannel.Server
) -> None:
    for group in ("one", "two"):
        provider.export(
            Notifier, NotifierImpl(greet=False), group=group, callbacks=1, methods=NOTIFIER_METHODS
        )
    one = consumer.reference(Notifier, group="one")
    two = consumer.reference(Notifier, group="two")
    a, b = consumer.listener(), consumer.listener()
    consumer.do(one.addListener("a", a))
    consumer.do(two.addListener("b", b))  # its own limit: not full because "one" is
    assert consumer.callback_count == 2 and provider_tables(provider) == [2]
    with pytest.raises(backchannel.TooManyCallbacks, match=r"test.Notifier \(group='one'\)"):
        consumer.do(one.addListener("b", b))  # b counts against "two" only so far
    with pytest.raises(backchannel.TooManyCallbacks, match="group='two'.*1 is live"):
        consumer.do(two.addListener("a", a))
    consumer.do(one.removeListener("a", a))
    consumer.do(one.addListener("b", b))  # crossed: b now counts against both
    assert consumer.callback_count == 1 and provider_tables(provider) == [1]
    assert consumer.do(two.ping(1)) == 1


def test_the_provider_counts_per_exported_service_too(provider: backchannel.Server) -> None:
    for group in ("one", "two"):
        provider.export(
            Notifier, NotifierImpl(greet=False), group=group, callbacks=1, methods=NOTIFIER_METHODS
        )

    def add(call_id: int, group: str, callback_id: int) -> pb.Frame:
        ref = pb.Value(callback_value=pb.CallbackRef(id=callback_id))
        key = pb.Value(string_value=f"k{call_id}")
        call = pb.Call(
            id=call_id, service="test.Notifier", group=group, method="addListener", args=[key, ref]
        )
        return pb.Frame(call=call)

    async def raw() -> None:
        stream = RawStream(provider.address)
        await stream.hello()
        await stream.send(add(1, "one", 7))
        await stream.send(add(2, "two", 8))  # a crafted consumer skips the consumer's check
        assert (await stream.recv()).result.HasField("value")
        assert (await stream.recv()).result.HasField("value")
        await stream.send(add(3, "two", 7))  # "two" is full; 7 is live, so no Release
        error = (await stream.recv()).result.error
        assert error.type == "backchannel.TooManyCallbacks" and "group='two'" in error.message
        await stream.close()

    run(raw())  # before the fix: 8 was refused, "test.Notifier" counted as one service


def test_a_refused_callback_is_released_to_the_consumer(provider: backchannel.Server) -> None:
    provider.export(
        Notifier, NotifierImpl(greet=False), group="one", callbacks=1, methods=NOTIFIER_METHODS
    )

    async def raw() -> None:
        stream = RawStream(provider.address)
        await stream.hello()
        frames = []
        for call_id, callback_id in ((1, 7), (2, 8)):
            ref = pb.Value(callback_value=pb.CallbackRef(id=callback_id))
            args = [pb.Value(string_value="k"), ref]
            call = pb.Call(
                id=call_id, service="test.Notifier", group="one", method="addListener", args=args
            )
            await stream.send(pb.Frame(call=call))
            frames.append(await stream.recv())
        assert frames[0].result.HasField("value")
        # the provider refused 8 (over the limit): it says so before the error Result
        assert frames[1].WhichOneof("kind") == "release" and frames[1].release.callback_id == 8
        error = (await stream.recv()).result.error
        assert error.type == "backchannel.TooManyCallbacks"
        await stream.close()

    run(raw())


# kept: a method that raised keeps what it was given on both sides; the two errors the
# stream itself refuses calls with, unread (ShuttingDown, RemoteProtocolError), are read
# by the consumer as such a refusal even when the method raised them: dropped on both
@pytest.mark.parametrize(
    ("error", "kept"),
    [
        ("MethodNotFound", True),
        ("CallbackGone", True),
        ("ShuttingDown", False),
        ("RemoteProtocolError", False),
    ],
)
def test_a_method_that_fails_after_taking_the_listener_keeps_both_tables_equal(
    consumer: Consumer, provider: backchannel.Server, impl: NotifierImpl, error: str, kept: bool
) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    with pytest.raises(getattr(backchannel, error)):
        consumer.do(notifier.addListener(f"fail:{error}", listener))
    ping = lambda: consumer.do(notifier.ping(0))  # noqa: E731
    expected = 1 if kept else 0
    assert wait_until(
        lambda: consumer.callback_count == expected and provider_tables(provider) == [expected],
        ping,
    ), (consumer.callback_count, provider_tables(provider))
    proxy = impl.listeners[f"fail:{error}"]
    if kept:  # kept on both sides: the proxy works
        assert proxy.alive and consumer.do(notifier.poke(f"fail:{error}", "x")) == "ok x"
    else:  # dropped on both sides: the proxy says so
        assert not proxy.alive
        with pytest.raises(backchannel.CallbackGone):
            proxy.changed("x")


def test_a_remover_that_times_out_still_ends_the_instance_on_both_sides(
    consumer: Consumer, provider: backchannel.Server, impl: NotifierImpl
) -> None:
    notifier = consumer.reference(Notifier, methods=[Method("removeListener", timeout=0.3)])
    listener = consumer.listener()
    consumer.do(notifier.addListener("slow", listener))
    try:
        with pytest.raises(backchannel.DeadlineExceeded):
            consumer.do(notifier.removeListener("slow", listener))
    finally:
        impl.gate.set()
    ping = lambda: consumer.do(notifier.ping(0))  # noqa: E731
    # the provider released it (the remover ran, or was cancelled) and told the consumer
    assert wait_until(lambda: consumer.callback_count == 0, ping)
    assert provider_tables(provider) == [0]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_that_is_never_sent_exports_nothing(provider: backchannel.Server, mode: str) -> None:
    limits = backchannel.Limits(max_calls_in_flight=1, max_message_size=64 * 1024)
    consumer = Consumer(mode, provider.address, limits=limits)
    try:
        notifier = consumer.reference(Notifier, methods=[Method("addListener", timeout=0.2)])
        listener = consumer.listener()
        with pytest.raises(backchannel.MessageTooLarge):
            consumer.do(notifier.addListener("x" * 100_000, listener))
        assert consumer.callback_count == 0
        # the only slot is taken by a call that waits; the next one expires queued
        holder = consumer.listener()
        consumer.do(notifier.addListener("holder", holder))
        blocked = consumer.background(lambda: notifier.poke("holder", "block"))
        assert wait_until(lambda: "block" in holder.received)  # it holds the slot
        with pytest.raises(backchannel.DeadlineExceeded):
            consumer.do(notifier.addListener("queued", listener))
        holder.gate.set()
        assert blocked.result(5) == "ok block"
        assert consumer.callback_count == 1  # the holder only
        assert provider_tables(provider) == [1]
    finally:
        consumer.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_calls_in_flight_when_the_stream_ends_raise_callback_gone(
    provider: Any,
    impl: NotifierImpl,
    mode: str,
) -> None:
    consumer = Consumer(mode, provider.address)
    listener = consumer.listener()
    try:
        consumer.do(consumer.reference(Notifier).addListener("k", listener))
        proxy = impl.listeners["k"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            from_thread = pool.submit(proxy.changed, "block")
            assert wait_until(lambda: "block" in listener.received)

            async def from_loop() -> Any:
                return await proxy.changed("block too")

            on_loop = asyncio.run_coroutine_threadsafe(from_loop(), provider_loop(provider))
            consumer.close()
            for outcome in (from_thread, on_loop):
                with pytest.raises(backchannel.CallbackGone, match="in flight|ended"):
                    outcome.result(5)
        assert not proxy.alive
    finally:
        listener.gate.set()
        consumer.close()


def provider_loop(provider: Any) -> asyncio.AbstractEventLoop:
    portal = provider.portal if isinstance(provider, AsyncProvider) else provider._portal
    return portal.loop  # type: ignore[no-any-return]


def test_callback_gone_from_the_consumer_releases_the_proxy(
    provider: backchannel.Server, impl: NotifierImpl
) -> None:
    async def raw() -> None:
        stream = RawStream(provider.address)
        await stream.hello()
        ref = pb.Value(callback_value=pb.CallbackRef(id=5, interface="test.Listener"))
        add = pb.Call(
            id=1,
            service="test.Notifier",
            method="addListener",
            args=[pb.Value(string_value="raw"), ref],
        )
        await stream.send(pb.Frame(call=add))
        init = (await stream.recv()).call  # the provider greets the listener
        gone = pb.Error(code=pb.UNAVAILABLE, type="backchannel.CallbackGone", message="not here")
        await stream.send(pb.Frame(result=pb.Result(id=init.id, error=gone)))
        assert (await stream.recv()).result.error.type == "backchannel.CallbackGone"
        proxy = impl.listeners["raw"]
        assert not proxy.alive  # released locally (the stream is still open)
        assert provider_tables(provider) == [0]
        with pytest.raises(backchannel.CallbackGone, match="released"):
            proxy.changed("again")
        await stream.close()

    run(raw())


def test_a_callback_returning_none_returns_only_after_the_consumer_ran_it(
    consumer: Consumer, impl: NotifierImpl
) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    listener.trace = impl.trace  # one list, both sides (one process)
    consumer.do(notifier.addListener("k", listener))
    assert consumer.do(notifier.poke("k", "none")) is None
    assert impl.trace == ["listener ran", "provider got None"]


@pytest.mark.parametrize("ending", ["client.release", "proxy.release", "stream end"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_consumer_drops_the_listener_when_the_instance_ends(
    provider: backchannel.Server,
    impl: NotifierImpl,
    ending: str,
    mode: str,
) -> None:
    consumer = Consumer(mode, provider.address)
    try:
        notifier = consumer.reference(Notifier)
        listener = consumer.listener()
        consumer.do(notifier.addListener("k", listener))
        gone = weakref.ref(listener)
        if ending == "client.release":
            consumer.release(listener)
        elif ending == "proxy.release":
            impl.listeners["k"].release()
        del listener
        if ending == "stream end":
            consumer.close()
        else:
            assert wait_until(
                lambda: consumer.callback_count == 0, lambda: consumer.do(notifier.ping(0))
            )
        impl.listeners.clear()
        impl.added.clear()
        gc.collect()
        assert gone() is None
    finally:
        consumer.close()


def test_a_listener_lacking_the_interface_methods_is_refused_before_sending(
    consumer: Consumer,
) -> None:
    class Deaf:
        def heard(self, msg: str) -> None: ...

    notifier = consumer.reference(Notifier)
    with pytest.raises(backchannel.InvalidArguments) as info:
        consumer.do(notifier.addListener("k", Deaf()))
    message = str(info.value)
    assert "argument 1 'listener' of test.Notifier.addListener()" in message
    assert "test.Listener" in message and "does not implement changed()" in message
    assert consumer.callback_count == 0


def test_a_reverse_proxy_binds_its_arguments_against_the_interface(
    consumer: Consumer, impl: NotifierImpl
) -> None:
    notifier = consumer.reference(Notifier)
    listener = consumer.listener()
    consumer.do(notifier.addListener("k", listener))
    proxy = impl.listeners["k"]
    with pytest.raises(TypeError, match=r"test.Listener.changed\(\) takes 1 argument"):
        proxy.changed("a", "b")
    with pytest.raises(TypeError, match=r"test.Listener.changed\(\) takes 1 argument"):
        proxy.changed()
    with pytest.raises(TypeError, match=r"changed\(\): missing a required argument: 'msg'"):
        proxy.changed(mgs="typo")
    proxy.changed(msg="by keyword")
    assert listener.received[-1] == "by keyword"


# ---------------------------------------------------------------- the tables, unit by unit
# The helpers and both tables driven directly (no stream): what a user reads in an error,
# what the tables count against a limit, and what goes to the peer (a recorded Release).


@backchannel.interface("test.Pair")
class Pair:
    """Two callback arguments (annotated), a remover, and an unannotated one."""

    def both(self, a: Listener, b: Listener) -> None: ...
    def drop(self, a: Listener) -> None: ...
    def loose(self, a, b) -> None: ...  # type: ignore[no-untyped-def]


@backchannel.interface("test.Twice")
class Twice:
    def first(self) -> None: ...
    def second(self) -> None: ...
    @backchannel.method(one_way=True)
    def fire(self, msg: str) -> None: ...


def _pair(name: str, *arguments: Argument) -> MethodSpec:
    spec = find_interface_spec(Pair)
    assert spec is not None
    return apply_method(spec.methods[name], Method(name, arguments=list(arguments)))


PAIR = ("test.Pair", "", "")


class _Connection:
    def __init__(self) -> None:
        self.released: list[int] = []

    def send_release(self, callback_id: int) -> None:
        self.released.append(callback_id)


class FakeSession:
    """What the tables use of a session: the loop, Releases sent, calls started."""

    def __init__(self, in_loop: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.connection = _Connection()
        self.flushes = 0
        self.in_loop = in_loop
        self.started: list[tuple[Any, ...]] = []
        self.error_types: dict[str, Any] = {}

    def in_loop_thread(self) -> bool:
        return self.in_loop

    def flush(self) -> None:
        self.flushes += 1

    def ancestors(self, parent_id: int) -> set[int]:
        return set()

    def start_call(self, call: pb.Call, timeout: Any, **options: Any) -> Any:
        self.started.append((call, timeout, options))
        return self.loop.create_future()


def _ref(callback_id: int, interface: str = "") -> pb.Value:
    value = pb.Value()
    value.callback_value.id = callback_id
    value.callback_value.interface = interface
    return value


def _provider_table(session: FakeSession | None = None) -> ProviderCallbacks:
    return ProviderCallbacks(session or FakeSession(), 7.5, None)  # type: ignore[arg-type]


def _take(table: ProviderCallbacks, ids: list[int], limit: int = 10) -> list[Any]:
    both = _pair("both", Argument(index=0, callback=True), Argument(index=1, callback=True))
    values = [_ref(i) if i else codec.encode(None, "x") for i in ids]
    args, commit, _ = table.decode_args(both, PAIR, limit, values)
    commit()
    return args


def test_the_limit_error_says_the_service_the_limit_and_how_many_in_words() -> None:
    tail = (
        "Release some (client.release(listener) or a remover method), or raise the "
        "limit with export(..., callbacks=N)"
    )
    assert str(limit_error(("svc", "", ""), 1, 1, 1)) == (
        "svc allows at most 1 live callback instance per stream; "
        f"1 is live and this call adds 1. {tail}"
    )
    assert str(limit_error(("svc", "g", "2"), 3, 2, 2)) == (
        "svc (group='g', version='2') allows at most 3 live callback instances per stream; "
        f"2 are live and this call adds 2. {tail}"
    )
    assert service_label(("svc", "", "2")) == "svc (version='2')"
    assert service_label(("svc", "g", "")) == "svc (group='g')"


def test_what_cannot_be_the_declared_listener_is_refused_in_words() -> None:
    place = "argument 1 'listener' of test.Notifier.addListener()"
    with pytest.raises(InvalidArguments) as caught:
        _check_listener("x", place, None)
    assert str(caught.value) == f"{place} is declared a callback; pass a listener object, not str"

    class Empty:
        pass

    one = find_interface_spec(Listener)
    with pytest.raises(InvalidArguments) as caught:
        _check_listener(Empty(), place, one)
    assert str(caught.value) == (
        f"{place} is declared a callback of interface test.Listener, but the Empty passed "
        "does not implement changed(); give it that method (or subclass Listener)"
    )
    two = find_interface_spec(Twice)
    with pytest.raises(InvalidArguments) as caught:
        _check_listener(Empty(), place, two)
    assert str(caught.value) == (
        f"{place} is declared a callback of interface test.Twice, but the Empty passed "
        "does not implement first(), second(), fire(); give it those methods "
        "(or subclass Twice)"
    )


class _Base:
    def on(self) -> None: ...


class _Derived(_Base):
    pass


class _Static:
    @staticmethod
    def on() -> None: ...


class _PrivateOnly:
    size = 3

    def _helper(self) -> None: ...


class _Meta(type):
    def describe(cls) -> None: ...


class _WithMeta(metaclass=_Meta):
    pass


def test_a_listener_passed_where_no_callback_is_declared_gets_the_hint() -> None:
    """An unencodable object with public methods of its own (or a base's) gets the hint
    to declare the argument a callback; other unencodable values (a class, an object
    with only private methods or data) get the codec's error alone."""
    for listener in (_Base(), _Derived(), _Static()):
        assert _looks_like_listener(listener), listener
    for value in (_PrivateOnly(), object(), _Base, _WithMeta, 3):
        assert not _looks_like_listener(value), value

    place = "argument 3 of test.Pair.loose()"
    with pytest.raises(EncodeError) as caught:
        _encode_plain(pb.Value(), _Derived(), place, 3)
    message = str(caught.value)
    assert message.startswith(place)
    assert message.endswith(
        ". If it is a listener, declare the argument a callback: "
        "Argument(index=3, callback=True) at export, or @backchannel.method("
        "arguments=[Argument(index=3)]) on the interface"
    )
    with pytest.raises(EncodeError) as caught:
        _encode_plain(pb.Value(), _PrivateOnly(), place, 3)
    assert "If it is a listener" not in str(caught.value)
    assert str(caught.value).startswith(place)


def test_the_provider_table_makes_one_proxy_an_id_named_by_its_interface() -> None:
    table = _provider_table()
    both = _pair("both", Argument(index=0, callback=True), Argument(index=1, callback=True))
    args, commit, _ = table.decode_args(both, PAIR, 10, [_ref(5), _ref(5)])
    assert args[0] is args[1]  # the same listener twice in one call: one proxy
    commit()
    assert len(table) == 1
    assert repr(args[0]) == "<ReverseProxy test.Listener #5 live>"  # from the annotation
    loose = _pair("loose", Argument(index=0, callback=True), Argument(index=1, callback=True))
    args, commit, _ = table.decode_args(loose, PAIR, 10, [_ref(6), _ref(7, "test.Other")])
    commit()
    assert repr(args[0]) == "<ReverseProxy callback #6 live>"  # no interface known
    assert repr(args[1]) == "<ReverseProxy test.Other #7 live>"  # the consumer's name
    table.release(5)
    assert repr(table_proxy := _take(table, [6])[0]) == "<ReverseProxy callback #6 live>"
    table.release(6)
    assert repr(table_proxy) == "<ReverseProxy callback #6 gone: released>"


def test_the_provider_table_refuses_bad_callback_values_in_words() -> None:
    table = _provider_table()
    both = _pair("both", Argument(index=0, callback=True), Argument(index=1, callback=True))
    with pytest.raises(InvalidArguments) as caught:
        table.decode_args(both, PAIR, 10, [_ref(0)])
    assert str(caught.value) == (
        "argument 0 of test.Pair.both(): callback id 0 is not allowed; "
        "give a callback a non-zero id"
    )
    with pytest.raises(InvalidArguments) as caught:
        table.decode_args(both, PAIR, 10, [_ref(1), codec.encode("k", "x")])
    assert str(caught.value) == (
        "argument 1 of test.Pair.both() is declared a callback; got a string_value value"
    )
    # None for a callback or a remover is an argument like any other
    args, _, removed = table.decode_args(both, PAIR, 10, [codec.encode(None, "x"), _ref(1)])
    assert args[0] is None and removed == []
    drop = _pair("drop", Argument(index=0, callback=False))
    args, _, removed = table.decode_args(drop, PAIR, 10, [codec.encode(None, "x")])
    assert args == [None] and removed == []
    with pytest.raises(UnknownCallback):
        table.decode_args(drop, PAIR, 10, [_ref(9)])
    # a plain argument that does not decode is named by its place, beside a callback
    first = _pair("both", Argument(index=0, callback=True))
    with pytest.raises(CodecError) as bad:
        table.decode_args(first, PAIR, 10, [_ref(1), pb.Value()])
    assert str(bad.value).startswith("argument 1 of test.Pair.both(): ")


def test_the_provider_table_counts_each_instance_once_per_service() -> None:
    table = _provider_table()
    _take(table, [1])
    _take(table, [1], limit=1)  # the same instance again: not counted again
    _take(table, [2], limit=2)
    with pytest.raises(TooManyCallbacks) as caught:
        _take(table, [3], limit=2)
    assert str(caught.value) == str(limit_error(PAIR, 2, 2, 1))
    table.release(1)  # one fewer live: one more fits, two do not
    with pytest.raises(TooManyCallbacks):
        _take(table, [3, 4], limit=2)
    _take(table, [3], limit=2)


def test_a_refused_call_releases_only_the_real_ids_it_carried() -> None:
    session = FakeSession()
    table = _provider_table(session)
    _take(table, [3])
    both = _pair("both", Argument(index=0, callback=True), Argument(index=1, callback=True))
    table.refuse(both, [_ref(0), _ref(1)])
    table.refuse(both, [_ref(3), _ref(4)])  # 3 is live here: the consumer keeps it
    assert session.connection.released == [1, 4]
    assert session.flushes == 2


def test_a_released_proxy_tells_the_consumer_and_says_why_it_is_gone() -> None:
    session = FakeSession()
    table = _provider_table(session)
    proxy = _take(table, [5])[0]
    proxy.release()  # on the loop thread: at once
    assert session.connection.released == [5]
    assert session.flushes == 1
    assert len(table) == 0
    with pytest.raises(CallbackGone) as caught:
        proxy.changed("x")
    assert str(caught.value) == (
        "test.Listener #5.changed(): the callback instance ended (released by the provider)"
    )
    assert not proxy.alive and proxy.wait_ended(0)

    thread_side = FakeSession(in_loop=False)
    table = _provider_table(thread_side)
    (proxy,) = _take(table, [8])[:1]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:  # a live instance: the wait times out (bounded, so a wait that ignores it fails)
        assert pool.submit(proxy.wait_ended, 0.01).result(timeout=5) is False
    finally:
        pool.shutdown(wait=False)  # the release below ends such a wait
    proxy.release()  # from a thread: posted to the loop, ended at once
    assert not proxy.alive
    with pytest.raises(CallbackGone) as caught:
        proxy.changed("x")
    assert str(caught.value) == (
        "test.Listener #8.changed(): the callback instance ended (released by the provider)"
    )
    thread_side.loop.run_until_complete(asyncio.sleep(0))
    assert thread_side.connection.released == [8]
    assert len(table) == 0
    thread_side.loop.close()
    session.loop.close()


def _loose_proxy(table: ProviderCallbacks, callback_id: int) -> Any:
    loose = _pair("loose", Argument(index=0, callback=True))
    args, commit, _ = table.decode_args(loose, PAIR, 10, [_ref(callback_id)])
    commit()
    return args[0]


def test_a_proxy_of_no_known_interface_takes_any_public_method_positionally() -> None:
    table = _provider_table()
    proxy = _loose_proxy(table, 6)
    typed = _take(table, [5])[0]
    for name in ("_private", "__len__"):
        with pytest.raises(AttributeError) as caught:
            getattr(proxy, name)
        assert caught.value.args == (name,)
    with pytest.raises(AttributeError):
        typed.whatever  # noqa: B018 (a typed proxy has its interface's methods only)
    with pytest.raises(InvalidArguments) as caught:
        proxy.whatever(1, b=2, c=3)
    assert str(caught.value) == (
        "callback #6.whatever(): keyword arguments (b, c) cannot travel to a listener of no "
        "known interface; pass them positionally"
    )
    table.release(6)
    with pytest.raises(CallbackGone) as caught:
        proxy.whatever("x")
    assert str(caught.value) == "callback #6.whatever(): the callback instance ended (released)"
    assert proxy.label("whatever") == "callback #6.whatever()"
    assert typed.label("changed") == typed.label("changed") == "test.Listener #5.changed()"


def test_gather_collects_a_proxy_call_with_its_parent_and_one_way() -> None:
    session = FakeSession()
    table = _provider_table(session)
    twice = find_interface_spec(Twice)
    assert twice is not None
    proxy = ReverseProxy(table, 4, "test.Twice", twice)
    loose = _loose_proxy(table, 6)
    collecting = COLLECTING.set(True)
    try:
        assert proxy.fire("a") == PendingCall(proxy, "fire", True, ("a",), 0)
        assert loose.anything("b", 2) == PendingCall(loose, "anything", False, ("b", 2), 0)
        assert proxy.first() == PendingCall(proxy, "first", False, (), 0)
        current = CURRENT_CALL.set((session, 42))  # type: ignore[arg-type]
        try:
            assert proxy.fire("c").parent == 42
        finally:
            CURRENT_CALL.reset(current)
    finally:
        COLLECTING.reset(collecting)


def test_begin_sends_the_collected_call_with_the_shared_values() -> None:
    session = FakeSession()
    table = _provider_table(session)
    twice = find_interface_spec(Twice)
    assert twice is not None
    proxy = ReverseProxy(table, 4, "test.Twice", twice)
    shared = [codec.encode("shared", "x")]
    proxy.begin(PendingCall(proxy, "fire", True, ("own",), 9), shared)
    call, timeout, options = session.started[-1]
    assert call == pb.Call(method="fire", args=shared, callback_id=4, parent_id=9, one_way=True)
    assert timeout == 7.5
    assert options["label"] == "test.Twice #4.fire()"
    assert options["broken"] is None  # gather translates a StreamBroken itself
    proxy.begin(PendingCall(proxy, "first", False, ("own",), 0), None)  # encoded here
    call, _, _ = session.started[-1]
    assert list(call.args) == [codec.encode("own", "x")] and not call.one_way

    error = proxy.gone_error("fire", StreamBroken("reset"))
    assert isinstance(error, CallbackGone)
    assert str(error) == (
        "test.Twice #4.fire(): the callback instance ended while the call was in flight (reset)"
    )
    with pytest.raises(CallbackGone) as caught:
        proxy.begin(PendingCall(proxy, "first", False, (), 0), None)
    assert str(caught.value) == (
        "test.Twice #4.first(): the callback instance ended (the stream ended: reset)"
    )


def test_a_call_on_the_loop_fails_with_callback_gone_when_its_stream_breaks() -> None:
    session = FakeSession()
    table = _provider_table(session)
    proxy = _loose_proxy(table, 6)
    twice = find_interface_spec(Twice)
    assert twice is not None
    typed = ReverseProxy(table, 4, "test.Twice", twice)
    typed.fire("x")  # on the loop: sent at once
    call, _, options = session.started[-1]
    assert call.one_way and options["label"] == "test.Twice #4.fire()"
    proxy.anything("x")
    call, _, options = session.started[-1]
    assert not call.one_way
    broken = options["broken"](StreamBroken("reset"))
    assert isinstance(broken, CallbackGone)
    assert str(broken) == (
        "callback #6.anything(): the callback instance ended while the call was in flight (reset)"
    )
    other = ValueError("x")
    assert options["broken"](other) is other
    session.loop.close()


class FakePools:
    """The provider's pools: records whose big results are decoded, in a real pool."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.waiters: list[object] = []

    def for_waiter(self, session: object) -> concurrent.futures.Executor:
        self.waiters.append(session)
        return self.pool


def test_a_proxy_decodes_the_listeners_result_and_a_big_one_in_the_providers_pool() -> None:
    session = FakeSession()
    pools = FakePools()
    table = ProviderCallbacks(session, 7.5, pools)  # type: ignore[arg-type]
    proxy = _loose_proxy(table, 6)
    proxy.anything()
    decode = session.started[-1][2]["decode"]
    assert decode(pb.Result(value=codec.encode("small", "x"))) == "small"
    with pytest.raises(DecodeError) as caught:
        decode(pb.Result(value=pb.Value()))
    assert str(caught.value).startswith("the result of callback #6.anything(): empty Value")

    big = list(range(2000))
    broken_big = codec.encode(big, "x")
    broken_big.list_value.items[1500].Clear()

    async def decode_bulk(value: pb.Value) -> Any:
        deferred = decode(pb.Result(value=value))
        assert isinstance(deferred, Deferred)  # not decoded on the loop
        return await deferred.future

    try:
        assert session.loop.run_until_complete(decode_bulk(codec.encode(big, "x"))) == big
        assert pools.waiters == [session]
        with pytest.raises(DecodeError) as caught:
            session.loop.run_until_complete(decode_bulk(broken_big))
        assert str(caught.value).startswith("the result of callback #6.anything()")
    finally:
        pools.pool.shutdown()
        session.loop.close()


def test_a_proxy_called_from_a_thread_blocks_on_the_loop_and_names_a_broken_stream() -> None:
    session = FakeSession(in_loop=False)
    portal = LoopThread("test-proxy")
    session.loop = portal.loop
    outcomes: list[Any] = [None, StreamBroken("reset")]

    def start_call(call: pb.Call, timeout: Any, **options: Any) -> Any:
        session.started.append((call, timeout, options))
        future = session.loop.create_future()
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
        return future

    session.start_call = start_call  # type: ignore[method-assign]
    table = _provider_table(session)
    twice = find_interface_spec(Twice)
    assert twice is not None
    proxy = ReverseProxy(table, 4, "test.Twice", twice)
    try:
        assert proxy.fire("x") is None
        call, _, _ = session.started[-1]
        assert call.one_way and call.method == "fire"
        with pytest.raises(CallbackGone) as caught:
            proxy.first()
        assert str(caught.value) == (
            "test.Twice #4.first(): the callback instance ended while the call was in flight "
            "(reset)"
        )
        assert not proxy.alive
    finally:
        portal.close()

    closed = FakeSession(in_loop=False)
    closed.loop.close()
    proxy = _loose_proxy(_provider_table(closed), 6)
    with pytest.raises(CallbackGone) as caught:
        proxy.anything()
    assert (
        str(caught.value)
        == "callback #6.anything(): the callback instance ended (the stream ended)"
    )


def test_a_proxy_names_the_argument_it_cannot_send() -> None:
    session = FakeSession()
    proxy = _loose_proxy(_provider_table(session), 6)
    with pytest.raises(EncodeError) as caught:
        proxy.anything(1, object())
    assert str(caught.value).startswith(
        "argument 1 of callback #6.anything(): cannot send an object of type builtins.object"
    )
    session.loop.close()


class FakeConsumerPools:
    """The consumer's pools: records which call asked for a thread, on which stream."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.asked: list[tuple[pb.Call, object]] = []

    def executor_for(self, call: pb.Call, session: object) -> concurrent.futures.Executor:
        self.asked.append((call, session))
        return self.pool


class _Plain:
    """A listener of no declared interface."""

    def __init__(self, result: object = "ok") -> None:
        self.result = result

    def changed(self, msg: str) -> object:
        return self.result


def _export(table: ConsumerCallbacks, *listeners: object, limit: int | None = None) -> Any:
    method = _pair("loose", Argument(index=0, callback=True), Argument(index=1, callback=True))
    fresh, _ = table.encode_args(method, PAIR, listeners, None, limit, pb.Call().args)
    return fresh


def test_the_consumer_table_counts_live_instances_against_the_limit() -> None:
    table = ConsumerCallbacks(FakeSession(), FakeConsumerPools())  # type: ignore[arg-type]
    (a,) = _export(table, _Plain(), limit=2)
    _export(table, _Plain(), limit=2)
    table.remove(a)  # one fewer live: one more fits, two do not
    with pytest.raises(TooManyCallbacks) as caught:
        _export(table, _Plain(), _Plain(), limit=2)
    assert str(caught.value) == str(limit_error(PAIR, 2, 1, 2))
    _export(table, _Plain(), limit=2)
    assert len(table) == 2


def test_the_consumer_table_ends_every_instance_when_the_stream_ends() -> None:
    session = FakeSession()
    table = ConsumerCallbacks(session, FakeConsumerPools())  # type: ignore[arg-type]
    listener = _Plain()
    gone = weakref.ref(listener)
    _export(table, listener, _Plain())
    table.clear()
    assert len(table) == 0 and table.find(listener) is None
    del listener
    gc.collect()
    assert gone() is None  # the table held the last reference
    assert session.connection.released == []  # the provider clears its own side


def test_the_consumer_tells_the_provider_only_when_asked_and_only_live_ones() -> None:
    session = FakeSession()
    table = ConsumerCallbacks(session, FakeConsumerPools())  # type: ignore[arg-type]
    a, b = _export(table, _Plain(), _Plain())
    table.drop([a])  # the provider released it: nothing to tell
    assert session.connection.released == [] and session.flushes == 0
    table.drop([a, b], tell_peer=True)
    assert session.connection.released == [b.id] and session.flushes == 1
    assert len(table) == 0


def test_the_consumer_runs_a_callback_call_naming_the_listener_in_errors() -> None:
    session = FakeSession()
    pools = FakeConsumerPools()
    table = ConsumerCallbacks(session, pools)  # type: ignore[arg-type]
    typed = _Plain(object())
    both = _pair("both", Argument(index=0, callback=True), Argument(index=1, callback=True))
    (typed_entry,) = table.encode_args(both, PAIR, [typed], None, None, pb.Call().args)[0]
    (loose_entry,) = _export(table, _Plain(object()))
    run_ = session.loop.run_until_complete
    try:
        with pytest.raises(CallbackGone) as caught:
            run_(table.run(pb.Call(id=1, callback_id=99, method="changed")))
        assert str(caught.value) == (
            "callback 99 is not exported on this stream (released, removed or never added)"
        )
        call = pb.Call(
            id=2, callback_id=typed_entry.id, method="changed", args=[codec.encode("m", "x")]
        )
        with pytest.raises(EncodeError) as caught:
            run_(table.run(call))
        assert str(caught.value).startswith("the result of test.Listener.changed(): cannot send")
        assert pools.asked == [(call, session)]
        call = pb.Call(id=3, callback_id=loose_entry.id, method="changed", args=[pb.Value()])
        with pytest.raises(DecodeError) as caught:
            run_(table.run(call))
        assert str(caught.value).startswith("argument 0 of callback.changed(): empty Value")
        # re-entrant (the call holding the instance waits for this one): no lock, same naming
        loose_entry.holder = 77
        session.ancestors = lambda parent_id: {77}  # type: ignore[method-assign]
        call = pb.Call(
            id=4, callback_id=loose_entry.id, method="changed", args=[codec.encode("m", "x")]
        )
        with pytest.raises(EncodeError) as caught:
            run_(table.run(call))
        assert str(caught.value).startswith("the result of callback.changed(): cannot send")
        assert pools.asked[-1] == (call, session)
    finally:
        pools.pool.shutdown()
        session.loop.close()


def test_a_cancelled_call_holds_its_instance_until_its_thread_ends() -> None:
    """docs/callbacks.md: calls to one instance run one at a time; a call cancelled while
    its plain listener still runs in a thread holds the instance until that thread ends."""
    session = FakeSession()
    pools = FakeConsumerPools()
    table = ConsumerCallbacks(session, pools)  # type: ignore[arg-type]
    gate, first_started, second_started = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    class Slow:
        def changed(self, msg: str) -> None:
            if msg == "first":
                first_started.set()
                gate.wait(5)
            else:
                seen.append(gate.is_set())
                second_started.set()

    (entry,) = _export(table, Slow())

    def call(call_id: int, msg: str) -> pb.Call:
        return pb.Call(
            id=call_id, callback_id=entry.id, method="changed", args=[codec.encode(msg, "x")]
        )

    async def scenario() -> None:
        first = asyncio.ensure_future(table.run(call(1, "first")))
        await asyncio.get_running_loop().run_in_executor(None, first_started.wait, 5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(table.run(call(2, "second")))
        # the second must not start while the first's thread runs (bounded negative check)
        started = await asyncio.get_running_loop().run_in_executor(None, second_started.wait, 0.3)
        assert not started
        gate.set()
        await asyncio.wait_for(second, 5)
        assert seen == [True]

    try:
        session.loop.run_until_complete(scenario())
    finally:
        gate.set()
        pools.pool.shutdown()
        session.loop.close()


@backchannel.interface("test.Maybe")
class Maybe:
    def maybe(
        self,
        a: Listener | None,
        b: Optional[Listener],  # noqa: UP045 (typing.Union, as older code writes it)
        c: int | str,
        d: Listener,
    ) -> None: ...


def test_a_callback_argument_takes_its_interface_from_the_annotation_or_the_object() -> None:
    spec = find_interface_spec(Maybe)
    assert spec is not None
    maybe = spec.methods["maybe"]
    assert [getattr(listener_interface(maybe, i), "name", None) for i in range(4)] == [
        "test.Listener",
        "test.Listener",
        None,
        "test.Listener",
    ]
    table = ConsumerCallbacks(FakeSession(), FakeConsumerPools())  # type: ignore[arg-type]
    loose = _pair("loose", Argument(index=0, callback=True), Argument(index=1, callback=True))
    into = pb.Call().args
    table.encode_args(loose, PAIR, [Twice(), _Plain()], None, None, into)
    assert [value.callback_value.interface for value in into] == ["test.Twice", ""]


def test_a_callback_call_reaches_only_the_interfaces_or_public_methods() -> None:
    table = ConsumerCallbacks(FakeSession(), FakeConsumerPools())  # type: ignore[arg-type]

    class Rich(_Plain):
        def other(self) -> None: ...

        def _private(self) -> None: ...

    both = _pair("both", Argument(index=0, callback=True), Argument(index=1, callback=True))
    (typed,), _ = table.encode_args(both, PAIR, [Rich()], None, None, pb.Call().args)
    (loose,) = _export(table, Rich())
    assert _listener_method(typed, "changed").__name__ == "changed"
    assert _listener_method(loose, "other").__name__ == "other"
    for entry, name, label in (
        (typed, "other", "test.Listener"),  # public, but not of the interface
        (loose, "_private", "Rich"),
        (loose, "", "Rich"),
        (loose, "missing", "Rich"),
    ):
        with pytest.raises(MethodNotFound) as caught:
            _listener_method(entry, name)
        assert str(caught.value) == f"callback {entry.id} ({label}) has no method {name!r}"


@pytest.mark.parametrize("ended", ["returned", "cancelled"])
def test_a_call_nested_in_a_finished_call_still_waits_its_turn(ended: str) -> None:
    """The re-entrant bypass of an instance's one-at-a-time order is only for a call whose
    chain holds the instance now: once a call to it ended (returned, or was cancelled and
    then its thread ended), a later call nested in that call's chain (say an outgoing call
    its listener left running) queues like any other."""
    session = FakeSession()
    pools = FakeConsumerPools()
    table = ConsumerCallbacks(session, pools)  # type: ignore[arg-type]
    gate, nested_started = threading.Event(), threading.Event()
    first_gate, first_started = threading.Event(), threading.Event()
    overlapped: list[bool] = []

    class Slow:
        def changed(self, msg: str) -> None:
            if msg == "done" and ended == "cancelled":
                first_started.set()
                first_gate.wait(5)
            elif msg == "nested":
                nested_started.set()
                gate.wait(5)
            elif msg == "other":
                overlapped.append(not gate.is_set())

    (entry,) = _export(table, Slow())
    # the chain of outgoing call 100: incoming calls 5 (ended below) and 1 (say, running)
    session.ancestors = lambda parent_id: {1, 5} if parent_id == 100 else set()  # type: ignore[method-assign]

    def call(call_id: int, msg: str, parent: int = 0) -> pb.Call:
        args = [codec.encode(msg, "x")]
        return pb.Call(
            id=call_id, callback_id=entry.id, method="changed", args=args, parent_id=parent
        )

    async def scenario() -> None:
        first = asyncio.ensure_future(table.run(call(5, "done")))
        if ended == "cancelled":  # cancelled while its thread runs, which then ends
            await asyncio.get_running_loop().run_in_executor(None, first_started.wait, 5)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            first_gate.set()
        else:
            await first
        # its thread ends just after: then the instance is free (taken and given back here)
        await asyncio.wait_for(entry.lock.acquire(), 5)
        entry.lock.release()
        nested = asyncio.ensure_future(table.run(call(6, "nested", parent=100)))
        await asyncio.get_running_loop().run_in_executor(None, nested_started.wait, 5)
        other = asyncio.ensure_future(table.run(call(7, "other")))
        # "other" must wait for "nested" (bounded negative check), then run after it
        done, _ = await asyncio.wait([other], timeout=0.3)
        assert not done
        gate.set()
        await asyncio.wait_for(asyncio.gather(nested, other), 5)
        assert overlapped == [False]

    try:
        session.loop.run_until_complete(scenario())
    finally:
        gate.set()
        first_gate.set()
        pools.pool.shutdown()
        session.loop.close()


def test_declared_callback_arguments_must_match_the_providers_in_words() -> None:
    both = _pair("both", Argument(index=1, callback=True))
    drop = _pair("drop", Argument(index=0, callback=False))
    assert declared_arguments(both, None) == (frozenset({1}), frozenset())
    with pytest.raises(InvalidArguments) as caught:
        declared_arguments(both, pb.MethodInfo())
    assert str(caught.value) == (
        "test.Pair.both(): this side declares argument 1 a callback, but the provider "
        "declares no callback arguments"
    )
    with pytest.raises(InvalidArguments) as caught:
        declared_arguments(both, pb.MethodInfo(callback_arguments=[0]))
    assert str(caught.value) == (
        "test.Pair.both(): this side declares argument 1 a callback, but the provider "
        "declares [0] callback arguments"
    )
    with pytest.raises(InvalidArguments) as caught:
        declared_arguments(drop, pb.MethodInfo())
    assert str(caught.value) == (
        "test.Pair.drop(): this side declares argument 0 a remover, but the provider "
        "declares no remover arguments"
    )
    with pytest.raises(InvalidArguments) as caught:
        declared_arguments(drop, pb.MethodInfo(remover_arguments=[1]))
    assert str(caught.value) == (
        "test.Pair.drop(): this side declares argument 0 a remover, but the provider "
        "declares [1] remover arguments"
    )


def test_the_consumer_numbers_instances_from_one_and_checks_each_argument() -> None:
    table = ConsumerCallbacks(FakeSession(), FakeConsumerPools())  # type: ignore[arg-type]
    loose = _pair("loose", Argument(index=0, callback=True))
    into = pb.Call().args
    table.encode_args(loose, PAIR, [_Plain(), "b"], None, None, into)
    table.encode_args(loose, PAIR, [_Plain()], None, None, into)
    assert [value.callback_value.id for value in into if value.HasField("callback_value")] == [
        1,
        2,
    ]
    with pytest.raises(InvalidArguments) as caught:  # an encodable value is no listener
        table.encode_args(loose, PAIR, ["x"], None, None, pb.Call().args)
    assert str(caught.value) == (
        "argument 0 'a' of test.Pair.loose() is declared a callback; "
        "pass a listener object, not str"
    )
    with pytest.raises(EncodeError) as caught:  # past the declared parameters: no name
        table.encode_args(loose, PAIR, [None, 1, object()], None, None, pb.Call().args)
    assert str(caught.value).startswith("argument 2 of test.Pair.loose(): cannot send")
    with pytest.raises(EncodeError) as caught:
        table.encode_args(loose, PAIR, [None, _Plain()], None, None, pb.Call().args)
    assert str(caught.value).startswith("argument 1 'b' of test.Pair.loose(): cannot send")
    assert "Argument(index=1, callback=True)" in str(caught.value)
    drop = _pair("drop", Argument(index=0, callback=False))
    with pytest.raises(UnknownCallback) as caught:  # even one the codec could send
        table.encode_args(drop, PAIR, ["x"], None, None, pb.Call().args)
    assert str(caught.value) == (
        "argument 0 'a' of test.Pair.drop(): this object was never added as a callback on "
        "this stream (or was already removed), so there is nothing to remove"
    )


def test_when_the_stream_ends_every_proxy_says_so() -> None:
    table = _provider_table()
    proxy = _take(table, [5])[0]
    table.clear("the stream ended: reset")
    assert not proxy.alive and len(table) == 0
    with pytest.raises(CallbackGone) as caught:
        proxy.changed("x")
    assert str(caught.value) == (
        "test.Listener #5.changed(): the callback instance ended (the stream ended: reset)"
    )
