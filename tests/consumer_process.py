"""A consumer in a process of its own, for tests that kill it: adds N listeners, says ready.

``python consumer_process.py ADDRESS COUNT [sync|asyncio]``: a sync Client with plain
listeners, or an AsyncClient with ``async def`` ones.
"""

import asyncio
import sys
import threading

from notifier import AsyncRecorder, Notifier, SyncRecorder

import backchannel


def run_sync(address: str, count: int) -> None:
    client = backchannel.Client(address)
    notifier = client.reference(Notifier)
    listeners = [SyncRecorder() for _ in range(count)]
    for i, listener in enumerate(listeners):
        notifier.addListener(f"k{i}", listener)
    print("ready", flush=True)
    threading.Event().wait()  # until killed


async def run_asyncio(address: str, count: int) -> None:
    client = backchannel.AsyncClient(address)
    notifier = client.reference(Notifier)
    listeners = [AsyncRecorder() for _ in range(count)]
    for i, listener in enumerate(listeners):
        await notifier.addListener(f"k{i}", listener)
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    address, count = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "sync"
    if mode == "asyncio":
        asyncio.run(run_asyncio(address, count))
    else:
        run_sync(address, count)
