"""A provider in a process of its own, for tests that kill it: exports Echo, prints its address."""

import threading

from services import Echo, EchoImpl

import backchannel

if __name__ == "__main__":
    server = backchannel.Server("127.0.0.1:0")
    server.export(Echo, EchoImpl())
    server.start()
    print(server.address, flush=True)
    threading.Event().wait()  # until killed
