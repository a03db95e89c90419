"""A provider with callback arguments, and listeners for both consumer flavours."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import backchannel
from backchannel import Argument, Method


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

    def addListener(self, key: str, listener: Any) -> None:
        self.listeners[key] = listener
        self.added.append(listener)
        if self.greet:
            listener.changed("init")  # during the forward call that carried it, as in the seed

    def removeListener(self, key: str, listener: Any) -> None:
        if self.listeners.get(key) is listener:
            del self.listeners[key]

    def push(self, key: str, count: int) -> None:
        listener = self.listeners[key]

        def pusher() -> None:
            for i in range(count):
                listener.changed(f"push {i}")

        thread = threading.Thread(target=pusher)  # a provider thread of its own
        thread.start()
        thread.join(10)

    async def burst(self, key: str, count: int) -> None:
        listener = self.listeners[key]
        await asyncio.gather(*(listener.changed(f"burst {i}") for i in range(count)))

    def poke(self, key: str, msg: str) -> Any:
        try:
            return self.listeners[key].changed(msg)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    async def apoke(self, key: str, msg: str) -> Any:
        return await self.listeners[key].changed(msg)

    def ping(self, value: Any) -> Any:
        return value


class SyncRecorder:
    """A plain listener: records messages; 'raise' raises; 'reenter' calls the provider."""

    def __init__(self, notifier: Any = None, jitter: bool = False) -> None:
        self.received: list[str] = []
        self.notifier = notifier
        self.jitter = jitter
        self.got = threading.Condition()

    def changed(self, msg: str) -> Any:
        if self.jitter:
            threading.Event().wait(random.random() / 2000)
        with self.got:
            self.received.append(msg)
            self.got.notify_all()
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
        if msg == "raise":
            raise ValueError("listener refused")
        if msg == "reenter":
            return await self.notifier.ping("pong")
        if msg == "chain":
            return await self.notifier.poke("k", "inner")
        return f"ok {msg}"
