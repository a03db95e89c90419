"""Parameter callbacks end to end, each scenario with a sync Client and an AsyncClient."""

from __future__ import annotations

import concurrent.futures
import gc
import subprocess
import sys
import time
import weakref
from asyncio import gather
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RawStream, run
from notifier import NOTIFIER_METHODS, AsyncRecorder, Notifier, NotifierImpl, SyncRecorder

import backchannel
from backchannel.portal import LoopThread
from backchannel.v1 import envelope_pb2 as pb


class Consumer:
    """One consumer, sync or asyncio, behind one blocking API for the test bodies."""

    def __init__(self, mode: str, address: str) -> None:
        self.mode = mode
        self._portal: LoopThread | None = None
        if mode == "sync":
            self.client: Any = backchannel.Client(address)
        else:
            self._portal = LoopThread("test-consumer")
            self.client = backchannel.AsyncClient(address)

    def reference(self, interface: type, **options: Any) -> Any:
        return self.client.reference(interface, **options)

    def do(self, call: Any) -> Any:
        """Finish a call made through a reference: a value (sync) or a coroutine (async)."""
        return self._portal.run(call) if self._portal else call

    def listener(self, notifier: Any = None, jitter: bool = False) -> SyncRecorder:
        recorder = SyncRecorder if self.mode == "sync" else AsyncRecorder
        return recorder(notifier, jitter)

    def release(self, listener: object) -> None:
        self.do(self.client.release(listener))

    @property
    def callback_count(self) -> int:
        return int(self.client.callback_count)

    def close(self) -> None:
        if self._portal:
            self._portal.run(self.client.close())
            self._portal.close()
        else:
            self.client.close()


def provider_tables(server: backchannel.Server) -> list[int]:
    """How many reverse proxies each open stream of the provider holds."""
    return [len(s.dispatcher.callbacks) for s in server._core._sessions]  # type: ignore[attr-defined]


@pytest.fixture
def impl() -> NotifierImpl:
    return NotifierImpl()


@pytest.fixture
def provider(impl: NotifierImpl) -> Iterator[backchannel.Server]:
    with backchannel.Server(max_workers=64) as server:
        server.export(Notifier, impl, methods=NOTIFIER_METHODS)
        server.export(
            Notifier, NotifierImpl(), group="small", callbacks=2, methods=NOTIFIER_METHODS
        )
        yield server


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


def test_consumer_killed_every_proxy_gone_within_two_seconds(
    provider: backchannel.Server, impl: NotifierImpl
) -> None:
    script = Path(__file__).with_name("consumer_process.py")
    process = subprocess.Popen(
        [sys.executable, str(script), provider.address, "3"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=script.parent,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
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
    finally:
        process.kill()
        process.wait(5)


def test_ten_thousand_add_remove_cycles_leave_nothing_behind(
    consumer: Consumer, provider: backchannel.Server
) -> None:
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
        for round_ in range(100):
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
    quiet.added.clear()
    gc.collect()
    assert sum(ref() is not None for ref in alive) == 0  # the consumer let go of every one
