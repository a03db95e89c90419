"""The wire layer: the envelope protocol without I/O.

Owns the Connect stream's state machine (:mod:`~backchannel.wire.protocol`), Python values
and exceptions to and from the envelope's ``Value`` and ``Error`` (:mod:`~backchannel.wire.codec`),
frames read and written from serialized parts (:mod:`~backchannel.wire.frames`), and text made
safe to log and to send (:mod:`~backchannel.wire.text`).

May import: the generated :mod:`backchannel.v1`, :mod:`backchannel.errors` and
:mod:`backchannel.settings`. Never asyncio, never grpc (``tests/test_layout.py`` checks at
run time), never a layer above: any language's implementation of the envelope could be
written from this layer alone.
"""
