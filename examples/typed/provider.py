"""The typed example's provider: python examples/typed/provider.py [HOST:PORT] [--asyncio].

Serves ``PriceFeed`` with a plain ``Server`` and plain methods (``ThreadedPriceFeed``, which
calls its listeners with ``gather_each`` from the server's threads), or with ``--asyncio``
an ``AsyncServer`` and ``async def`` methods (``AsyncPriceFeed``, ``await gather(...)``).
Prints ``listening on HOST:PORT`` and serves until stdin closes or Ctrl-C. Both pass
``mypy --strict`` and ``basedpyright`` (docs/typing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from typing import TYPE_CHECKING, TypeVar

from prices import PriceFeed, PriceListener

import backchannel

if TYPE_CHECKING:  # a name the generated stub (prices.pyi) declares, for type checkers
    from prices import PriceListenerAsync


class ThreadedPriceFeed:
    """Plain methods (they run in the server's thread pool); listeners are sync proxies."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[PriceListener]] = {}
        self.lock = threading.Lock()

    def subscribe(self, symbol: str, listener: PriceListener) -> int:
        with self.lock:
            self.listeners.setdefault(symbol, []).append(listener)
            count = len(self.listeners[symbol])
        listener.price(symbol, 0.0)  # a first quote; from this thread, the call blocks
        return count

    def publish(self, symbol: str, value: float) -> int:
        """Call every listener of ``symbol`` at once; forget those that failed."""
        with self.lock:
            listeners = list(self.listeners.get(symbol, ()))
        # gather(l.price(...) for l in ...) would use the value of a call typed None, which
        # mypy refuses ([func-returns-value]): gather_each takes the methods and arguments
        outcomes = backchannel.gather_each(
            (listener.price for listener in listeners), symbol, value
        )
        return _keep(self.listeners, self.lock, symbol, listeners, outcomes)

    def symbols(self) -> list[str]:
        with self.lock:
            return sorted(self.listeners)


class AsyncPriceFeed:
    """``async def`` methods on the server's loop; listeners are proxies typed with the
    interface's async twin, whose calls are awaited."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[PriceListenerAsync]] = {}
        self.lock = threading.Lock()  # for _keep, which the sync feed shares

    async def subscribe(self, symbol: str, listener: PriceListenerAsync) -> int:
        self.listeners.setdefault(symbol, []).append(listener)
        await listener.price(symbol, 0.0)  # a first quote, awaited like any proxy call
        return len(self.listeners[symbol])

    async def publish(self, symbol: str, value: float) -> int:
        listeners = list(self.listeners.get(symbol, ()))
        outcomes = await backchannel.gather(listener.price(symbol, value) for listener in listeners)
        return _keep(self.listeners, self.lock, symbol, listeners, outcomes)

    async def symbols(self) -> list[str]:
        return sorted(self.listeners)


L = TypeVar("L")


def _keep(
    table: dict[str, list[L]],
    lock: threading.Lock,
    symbol: str,
    listeners: list[L],
    outcomes: list[BaseException | None],
) -> int:
    """Forget the listeners whose call failed (their consumer went away); how many got it."""
    failed = [listener for listener, o in zip(listeners, outcomes, strict=True) if o is not None]
    with lock:
        table[symbol] = [listener for listener in table.get(symbol, []) if listener not in failed]
    return len(listeners) - len(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:0")
    parser.add_argument("--asyncio", action="store_true", help="AsyncServer, async def methods")
    options = parser.parse_args()
    if options.asyncio:
        asyncio.run(serve_async(options.address))
        return
    server = backchannel.Server(options.address)
    server.export(PriceFeed, ThreadedPriceFeed())
    with server:
        print(f"listening on {server.address}", flush=True)
        sys.stdin.read()  # until the parent closes stdin


async def serve_async(address: str) -> None:
    server = backchannel.AsyncServer(address)
    server.export(PriceFeed, AsyncPriceFeed())
    async with server:
        print(f"listening on {server.address}", flush=True)
        await asyncio.to_thread(sys.stdin.read)


if __name__ == "__main__":
    main()
