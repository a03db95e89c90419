"""Interfaces and implementations the end-to-end tests export."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import backchannel


class OutOfStock(Exception):
    """An application error that consumers may register."""


class Unregistered(Exception):
    """An application error nobody registers: it arrives as RemoteError."""


@backchannel.interface("test.Echo")
class Echo:
    """What the tests call."""

    def echo(self, value: Any) -> Any: ...
    def add(self, a: int, b: int) -> int: ...
    def greet(self, name: str, greeting: str = "Hello") -> str: ...
    def fail(self, kind: str, message: str) -> None: ...
    def wait(self, seconds: float) -> str: ...
    def sync_wait(self, seconds: float) -> str: ...
    def unsendable(self) -> Any: ...
    def tracked(self, seconds: float) -> int: ...
    def big(self, size: int) -> bytes: ...


class EchoImpl:
    """Sync and async methods mixed, as users write them."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.running = 0
        self.most_running = 0
        self.running_changed = threading.Condition()

    def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    async def add(self, a: int, b: int) -> int:
        return a + b

    def greet(self, name: str, greeting: str = "Hello") -> str:
        return f"{greeting}, {name}!"

    def fail(self, kind: str, message: str) -> None:
        errors: dict[str, type[Exception]] = {
            "ValueError": ValueError,
            "KeyError": KeyError,
            "ZeroDivisionError": ZeroDivisionError,
            "OutOfStock": OutOfStock,
            "Unregistered": Unregistered,
        }
        raise errors[kind](message)

    async def wait(self, seconds: float) -> str:
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "done"

    def sync_wait(self, seconds: float) -> str:
        self.started.set()
        threading.Event().wait(seconds)
        return "done"

    def unsendable(self) -> Any:
        return object()

    async def tracked(self, seconds: float) -> int:
        """Counts how many calls run at once."""
        with self.running_changed:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.running_changed.notify_all()
        try:
            await asyncio.sleep(seconds)
        finally:
            with self.running_changed:
                self.running -= 1
                self.running_changed.notify_all()
        return self.most_running

    def wait_running(self, count: int, timeout: float = 5) -> bool:
        """Block until ``count`` tracked calls run at once."""
        with self.running_changed:
            return self.running_changed.wait_for(lambda: self.running >= count, timeout)

    def wait_idle(self, timeout: float = 5) -> bool:
        """Block until no tracked call runs."""
        with self.running_changed:
            return self.running_changed.wait_for(lambda: self.running == 0, timeout)

    def big(self, size: int) -> bytes:
        return b"x" * size


@backchannel.interface("test.Echo")
class EchoWithExtra:
    """The same service name with a method the provider lacks."""

    def echo(self, value: Any) -> Any: ...
    def missing(self) -> None: ...


@backchannel.interface("test.Nobody")
class Nobody:
    """A service nobody exports."""

    def ping(self) -> None: ...


@backchannel.interface("test.Table")
class Table:
    """A listener that answers with a table (a dict)."""

    def table(self) -> dict[str, int]: ...


@backchannel.interface("test.Tables")
class Tables:
    """A provider that is given a Table listener and calls it."""

    def add(self, listener: Table) -> None: ...
    def pull(self, listener: Table) -> int: ...
    def echo(self, value: int) -> int: ...


TABLES_METHODS = [
    backchannel.Method("add", arguments=[backchannel.Argument(index=0, callback=True)]),
    backchannel.Method("pull", arguments=[backchannel.Argument(index=0, callback=True)]),
]


class TablesImpl:
    """Keeps the listener ``add`` gives it; ``pull`` calls one from its pool thread."""

    def __init__(self) -> None:
        self.listener: Any = None
        self.added = threading.Event()

    def add(self, listener: Any) -> None:
        self.listener = listener
        self.added.set()

    def pull(self, listener: Any) -> int:
        return len(listener.table())

    def echo(self, value: int) -> int:
        return value


class TableListener:
    """Answers every call with the same table of ``entries`` entries."""

    def __init__(self, entries: int) -> None:
        self.value = {f"entry-{i:07d}": i for i in range(entries)}

    def table(self) -> dict[str, int]:
        return self.value
