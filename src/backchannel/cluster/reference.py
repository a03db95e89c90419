"""Consumer-side references: the target service and per-method settings, and the proxy
object whose methods make the calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from backchannel.cluster.loadbalance import LoadBalance, load_balance
from backchannel.rpc.filters import Link
from backchannel.rpc.interface import (
    InterfaceSpec,
    Method,
    MethodSpec,
    apply_settings,
    check_callback_limit,
    interface_spec,
)
from backchannel.rpc.notify import MethodHooks, method_hooks

#: what a proxy method calls: (reference, method, positional args, keyword args)
Invoke = Callable[["Reference", MethodSpec, tuple[Any, ...], dict[str, Any]], Any]
#: builds the proxy method of a method with event-notify hooks or async_
Notify = Callable[["Reference", MethodSpec, MethodHooks], Callable[..., Any]]

#: Dubbo's cluster modes (docs/cluster.md); failover is Dubbo's default, and ours
CLUSTER_MODES = ("failover", "failfast", "failsafe", "forking", "broadcast")


class Reference:
    """What a proxy's calls need: the target export and each method's settings."""

    def __init__(
        self,
        interface: type,
        group: str | None,
        version: str | None,
        timeout: float | None,
        methods: Sequence[Method],
        *,
        cluster: str = "failover",
        loadbalance: str | LoadBalance = "random",
        forks: int = 2,
        callbacks: int | None = None,
        filters: tuple[Link, ...] = (),
    ) -> None:
        check_callback_limit(callbacks, "callbacks")
        #: the consumer's own limit of live listener instances per stream for the service
        #: (None: none; the provider's announced limit applies either way)
        self.callbacks = callbacks
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if not isinstance(forks, int) or forks < 1:
            raise ValueError(f"forks must be an int >= 1, got {forks!r}")
        #: the strategy choosing a provider for each call (one per reference)
        self.balance: LoadBalance = (
            load_balance(loadbalance) if isinstance(loadbalance, str) else loadbalance
        )
        #: how many providers a ``forking`` call is sent to at once
        self.forks = forks
        #: the client's filters then the reference's, around each call (not each attempt)
        self.filters = filters
        self.spec: InterfaceSpec = interface_spec(interface)
        self.group = group or ""
        self.version = version or ""
        #: every method with the reference's settings applied
        self.methods: dict[str, MethodSpec] = apply_settings(self.spec, methods)
        settings = {method.name: method for method in methods}
        #: seconds each method waits for its result
        self.timeouts: dict[str, float | None] = {
            name: settings[name].timeout
            if name in settings and settings[name].timeout is not None
            else timeout
            for name in self.spec.methods
        }
        for method in methods:
            if not isinstance(method.retries, int) or method.retries < 0:
                raise ValueError(f"{self.spec.name}.{method.name}: retries must be an int >= 0")
        #: how many times each idempotent method may be re-sent on a new stream
        self.retries = {method.name: method.retries for method in methods if method.retries}
        #: methods replayed with the same listener objects after a reconnect
        self.resubscribe = {method.name for method in methods if method.resubscribe}
        #: each method's cluster mode
        self.clusters: dict[str, str] = {name: cluster for name in self.spec.methods}
        for method in methods:
            if method.cluster is not None:
                self.clusters[method.name] = method.cluster
        for name, mode in {"": cluster, **self.clusters}.items():
            if mode not in CLUSTER_MODES:
                where = f"{self.spec.name}.{name}" if name else self.spec.name
                raise ValueError(
                    f"{where}: unknown cluster {mode!r} (known: {', '.join(CLUSTER_MODES)})"
                )
        #: event notify (hooks, async_) of the methods that have any, checked against them
        self.hooks: dict[str, MethodHooks] = {}
        for name, method in settings.items():
            hooks = method_hooks(self.methods[name], method)
            if hooks is not None:
                self.hooks[name] = hooks

    @property
    def key(self) -> tuple[str, str, str]:
        """(service, group, version) of the target export."""
        return (self.spec.name, self.group, self.version)


class Proxy:
    """A reference's proxy: one attribute per interface method.

    A method with event-notify hooks or ``async_`` is built by ``notify``; the others call
    ``invoke`` directly.
    """

    def __init__(self, reference: Reference, invoke: Invoke, notify: Notify | None = None) -> None:
        self._reference = reference
        for name, method in reference.methods.items():
            hooks = reference.hooks.get(name)
            call: Callable[..., Any]
            if hooks is not None:
                if notify is None:
                    raise TypeError(f"{method.qualname}: this client does not support notify")
                call = notify(reference, method, hooks)
            else:
                call = functools.partial(_call, invoke, reference, method)
            functools.update_wrapper(call, getattr(reference.spec.cls, name))
            setattr(self, name, call)

    def __repr__(self) -> str:
        ref = self._reference
        return f"<backchannel proxy {ref.spec.name} group={ref.group!r} version={ref.version!r}>"


def _call(
    invoke: Invoke, reference: Reference, method: MethodSpec, *args: Any, **kwargs: Any
) -> Any:
    return invoke(reference, method, args, kwargs)
