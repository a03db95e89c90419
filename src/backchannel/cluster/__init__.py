"""The cluster layer: many providers behind one reference.

Owns service URLs in Dubbo's format and the registries that hold them (static, ZooKeeper),
the consumer's directory of providers per reference, load balancing, the cluster modes
(failover, failfast and failsafe share one loop in ``invoke``; forking and broadcast have
a module each), and the link to each provider address with its backoff between
connection attempts.

May import: :mod:`backchannel.rpc`, :mod:`backchannel.transport`, :mod:`backchannel.wire`
and below; never grpc (a link opens its stream through the transport seam).
"""
