"""Service interfaces: plain Python classes named for the wire with :func:`interface`.

::

    @backchannel.interface("com.callback.CallbackService")
    class CallbackService:
        def addListener(self, key: str, listener: CallbackListener) -> None: ...

Every public function of the class is a method of the service; its parameters (``self``
excluded) are the positional arguments on the wire.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from backchannel.errors import InvalidArguments
from backchannel.rpc.type_text import type_text

T = TypeVar("T")
#: the asynchronous twin of an interface (see :class:`Interface`)
A = TypeVar("A")

_SPEC_ATTRIBUTE = "_backchannel_interface"
_METHOD_ATTRIBUTE = "_backchannel_method"


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
    #: the declaring function, for its type annotations (resolved lazily)
    function: Callable[..., Any] | None = field(default=None, repr=False, compare=False)
    #: indexes of arguments that are callbacks
    callbacks: frozenset[int] = frozenset()
    #: indexes of arguments that release a callback added earlier (Dubbo's callback="false")
    removers: frozenset[int] = frozenset()
    #: True when the caller does not wait for a result
    one_way: bool = False
    #: consumer: at most this many live listener instances passed to this method per
    #: stream (``Method(callbacks=N)``); None: no limit of the consumer's own
    callback_limit: int | None = None

    def parameter_type(self, index: int) -> Any:
        """The annotation of parameter ``index``, resolved; None when there is none."""
        if self.function is None or index >= len(self.parameters):
            return None
        try:
            hints = typing.get_type_hints(self.function)
        except Exception:  # an unresolvable forward reference: no type to go by
            return None
        return hints.get(self.parameters[index])

    def parameter_type_text(self, index: int) -> str:
        """Parameter ``index``'s declared type as Python writes it (``"list[int]"``), as
        ``MethodInfo.parameter_types`` carries it; "" when it declares none."""
        hint = self.parameter_type(index)
        if hint is not None:
            return type_text(hint)
        if index >= len(self.parameters):
            return ""
        # none, or one that does not resolve here: the annotation as it was written
        annotation = self.signature.parameters[self.parameters[index]].annotation
        return "" if annotation is inspect.Parameter.empty else type_text(annotation)

    def listener_interface(self, index: int) -> InterfaceSpec | None:
        """The interface a callback argument is annotated with, when it is one."""
        hint = self.parameter_type(index)
        return find_interface_spec(hint) if isinstance(hint, type) else None

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
    spec = MethodSpec(
        name, service, tuple(p.name for p in positional), required, variadic, signature, function
    )
    declared: Method | None = getattr(function, _METHOD_ATTRIBUTE, None)
    return spec if declared is None else apply_method(spec, declared)


class Interface(Generic[A]):
    """Links an interface to its asynchronous twin, for type checkers only.

    ``backchannel stubs MODULE`` writes ``MODULE.pyi`` in which each interface ``X`` of the
    module subclasses ``Interface[XAsync]`` (``XAsync``: a Protocol with the same methods as
    ``async def``), so that ``AsyncClient.reference(X)`` is typed ``XAsync``. Nothing
    subclasses it at run time (docs/typing.md).
    """

    __slots__ = ()


def interface(name: str) -> Callable[[type[T]], type[T]]:
    """Declare a class as a service interface with the wire name ``name``.

    The class may be a plain class or a ``typing.Protocol`` (whose ``...`` bodies type
    checkers accept as declarations; docs/typing.md).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"interface() takes a non-empty service name, got {name!r}")

    def declare(cls: type[T]) -> type[T]:
        setattr(cls, _SPEC_ATTRIBUTE, InterfaceSpec.from_class(name, cls))
        return cls

    return declare


def find_interface_spec(cls: type) -> InterfaceSpec | None:
    """The spec of ``cls`` or of the first interface among its bases, or None."""
    for klass in cls.__mro__:
        spec = vars(klass).get(_SPEC_ATTRIBUTE)
        if isinstance(spec, InterfaceSpec):
            return spec
    return None


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
class Argument:
    """Declares one argument of a method, as Dubbo's ``<dubbo:argument>``.

    By ``index`` (from 0, ``self`` excluded) or by ``type`` (the first parameter
    annotated with that type). ``callback=True`` makes the argument a callback: the
    provider receives a reverse proxy. ``callback=False`` makes it a *remover*: the
    provider receives the proxy added earlier, and the instance ends after the call.
    """

    index: int | None = None
    type: type | None = None
    callback: bool = True


