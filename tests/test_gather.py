"""backchannel.gather: many reverse proxy calls at once, from provider threads (``def``
methods) and from the provider's loop (``async def`` methods), over real loopback streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run
from helpers import CheckedThread, consumer_process
from notifier import Consumer, Listener

import backchannel
from backchannel import Argument
from backchannel.wire import codec

# end to end: the module runs once per transport (conftest.py)
pytestmark = pytest.mark.usefixtures("transport")


@backchannel.interface("test.Broadcaster")
class Broadcaster:
    """A provider that notifies every listener it holds at once."""

    @backchannel.method(arguments=[Argument(index=1)])
    def addListener(self, key: str, listener: Listener) -> None: ...
    def notify(self, msg: str) -> list[str]: ...
    def anotify(self, msg: str) -> list[str]: ...
    def interleave(self, rounds: int) -> None: ...


def describe(outcome: object) -> str:
    return (
        f"{type(outcome).__name__}: {outcome}" if isinstance(outcome, Exception) else str(outcome)
    )


class BroadcasterImpl:
    """The seed's provider with gather: notify everyone, drop the listener that raised."""

    def __init__(self) -> None:
        self.listeners: dict[str, Any] = {}

    def addListener(self, key: str, listener: Any) -> None:
        self.listeners[key] = listener

    def _drop_raisers(self, keys: list[str], outcomes: list[Any]) -> list[str]:
        for key, outcome in zip(keys, outcomes, strict=True):
            if isinstance(outcome, Exception):
                del self.listeners[key]
        return [describe(outcome) for outcome in outcomes]

    def notify(self, msg: str) -> list[str]:  # a def method: in the provider's pool thread
        keys = list(self.listeners)
        outcomes = backchannel.gather(self.listeners[key].changed(msg) for key in keys)
        return self._drop_raisers(keys, outcomes)

    async def anotify(self, msg: str) -> list[str]:  # on the provider's loop
        keys = list(self.listeners)
        outcomes = await backchannel.gather(self.listeners[key].changed(msg) for key in keys)
        return self._drop_raisers(keys, outcomes)

    async def interleave(self, rounds: int) -> None:
        """Plain proxy calls and gathers to the same listeners, mixed; awaited at the end."""
        proxies = list(self.listeners.values())
        pending: list[Any] = []
        for n in range(rounds):
            pending += [proxy.changed(f"plain {n}") for proxy in proxies]
            pending.append(backchannel.gather(proxy.changed(f"gather {n}") for proxy in proxies))
        await asyncio.gather(*pending)


@pytest.fixture
def impl() -> BroadcasterImpl:
    return BroadcasterImpl()


@pytest.fixture
def provider(impl: BroadcasterImpl) -> Iterator[backchannel.Server]:
    server = backchannel.Server(callback_timeout=5.0)
    server.export(Broadcaster, impl)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sync", "asyncio"])
def consumers(request: pytest.FixtureRequest, provider: backchannel.Server) -> Iterator[Any]:
    """Two consumers of one flavour: the listeners spread over two streams."""
    made = [Consumer(request.param, provider.address) for _ in range(2)]
    yield made
    for consumer in made:
        consumer.close()


def add(consumer: Consumer, key: str) -> Any:
    listener = consumer.listener()
    consumer.do(consumer.reference(Broadcaster).addListener(key, listener))
    return listener


@pytest.mark.parametrize("method", ["notify", "anotify"])
def test_each_listener_gets_its_result_or_exception_in_order_and_raisers_are_dropped(
    consumers: list[Consumer], impl: BroadcasterImpl, method: str
) -> None:
    first, second = consumers
    listeners = {key: add(consumer, key) for key, consumer in [("a", first), ("b", second)]}
    listeners |= {key: add(consumer, key) for key, consumer in [("c", first), ("d", second)]}
    first.release(listeners["c"])  # its proxy now raises CallbackGone
    broadcaster = first.reference(Broadcaster)

    outcomes = first.do(getattr(broadcaster, method)("hello"))
    assert outcomes[0] == "ok hello" and outcomes[1] == "ok hello" and outcomes[3] == "ok hello"
    assert outcomes[2].startswith("CallbackGone: ")
    assert list(impl.listeners) == ["a", "b", "d"]  # the one that raised is dropped

    outcomes = first.do(getattr(broadcaster, method)("raise"))  # every listener raises
    assert outcomes == ["ValueError: listener refused"] * 3
    assert impl.listeners == {}
    assert [listeners[key].received for key in "abd"] == [["hello", "raise"]] * 3


