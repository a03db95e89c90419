"""The standard health service's state, whatever transport serves it: each service's
serving status, the watchers waiting for a change, and going away (every status
NOT_SERVING for good). grpc-free: ``grpc_health``'s messages are plain protobuf."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc_health.v1 import health_pb2

#: the statuses (HealthCheckResponse.ServingStatus)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthState:
    """Serving statuses by service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {"": SERVING}
        self._changed: asyncio.Event | None = None  # set (and replaced) on each change
        self._going_away = False

    def set(self, service: str, status: int) -> None:
        """Set a service's status (ignored once going away)."""
        if not self._going_away:
            self._set(service, status)

    def _set(self, service: str, status: int) -> None:
        self._statuses[service] = status
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def going_away(self) -> None:
        """Every status NOT_SERVING, for good: the server stops soon."""
        self._going_away = True
        for service in list(self._statuses):
            self._set(service, NOT_SERVING)

    def check(self, service: str) -> int | None:
        """A service's status; None for a service never set."""
        return self._statuses.get(service)

    def statuses(self) -> dict[str, int]:
        """Every service's status."""
        return dict(self._statuses)

    async def watch(self, service: str) -> AsyncIterator[int]:
        """The service's status now, then each time it changes (SERVICE_UNKNOWN for a
        service never set), until the caller stops."""
        last: int | None = None
        while True:
            status = self._statuses.get(service, SERVICE_UNKNOWN)
            if status != last:
                yield status
                last = status
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