@dataclass(frozen=True)
class Method:
    """Per-method settings of a reference (consumer) or an export (provider).

    On a reference, ``async_`` and the event-notify hooks are Dubbo's
    ``<dubbo:method name="get" async="true" onreturn="notify.onreturn" .../>``::

        client.reference(
            IDemoService,
            group="cn",
            version="1.0.0",
            methods=[Method("get", async_=True, onreturn=notify.onreturn, onthrow=notify.onthrow)],
        )

    ``oninvoke(*args)`` runs before the call is sent; ``onreturn`` gets ``(result)`` or
    ``(result, *args)`` and ``onthrow`` gets ``(exc)`` or ``(exc, *args)``, by their own
    signatures. Hooks are checked when the reference is made. See docs/notify.md.
    """

    #: the method name; must exist on the interface
    name: str
    #: seconds to wait for the result (consumer); None keeps the reference's timeout
    timeout: float | None = None
    #: callback and remover arguments
    arguments: Sequence[Argument] = ()
    #: True: the caller does not wait for a result; None keeps the interface's choice
    one_way: bool | None = None
    #: consumer: True returns a future at once (Dubbo's async="true"); False blocks/awaits
    async_: bool = False
    #: consumer: runs with the call's arguments before the call is sent
    oninvoke: Callable[..., Any] | None = None
    #: consumer: runs with the result (and the arguments) when the call succeeds
    onreturn: Callable[..., Any] | None = None
    #: consumer: runs with the exception (and the arguments) when the call fails
    onthrow: Callable[..., Any] | None = None
    #: consumer: an idempotent method is re-sent up to this many times on a new stream
    #: when its stream breaks or its provider goes away (never otherwise)
    retries: int = 0
    #: consumer: after a reconnect, make this call again with the same listener objects,
    #: so they keep receiving after a provider restart (for methods that add listeners)
    resubscribe: bool = False
    #: consumer: how a call meets a cluster of providers (``failover``, ``failfast``,
    #: ``failsafe``, ``forking``, ``broadcast``); None keeps the reference's
    cluster: str | None = None
    #: consumer: at most this many live listener instances passed to this method per
    #: stream (Dubbo's consumer-side ``callbacks``); None: no limit of the consumer's own
    callbacks: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Method name must be a non-empty str, got {self.name!r}")
        check_callback_limit(self.callbacks, f"Method({self.name!r}): callbacks")
        for flag in ("async_", "resubscribe"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"Method({self.name!r}): {flag} must be True or False, "
                    f"got {getattr(self, flag)!r}"
                )
        if self.one_way is not None and not isinstance(self.one_way, bool):
            raise TypeError(
                f"Method({self.name!r}): one_way must be True, False or None, got {self.one_way!r}"
            )

    @classmethod
    def notify(
        cls,
        name: str,
        target: object,
        *,
        async_: bool = False,
        timeout: float | None = None,
    ) -> Method:
        """Settings whose hooks are ``target``'s methods ``oninvoke``, ``onreturn`` and
        ``onthrow`` (those it has), as an object implementing Dubbo's ``Notify``::

            methods = [Method.notify("get", NotifyImpl(), async_=True)]

        ``target`` must have at least one of them.
        """
        oninvoke = getattr(target, "oninvoke", None)
        onreturn = getattr(target, "onreturn", None)
        onthrow = getattr(target, "onthrow", None)
        if oninvoke is None and onreturn is None and onthrow is None:
            raise TypeError(
                f"Method.notify({name!r}, ...): {target!r} has none of the hooks "
                "oninvoke, onreturn, onthrow"
            )
        return cls(
            name,
            timeout=timeout,
            async_=async_,
            oninvoke=oninvoke,
            onreturn=onreturn,
            onthrow=onthrow,
        )


