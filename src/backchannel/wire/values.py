"""Python values to and from the wire's ``Value``: the codec's half that knows no exceptions
(:mod:`backchannel.wire.codec` re-exports it, and adds exceptions to and from ``Error``).

Nothing here imports or runs a name that came off the wire: protobuf messages are looked
up in the descriptor pool of types this process already loaded. An object of no type the
codec carries is sent by reference only through a :class:`ListenerEncoder` the caller
passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from google.protobuf import any_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import EncodeError as ProtobufEncodeError
from google.protobuf.message import Message

from backchannel import errors
from backchannel.settings import BULK_BYTES, BULK_ITEMS
from backchannel.v1 import envelope_pb2 as pb

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


class ListenerEncoder(Protocol):
    """Sends by reference an object that is no value (a listener): returns the CallbackRef
    the receiver knows it by, or None when it is no listener here (then it cannot be sent).

    The codec calls it for an object of a type it does not carry, at any depth, and knows
    nothing of what the reference stands for: the layer that keeps listeners implements
    it. ``place`` is ``""`` for now.
    """

    def __call__(self, obj: object, place: str, /) -> pb.CallbackRef | None: ...


class ListenerDecoder(Protocol):
    """Turns a received CallbackRef into the object the receiving code sees: the other
    half of :class:`ListenerEncoder`. ``place`` is ``""`` for now."""

    def __call__(self, ref: pb.CallbackRef, place: str, /) -> object: ...


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


def encode(obj: object, where: str, listeners: ListenerEncoder | None = None) -> pb.Value:
    """Encode one Python object; ``where`` names it in errors (``"argument 0 'id' of get()"``).

    Raises :class:`EncodeError` (a TypeError) with the path to what could not be sent.
    """
    try:
        return _encode(obj, listeners, 0)
    except _Failure as failure:
        raise failure.located(where) from None


def encode_into(
    value: pb.Value, obj: object, where: str, listeners: ListenerEncoder | None = None
) -> None:
    """:func:`encode`, filling ``value`` (one that stands in its message already, such as
    ``call.args.add()``) in place: a Value built apart is copied when put in a message."""
    try:
        _fill(obj, value, listeners, 0)
    except _Failure as failure:
        raise failure.located(where) from None


def _encode(obj: object, listeners: ListenerEncoder | None, depth: int) -> pb.Value:
    value = pb.Value()
    _fill(obj, value, listeners, depth)
    return value


def _fill(obj: object, value: pb.Value, listeners: ListenerEncoder | None, depth: int) -> None:
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
                _fill(item, add(), listeners, deeper)
        except _Failure as failure:
            raise _locate(
                failure, obj, enumerate(obj), lambda v: _encode(v, listeners, deeper)
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
                _fill(item, entries[key], listeners, deeper)
        except _Failure as failure:
            raise _locate(
                failure, obj, obj.items(), lambda v: _encode(v, listeners, deeper)
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
        _fill(int(obj), value, listeners, depth)
    elif isinstance(obj, str):
        _check_utf8(obj, "str")
        value.string_value = str(obj)
    elif isinstance(obj, float):
        value.double_value = float(obj)
    elif isinstance(obj, bytes | bytearray | memoryview):
        value.bytes_value = bytes(obj)
    else:
        ref = listeners(obj, "") if listeners is not None else None
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


def decode(value: pb.Value, where: str, listeners: ListenerDecoder | None = None) -> object:
    """Decode one Value; raise :class:`DecodeError` naming ``where`` if it makes no sense."""
    try:
        return _decode(value, listeners, 0)
    except _Failure as failure:
        raise failure.located(where) from None


#: kinds of Value that take a few bytes at most
_FIXED_SIZE = frozenset({"int_value", "bool_value", "double_value", "null_value"})


def is_bulk_value(value: pb.Value) -> bool:
    """Whether decoding ``value`` is worth a thread hop off the event loop (decoding
    costs ~30 ms per MB of map or list entries): it is a map or list of more than
    :data:`~backchannel.settings.BULK_ITEMS` entries, or over
    :data:`~backchannel.settings.BULK_BYTES` on the wire, the threshold of big
    arguments. Entries are counted first because that is free, while ``ByteSize()``
    walks every entry (~4 ms per MB, on the loop)."""
    kind = value.WhichOneof("kind")
    if kind in _FIXED_SIZE:  # small whatever their value: no need to measure them
        return False
    if kind == "map_value":
        entries = len(value.map_value.entries)
    elif kind == "list_value":
        entries = len(value.list_value.items)
    else:
        entries = 0
    return entries > BULK_ITEMS or value.ByteSize() > BULK_BYTES


def _decode(value: pb.Value, listeners: ListenerDecoder | None, depth: int) -> object:
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
            return [_decode(item, listeners, deeper) for item in items]
        except _Failure as failure:
            raise _locate(
                failure, value, enumerate(items), lambda v: _decode(v, listeners, deeper)
            ) from None
    if kind == "map_value":
        if depth >= MAX_NESTING:
            raise _Failure(_TOO_DEEP, True)
        deeper = depth + 1
        entries = value.map_value.entries
        try:
            return {key: _decode(item, listeners, deeper) for key, item in entries.items()}
        except _Failure as failure:
            raise _locate(
                failure, value, entries.items(), lambda v: _decode(v, listeners, deeper)
            ) from None
    if kind == "message_value":
        return _unpack_message(value.message_value)
    if kind == "callback_value":
        if listeners is None:
            raise _Failure(
                "a callback reference arrived where no callback argument is declared", True
            )
        return listeners(value.callback_value, "")
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
    listeners: ListenerEncoder | None,
    into: Args | None = None,
) -> Sequence[pb.Value]:
    """Encode positional arguments; errors name the argument by index and name.

    With ``into`` (a Call's ``args``) they are encoded in place there, and ``into`` is
    returned: no Value is built apart and copied into the Call.
    """
    try:
        if into is None:
            return [_encode(arg, listeners, 0) for arg in args]
        add = into.add
        for arg in args:
            _fill(arg, add(), listeners, 0)
        return into
    except _Failure:
        for index, arg in enumerate(args):  # the error path: say which argument
            encode(arg, argument_place(index, names, where), listeners)
        raise


def decode_args(
    values: Sequence[pb.Value],
    where: str,
    listeners: ListenerDecoder | None = None,
) -> list[object]:
    """Decode positional arguments; errors name the argument by index."""
    try:
        return [_decode(value, listeners, 0) for value in values]
    except _Failure:
        for index, value in enumerate(values):  # the error path: say which argument
            decode(value, argument_place(index, (), where), listeners)
        raise
