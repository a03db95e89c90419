"""Declarative configuration in TOML, one to one with Dubbo's Spring XML.

::

    [application]
    name = "callback-provider"
    startup = "pusher:start"           # optional: run by `backchannel serve` once it listens

    [registry]                         # <dubbo:registry address="zookeeper://...">
    address = "zookeeper://127.0.0.1:2181"

    [protocol]                         # <dubbo:protocol port="50051">: where providers listen
    host = "127.0.0.1"
    port = 50051
    authenticator = "auth:authenticate"  # optional, as Server(authenticator=...); so are
    authenticate_health = false          # reflection, health, authenticate_reflection
    transport = "grpcio"                 # or "grpclib" (the fast extra), for Client() too

    [[service]]                        # <dubbo:service interface=... ref=... callbacks="1000">
    interface = "service:CallbackService"
    ref = "provider:CallbackServiceImpl"
    callbacks = 1000
    [[service.method]]                 # <dubbo:method name="addListener">
    name = "addListener"
    [[service.method.argument]]        # <dubbo:argument index="1" callback="true"/>
    index = 1
    callback = true

    [[reference]]                      # <dubbo:reference id=... interface=...>
    id = "demoService"
    interface = "service:IDemoService"
    group = "cn"
    version = "1.0.0"
    [[reference.method]]               # <dubbo:method name="get" async="true" onreturn=...>
    name = "get"
    async = true
    onreturn = "notify_impl:demo_callback.onreturn"

Import paths (``module:attr`` or ``module:attr.method``) are resolved from the config
file only, never from the wire, with the file's own folder first on the import path.
Every mistake is reported with the file, the key and what was expected, before anything
starts.
"""

from __future__ import annotations

import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from backchannel.client import Client
from backchannel.cluster.reference import Reference
from backchannel.cluster.registry import STATIC_SCHEME, ZOOKEEPER_SCHEME
from backchannel.config_keys import ConfigError as ConfigError
from backchannel.config_keys import KeyReader, StartupHook, describe_error
from backchannel.rpc.exports import DEFAULT_CALLBACK_LIMIT
from backchannel.rpc.interface import (
    Argument,
    Method,
    apply_settings,
    interface_spec,
)
from backchannel.server import AsyncServer, Server
from backchannel.transport.auth import Authenticator
from backchannel.transport.default import NAMES as TRANSPORTS