def method(*, arguments: Sequence[Argument] = (), one_way: bool = False) -> Callable[[T], T]:
    """Declare callback arguments or one-way on an interface method itself::

    @backchannel.interface("com.callback.CallbackService")
    class CallbackService:
        @backchannel.method(arguments=[backchannel.Argument(index=1)])
        def addListener(self, key: str, listener: CallbackListener) -> None: ...
    """

    def declare(function: T) -> T:
        name = getattr(function, "__name__", "?")
        setattr(function, _METHOD_ATTRIBUTE, Method(name, arguments=arguments, one_way=one_way))
        return function

    return declare


def apply_method(spec: MethodSpec, settings: Method) -> MethodSpec:
    """The method with ``settings`` applied; a bad argument declaration is a clear error."""
    callbacks, removers = set(spec.callbacks), set(spec.removers)
    for argument in settings.arguments:
        index = _argument_index(spec, argument)
        (callbacks if argument.callback else removers).add(index)
        (removers if argument.callback else callbacks).discard(index)
    one_way = spec.one_way if settings.one_way is None else settings.one_way
    return dataclasses.replace(
        spec,
        callbacks=frozenset(callbacks),
        removers=frozenset(removers),
        one_way=one_way,
        callback_limit=spec.callback_limit if settings.callbacks is None else settings.callbacks,
    )


def check_callback_limit(limit: object, what: str) -> None:
    """A consumer's callback limit is None or an int >= 1; else a clear ValueError."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"{what} must be an int >= 1 (live listener instances per stream) or None "
            f"(no limit of the consumer's own), got {limit!r}"
        )


def _argument_index(spec: MethodSpec, argument: Argument) -> int:
    if (argument.index is None) == (argument.type is None):
        raise ValueError(f"{spec.qualname}: an Argument takes exactly one of index= or type=")
    if argument.index is not None:
        if not 0 <= argument.index < len(spec.parameters):
            raise ValueError(
                f"{spec.qualname}: argument index {argument.index} is out of range; "
                f"its parameters are {', '.join(spec.parameters) or 'none'} (counted from 0)"
            )
        return argument.index
    return index_of_type(spec, argument.type)  # type: ignore[arg-type]


def index_of_type(method: MethodSpec, wanted: type) -> int:
    """The first parameter annotated ``wanted`` (or ``wanted | None``), for Argument(type=...)."""
    try:
        hints = typing.get_type_hints(method.function)
    except Exception as exc:
        raise ValueError(
            f"{method.qualname}: Argument(type={getattr(wanted, '__name__', wanted)}) "
            f"picks a parameter by its annotation, but resolving the annotations of "
            f"{method.qualname}() failed: {type(exc).__name__}: {exc}; give "
            "Argument(index=...) instead, or make the name importable where it is defined"
        ) from None
    for index, name in enumerate(method.parameters):
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if hint is wanted or (union and wanted in typing.get_args(hint)):
            return index
    raise ValueError(
        f"{method.qualname}: no parameter is annotated with {wanted!r} (or {wanted!r} | "
        "None); Argument(type=...) picks the first parameter of that type"
    )


def apply_settings(spec: InterfaceSpec, methods: Sequence[Method]) -> dict[str, MethodSpec]:
    """Every method of the interface with its per-method settings applied.

    A name the interface lacks, or a bad timeout or argument, is a clear error.
    """
    by_name = dict(spec.methods)
    seen: set[str] = set()
    for settings in methods:
        if settings.name in seen:
            raise ValueError(
                f"{spec.name}.{settings.name}: more than one Method({settings.name!r})"
            )
        seen.add(settings.name)
        if settings.name not in spec.methods:
            known = ", ".join(sorted(spec.methods)) or "none"
            raise ValueError(f"{spec.name} has no method {settings.name!r} (its methods: {known})")
        if settings.timeout is not None and not settings.timeout > 0:
            raise ValueError(
                f"{spec.name}.{settings.name}: timeout must be > 0, got {settings.timeout}"
            )
        by_name[settings.name] = apply_method(by_name[settings.name], settings)
    return by_name
