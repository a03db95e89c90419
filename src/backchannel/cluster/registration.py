"""A provider's exports in a registry: one provider URL per export, registered when the
server starts and as exports are made while it runs, withdrawn when it stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from backchannel.cluster.registries import open_registry
from backchannel.cluster.registry import Registry
from backchannel.cluster.service_url import DEFAULT_WEIGHT, ServiceURL, reachable_host
from backchannel.rpc.exports import Exports
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")


class Registration:
    """The registry side of one provider: its URLs, and the registry they are in.

    ``serving()`` says whether an export made now is registered at once (the server
    listens and is not stopping); :attr:`port` is the bound port, set on start. The URLs
    carry ``advertise_host`` and ``advertise_port`` when given (behind NAT or in a
    container the address consumers reach differs from the bound one), else the bound
    host (a reachable one for a wildcard) and port.
    """

    def __init__(
        self,
        spec: str | Registry | None,
        exports: Exports,
        serving: Callable[[], bool],
        *,
        application: str,
        bound_host: str,
        advertise_host: str | None,
        advertise_port: int | None = None,
    ) -> None:
        check_port(advertise_port)
        # a str is opened on start() and closed on stop(); a Registry object is the
        # caller's: only what this server registered is withdrawn from it
        self.spec = spec
        #: the registry (opened on the first registration when given as a str)
        self.registry: Registry | None = None
        self._exports = exports
        self._serving = serving
        self._application = application
        self._bound_host = bound_host
        self._advertise_host = advertise_host
        self._advertise_port = advertise_port
        self.port = 0
        self._weights: dict[tuple[str, str, str], int] = {}
        #: the URLs registered, in order
        self.registered: list[ServiceURL] = []
        # held while URLs are registered or withdrawn (in a thread), so an export made
        # while running is registered once, and before stop() withdraws everything
        self._lock = asyncio.Lock()
        #: registrations of exports made on the loop while running (kept from the GC)
        self.registering: set[asyncio.Task[None]] = set()

    def add(self, key: tuple[str, str, str], service: pb.ServiceInfo, weight: int) -> None:
        """Keep the weight of a new export; with a registry, refuse now (ValueError) what
        its URL could not carry (host and port do not matter)."""
        self._weights[key] = weight
        if self.spec is None:
            return
        try:
            self._provider_url(service, "127.0.0.1", 1)
        except ValueError:
            del self._weights[key]
            raise

    def register_new(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register an export made while the server runs on ``loop``: in a task when
        called there, else before returning (a failure raised)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(self._register_running())
            self.registering.add(task)
            task.add_done_callback(self._registered_in_task)
        else:  # another thread: wait for it, and let a failure be raised
            asyncio.run_coroutine_threadsafe(self._register_running(), loop).result()

    async def register_all(self) -> None:
        """Register every export (the server starts)."""
        async with self._lock:
            await asyncio.to_thread(self._register, self._exports.services())

    async def withdraw(self) -> None:
        """Withdraw every URL registered (the server stops), after the registrations
        under way (the lock is fair): they are withdrawn too."""
        async with self._lock:
            if self.registry is not None:
                # first: consumers stop choosing this provider while its calls finish
                try:
                    await asyncio.to_thread(self._unregister)
                except Exception as exc:  # the session's end removes the nodes all the same
                    logger.warning("could not unregister from the registry: %s", wire_text(exc))

    @property
    def advertised_address(self) -> str:
        """``host:port`` written into the registry."""
        host, port = self._advertised_host(), self._advertised_port()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def provider_urls(self) -> list[ServiceURL]:
        """One provider URL per export, as they are registered."""
        host, port = self._advertised_host(), self._advertised_port()
        return [self._provider_url(service, host, port) for service in self._exports.services()]

    def _advertised_host(self) -> str:
        return reachable_host(self._bound_host, self._advertise_host)

    def _advertised_port(self) -> int:
        return self._advertise_port or self.port

    def _provider_url(self, service: pb.ServiceInfo, host: str, port: int) -> ServiceURL:
        return ServiceURL.provider(
            service.name,
            host,
            port,
            application=self._application,
            group=service.group,
            version=service.version,
            methods=[method.name for method in service.methods],
            callbacks=service.callbacks,
            weight=self._weights.get(
                (service.name, service.group, service.version), DEFAULT_WEIGHT
            ),
        )

    def _register(self, services: Sequence[pb.ServiceInfo]) -> None:
        # in a thread, holding the registry lock: ZooKeeper's round trips block. Every
        # export not registered yet is (all of them on start; a new one while running),
        # from ``services``, taken on the loop: export() may add to them meanwhile
        registry = self.registry
        if registry is None:
            spec = self.spec
            registry = open_registry(spec) if isinstance(spec, str) else spec
            assert registry is not None
            self.registry = registry
        done = {(url.interface, url.group, url.version) for url in self.registered}
        host, port = self._advertised_host(), self._advertised_port()
        for service in services:
            url = self._provider_url(service, host, port)
            if (url.interface, url.group, url.version) in done:
                continue
            registry.register(url)
            self.registered.append(url)
            logger.info("registered %s", url)

    async def _register_running(self) -> None:
        """Register the exports made since start, unless the server is stopping."""
        async with self._lock:
            if self._serving() and self.registry is not None:
                # the exports are read here, on the loop, where export() adds to them
                await asyncio.to_thread(self._register, self._exports.services())

    def _registered_in_task(self, task: asyncio.Task[None]) -> None:
        self.registering.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "could not register an export made while running: %s",
                wire_text(task.exception()),
            )

    def _unregister(self) -> None:
        registry, self.registry = self.registry, None
        urls, self.registered = self.registered, []
        if registry is None:
            return
        try:
            for url in urls:
                registry.unregister(url)
        finally:
            if isinstance(self.spec, str):  # ours: its session ends too
                registry.close()


def check_port(port: object) -> None:
    """``advertise_port`` is None or an int from 1 to 65535; else a clear ValueError."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ValueError(
            f"advertise_port must be an int (the port written into the registry), got {port!r}"
        )
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"advertise_port must be a port from 1 to 65535, got {port}")
