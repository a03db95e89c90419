"""A consumer in a process of its own for test_gather's kill test: adds N plain listeners
to test.Broadcaster under the keys far0, far1, ..., says ready, and waits to be killed.

``python gather_consumer_process.py ADDRESS COUNT``
"""

import sys
import threading

from notifier import Listener, SyncRecorder

import backchannel


@backchannel.interface("test.Broadcaster")
class Broadcaster:
    """The part of test_gather's Broadcaster this consumer calls."""

    def addListener(self, key: str, listener: Listener) -> None: ...


if __name__ == "__main__":
    address, count = sys.argv[1], int(sys.argv[2])
    client = backchannel.Client(address)
    broadcaster = client.reference(Broadcaster)
    listeners = [SyncRecorder() for _ in range(count)]
    for i, listener in enumerate(listeners):
        broadcaster.addListener(f"far{i}", listener)
    print("ready", flush=True)
    threading.Event().wait()  # until killed
