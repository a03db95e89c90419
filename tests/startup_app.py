"""An application for `backchannel serve` with start-up hooks (tests/test_parity.py): a
ticker that pushes to its listeners only once a hook has started its pusher."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import backchannel
from backchannel import Argument


@backchannel.interface("test.TickListener")
class TickListener:
    """What consumers implement."""

    def tick(self, msg: str) -> None: ...


@backchannel.interface("test.Ticker")
class Ticker:
    """The provider's service: subscribe, then receive ticks."""

    @backchannel.method(arguments=[Argument(index=0)])
    def subscribe(self, listener: TickListener) -> None: ...


class TickerImpl:
    """Keeps its listeners; pushes nothing by itself."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []
        self.started_by = ""

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)


#: the object the config exports (ref = "startup_app:ticker"), which the hooks push from
ticker = TickerImpl()
#: kept from the garbage collector while the server runs
_tasks: set[asyncio.Task[None]] = set()


def start(server: backchannel.Server) -> None:
    """A ``def`` hook: a pusher thread, ticking every 50 ms."""
    ticker.started_by = f"{type(server).__name__} on port {server.port}"

    def push() -> None:
        count = 0
        while True:
            for listener in list(ticker.listeners):
                try:
                    listener.tick(f"tick {count} by {ticker.started_by}")
                except Exception:  # that consumer is gone
                    ticker.listeners.remove(listener)
            count += 1
            threading.Event().wait(0.05)  # the pusher's period, not a synchronisation

    threading.Thread(target=push, daemon=True).start()


async def astart(server: backchannel.AsyncServer) -> None:
    """An ``async def`` hook: a pusher task on the server's loop."""
    ticker.started_by = f"{type(server).__name__} on port {server.port}"

    async def push() -> None:
        count = 0
        while True:
            for listener in list(ticker.listeners):
                try:
                    await listener.tick(f"tick {count} by {ticker.started_by}")
                except Exception:  # that consumer is gone
                    ticker.listeners.remove(listener)
            count += 1
            await asyncio.sleep(0.05)  # the pusher's period, not a synchronisation

    task = asyncio.get_running_loop().create_task(push())
    _tasks.add(task)


def broken(server: backchannel.Server) -> None:
    """A hook that fails, as one whose database is down."""
    raise RuntimeError("the price database is unreachable")


async def abroken(server: backchannel.AsyncServer) -> None:
    """The same, ``async def``."""
    await asyncio.sleep(0)
    raise RuntimeError("the price database is unreachable")


def two_arguments(server: Any, other: Any) -> None:
    """Not a hook: it needs two arguments."""


def returns_a_coroutine(server: Any) -> Any:
    """A ``def`` that returns a coroutine: serve cannot await it on the Server's loop."""
    return abroken(server)
