"""Python values to and from the wire's ``Value``; exceptions to and from ``Error``.

Nothing here imports or runs a name that came off the wire: protobuf messages are
looked up in the descriptor pool of types this process already loaded, and exception
types in an allow-list (builtins, backchannel's own, and what the application
registered).
"""

from __future__ import annotations

import inspect
import logging
import traceback as traceback_module
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import any_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import EncodeError as ProtobufEncodeError
from google.protobuf.message import Message

from backchannel import errors
from backchannel.settings import BULK_BYTES, BULK_ITEMS
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire.text import sendable_text, wire_text

logger = logging.getLogger("backchannel")

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: the deepest a value may nest lists, tuples and dicts, on either side. The wire spends
#: up to three protobuf levels on each (Value > ValueMap > entry), and upb parses at most
#: 100: at this limit the deepest frame there can be (Frame > Batch > Frame > Result >
#: Error > args Value, 24 dicts, a CallbackRef) is 79 levels, well under.
MAX_NESTING = 24

_TOO_DEEP = f"nested deeper than {MAX_NESTING} levels (the nesting limit, codec.MAX_NESTING)"

#: the Value of None (shared: Values are copied into the messages that hold them)
NULL = pb.Value(null_value=struct_pb2.NULL_VALUE)  # type: ignore[arg-type]

#: a message's repeated Value field (``call.args``): arguments are encoded in place there
Args = RepeatedCompositeFieldContainer[pb.Value]

#: turns an object into a CallbackRef, or returns None when it is not a callback here
CallbackEncoder = Callable[[object, str], "pb.CallbackRef | None"]
#: turns a received CallbackRef into the object the receiving code sees
CallbackDecoder = Callable[["pb.CallbackRef", str], object]


