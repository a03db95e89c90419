"""Which registry an address names: :func:`open_registry`, the one place that knows every
kind (a static list, ZooKeeper)."""

from __future__ import annotations

from typing import Any

from backchannel.cluster.registry import (
    STATIC_SCHEME,
    ZOOKEEPER_SCHEME,
    Registry,
    StaticRegistry,
)
from backchannel.cluster.zookeeper import ZookeeperRegistry


def open_registry(address: str, **options: Any) -> Registry:
    """The registry an address names: ``zookeeper://host:port[,host:port]`` or a static
    list (``static://h1:p1,h2:p2``, or just ``h1:p1,h2:p2``)."""
    if address.startswith(ZOOKEEPER_SCHEME):
        return ZookeeperRegistry(address, **options)
    if "://" in address and not address.startswith(STATIC_SCHEME):
        scheme = address.partition("://")[0]
        raise ValueError(f"unknown registry {scheme}:// in {address!r} (zookeeper://, static://)")
    return StaticRegistry(address)
