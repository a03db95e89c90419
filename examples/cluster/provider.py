"""The seed's CallbackService as one provider of a cluster behind ZooKeeper.

    python examples/cluster/provider.py zookeeper://127.0.0.1:2181 [--interval S]

Start three of them (each on a free port); every notification names the provider that
sent it. Each registers its export in ZooKeeper on start, in Dubbo's layout, and
withdraws it on Ctrl-C before finishing its calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "callback"))

from callback_service import CallbackService, CallbackServiceImpl

import backchannel
from backchannel import Argument, Method


class NamedCallbackServiceImpl(CallbackServiceImpl):
    """The seed's implementation; its notifications say which provider sent them."""

    address = ""

    def get_changed(self, key: str) -> str:
        return f"Changed: {time.strftime('%Y-%m-%d %H:%M:%S')} from {self.address}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("registry", help="zookeeper://host:port")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between pushes")
    options = parser.parse_args()
    server = backchannel.Server(
        options.listen, application="callback-provider", registry=options.registry
    )
    impl = NamedCallbackServiceImpl(options.interval)
    server.export(
        CallbackService,
        impl,
        callbacks=1000,
        methods=[
            Method("addListener", arguments=[Argument(index=1, callback=True)]),
            Method("removeListener", arguments=[Argument(index=1, callback=False)]),
        ],
    )
    server.start()
    impl.address = server.advertised_address
    print(f"registered {server.advertised_address} in {options.registry}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1)


if __name__ == "__main__":
    main()
