"""The rpc layer: what a call means, on top of a stream.

Owns service interfaces and their method declarations, a provider's exports and running
one incoming call against them, parameter callbacks (the consumer's table of exported
listeners, the provider's reverse proxies), event notify (``oninvoke``, ``onreturn``,
``onthrow``) and :func:`~backchannel.gather`.

May import: :mod:`backchannel.transport`, :mod:`backchannel.wire` and below; never grpc.
"""
