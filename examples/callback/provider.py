"""The seed's CallbackServiceImpl: python examples/callback/provider.py [HOST:PORT] [--interval S].

Pushes a change notification to every listener every ``--interval`` seconds (5, as in
the seed) from a background thread, and drops listeners whose consumer is gone.
"""

from __future__ import annotations

import argparse
import threading
import time

from service import CallbackListener, CallbackService

import backchannel
from backchannel import Argument, Method


class CallbackServiceImpl:
    """Keeps listeners by key and notifies them from a daemon thread."""

    def __init__(self, interval: float = 5.0) -> None:
        self.listeners: dict[str, CallbackListener] = {}
        self._interval = interval
        threading.Thread(target=self._push_forever, daemon=True).start()

    def _push_forever(self) -> None:
        while True:
            for key, listener in list(self.listeners.items()):
                try:
                    listener.changed(self.get_changed(key))
                except Exception:  # the consumer is gone (CallbackGone) or failed
                    self.listeners.pop(key, None)
            time.sleep(self._interval)  # timed trigger change notification, as in the seed

    def addListener(self, key: str, listener: CallbackListener) -> None:
        self.listeners[key] = listener
        listener.changed(self.get_changed(key))  # send change notification

    def removeListener(self, key: str, listener: CallbackListener) -> None:
        if self.listeners.get(key) is listener:
            del self.listeners[key]

    def get_changed(self, key: str) -> str:
        return "Changed: " + time.strftime("%Y-%m-%d %H:%M:%S")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:0")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between pushes")
    parser.add_argument(
        "--callback-timeout", type=float, default=1.0, help="seconds a listener may take"
    )
    options = parser.parse_args()
    server = backchannel.Server(
        options.address,
        application="callback-provider",
        callback_timeout=options.callback_timeout,
    )
    # <dubbo:service ... callbacks="1000"> with <dubbo:argument index="1" callback="true"/>
    server.export(
        CallbackService,
        CallbackServiceImpl(options.interval),
        callbacks=1000,
        methods=[
            Method("addListener", arguments=[Argument(index=1, callback=True)]),
            Method("removeListener", arguments=[Argument(index=1, callback=False)]),
        ],
    )
    server.start()
    print(f"listening on {server.address}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1)


if __name__ == "__main__":
    main()
