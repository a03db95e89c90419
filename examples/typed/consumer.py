"""The typed example's consumer: python examples/typed/consumer.py HOST:PORT.

Uses one interface declaration (prices.py, typed by its generated prices.pyi) through a
``Client`` and an ``AsyncClient``, with a ``def`` listener and an ``async def`` one on
each; prints what the listeners received. Passes ``mypy --strict`` and ``basedpyright``
(docs/typing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import threading

from prices import PriceFeed, PriceListener

import backchannel

_printing = threading.Lock()  # listeners run at once, on the loop and in the thread pool


def say(line: str) -> None:
    """Print one whole line, never interleaved with another listener's."""
    with _printing:
        print(line, flush=True)


class Printer(PriceListener):
    """A ``def`` listener: subclasses the interface, as with any sync implementation."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[tuple[str, float]] = []

    def price(self, symbol: str, value: float) -> None:
        self.received.append((symbol, value))
        say(f"{self.name}: {symbol} {value}")


class AsyncPrinter:
    """An ``async def`` listener: it matches the interface's async twin (prices.pyi's
    ``PriceListenerAsync``) without subclassing it; subclassing ``PriceListener`` with an
    ``async def`` method would be an incompatible override."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[tuple[str, float]] = []

    async def price(self, symbol: str, value: float) -> None:
        self.received.append((symbol, value))
        say(f"{self.name}: {symbol} {value}")


def with_client(address: str) -> int:
    """The sync API: every call blocks for its result, typed as declared."""
    with backchannel.Client(address) as client:
        feed = client.reference(PriceFeed)
        feed.subscribe("ACME", Printer("sync client, def listener"))
        feed.subscribe("ACME", AsyncPrinter("sync client, async def listener"))
        delivered: int = feed.publish("ACME", 1.5)
        symbols: list[str] = feed.symbols()
        say(f"sync client: delivered to {delivered}, symbols {symbols}")
        return delivered


async def with_async_client(address: str) -> int:
    """The asyncio API: the same declaration, every method awaited."""
    async with backchannel.AsyncClient(address) as client:
        feed = client.reference(PriceFeed)
        await feed.subscribe("ACME", AsyncPrinter("async client, async def listener"))
        await feed.subscribe("ACME", Printer("async client, def listener"))
        delivered: int = await feed.publish("ACME", 2.5)
        symbols: list[str] = await feed.symbols()
        say(f"async client: delivered to {delivered}, symbols {symbols}")
        return delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", help="the provider's HOST:PORT")
    options = parser.parse_args()
    with_client(options.address)
    asyncio.run(with_async_client(options.address))


if __name__ == "__main__":
    main()
