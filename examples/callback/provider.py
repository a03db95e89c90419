"""The seed's CallbackServiceImpl: python examples/callback/provider.py [HOST:PORT] [--interval S].

Pushes a change notification to every listener every ``--interval`` seconds (5, as in
the seed) from a background thread, and drops listeners whose consumer is gone.
"""

from __future__ import annotations

import argparse

from callback_service import CallbackService, CallbackServiceImpl

import backchannel
from backchannel import Argument, Method


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
