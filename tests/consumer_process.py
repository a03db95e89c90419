"""A consumer in a process of its own, for tests that kill it: adds N listeners, says ready."""

import sys
import threading

from notifier import Notifier, SyncRecorder

import backchannel

if __name__ == "__main__":
    address, count = sys.argv[1], int(sys.argv[2])
    client = backchannel.Client(address)
    notifier = client.reference(Notifier)
    listeners = [SyncRecorder() for _ in range(count)]
    for i, listener in enumerate(listeners):
        notifier.addListener(f"k{i}", listener)
    print("ready", flush=True)
    threading.Event().wait()  # until killed
