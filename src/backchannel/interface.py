"""Service interfaces: plain Python classes named for the wire with :func:`interface`.

::

    @backchannel.interface("com.callback.CallbackService")
    class CallbackService:
        def addListener(self, key: str, listener: CallbackListener) -> None: ...

Every public function of the class is a method of the service; its parameters (``self``
excluded) are the positional arguments on the wire.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backchannel.errors import InvalidArguments

T = TypeVar("T")

_SPEC_ATTRIBUTE = "_backchannel_interface"


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One method of an interface, as the wire sees it."""

    #: the method name
    name: str
    #: the service name the method belongs to (for messages)
    service: str
    #: parameter names in order, ``self`` excluded
    parameters: tuple[str, ...]
    #: how many leading parameters have no default
    required: int
    #: True when the method takes ``*args`` (any number past ``parameters``)
    variadic: bool
    #: the signature, used to map keyword arguments onto positions
    signature: inspect.Signature = field(repr=False, compare=False)

    @property
    def qualname(self) -> str:
        """``Service.method``, for messages."""
        return f"{self.service}.{self.name}"

    def check_count(self, count: int) -> None:
        """Raise :class:`InvalidArguments` unless ``count`` positional arguments fit."""
        most = None if self.variadic else len(self.parameters)
        if count >= self.required and (most is None or count <= most):
            return
        if most is None:
            expected = f"at least {self.required}"
        elif self.required == most:
            expected = str(most)
        else:
            expected = f"{self.required} to {most}"
        names = ", ".join(self.parameters) or "no arguments"
        raise InvalidArguments(
            f"{self.qualname}() takes {expected} argument{'s' if expected != '1' else ''} "
            f"({names}), got {count}"
        )

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Map a Python call's arguments onto positions, or raise :class:`InvalidArguments`."""
        if not kwargs:
            self.check_count(len(args))
            return args
        try:
            bound = self.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"{self.qualname}(): {exc}") from None
        bound.apply_defaults()
        return bound.args[1:]


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    """A service interface: its wire name and methods."""

    #: the wire name, e.g. ``"com.callback.CallbackService"``
    name: str
    #: the Python class that declared it
    cls: type
    #: the methods by name
    methods: dict[str, MethodSpec]

    @classmethod
    def from_class(cls, name: str, declared: type) -> InterfaceSpec:
        """Read the methods of a class."""
        methods = {}
        for attr, value in vars(declared).items():
            if attr.startswith("_") or not inspect.isfunction(value):
                continue
            methods[attr] = method_spec(name, attr, value)
        return cls(name, declared, methods)


def method_spec(service: str, name: str, function: Callable[..., Any]) -> MethodSpec:
    """Describe one function as a method (its first parameter is ``self``)."""
    signature = inspect.signature(function)
    params = list(signature.parameters.values())[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for p in params:
        if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
            raise TypeError(
                f"{service}.{name}: keyword-only parameter {p.name!r} cannot travel; "
                "the wire carries positional arguments"
            )
    required = sum(1 for p in positional if p.default is p.empty)
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    return MethodSpec(
        name, service, tuple(p.name for p in positional), required, variadic, signature
    )


def interface(name: str) -> Callable[[type[T]], type[T]]:
    """Declare a class as a service interface with the wire name ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"interface() takes a non-empty service name, got {name!r}")

    def declare(cls: type[T]) -> type[T]:
        setattr(cls, _SPEC_ATTRIBUTE, InterfaceSpec.from_class(name, cls))
        return cls

    return declare


def interface_spec(cls: type) -> InterfaceSpec:
    """The spec of a class declared with :func:`interface`, or a clear TypeError."""
    spec = vars(cls).get(_SPEC_ATTRIBUTE) if isinstance(cls, type) else None
    if not isinstance(spec, InterfaceSpec):
        raise TypeError(
            f"{cls!r} is not a backchannel interface: declare it with "
            "@backchannel.interface('service.Name')"
        )
    return spec


@dataclass(frozen=True)
class Method:
    """Per-method settings of a reference (consumer) or an export (provider)."""

    #: the method name; must exist on the interface
    name: str
    #: seconds to wait for the result (consumer); None keeps the reference's timeout
    timeout: float | None = None


def check_method_names(spec: InterfaceSpec, methods: Sequence[Method]) -> dict[str, Method]:
    """Index per-method settings by name; a name the interface lacks is a clear error."""
    by_name: dict[str, Method] = {}
    for method in methods:
        if method.name not in spec.methods:
            known = ", ".join(sorted(spec.methods)) or "none"
            raise ValueError(f"{spec.name} has no method {method.name!r} (its methods: {known})")
        if method.timeout is not None and not method.timeout > 0:
            raise ValueError(
                f"{spec.name}.{method.name}: timeout must be > 0, got {method.timeout}"
            )
        by_name[method.name] = method
    return by_name
