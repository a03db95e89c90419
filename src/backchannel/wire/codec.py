"""Python values to and from the wire's ``Value``; exceptions to and from ``Error``.

The values are :mod:`backchannel.wire.values`' (re-exported here, so callers name them all
``codec.X``); this module adds the exceptions, on top of them.

Nothing here imports or runs a name that came off the wire: protobuf messages are
looked up in the descriptor pool of types this process already loaded, and exception
types in an allow-list (builtins, backchannel's own, and what the application
registered).
"""

from __future__ import annotations

import inspect
import logging
import traceback as traceback_module
from collections.abc import Iterable, Mapping

from backchannel import errors
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.text import sendable_text, wire_text
from backchannel.wire.values import (
    INT64_MAX,
    INT64_MIN,
    MAX_NESTING,
    NULL,
    Args,
    ListenerDecoder,
    ListenerEncoder,
    decode,
    decode_args,
    encode,
    encode_args,
    encode_into,
    is_bulk_value,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_NESTING",
    "NULL",
    "Args",
    "ErrorTypes",
    "ListenerDecoder",
    "ListenerEncoder",
    "decode",
    "decode_args",
    "decode_error",
    "encode",
    "encode_args",
    "encode_error",
    "encode_into",
    "is_bulk_value",
]

logger = logging.getLogger("backchannel")


# ---------------------------------------------------------------- exceptions

_BUILTIN_ERRORS: tuple[type[BaseException], ...] = (
    ArithmeticError, AssertionError, AttributeError, EOFError, Exception, FileExistsError,
    FileNotFoundError, FloatingPointError, IndexError, IsADirectoryError, KeyError,
    LookupError, NotADirectoryError, NotImplementedError, OSError, OverflowError,
    PermissionError, RecursionError, RuntimeError, TimeoutError, TypeError,
    UnicodeError, ValueError, ZeroDivisionError, ConnectionError, ConnectionRefusedError,
    ConnectionResetError, BrokenPipeError, ProcessLookupError, ChildProcessError,
    InterruptedError, BlockingIOError, BufferError, MemoryError,
)  # fmt: skip

_LIBRARY_ERRORS: tuple[type[errors.BackchannelError], ...] = (
    errors.CallCancelled, errors.DeadlineExceeded, errors.InvalidArguments,
    errors.ServiceNotFound, errors.MethodNotFound, errors.TooManyCallbacks,
    errors.ShuttingDown, errors.CallbackGone, errors.MessageTooLarge, errors.UnknownCallback,
    errors.StreamBroken, errors.DecodeError,
    errors.EncodeError, errors.RemoteProtocolError, errors.ChannelClosed,
)  # fmt: skip

# the status code each library error travels with; anything else is UNKNOWN
_CODES: dict[type[BaseException], int] = {
    errors.CallCancelled: pb.CANCELLED,
    errors.DeadlineExceeded: pb.DEADLINE_EXCEEDED,
    errors.InvalidArguments: pb.INVALID_ARGUMENT,
    errors.DecodeError: pb.INVALID_ARGUMENT,
    errors.EncodeError: pb.INTERNAL,
    errors.ServiceNotFound: pb.NOT_FOUND,
    errors.MethodNotFound: pb.UNIMPLEMENTED,
    errors.TooManyCallbacks: pb.RESOURCE_EXHAUSTED,
    errors.ShuttingDown: pb.UNAVAILABLE,
    errors.MessageTooLarge: pb.RESOURCE_EXHAUSTED,
    errors.UnknownCallback: pb.NOT_FOUND,
    errors.CallbackGone: pb.NOT_FOUND,
    errors.StreamBroken: pb.UNAVAILABLE,
    errors.ChannelClosed: pb.UNAVAILABLE,
    errors.RemoteProtocolError: pb.FAILED_PRECONDITION,
}


class ErrorTypes:
    """The allow-list of exception types that cross the wire as themselves.

    Builtins travel by their bare name (``"ValueError"``), backchannel's own errors as
    ``"backchannel.Name"``, and application types as ``"module.QualName"``. A received
    name not on the list becomes a :class:`RemoteError`, so the *receiving* side is the
    one that registers: the consumer for what provider methods raise, the provider for
    what listeners raise. A registered type is rebuilt without calling its ``__init__``:
    its args and its public attributes that are Values cross, so ``str(exc)`` and
    ``exc.sku`` read as they did where it was raised.
    """

    def __init__(self, registered: Iterable[type[BaseException]] = ()) -> None:
        self._by_name: dict[str, type[BaseException]] = {}
        for cls in _BUILTIN_ERRORS + _LIBRARY_ERRORS:
            self._by_name[self.name_of(cls)] = cls
        for cls in registered:
            self.register(cls)

    def register(self, cls: type[BaseException]) -> None:
        """Let ``cls`` arrive as itself instead of as a :class:`RemoteError` (see above)."""
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"register() takes an exception class, got {cls!r}")
        self._by_name[self.name_of(cls)] = cls

    @staticmethod
    def name_of(cls: type[BaseException]) -> str:
        """The wire name of an exception type."""
        if cls.__module__ == "builtins":
            return cls.__name__
        if cls.__module__.startswith("backchannel.") and issubclass(cls, errors.BackchannelError):
            return f"backchannel.{cls.__name__}"
        return f"{cls.__module__}.{cls.__qualname__}"

    def lookup(self, name: str) -> type[BaseException] | None:
        """The allowed exception type of that wire name, or None."""
        return self._by_name.get(name)


