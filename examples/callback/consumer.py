"""The seed's consumer: python examples/callback/consumer.py HOST:PORT [--count N].

Adds a listener for "foo.bar" that prints every notification, waits for ``--count``
of them (forever when 0), then removes it and exits.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("--count", type=int, default=0, help="stop after N callbacks")
    options = parser.parse_args()
    with backchannel.Client(options.address, application="callback-consumer") as client:
        callback_service = client.reference(CallbackService)
        listener = PrintingListener(options.count)
        callback_service.addListener("foo.bar", listener)
        listener.enough.wait(None if options.count == 0 else 60)
        callback_service.removeListener("foo.bar", listener)
        print(f"received {listener.received} callbacks; listener removed", flush=True)


if __name__ == "__main__":
    main()
