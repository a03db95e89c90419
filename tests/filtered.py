"""A service, listeners and a rig for the filter and attachment tests: one provider and one
consumer, both sync (Server, Client, ``def`` methods and listeners) or both asyncio
(AsyncServer, AsyncClient, ``async def`` ones), driven through one blocking API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import backchannel
from backchannel import Argument, Method
from backchannel.transport.portal import LoopThread


@backchannel.interface("test.Watcher")
class Watcher:
    """What consumers implement."""

    def seen(self, text: str) -> Any: ...


@backchannel.interface("test.Filtered")
class Filtered:
    """The provider's service."""

    def say(self, text: str) -> Any: ...
    def fail(self, text: str) -> Any: ...
    def subscribe(self, listener: Watcher, text: str) -> Any: ...
    def notify_all(self, text: str) -> Any: ...
    def forward(self, address: str, text: str) -> Any: ...


FILTERED_METHODS = [Method("subscribe", arguments=[Argument(index=0, callback=True)])]


def _tenant() -> str:
    return backchannel.attachments().get("tenant", "-")


class SyncImpl:
    """``def`` methods: they run in pool threads."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def say(self, text: str) -> Any:
        return f"{text}|{_tenant()}"

    def fail(self, text: str) -> Any:
        raise ValueError(text)

    def subscribe(self, listener: Any, text: str) -> Any:
        self.listeners.append(listener)
        return listener.seen(text)

    def notify_all(self, text: str) -> Any:
        return backchannel.gather(listener.seen(text) for listener in self.listeners)

    def forward(self, address: str, text: str) -> Any:
        with backchannel.Client(address) as client:
            return client.reference(Filtered).say(text)


class AsyncImpl:
    """``async def`` methods: they run on the loop."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    async def say(self, text: str) -> Any:
        return f"{text}|{_tenant()}"

    async def fail(self, text: str) -> Any:
        raise ValueError(text)

    async def subscribe(self, listener: Any, text: str) -> Any:
        self.listeners.append(listener)
        return await listener.seen(text)

    async def notify_all(self, text: str) -> Any:
        return await backchannel.gather(listener.seen(text) for listener in self.listeners)

    async def forward(self, address: str, text: str) -> Any:
        async with backchannel.AsyncClient(address) as client:
            return await client.reference(Filtered).say(text)  # type: ignore[misc]


class SyncWatcher:
    def __init__(self, name: str = "w") -> None:
        self.name = name

    def seen(self, text: str) -> Any:
        return f"{self.name}:{text}|{_tenant()}"


class AsyncWatcher:
    def __init__(self, name: str = "w") -> None:
        self.name = name

    async def seen(self, text: str) -> Any:
        return f"{self.name}:{text}|{_tenant()}"


class SyncRelay:
    """A listener that calls the provider back through its own client's reference."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def seen(self, text: str) -> Any:
        return self.ref.say(text)


class AsyncRelay:
    def __init__(self, ref: Any) -> None:
        self.ref = ref

    async def seen(self, text: str) -> Any:
        return await self.ref.say(text)


class Rig:
    """A provider and a consumer of one flavour; ``call`` makes a call from the test
    thread (sync) or from a coroutine on the consumer's loop (asyncio), inside
    ``backchannel.attach(**attach)`` when given."""

    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.impl: Any = SyncImpl() if flavour == "sync" else AsyncImpl()
        self.address = ""
        self._loop: LoopThread | None = None
        self._client: Any = None
        self._ref: Any = None

    def watcher(self, name: str = "w") -> Any:
        return SyncWatcher(name) if self.flavour == "sync" else AsyncWatcher(name)

    def relay(self) -> Any:
        """A listener whose method calls ``say`` through this rig's consumer."""
        return SyncRelay(self._ref) if self.flavour == "sync" else AsyncRelay(self._ref)

    def call(
        self, method: str, *args: Any, attach: Mapping[str, str] | None = None, ref: Any = None
    ) -> Any:
        target = ref if ref is not None else self._ref
        if self._loop is None:
            with backchannel.attach(attach or {}):
                return getattr(target, method)(*args)

        async def body() -> Any:
            with backchannel.attach(attach or {}):
                return await getattr(target, method)(*args)

        return self._loop.run(body())

    def reference(self, **options: Any) -> Any:
        return self._client.reference(Filtered, methods=FILTERED_METHODS, **options)


@contextmanager
def rig(
    flavour: str,
    server: Mapping[str, Any] | None = None,
    client: Mapping[str, Any] | None = None,
    export: Mapping[str, Any] | None = None,
) -> Iterator[Rig]:
    """A started provider exporting Filtered, and a consumer with a reference to it."""
    made = Rig(flavour)
    if flavour == "sync":
        with backchannel.Server("127.0.0.1:0", **(server or {})) as provider:
            provider.export(Filtered, made.impl, methods=FILTERED_METHODS, **(export or {}))
            made.address = provider.address
            with backchannel.Client(provider.address, **(client or {})) as consumer:
                made._client = consumer
                made._ref = made.reference()
                yield made
        return
    loop = LoopThread("test-rig")
    try:

        async def start() -> tuple[backchannel.AsyncServer, backchannel.AsyncClient]:
            provider = backchannel.AsyncServer("127.0.0.1:0", **(server or {}))
            provider.export(Filtered, made.impl, methods=FILTERED_METHODS, **(export or {}))
            await provider.start()
            return provider, backchannel.AsyncClient(provider.address, **(client or {}))

        provider, consumer = loop.run(start())
        made.address = provider.address
        made._loop = loop
        made._client = consumer
        made._ref = made.reference()
        try:
            yield made
        finally:

            async def stop() -> None:
                await consumer.close()
                await provider.stop()

            loop.run(asyncio.wait_for(stop(), 10))
    finally:
        loop.close()