def encode_error(exc: BaseException, types: ErrorTypes, with_traceback: bool = False) -> pb.Error:
    """Describe an exception for the wire: its args and public attributes that are Values
    (the rest is dropped: the message still says what happened), the traceback only when
    asked."""
    code: int = pb.UNKNOWN
    for cls in type(exc).__mro__:
        if cls in _CODES:
            code = _CODES[cls]
            break
    error = pb.Error(
        code=code,  # type: ignore[arg-type]
        type=types.name_of(type(exc)),
        message=sendable_text(str(exc)),
    )
    try:
        error.args.extend(encode(arg, "exception argument") for arg in exc.args)
    except errors.EncodeError:
        del error.args[:]  # the message still says what happened
    for name, value in vars(exc).items():
        if name.startswith("_"):
            continue  # private state, and __notes__, stay home
        try:
            error.attributes[name].CopyFrom(encode(value, f"exception attribute {name!r}"))
        except errors.EncodeError:
            del error.attributes[name]  # not a Value: this one attribute is dropped
    if with_traceback:
        error.traceback = sendable_text("".join(traceback_module.format_exception(exc)))
    return error


def decode_error(error: pb.Error, types: ErrorTypes) -> BaseException:
    """Rebuild an exception from the wire: an allowed type, or a RemoteError."""
    cls = types.lookup(error.type)
    if cls is None:
        return errors.RemoteError(
            error.type or pb.Code.Name(error.code), error.message, error.traceback
        )
    try:
        args = decode_args(error.args, "exception")
    except errors.DecodeError:
        args = []
    if not args and error.message:
        args = [error.message]  # the args could not travel: the message stands in
    if cls in _KNOWN_ERRORS:
        try:  # their constructors take their args as they are (OSError sets errno from them)
            exc = cls(*args)
        except Exception:
            return errors.RemoteError(error.type, error.message, error.traceback)
    else:
        rebuilt = _rebuild(cls, args, error.attributes)
        if rebuilt is None:
            return errors.RemoteError(error.type, error.message, error.traceback)
        exc = rebuilt
    if error.traceback:
        exc.add_note(f"remote traceback:\n{error.traceback}")
    return exc


_KNOWN_ERRORS = frozenset(_BUILTIN_ERRORS + _LIBRARY_ERRORS)


def _rebuild(
    cls: type[BaseException], args: list[object], attributes: Mapping[str, pb.Value]
) -> BaseException | None:
    """A registered exception as the sender had it, without calling its ``__init__``.

    ``__init__`` is not called on purpose: ``args`` is what ``__init__`` passed to
    ``BaseException`` (``Rich(sku, qty)`` passes one message), not what ``__init__``
    takes, and it would run application code on values the peer chose. Instead the
    instance is made with ``__new__`` (given the args, as ``BaseException.__new__``
    takes them), ``args`` is set, and so is every public attribute that decodes and
    that the class does not define as a method or property. None (logged, naming the
    class and what it needs) when the class refuses that.
    """
    try:
        exc = cls.__new__(cls, *args)
        exc.args = tuple(args)
        for name, value in attributes.items():
            if name.startswith("_") or hasattr(inspect.getattr_static(cls, name, None), "__get__"):
                continue  # never a private name, and never shadow a method or descriptor
            try:
                decoded = decode(value, f"exception attribute {name!r}")
            except errors.DecodeError:
                continue  # this one attribute makes no sense here: dropped
            setattr(exc, name, decoded)
    except Exception as failure:
        logger.warning(
            "registered exception %s arrived but cannot be rebuilt, so it is raised as "
            "RemoteError: %s.__new__(cls, *args) must accept the exception's args and its "
            "public attributes must be settable (%s: %s)",
            ErrorTypes.name_of(cls),
            cls.__qualname__,
            type(failure).__name__,
            wire_text(failure),
        )
        return None
    return exc
