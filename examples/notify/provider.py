"""The seed's provider of IDemoService: python examples/notify/provider.py [HOST:PORT].

Exports NormalDemoService as ``version="1.0.0" group="cn"`` and prints
``listening on ADDRESS`` (give ``127.0.0.1:0`` for a free port).
"""

from __future__ import annotations

import sys

from notify_service import IDemoService, NormalDemoService

import backchannel


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0"
    server = backchannel.Server(address, application="rpc-callback-demo")
    # <dubbo:service interface="...IDemoService" ref="demoService" version="1.0.0" group="cn"/>
    server.export(IDemoService, NormalDemoService(), group="cn", version="1.0.0")
    server.start()
    print(f"listening on {server.address}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1)


if __name__ == "__main__":
    main()
