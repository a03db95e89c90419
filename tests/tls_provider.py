"""A TLS provider in a process of its own, with few file descriptors: prints its address.

Arguments: the server's key and certificate (PEM files), the file-descriptor limit
(RLIMIT_NOFILE) and ``Limits.handshake_timeout`` in seconds (``default``: the default).
"""

import resource
import sys
import threading
from pathlib import Path

from helpers import server_credentials
from services import Echo, EchoImpl

import backchannel

if __name__ == "__main__":
    key, cert, nofile, timeout = sys.argv[1:5]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), hard))
    credentials = server_credentials(Path(key).read_bytes(), Path(cert).read_bytes())
    limits = (
        backchannel.Limits()
        if timeout == "default"
        else backchannel.Limits(handshake_timeout=float(timeout))
    )
    server = backchannel.Server("127.0.0.1:0", credentials=credentials, limits=limits)
    server.export(Echo, EchoImpl())
    server.start()
    print(server.address, flush=True)
    threading.Event().wait()  # until killed