#: a Server or an AsyncServer: Config builds either the same way
_S = TypeVar("_S", Server, AsyncServer)
#: the [protocol] keys that are Server's boolean keywords of the same names
_PROTOCOL_FLAGS = ("reflection", "health", "authenticate_reflection", "authenticate_health")
#: the [protocol] keys saying what the registry is given instead of the bound address
_ADVERTISE = ("advertise_host", "advertise_port")


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[[service]]``: the arguments of :meth:`Server.export`."""

    interface: type
    impl: object
    group: str | None = None
    version: str | None = None
    callbacks: int = DEFAULT_CALLBACK_LIMIT
    methods: tuple[Method, ...] = ()


@dataclass(frozen=True)
class ReferenceConfig:
    """One ``[[reference]]``: the arguments of :meth:`Client.reference`."""

    id: str
    interface: type
    group: str | None = None
    version: str | None = None
    timeout: float | None = None
    methods: tuple[Method, ...] = ()
    cluster: str = "failover"
    loadbalance: str = "random"
    forks: int = 2
    #: the consumer's own limit of live listener instances per stream (None: none)
    callbacks: int | None = None


@dataclass(frozen=True)
class ProtocolConfig:
    """The provider's ``[protocol]`` settings beyond its address: the keywords of
    :class:`Server` of the same names, with the same defaults."""

    authenticator: Authenticator | None = None
    reflection: bool = True
    health: bool = True
    authenticate_reflection: bool = True
    authenticate_health: bool = False
    #: the transport's name (None: ``$BACKCHANNEL_TRANSPORT``, else grpcio); the
    #: ``Client`` of :meth:`Config.client` runs on it too
    transport: str | None = None
    #: the host and port written into the registry instead of the bound ones (NAT,
    #: containers)
    advertise_host: str | None = None
    advertise_port: int | None = None

    def keywords(self) -> dict[str, Any]:
        """The settings as :class:`Server` keywords (the authenticator as given, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Config:
    """A loaded configuration: what the code API would be given."""

    path: Path
    application: str = ""
    #: where providers listen ([protocol] host and port); without a registry, also
    #: where references connect
    address: str = "127.0.0.1:0"
    services: tuple[ServiceConfig, ...] = ()
    references: tuple[ReferenceConfig, ...] = field(default=())
    #: [registry] address when it names a registry (zookeeper://, static://, a list)
    registry: str | None = None
    #: [protocol] authenticator, reflection, health, authenticate_reflection and
    #: authenticate_health: the Server keywords of the same names
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    #: [application] startup: what ``backchannel serve`` calls with the running server
    startup: StartupHook | None = None
    #: the hook's import path as written, for messages
    startup_spec: str = ""

    def server(self) -> Server:
        """A :class:`Server` on the protocol address with every service exported,
        registered in the registry when there is one."""
        return self._server(Server)

    def async_server(self) -> AsyncServer:
        """The same as :meth:`server`, as an :class:`AsyncServer` (to start on a loop)."""
        return self._server(AsyncServer)

    def _server(self, kind: type[_S]) -> _S:
        server = kind(
            self.address,
            application=self.application,
            registry=self.registry,
            **self.protocol.keywords(),
        )
        for service in self.services:
            server.export(
                service.interface,
                service.impl,
                group=service.group,
                version=service.version,
                callbacks=service.callbacks,
                methods=service.methods,
            )
        return server

    def start_servers(self) -> list[Server]:
        """Start the providers this file names (none when it has no services)."""
        if not self.services:
            return []
        server = self.server()
        server.start()
        return [server]

    def client(self) -> Client:
        """A :class:`Client` of the registry (or, without one, of the protocol address)."""
        return Client(
            self.registry or self.address,
            application=self.application,
            transport=self.protocol.transport,
        )

    def reference(self, client: Any, id: str) -> Any:
        """The proxy of reference ``id`` made on ``client`` (a Client or an AsyncClient)."""
        for ref in self.references:
            if ref.id == id:
                return client.reference(
                    ref.interface,
                    group=ref.group,
                    version=ref.version,
                    timeout=ref.timeout,
                    methods=ref.methods,
                    cluster=ref.cluster,
                    loadbalance=ref.loadbalance,
                    forks=ref.forks,
                    callbacks=ref.callbacks,
                )
        known = ", ".join(ref.id for ref in self.references) or "none"
        raise KeyError(f"{self.path}: no reference with id {id!r} (references: {known})")


def load_config(path: str | Path) -> Config:
    """Read and check a TOML configuration; resolve its import paths."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    reader = _Reader(path)
    return reader.config(data)


class _Reader(KeyReader):
    """Walks the parsed TOML table by table ([application], [registry], [protocol],
    [[service]], [[reference]] and their methods), naming each key it checks."""

    def config(self, data: dict[str, Any]) -> Config:
        self.table(
            data, "(top level)", {"application", "registry", "protocol", "service", "reference"}
        )
        application = self.table(data.get("application", {}), "application", {"name", "startup"})
        startup = self.string(application, "startup", "application")
        registry, address = self.addresses(data)
        protocol = self.protocol(data.get("protocol", {}))
        services = tuple(
            self.service(item, f"service[{i}]")
            for i, item in enumerate(self.tables(data, "service", ""))
        )
        references = tuple(
            self.reference(item, f"reference[{i}]")
            for i, item in enumerate(self.tables(data, "reference", ""))
        )
        keys = [(s.interface, s.group or "", s.version or "") for s in services]
        for index, service_key in enumerate(keys):
            if keys.index(service_key) != index:
                raise self.fail(
                    f"service[{index}]",
                    "an interface, group and version no other service has "
                    f"(service[{keys.index(service_key)}] has the same)",
                )
        ids = [ref.id for ref in references]
        for index, ref_id in enumerate(ids):
            if ids.index(ref_id) != index:
                raise self.fail(f"reference[{index}].id", "an id no other reference has", ref_id)
        return Config(
            self.path,
            self.string(application, "name", "application") or "",
            address,
            services,
            references,
            registry,
            protocol,
            startup=None if startup is None else self.hook(startup, "application.startup"),
            startup_spec=startup or "",
        )

    def protocol(self, data: dict[str, Any]) -> ProtocolConfig:
        """The ``[protocol]`` keys that are Server settings (checked by :meth:`addresses`)."""
        path = self.string(data, "authenticator", "protocol")
        authenticator = None
        if path is not None:
            authenticator = self.resolve(path, "protocol.authenticator")
            if not callable(authenticator):
                raise self.fail(
                    "protocol.authenticator", "a callable taking the metadata (a dict)", path
                )
        flags: dict[str, bool] = {}
        for name in _PROTOCOL_FLAGS:
            value = self.boolean(data, name, "protocol")
            if value is not None:
                flags[name] = value
        transport = self.string(data, "transport", "protocol")
        if transport is not None and transport not in TRANSPORTS:
            raise self.fail(
                "protocol.transport", " or ".join(repr(name) for name in TRANSPORTS), transport
            )
        advertise_port = self.number(data, "advertise_port", "protocol", integer=True)
        if advertise_port is not None and not 1 <= advertise_port <= 65535:
            raise self.fail("protocol.advertise_port", "a port from 1 to 65535", advertise_port)
        return ProtocolConfig(
            authenticator,
            transport=transport,
            advertise_host=self.string(data, "advertise_host", "protocol"),
            advertise_port=advertise_port,
            **flags,
        )

    def addresses(self, data: dict[str, Any]) -> tuple[str | None, str]:
        """([registry] address if it names a registry, the [protocol] listen address).

        ``[registry] address = "host:port"`` is the old form, from before registries: it
        still means the listen address (and where references connect), with a warning."""
        registry = self.table(data.get("registry", {}), "registry", {"address"})
        protocol = self.table(
            data.get("protocol", {}),
            "protocol",
            {"host", "port", "authenticator", "transport", *_PROTOCOL_FLAGS, *_ADVERTISE},
        )
        given = self.string(registry, "address", "registry")
        host = self.string(protocol, "host", "protocol") or "127.0.0.1"
        port = self.number(protocol, "port", "protocol", integer=True)
        if port is not None and port > 65535:
            raise self.fail("protocol.port", "a port from 0 to 65535", port)
        address = f"{host}:{port or 0}"
        if given is None:
            return None, address
        if given.startswith((ZOOKEEPER_SCHEME, STATIC_SCHEME)) or "," in given:
            return given, address
        host, _, old_port = given.rpartition(":")
        if not host or not old_port.isdigit() or not 0 <= int(old_port) <= 65535:
            raise self.fail(
                "registry.address",
                "'host:port' with a port from 0 to 65535",
                given,
            )
        if "host" in protocol or "port" in protocol:
            raise self.fail(
                "registry.address",
                "a registry ('zookeeper://host:port') when [protocol] gives the listen address",
                given,
            )
        # a DeprecationWarning (not a log line): shown by -W default and by pytest, and
        # kept out of the output of `backchannel serve` with old files
        warnings.warn(
            f"{self.path}: [registry] address = {given!r} as a listen address is "
            f'deprecated: write [protocol] host = "{host}" and port = {old_port}, and keep '
            "[registry] for a registry (zookeeper://...)",
            DeprecationWarning,
            stacklevel=4,
        )
        return None, given

    def service(self, data: dict[str, Any], key: str) -> ServiceConfig:
        allowed = {"interface", "ref", "group", "version", "callbacks", "connections", "method"}
        self.table(data, key, allowed)
        interface = self.interface(data, key)
        impl = self.resolve(self.string(data, "ref", key, required=True), f"{key}.ref")
        if isinstance(impl, type):
            try:
                impl = impl()
            except TypeError as exc:
                raise self.fail(f"{key}.ref", f"a class that takes no arguments ({exc})") from None
            except Exception as exc:  # its __init__ failed
                raise self.fail(
                    f"{key}.ref", f"a class that can be made ({describe_error(exc)})"
                ) from None
        spec = interface_spec(interface)
        missing = [name for name in spec.methods if not callable(getattr(impl, name, None))]
        if missing:
            raise self.fail(
                f"{key}.ref",
                f"an implementation of {spec.name} ({type(impl).__name__} lacks "
                f"{', '.join(m + '()' for m in missing)})",
            )
        connections = self.number(data, "connections", key, integer=True)
        if connections not in (None, 1):
            raise self.fail(
                f"{key}.connections", "1 (backchannel uses one stream per consumer)", connections
            )
        callbacks = self.number(data, "callbacks", key, integer=True)
        methods = tuple(
            self.method(item, f"{key}.method[{i}]", provider=True)
            for i, item in enumerate(self.tables(data, "method", f"{key}."))
        )
        self.check(key, lambda: apply_settings(interface_spec(interface), methods))
        return ServiceConfig(
            interface,
            impl,
            self.string(data, "group", key),
            self.string(data, "version", key),
            DEFAULT_CALLBACK_LIMIT if callbacks is None else callbacks,
            methods,
        )

    def reference(self, data: dict[str, Any], key: str) -> ReferenceConfig:
        allowed = {"id", "interface", "group", "version", "timeout", "method"}
        allowed |= {"cluster", "loadbalance", "forks", "callbacks"}
        self.table(data, key, allowed)
        timeout = self.number(data, "timeout", key)
        cluster = self.string(data, "cluster", key) or "failover"
        loadbalance = self.string(data, "loadbalance", key) or "random"
        forks = self.number(data, "forks", key, integer=True) or 2
        callbacks = self.limit(data, key)
        methods = tuple(
            self.method(item, f"{key}.method[{i}]", provider=False)
            for i, item in enumerate(self.tables(data, "method", f"{key}."))
        )
        reference = ReferenceConfig(
            self.string(data, "id", key, required=True),
            self.interface(data, key),
            self.string(data, "group", key),
            self.string(data, "version", key),
            timeout,
            methods,
            cluster,
            loadbalance,
            forks,
            callbacks,
        )
        self.check(
            key,
            lambda: Reference(
                reference.interface,
                None,
                None,
                timeout,
                methods,
                cluster=cluster,
                loadbalance=loadbalance,
                forks=forks,
                callbacks=callbacks,
            ),
        )
        return reference

    def check(self, key: str, build: Callable[[], object]) -> None:
        """Run the code API's own checks now, so a mistake names the file and key."""
        try:
            build()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.path}: {key}.method: {exc}") from None

    def method(self, data: dict[str, Any], key: str, provider: bool) -> Method:
        allowed = {"name", "one_way", "argument"}
        if provider:
            if "timeout" in data:
                raise self.fail(
                    f"{key}.timeout",
                    "no timeout on a provider's method (a timeout is the consumer's: "
                    "give it in [[reference]] or [[reference.method]])",
                )
        else:
            allowed |= {"timeout", "async", "oninvoke", "onreturn", "onthrow", "retries"}
            allowed |= {"resubscribe", "cluster", "callbacks"}
        self.table(data, key, allowed)
        hooks: dict[str, Callable[..., Any]] = {}
        for hook in ("oninvoke", "onreturn", "onthrow"):
            path = self.string(data, hook, key)
            if path is not None:
                target = self.resolve(path, f"{key}.{hook}")
                if not callable(target):
                    raise self.fail(f"{key}.{hook}", "a callable", path)
                hooks[hook] = target
        arguments = tuple(
            self.argument(item, f"{key}.argument[{i}]")
            for i, item in enumerate(self.tables(data, "argument", f"{key}."))
        )
        timeout = self.number(data, "timeout", key)
        return Method(
            self.string(data, "name", key, required=True),
            timeout=timeout,
            arguments=arguments,
            one_way=self.boolean(data, "one_way", key),
            async_=bool(self.boolean(data, "async", key)),
            oninvoke=hooks.get("oninvoke"),
            onreturn=hooks.get("onreturn"),
            onthrow=hooks.get("onthrow"),
            retries=self.number(data, "retries", key, integer=True) or 0,
            resubscribe=bool(self.boolean(data, "resubscribe", key)),
            cluster=None if provider else self.string(data, "cluster", key),
            callbacks=self.limit(data, key),
        )

    def argument(self, data: dict[str, Any], key: str) -> Argument:
        self.table(data, key, {"index", "type", "callback"})
        index = self.number(data, "index", key, integer=True)
        type_path = self.string(data, "type", key)
        if (index is None) == (type_path is None):
            raise self.fail(key, "exactly one of index or type")
        kind = None if type_path is None else self.resolve(type_path, f"{key}.type")
        if kind is not None and not isinstance(kind, type):
            raise self.fail(f"{key}.type", "a class", type_path)
        callback = self.boolean(data, "callback", key)
        return Argument(index=index, type=kind, callback=True if callback is None else callback)
