"""A provider process for restart tests: Echo and a pushing Notifier on a given address."""

import sys
import threading

from notifier import NOTIFIER_METHODS, Notifier, NotifierImpl
from services import Echo, EchoImpl

import backchannel


def push_forever(impl: NotifierImpl, stop: threading.Event) -> None:
    """Like the seed's pusher: notify every listener, drop the dead ones."""
    while not stop.wait(0.05):
        for key, listener in list(impl.listeners.items()):
            try:
                listener.changed("tick")
            except Exception:
                impl.listeners.pop(key, None)


if __name__ == "__main__":
    notifier = NotifierImpl()
    server = backchannel.Server(sys.argv[1])
    server.export(Echo, EchoImpl())
    server.export(Notifier, notifier, methods=NOTIFIER_METHODS)
    server.start()
    threading.Thread(target=push_forever, args=(notifier, threading.Event()), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()  # until killed
