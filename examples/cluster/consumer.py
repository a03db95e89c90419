"""A consumer of the cluster that survives a provider being killed.

    python examples/cluster/consumer.py zookeeper://127.0.0.1:2181 [--count N]

Finds the providers in ZooKeeper, adds a listener with ``resubscribe=True`` (on one
provider, chosen by the default weighted random), and prints every notification. Kill
the provider named in the lines (``kill -9``): within a couple of seconds the listener
is added again on another provider, and the lines go on, naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "callback"))

from callback_service import CallbackListener, CallbackService

import backchannel
from backchannel import Argument, Method


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
    parser.add_argument("registry", help="zookeeper://host:port")
    parser.add_argument("--count", type=int, default=0, help="stop after N callbacks")
    options = parser.parse_args()
    with backchannel.Client(options.registry, application="callback-consumer") as client:
        callback_service = client.reference(
            CallbackService,
            methods=[
                # replayed on a live provider when the one holding it dies; and, as
                # adding a key's listener again replaces it (idempotent), re-sent
                # elsewhere if its provider dies during the call itself
                Method(
                    "addListener",
                    arguments=[Argument(index=1, callback=True)],
                    resubscribe=True,
                    retries=2,
                ),
            ],
        )
        listener = PrintingListener(options.count)
        callback_service.addListener("foo.bar", listener)
        with contextlib.suppress(KeyboardInterrupt):
            listener.enough.wait(None if options.count == 0 else 600)
        print(f"received {listener.received} callbacks", flush=True)


if __name__ == "__main__":
    main()