def test_a_consumer_killed_mid_fan_out_raises_callback_gone_others_succeed(
    provider: backchannel.Server, impl: BroadcasterImpl
) -> None:
    local = Consumer("sync", provider.address)
    with (
        contextlib.closing(local),
        consumer_process(provider.address, 3, "sync", "test.Broadcaster", "far") as process,
    ):
        near = [add(local, f"near{i}") for i in range(3)]
        far = [key for key in impl.listeners if key.startswith("far")]
        assert len(far) == 3
        outcome: list[Any] = []
        keys = list(impl.listeners)
        # "block": the far listeners wait (5 s) and never answer before the kill
        fan_out = CheckedThread(
            lambda: outcome.extend(
                backchannel.gather(impl.listeners[key].changed("block") for key in keys)
            )
        )
        fan_out.start()
        for listener in near:  # the fan-out is under way: every call was started together
            assert listener.wait_for(1)
            listener.gate.set()
        process.kill()
        fan_out.check(10)
        by_key = dict(zip(keys, outcome, strict=True))
        assert [by_key[key] for key in keys if key.startswith("near")] == ["ok block"] * 3
        for key in far:
            assert isinstance(by_key[key], backchannel.CallbackGone), by_key[key]
            assert not impl.listeners[key].alive


def test_gather_mixed_with_plain_calls_keeps_each_listeners_order(
    consumers: list[Consumer], impl: BroadcasterImpl
) -> None:
    first, second = consumers
    listeners = [add(first, "a"), add(second, "b"), add(first, "c")]
    first.do(first.reference(Broadcaster).interleave(20))
    expected = [f"{kind} {n}" for n in range(20) for kind in ("plain", "gather")]
    assert [listener.received for listener in listeners] == [expected] * 3


def test_from_a_plain_thread_it_blocks_and_shares_the_encoded_argument(
    consumers: list[Consumer], impl: BroadcasterImpl, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = consumers
    listeners = [add(consumer, f"k{i}") for i, consumer in enumerate([first, second] * 5)]
    encoded: list[object] = []
    encode_args = codec.encode_args

    def counting(args: Any, *rest: Any) -> Any:
        encoded.append(args)
        return encode_args(args, *rest)

    monkeypatch.setattr(codec, "encode_args", counting)
    shared = ["a", "shared", "argument"]
    outcomes = backchannel.gather(proxy.changed(shared) for proxy in impl.listeners.values())
    assert outcomes == [f"ok {shared}"] * 10
    assert all(listener.received == [shared] for listener in listeners)
    assert encoded == [(shared,)]  # once for the ten calls
    assert backchannel.gather(iter(())) == []


def test_a_list_of_calls_already_made_from_a_thread_is_refused(
    consumers: list[Consumer], impl: BroadcasterImpl
) -> None:
    add(consumers[0], "a")
    proxy = impl.listeners["a"]
    with pytest.raises(TypeError, match=r"item 0 is a str, not a reverse proxy call"):
        backchannel.gather([proxy.changed("x")])  # made (and blocked for) before gather ran


def test_on_another_event_loops_thread_it_is_refused(
    consumers: list[Consumer], impl: BroadcasterImpl
) -> None:
    listener = add(consumers[0], "a")
    proxy = impl.listeners["a"]

    async def on_a_foreign_loop() -> None:
        with pytest.raises(RuntimeError, match="not the provider's"):
            backchannel.gather(proxy.changed(n) for n in range(3))

    run(on_a_foreign_loop())
    assert proxy.changed("after") == "ok after"
    assert listener.received == ["after"]  # nothing of the refused calls was sent
