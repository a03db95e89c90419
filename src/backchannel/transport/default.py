"""The transport every client and server runs on: grpcio, the only one today.

The layers above name no transport; they take this one (a second would be chosen here).
"""

from __future__ import annotations

from backchannel.transport.grpcio import TRANSPORT
from backchannel.transport.seam import Transport

#: the transport of every client and server
DEFAULT: Transport = TRANSPORT
