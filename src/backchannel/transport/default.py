"""Which transport a client or server runs on: chosen by name, grpcio unless told otherwise.

The layers above name no transport library; the facades pass the user's ``transport=``
(or ``None``) to :func:`resolve`, which picks from a fixed table of the transports
backchannel ships: ``"grpcio"`` (``grpc.aio``, always installed) and ``"grpclib"``
(pure-Python HTTP/2, with the ``fast`` extra). ``None`` means the environment variable
:data:`ENVIRONMENT` when it is set (so a whole deployment, or the test suite, switches
without a code change), else :data:`DEFAULT_NAME`. A transport's package is imported
only when it is first chosen: without the extra, grpclib is never imported.
"""

from __future__ import annotations

import importlib
import os

from backchannel.transport.seam import Transport

#: the transport chosen when neither ``transport=`` nor the environment names one
DEFAULT_NAME = "grpcio"
#: the environment variable that names the transport when ``transport=`` is not given
ENVIRONMENT = "BACKCHANNEL_TRANSPORT"
#: every transport backchannel ships: its name -> what installing it takes
NAMES: dict[str, str] = {
    "grpcio": "grpcio (always installed)",
    "grpclib": "grpclib (pip install 'backchannel[fast]')",
}


def resolve(name: str | None = None) -> Transport:
    """The transport called ``name`` (None: ``$BACKCHANNEL_TRANSPORT``, else grpcio).

    ``ValueError`` names an unknown transport and the known ones; ``ImportError`` says
    which extra to install when the chosen one's library is missing.
    """
    where = "transport="
    if name is None:
        name = os.environ.get(ENVIRONMENT) or DEFAULT_NAME
        where = f"${ENVIRONMENT}" if ENVIRONMENT in os.environ else where
    if not isinstance(name, str) or name not in NAMES:
        known = ", ".join(repr(known) for known in NAMES)
        raise ValueError(f"{where} must be one of {known}, got {name!r}")
    try:
        module = importlib.import_module(f"backchannel.transport.{name}")
    except ImportError as exc:
        raise ImportError(
            f"transport {name!r} needs {NAMES[name]}: {type(exc).__name__}: {exc}"
        ) from exc
    transport: Transport = module.TRANSPORT
    return transport
