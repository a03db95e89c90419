"""A provider process for cluster tests: registers in ZooKeeper, says who answered.

``python cluster_provider.py zookeeper://HOST:PORT GROUP`` exports ``Node`` and the
pushing ``Notifier`` (group GROUP), prints ``ready HOST:PORT`` and runs until killed.
"""

import sys
import threading

from notifier import NOTIFIER_METHODS, Notifier, NotifierImpl
from restartable_provider import push_forever

import backchannel


@backchannel.interface("test.cluster.Node")
class Node:
    """Each answer names the provider that gave it."""

    def whoami(self, value: int) -> list[object]: ...


class NodeImpl:
    def __init__(self) -> None:
        self.address = ""

    async def whoami(self, value: int) -> list[object]:
        return [self.address, value]


if __name__ == "__main__":
    registry, group = sys.argv[1], sys.argv[2]
    node, notifier = NodeImpl(), NotifierImpl()
    server = backchannel.Server("127.0.0.1:0", registry=registry)
    server.export(Node, node, group=group)
    server.export(Notifier, notifier, group=group, methods=NOTIFIER_METHODS)
    server.start()
    node.address = server.address
    threading.Thread(target=push_forever, args=(notifier, threading.Event()), daemon=True).start()
    print(f"ready {server.address}", flush=True)
    threading.Event().wait()  # until killed