class _Failure(Exception):
    """Raised inside the codec; ``path`` grows as it leaves nested lists and maps."""

    def __init__(self, reason: str, decoding: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decoding = decoding
        self.path = ""
        #: the list or dict the failure left last, which its parent holds as an item
        self.culprit: object = None

    def located(self, where: str) -> errors.CodecError:
        cls = errors.DecodeError if self.decoding else errors.EncodeError
        return cls(f"{where}{self.path}: {self.reason}")


def encode(obj: object, where: str, callbacks: CallbackEncoder | None = None) -> pb.Value:
    """Encode one Python object; ``where`` names it in errors (``"argument 0 'id' of get()"``).

    Raises :class:`EncodeError` (a TypeError) with the path to what could not be sent.
    """
    try:
        return _encode(obj, callbacks, 0)
    except _Failure as failure:
        raise failure.located(where) from None


def encode_into(
    value: pb.Value, obj: object, where: str, callbacks: CallbackEncoder | None = None
) -> None:
    """:func:`encode`, filling ``value`` (one that stands in its message already, such as
    ``call.args.add()``) in place: a Value built apart is copied when put in a message."""
    try:
        _fill(obj, value, callbacks, 0)
    except _Failure as failure:
        raise failure.located(where) from None


def _encode(obj: object, callbacks: CallbackEncoder | None, depth: int) -> pb.Value:
    value = pb.Value()
    _fill(obj, value, callbacks, depth)
    return value


def _fill(obj: object, value: pb.Value, callbacks: CallbackEncoder | None, depth: int) -> None:
    """Encode ``obj`` into ``value``, in place.

    Lists and dicts are filled item by item where they stand (``items.add()``,
    ``entries[key]``): building a Value and then assigning it copies it, so a container
    built bottom-up would be copied once per level, and each copy of a big one is a long
    C call that holds the GIL. In place, encoding a 150k-entry dict is ~8x faster.
    """
    kind = type(obj)
    # exact-type checks first: the hot path, and bool must not pass as int
    if kind is str:
        try:
            value.string_value = obj  # type: ignore[assignment]
        except UnicodeEncodeError as exc:
            raise _Failure(_not_utf8("str", exc), False) from None
    elif kind is int:
        if not INT64_MIN <= obj <= INT64_MAX:  # type: ignore[operator]
            raise _Failure(f"int {obj} does not fit in 64 bits", False)
        value.int_value = obj  # type: ignore[assignment]
    elif obj is None:
        value.null_value = struct_pb2.NULL_VALUE  # type: ignore[assignment]
    elif kind is bool:
        value.bool_value = obj  # type: ignore[assignment]
    elif kind is float:
        value.double_value = obj  # type: ignore[assignment]
    elif kind is bytes:
        value.bytes_value = obj  # type: ignore[assignment]
    elif isinstance(obj, list | tuple):
        if depth >= MAX_NESTING:
            raise _Failure(_TOO_DEEP, False)
        deeper = depth + 1
        target = value.list_value
        target.SetInParent()  # an empty list is still a list
        add = target.items.add
        try:
            for item in obj:
                _fill(item, add(), callbacks, deeper)
        except _Failure as failure:
            raise _locate(
                failure, obj, enumerate(obj), lambda v: _encode(v, callbacks, deeper)
            ) from None
    elif isinstance(obj, dict):
        if depth >= MAX_NESTING:
            raise _Failure(_TOO_DEEP, False)
        deeper = depth + 1
        for key in obj:
            if not isinstance(key, str):
                raise _Failure(
                    f"dict keys must be str, got {type(key).__name__} key {key!r}", False
                )
        value.map_value.SetInParent()  # an empty dict is still a dict
        entries = value.map_value.entries
        try:
            for key, item in obj.items():
                _fill(item, entries[key], callbacks, deeper)
        except _Failure as failure:
            raise _locate(
                failure, obj, obj.items(), lambda v: _encode(v, callbacks, deeper)
            ) from None
        except UnicodeEncodeError:
            for key in obj:  # the error path: say which key
                _check_utf8(key, f"dict key {key!a}")
            raise
    elif isinstance(obj, Message):
        try:
            value.message_value.Pack(obj)
        except (ProtobufEncodeError, UnicodeEncodeError) as exc:  # proto2 required fields
            raise _Failure(f"cannot serialize protobuf message: {exc}", False) from None
    elif isinstance(obj, bool):  # subclasses of the exact types above
        value.bool_value = bool(obj)
    elif isinstance(obj, int):
        _fill(int(obj), value, callbacks, depth)
    elif isinstance(obj, str):
        _check_utf8(obj, "str")
        value.string_value = str(obj)
    elif isinstance(obj, float):
        value.double_value = float(obj)
    elif isinstance(obj, bytes | bytearray | memoryview):
        value.bytes_value = bytes(obj)
    else:
        ref = callbacks(obj, "") if callbacks is not None else None
        if ref is None:
            raise _Failure(
                f"cannot send an object of type {kind.__module__}.{kind.__qualname__}; "
                "backchannel carries None, bool, int, float, str, bytes, list, tuple, dict "
                "with str keys, protobuf messages and declared callback arguments",
                False,
            )
        value.callback_value.CopyFrom(ref)


def _locate(
    failure: _Failure,
    container: object,
    items: Iterable[tuple[Any, Any]],
    convert: Callable[[Any], object],
) -> _Failure:
    """On the error path only: put the key of the item that failed in the path.

    A failure from deeper down names the item it left (``culprit``), found by identity;
    else the item failed at its own level and converting it again fails at once. Either
    way nothing is converted twice more than one level down, however deep the value.
    """
    culprit = failure.culprit
    for key, item in items:
        if culprit is not None:
            if item is not culprit:
                continue
        else:
            try:
                convert(item)
            except _Failure:
                pass
            else:
                continue
        failure.path = f"[{key!r}]{failure.path}"
        break
    failure.culprit = container
    return failure


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise _Failure(_not_utf8(what, exc), False) from None


def _not_utf8(what: str, exc: UnicodeEncodeError) -> str:
    """Why a str cannot travel: protobuf strings are UTF-8, lone surrogates are not (a file
    name from ``os.listdir`` of bytes that are no UTF-8, say)."""
    return (
        f"{what} is not valid UTF-8 (lone surrogate {exc.object[exc.start]!a} at index "
        f"{exc.start}); send bytes instead (os.fsencode(name)), or escape it first "
        "(name.encode(errors='backslashreplace').decode())"
    )


def decode(value: pb.Value, where: str, callbacks: CallbackDecoder | None = None) -> object:
    """Decode one Value; raise :class:`DecodeError` naming ``where`` if it makes no sense."""
    try:
        return _decode(value, callbacks, 0)
    except _Failure as failure:
        raise failure.located(where) from None


def is_bulk_value(value: pb.Value) -> bool:
    """Whether decoding ``value`` is worth a thread hop off the event loop (decoding
    costs ~30 ms per MB of map or list entries): it is a map or list of more than
    :data:`~backchannel.settings.BULK_ITEMS` entries, or over
    :data:`~backchannel.settings.BULK_BYTES` on the wire, the threshold of big
    arguments. Entries are counted first because that is free, while ``ByteSize()``
    walks every entry (~4 ms per MB, on the loop)."""
    kind = value.WhichOneof("kind")
    if kind == "map_value":
        entries = len(value.map_value.entries)
    elif kind == "list_value":
        entries = len(value.list_value.items)
    else:
        entries = 0
    return entries > BULK_ITEMS or value.ByteSize() > BULK_BYTES


def _decode(value: pb.Value, callbacks: CallbackDecoder | None, depth: int) -> object:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "null_value":
        return None
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        return value.double_value
    if kind == "bytes_value":
        return value.bytes_value
    if kind == "list_value":
        if depth >= MAX_NESTING:
            raise _Failure(_TOO_DEEP, True)
        deeper = depth + 1
        items = value.list_value.items
        try:
            return [_decode(item, callbacks, deeper) for item in items]
        except _Failure as failure:
            raise _locate(
                failure, value, enumerate(items), lambda v: _decode(v, callbacks, deeper)
            ) from None
    if kind == "map_value":
        if depth >= MAX_NESTING:
            raise _Failure(_TOO_DEEP, True)
        deeper = depth + 1
        entries = value.map_value.entries
        try:
            return {key: _decode(item, callbacks, deeper) for key, item in entries.items()}
        except _Failure as failure:
            raise _locate(
                failure, value, entries.items(), lambda v: _decode(v, callbacks, deeper)
            ) from None
    if kind == "message_value":
        return _unpack_message(value.message_value)
    if kind == "callback_value":
        if callbacks is None:
            raise _Failure(
                "a callback reference arrived where no callback argument is declared", True
            )
        return callbacks(value.callback_value, "")
    raise _Failure("empty Value (no kind set, or a kind this side does not know)", True)


def _unpack_message(packed: any_pb2.Any) -> Message:
    """Unpack to the message's own class when this process knows the type; else keep the Any."""
    type_name = packed.type_url.rpartition("/")[2]
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return packed
    message = message_factory.GetMessageClass(descriptor)()
    try:
        unpacked = packed.Unpack(message)
    except ProtobufDecodeError:
        unpacked = False
    if not unpacked:
        raise _Failure(f"cannot unpack protobuf message {type_name}", True)
    return message


def argument_place(index: int, names: Sequence[str], where: str) -> str:
    """``argument 1 'listener' of Service.method()``: how errors name an argument."""
    name = f" {names[index]!r}" if index < len(names) else ""
    return f"argument {index}{name} of {where}"


def encode_args(
    args: Sequence[object],
    names: Sequence[str],
    where: str,
    callbacks: CallbackEncoder | None,
    into: Args | None = None,
) -> Sequence[pb.Value]:
    """Encode positional arguments; errors name the argument by index and name.

    With ``into`` (a Call's ``args``) they are encoded in place there, and ``into`` is
    returned: no Value is built apart and copied into the Call.
    """
    try:
        if into is None:
            return [_encode(arg, callbacks, 0) for arg in args]
        add = into.add
        for arg in args:
            _fill(arg, add(), callbacks, 0)
        return into
    except _Failure:
        for index, arg in enumerate(args):  # the error path: say which argument
            encode(arg, argument_place(index, names, where), callbacks)
        raise


def decode_args(
    values: Sequence[pb.Value],
    where: str,
    callbacks: CallbackDecoder | None = None,
) -> list[object]:
    """Decode positional arguments; errors name the argument by index."""
    try:
        return [_decode(value, callbacks, 0) for value in values]
    except _Failure:
        for index, value in enumerate(values):  # the error path: say which argument
            decode(value, argument_place(index, (), where), callbacks)
        raise


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
