"""The seed's consumer: python examples/callback/consumer.py HOST:PORT [--count N] [--asyncio].

Adds a listener for "foo.bar" that prints every notification, waits for ``--count``
of them (forever when 0), then removes it and exits. With ``--asyncio`` it does the same
with an ``AsyncClient`` and an ``async def`` listener.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

from callback_service import CallbackListener, CallbackService

import backchannel


class PrintingListener(CallbackListener):
    """Prints what the provider pushes, as the seed's anonymous CallbackListener."""

    def __init__(self, wanted: int) -> None:
        self.received = 0
        self.enough = threading.Event()
        self._wanted = wanted

    def changed(self, msg: str) -> None:
        print("callback1:" + msg, flush=True)
        self.received += 1
        if self._wanted and self.received >= self._wanted:
            self.enough.set()


class AsyncPrintingListener(CallbackListener):
    """The same listener for an AsyncClient: ``changed`` runs on the client's event loop."""

    def __init__(self, wanted: int) -> None:
        self.received = 0
        self.enough = asyncio.Event()
        self._wanted = wanted

    async def changed(self, msg: str) -> None:  # type: ignore[override]
        print("callback1:" + msg, flush=True)
        self.received += 1
        if self._wanted and self.received >= self._wanted:
            self.enough.set()


def run_sync(address: str, count: int) -> None:
    with backchannel.Client(address, application="callback-consumer") as client:
        callback_service = client.reference(CallbackService)
        listener = PrintingListener(count)
        callback_service.addListener("foo.bar", listener)
        listener.enough.wait(None if count == 0 else 60)
        callback_service.removeListener("foo.bar", listener)
        print(f"received {listener.received} callbacks; listener removed", flush=True)


async def run_asyncio(address: str, count: int) -> None:
    async with backchannel.AsyncClient(address, application="callback-consumer") as client:
        callback_service = client.reference(CallbackService)
        listener = AsyncPrintingListener(count)
        await callback_service.addListener("foo.bar", listener)
        async with asyncio.timeout(None if count == 0 else 60):
            await listener.enough.wait()
        await callback_service.removeListener("foo.bar", listener)
        print(f"received {listener.received} callbacks; listener removed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("--count", type=int, default=0, help="stop after N callbacks")
    parser.add_argument(
        "--asyncio", action="store_true", help="use an AsyncClient and an async def listener"
    )
    options = parser.parse_args()
    if options.asyncio:
        asyncio.run(run_asyncio(options.address, options.count))
    else:
        run_sync(options.address, options.count)


if __name__ == "__main__":
    main()
