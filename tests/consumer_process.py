"""A consumer in a process of its own, for tests that kill it: adds N listeners, says ready.

``python consumer_process.py ADDRESS COUNT [sync|asyncio] [SERVICE] [PREFIX]``: a sync
Client with plain listeners, or an AsyncClient with ``async def`` ones, added with
``SERVICE.addListener(f"{PREFIX}{i}", listener)`` (default ``test.Notifier`` and ``k``).
Started by ``helpers.consumer_process``.
"""

import asyncio
import sys
import threading

from notifier import AsyncRecorder, Listener, SyncRecorder

import backchannel


def listener_service(name: str) -> type:
    """The one method of the service ``name`` this consumer calls."""

    @backchannel.interface(name)
    class AddsListeners:
        def addListener(self, key: str, listener: Listener) -> None: ...

    return AddsListeners


def run_sync(address: str, count: int, service: type, prefix: str) -> None:
    client = backchannel.Client(address)
    reference = client.reference(service)
    listeners = [SyncRecorder() for _ in range(count)]
    for i, listener in enumerate(listeners):
        reference.addListener(f"{prefix}{i}", listener)
    print("ready", flush=True)
    threading.Event().wait()  # until killed


async def run_asyncio(address: str, count: int, service: type, prefix: str) -> None:
    client = backchannel.AsyncClient(address)
    reference = client.reference(service)
    listeners = [AsyncRecorder() for _ in range(count)]
    for i, listener in enumerate(listeners):
        await reference.addListener(f"{prefix}{i}", listener)
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    address, count = sys.argv[1], int(sys.argv[2])
    mode, name, prefix = [*sys.argv[3:], "sync", "test.Notifier", "k"][:3]
    service = listener_service(name)
    if mode == "asyncio":
        asyncio.run(run_asyncio(address, count, service, prefix))
    else:
        run_sync(address, count, service, prefix)
