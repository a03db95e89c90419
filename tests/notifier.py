"""A provider with callback arguments, listeners for both consumer flavours, and a
consumer of either flavour behind one blocking API."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from typing import Any

from helpers import CheckedThread

import backchannel
from backchannel import Argument, Method
from backchannel.transport.portal import LoopThread


@backchannel.interface("test.Listener")
class Listener:
    """What consumers implement."""

    def changed(self, msg: str) -> Any: ...


@backchannel.interface("test.Notifier")
class Notifier:
    """The provider's service; listeners by key, as the seed's CallbackService."""

    def addListener(self, key: str, listener: Listener) -> None: ...
    def removeListener(self, key: str, listener: Listener) -> None: ...
    def push(self, key: str, count: int) -> None: ...
    def burst(self, key: str, count: int) -> None: ...
    def poke(self, key: str, msg: str) -> Any: ...
    def apoke(self, key: str, msg: str) -> Any: ...
    def ping(self, value: Any) -> Any: ...


NOTIFIER_METHODS = [
    Method("addListener", arguments=[Argument(index=1, callback=True)]),
    Method("removeListener", arguments=[Argument(index=1, callback=False)]),
]


class NotifierImpl:
    """Sync and async methods; reverse proxies used from threads and from the loop."""

    def __init__(self, greet: bool = True) -> None:
        self.listeners: dict[str, Any] = {}
        self.added: list[Any] = []
        self.greet = greet
        #: what happened, in order, for tests that compare provider and listener steps
        self.trace: list[str] = []
        #: removeListener of a key starting "slow" waits for this
        self.gate = threading.Event()

    def addListener(self, key: str, listener: Any) -> None:
        self.listeners[key] = listener
        self.added.append(listener)
        if self.greet:
            listener.changed("init")  # during the forward call that carried it, as in the seed
        fail_after_adding(key)

    def removeListener(self, key: str, listener: Any) -> None:
        if key.startswith("slow"):
            self.gate.wait(5)
        if self.listeners.get(key) is listener:
            del self.listeners[key]

    def push(self, key: str, count: int) -> None:
        listener = self.listeners[key]

        def pusher() -> None:
            for i in range(count):
                listener.changed(f"push {i}")

        thread = CheckedThread(pusher)  # a provider thread of its own
        thread.start()
        thread.check(10)  # a failed push fails push(), and so the test that called it

    async def burst(self, key: str, count: int) -> None:
        listener = self.listeners[key]
        await asyncio.gather(*(listener.changed(f"burst {i}") for i in range(count)))

    def poke(self, key: str, msg: str) -> Any:
        try:
            result = self.listeners[key].changed(msg)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        self.trace.append(f"provider got {result!r}")
        return result

    async def apoke(self, key: str, msg: str) -> Any:
        return await self.listeners[key].changed(msg)

    def ping(self, value: Any) -> Any:
        return value


def fail_after_adding(key: str) -> None:
    """addListener("fail:<Error>", ...) raises that library error after taking the listener."""
    if key.startswith("fail:"):
        error: type[Exception] = getattr(backchannel, key.removeprefix("fail:"))
        raise error(f"addListener failed after adding the listener ({key})")


class AsyncNotifierImpl(NotifierImpl):
    """The same provider with every method ``async def``, for an AsyncServer."""

    async def addListener(self, key: str, listener: Any) -> None:  # type: ignore[override]
        self.listeners[key] = listener
        self.added.append(listener)
        if self.greet:
            await listener.changed("init")
        fail_after_adding(key)

    async def removeListener(self, key: str, listener: Any) -> None:  # type: ignore[override]
        if key.startswith("slow"):
            await asyncio.to_thread(self.gate.wait, 5)
        if self.listeners.get(key) is listener:
            del self.listeners[key]

    async def push(self, key: str, count: int) -> None:  # type: ignore[override]
        listener = self.listeners[key]

        async def pusher() -> None:  # a provider task of its own
            for i in range(count):
                await listener.changed(f"push {i}")

        await asyncio.wait_for(asyncio.create_task(pusher()), 10)

    async def poke(self, key: str, msg: str) -> Any:  # type: ignore[override]
        try:
            result = await self.listeners[key].changed(msg)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        self.trace.append(f"provider got {result!r}")
        return result

    async def ping(self, value: Any) -> Any:  # type: ignore[override]
        return value


class SyncRecorder:
    """A plain listener: records messages; 'raise' raises; 'reenter' calls the provider;
    'block' waits for ``gate``; 'none' returns None a moment later, noting it in ``trace``."""

    def __init__(self, notifier: Any = None, jitter: bool = False) -> None:
        self.received: list[str] = []
        self.notifier = notifier
        self.jitter = jitter
        self.got = threading.Condition()
        self.gate = threading.Event()
        self.trace: list[str] = []

    def changed(self, msg: str) -> Any:
        if self.jitter:
            threading.Event().wait(random.random() / 2000)
        with self.got:
            self.received.append(msg)
            self.got.notify_all()
        if msg == "block":
            self.gate.wait(5)
        if msg == "none":
            threading.Event().wait(0.05)  # a stall, so a provider that did not wait shows
            self.trace.append("listener ran")
            return None
        if msg == "raise":
            raise ValueError("listener refused")
        if msg == "reenter":
            return self.notifier.ping("pong")
        if msg == "chain":
            return self.notifier.poke("k", "inner")
        return f"ok {msg}"

    def wait_for(self, count: int, timeout: float = 5) -> bool:
        with self.got:
            return self.got.wait_for(lambda: len(self.received) >= count, timeout)


class AsyncRecorder(SyncRecorder):
    """The same listener with an ``async def`` method, for AsyncClient consumers."""

    async def changed(self, msg: str) -> Any:  # type: ignore[override]
        if self.jitter:
            await asyncio.sleep(random.random() / 2000)
        with self.got:
            self.received.append(msg)
            self.got.notify_all()
        if msg == "block":
            await asyncio.to_thread(self.gate.wait, 5)
        if msg == "none":
            await asyncio.sleep(0.05)  # a stall, so a provider that did not wait shows
            self.trace.append("listener ran")
            return None
        if msg == "raise":
            raise ValueError("listener refused")
        if msg == "reenter":
            return await self.notifier.ping("pong")
        if msg == "chain":
            return await self.notifier.poke("k", "inner")
        return f"ok {msg}"


class Consumer:
    """One consumer, sync or asyncio, behind one blocking API for the test bodies."""

    def __init__(self, mode: str, address: str, **options: Any) -> None:
        self.mode = mode
        self._portal: LoopThread | None = None
        self._threads = concurrent.futures.ThreadPoolExecutor(4)
        if mode == "sync":
            self.client: Any = backchannel.Client(address, **options)
        else:
            self._portal = LoopThread("test-consumer")
            self.client = self._portal.run(_make_async_client(address, options))

    def reference(self, interface: type, **options: Any) -> Any:
        return self.client.reference(interface, **options)

    def do(self, call: Any) -> Any:
        """Finish a call made through a reference: a value (sync) or a coroutine (async)."""
        return self._portal.run(call) if self._portal else call

    def background(self, make_call: Any) -> concurrent.futures.Future[Any]:
        """Start a call without waiting: ``make_call()`` makes it (in a thread, when sync)."""
        if self._portal:
            return self._portal.submit(make_call())
        return self._threads.submit(make_call)

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
            if not self._portal.loop.is_closed():
                self._portal.run(self.client.close())
            self._portal.close()
        else:
            self.client.close()
        self._threads.shutdown(wait=False)


async def _make_async_client(address: str, options: dict[str, Any]) -> backchannel.AsyncClient:
    return backchannel.AsyncClient(address, **options)
