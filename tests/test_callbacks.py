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
from typing import Any

import pytest
from conftest import RawStream, run
from helpers import consumer_process
from notifier import (
    NOTIFIER_METHODS,
    AsyncNotifierImpl,
    Consumer,
    Notifier,
    NotifierImpl,
)

import backchannel
from backchannel import Method
from backchannel.portal import LoopThread
from backchannel.v1 import envelope_pb2 as pb


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
    """10,000 cycles (100 rounds of 100) with a sync Client on a Server and an AsyncClient
    on an AsyncServer, which covers each client and each provider at full length; the two
    crossed pairs run 1,000 cycles (10 rounds), which covers their own code paths at a
    tenth of the time (a round of 100 is the same whatever the count)."""
    rounds = 100 if (consumer.mode == "sync") == (flavour == "Server") else 10
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
