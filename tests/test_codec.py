"""Python values to and from Value, exceptions to and from Error; no I/O."""

from __future__ import annotations

import enum
import logging
import math
import re
import traceback

import pytest
from google.protobuf import any_pb2, descriptor_pb2, timestamp_pb2

from backchannel import errors
from backchannel.settings import BULK_BYTES, BULK_ITEMS
from backchannel.v1 import envelope_pb2 as pb
from backchannel.wire import codec


def round_trip(obj: object) -> object:
    """What the receiving side sees, after the bytes of the Value crossed the wire."""
    wire = codec.encode(obj, "value").SerializeToString()
    return codec.decode(pb.Value.FromString(wire), "value")


class OutOfStock(Exception):
    """An application error a consumer may register."""


class Priority(enum.IntEnum):
    LOW = 1
    #: above 2**53: a float cannot hold it, so a float on the way shows as a wrong value
    HUGE = 2**53 + 1


class Widget:
    def __str__(self) -> str:
        return "widget 7"


# ------------------------------------------------------------------ values


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -5,
        codec.INT64_MAX,
        codec.INT64_MIN,
        1.5,
        -0.25,
        "",
        "héllo ✓",
        b"",
        b"\x00\xff",
        [],
        [1, "two", None, [3.0]],
        {},
        {"a": {"b": [1, {"c": b"x"}]}, "flag": False},
    ],
    ids=repr,
)
def test_value_round_trips_as_itself(value: object) -> None:
    result = round_trip(value)
    assert result == value
    assert type(result) is type(value)


def test_bool_stays_bool_and_int_stays_int() -> None:
    assert round_trip(True) is True
    two = round_trip(2)
    assert type(two) is int and two == 2
    assert type(round_trip(2.0)) is float
    assert round_trip([True, 1]) == [True, 1]
    assert [type(item) for item in round_trip([True, 1])] == [bool, int]  # type: ignore[union-attr]


def test_an_int_enum_arrives_as_a_plain_int_of_its_value() -> None:
    """An IntEnum is an int subclass: it goes as an int (its class is not sent), never
    through float."""
    for member in Priority:
        result = round_trip(member)
        assert type(result) is int and result == member.value
    assert codec.encode(Priority.HUGE, "value").WhichOneof("kind") == "int_value"
    nested = round_trip({"levels": [Priority.LOW, Priority.HUGE]})
    assert nested == {"levels": [1, 2**53 + 1]}
    assert [type(item) for item in nested["levels"]] == [int, int]  # type: ignore[index]


def test_float_specials_round_trip() -> None:
    assert round_trip(math.inf) == math.inf
    assert math.isnan(round_trip(math.nan))  # type: ignore[arg-type]


def test_tuple_arrives_as_list() -> None:
    assert round_trip((1, ("a", None))) == [1, ["a", None]]


def test_bytearray_arrives_as_bytes() -> None:
    assert round_trip(bytearray(b"ab")) == b"ab"


def test_protobuf_message_arrives_as_its_own_class() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    result = round_trip(stamp)
    assert type(result) is timestamp_pb2.Timestamp
    assert result == stamp


def test_backchannel_message_arrives_as_its_own_class() -> None:
    info = pb.ServiceInfo(name="test.Echo", methods=[pb.MethodInfo(name="echo")])
    result = round_trip({"info": [info]})
    assert result == {"info": [info]}
    assert type(result["info"][0]) is pb.ServiceInfo  # type: ignore[index]


def test_message_of_an_unknown_type_stays_an_any() -> None:
    packed = any_pb2.Any(type_url="type.googleapis.com/elsewhere.Secret", value=b"\x08\x01")
    result = codec.decode(pb.Value(message_value=packed), "value")
    assert type(result) is any_pb2.Any
    assert result == packed


CORRUPT_HELLO = pb.Value(
    message_value=any_pb2.Any(type_url="type.googleapis.com/backchannel.v1.Hello", value=b"\xff")
)


def test_corrupt_message_of_a_known_type_is_a_decode_error() -> None:
    with pytest.raises(errors.DecodeError, match="^result: .*backchannel.v1.Hello"):
        codec.decode(CORRUPT_HELLO, "result")


def test_error_with_a_corrupt_message_arg_still_arrives_with_its_message() -> None:
    error = pb.Error(type="ValueError", message="bad hello", args=[CORRUPT_HELLO])
    result = codec.decode_error(error, codec.ErrorTypes())
    assert type(result) is ValueError
    assert str(result) == "bad hello"


# ------------------------------------------------------------------ encode errors


@pytest.mark.parametrize("number", [codec.INT64_MAX + 1, codec.INT64_MIN - 1, 10**30])
def test_int_out_of_int64_range_is_an_encode_error(number: int) -> None:
    with pytest.raises(errors.EncodeError, match=f"argument 0 'count' of Shop.buy\\(\\).*{number}"):
        codec.encode_args([number], ["count"], "Shop.buy()", None)


def test_non_str_dict_key_is_an_encode_error() -> None:
    with pytest.raises(errors.EncodeError, match=r"^value\['prices'\]: dict keys must be str.*1"):
        codec.encode({"prices": {1: "one"}}, "value")


def test_arbitrary_object_is_an_encode_error_naming_the_argument() -> None:
    with pytest.raises(TypeError) as raised:
        codec.encode_args(["x", Widget()], ["name", "listener"], "Events.subscribe()", None)
    assert isinstance(raised.value, errors.EncodeError)
    message = str(raised.value)
    assert message.startswith("argument 1 'listener' of Events.subscribe(): ")
    assert f"{__name__}.Widget" in message


def test_encode_error_names_the_path_inside_nested_values() -> None:
    with pytest.raises(
        errors.EncodeError, match=r"^argument 0 'order' of Shop.buy\(\)\['lines'\]\[1\]:"
    ):
        codec.encode_args([{"lines": [1, Widget()]}], ["order"], "Shop.buy()", None)


def test_encode_error_for_an_unnamed_argument_gives_its_index() -> None:
    with pytest.raises(errors.EncodeError, match=r"^argument 2 of f\(\): "):
        codec.encode_args([1, 2, object()], ["a", "b"], "f()", None)


def test_callback_encoder_turns_an_object_into_a_callback_ref() -> None:
    listener = Widget()
    ref = pb.CallbackRef(id=4, interface="test.Listener")
    value = codec.encode(listener, "value", lambda obj, _: ref if obj is listener else None)
    assert value.callback_value == ref
    with pytest.raises(errors.EncodeError):
        codec.encode(Widget(), "value", lambda obj, _: ref if obj is listener else None)


# ------------------------------------------------------------------ decode errors


def test_empty_value_is_a_decode_error() -> None:
    with pytest.raises(errors.DecodeError, match=r"^result: empty Value"):
        codec.decode(pb.Value(), "result")


def test_empty_value_inside_a_list_names_its_place() -> None:
    value = pb.Value(list_value=pb.ValueList(items=[pb.Value(int_value=1), pb.Value()]))
    with pytest.raises(ValueError, match=r"^argument 0 of Shop.buy\(\)\[1\]: empty Value"):
        codec.decode_args([value], "Shop.buy()")


def test_callback_value_without_a_decoder_is_a_decode_error() -> None:
    value = pb.Value(callback_value=pb.CallbackRef(id=1, interface="test.Listener"))
    with pytest.raises(errors.DecodeError, match="callback"):
        codec.decode(value, "argument 0")


def test_callback_value_goes_through_the_decoder() -> None:
    value = pb.Value(callback_value=pb.CallbackRef(id=9, interface="test.Listener"))
    assert codec.decode(value, "argument 0", lambda ref, _: f"proxy {ref.id}") == "proxy 9"


# ------------------------------------------------------------------ errors


def error_round_trip(
    exc: BaseException, types: codec.ErrorTypes | None = None, with_traceback: bool = False
) -> BaseException:
    types = types or codec.ErrorTypes()
    wire = codec.encode_error(exc, types, with_traceback).SerializeToString()
    return codec.decode_error(pb.Error.FromString(wire), types)


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a method would have raised it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_builtin_error_arrives_as_the_same_type_with_the_same_args() -> None:
    result = error_round_trip(ValueError("bad quantity", 3))
    assert type(result) is ValueError
    assert result.args == ("bad quantity", 3)


def test_key_error_keeps_its_quoted_str() -> None:
    result = error_round_trip(KeyError("x"))
    assert type(result) is KeyError
    assert result.args == ("x",)
    assert str(result) == "'x'"


def test_builtin_error_without_args_arrives_without_args() -> None:
    assert error_round_trip(ValueError()).args == ()


def test_library_error_travels_with_its_code_and_arrives_as_itself() -> None:
    types = codec.ErrorTypes()
    error = codec.encode_error(errors.ShuttingDown("draining"), types)
    assert (error.type, error.code) == ("backchannel.ShuttingDown", pb.UNAVAILABLE)
    result = codec.decode_error(error, types)
    assert type(result) is errors.ShuttingDown
    assert str(result) == "draining"


def test_unknown_exception_code_is_unknown() -> None:
    assert codec.encode_error(OutOfStock("x"), codec.ErrorTypes()).code == pb.UNKNOWN


def test_registered_app_error_arrives_as_itself() -> None:
    types = codec.ErrorTypes([OutOfStock])
    result = error_round_trip(OutOfStock("sku-1", 0), types)
    assert type(result) is OutOfStock
    assert result.args == ("sku-1", 0)


def test_unregistered_app_error_arrives_as_remote_error() -> None:
    result = error_round_trip(OutOfStock("sku-1 is gone"))
    assert type(result) is errors.RemoteError
    assert result.type_name == f"{__name__}.OutOfStock"
    assert result.remote_message == "sku-1 is gone"
    assert str(result) == f"{__name__}.OutOfStock: sku-1 is gone"


def test_register_refuses_what_is_not_an_exception_class() -> None:
    with pytest.raises(TypeError, match="exception class"):
        codec.ErrorTypes().register(ValueError("not a class"))  # type: ignore[arg-type]


def test_traceback_travels_only_when_asked() -> None:
    exc = raised(ValueError("bad"))
    assert codec.encode_error(exc, codec.ErrorTypes()).traceback == ""
    assert not getattr(error_round_trip(exc), "__notes__", None)

    error = codec.encode_error(exc, codec.ErrorTypes(), with_traceback=True)
    assert "Traceback" in error.traceback
    assert "raise exc" in error.traceback
    [note] = error_round_trip(exc, with_traceback=True).__notes__
    assert note.startswith("remote traceback:\n")
    assert "ValueError: bad" in note


def test_remote_error_keeps_the_traceback_when_sent() -> None:
    result = error_round_trip(raised(OutOfStock("gone")), with_traceback=True)
    assert isinstance(result, errors.RemoteError)
    assert "OutOfStock: gone" in result.remote_traceback


def test_error_whose_args_cannot_be_encoded_still_travels_with_its_message() -> None:
    error = codec.encode_error(ValueError(Widget()), codec.ErrorTypes())
    assert list(error.args) == []
    assert error.message == "widget 7"
    result = codec.decode_error(error, codec.ErrorTypes())
    assert type(result) is ValueError
    assert str(result) == "widget 7"


def test_allowed_type_whose_init_wants_other_arguments_is_rebuilt_without_it() -> None:
    class NeedsTwo(Exception):
        def __init__(self, a: str, b: str) -> None:
            super().__init__(f"{a}/{b}")

    types = codec.ErrorTypes([NeedsTwo])
    result = error_round_trip(NeedsTwo("a", "b"), types)
    assert type(result) is NeedsTwo
    assert str(result) == "a/b"


def test_allowed_type_that_cannot_be_rebuilt_arrives_as_remote_error() -> None:
    class NewNeedsTwo(Exception):
        def __new__(cls, a: str, b: str) -> NewNeedsTwo:
            return super().__new__(cls, a, b)

        def __init__(self, a: str, b: str) -> None:
            super().__init__(f"{a}/{b}")

    types = codec.ErrorTypes([NewNeedsTwo])
    result = error_round_trip(NewNeedsTwo("a", "b"), types)
    assert type(result) is errors.RemoteError
    assert result.remote_message == "a/b"


# ------------------------------------------------------------------ triage of surviving mutants


NOT_UTF8_HINT = (
    "send bytes instead (os.fsencode(name)), or escape it first "
    "(name.encode(errors='backslashreplace').decode())"
)


def test_a_str_that_is_no_utf8_is_an_encode_error_saying_where_and_what_to_do() -> None:
    """docs/reliability.md: a lone surrogate never reaches protobuf; the EncodeError names
    the path, the surrogate and its index, and how to send the name instead. The same for a
    str subclass and for a dict key."""

    class FileName(str):
        pass

    is_not = "is not valid UTF-8 (lone surrogate"
    cases = [
        ("x\udcff", f"value: str {is_not} '\\udcff' at index 1)"),
        ([1, FileName("\udc80ab")], f"value[1]: str {is_not} '\\udc80' at index 0)"),
        ({"ok": 1, "a\udcffb": 2}, f"value: dict key 'a\\udcffb' {is_not} '\\udcff' at index 1)"),
    ]
    for obj, reason in cases:
        with pytest.raises(errors.EncodeError) as raised:
            codec.encode(obj, "value")
        assert type(raised.value) is errors.EncodeError
        assert str(raised.value) == f"{reason}; {NOT_UTF8_HINT}"


def test_the_path_names_the_failing_item_of_a_later_nested_container() -> None:
    with pytest.raises(errors.EncodeError, match=r"^value\[1\]\[2\]\['x'\]: cannot send"):
        codec.encode([[1], [2, 3, {"ok": 1, "x": Widget()}]], "value")
    bad = pb.Value(list_value=pb.ValueList(items=[pb.Value(int_value=1), pb.Value()]))
    value = pb.Value(list_value=pb.ValueList(items=[pb.Value(list_value=pb.ValueList()), bad]))
    with pytest.raises(errors.DecodeError, match=r"^result\[1\]\[1\]: empty Value"):
        codec.decode(value, "result")


def test_a_codec_error_deep_down_converts_nothing_more_than_twice() -> None:
    """The error path finds the failing item by identity on the way out (_locate): only the
    innermost level converts its items again, so an error deep in a big value costs one
    more pass over one container, not one per level. Counted at the callback encoder."""
    listener = object()
    seen: list[object] = []
    ref = pb.CallbackRef(id=1, interface="test.Listener")

    def callbacks(obj: object, _: str) -> pb.CallbackRef | None:
        seen.append(obj)
        return ref if obj is listener else None

    value: object = [listener, Widget()]
    for level in range(6):  # lists and dicts in turn
        value = [listener, value] if level % 2 else {"l": listener, "v": value}
    with pytest.raises(errors.EncodeError) as raised:
        codec.encode(value, "value", callbacks)
    path = "[1]['v'][1]['v'][1]['v'][1]"
    assert str(raised.value).startswith(f"value{path}: cannot send an object")
    # each listener once on the way in, and the innermost one once more on the way out
    assert sum(obj is listener for obj in seen) == 7 + 1

    # the same on the way back: each callback decoded once, the innermost twice
    decoded: list[int] = []
    back = pb.Value(list_value=pb.ValueList(items=[pb.Value(callback_value=ref), pb.Value()]))
    for level in range(6):
        outer = pb.Value()
        if level % 2:
            outer.list_value.items.add(callback_value=ref)
            outer.list_value.items.add().CopyFrom(back)
        else:  # a map with one entry: its order cannot matter
            outer.map_value.entries["v"].CopyFrom(back)
        back = outer
    with pytest.raises(errors.DecodeError) as raised:
        codec.decode(back, "result", lambda r, _: decoded.append(r.id))
    assert str(raised.value).startswith(f"result{path}: empty Value")
    assert len(decoded) == 4 + 1


def test_encode_into_fills_callbacks_and_nests_to_the_limit() -> None:
    listener = Widget()
    ref = pb.CallbackRef(id=3, interface="test.Listener")
    call = pb.Call()
    codec.encode_into(call.args.add(), [listener], "value", lambda obj, _: ref)
    assert call.args[0].list_value.items[0].callback_value == ref
    in_dict = codec.encode({"l": listener}, "value", lambda obj, _: ref)
    assert in_dict.map_value.entries["l"].callback_value == ref

    deepest: object = []
    for _ in range(codec.MAX_NESTING - 1):
        deepest = [deepest]  # MAX_NESTING lists in all: allowed
    codec.encode_into(call.args.add(), deepest, "value")
    assert codec.decode(call.args[1], "value") == deepest
    with pytest.raises(errors.EncodeError, match=r"nested deeper than 24 levels"):
        codec.encode_into(call.args.add(), [deepest], "value")


def test_is_bulk_value_past_the_entry_count_or_the_byte_size() -> None:
    items = BULK_ITEMS
    small_map = codec.encode({str(n): n for n in range(items)}, "v")
    big_map = codec.encode({str(n): n for n in range(items + 1)}, "v")
    assert small_map.ByteSize() <= BULK_BYTES >= big_map.ByteSize()
    assert (codec.is_bulk_value(small_map), codec.is_bulk_value(big_map)) == (False, True)
    small_list = codec.encode([None] * items, "v")
    big_list = codec.encode([None] * (items + 1), "v")
    assert (codec.is_bulk_value(small_list), codec.is_bulk_value(big_list)) == (False, True)

    # a scalar goes by its size: a bytes Value of exactly BULK_BYTES is not bulk, one more is
    overhead = pb.Value(bytes_value=b"x" * 60_000).ByteSize() - 60_000
    at_limit = pb.Value(bytes_value=b"x" * (BULK_BYTES - overhead))
    assert at_limit.ByteSize() == BULK_BYTES
    past = pb.Value(bytes_value=b"x" * (BULK_BYTES - overhead + 1))
    assert (codec.is_bulk_value(at_limit), codec.is_bulk_value(past)) == (False, True)
    assert codec.is_bulk_value(codec.encode("y", "v")) is False


def test_a_message_whose_type_url_has_a_path_arrives_as_its_class() -> None:
    """An Any's type name is what follows the type_url's last '/'."""
    stamp = timestamp_pb2.Timestamp(seconds=12)
    packed = any_pb2.Any()
    packed.Pack(stamp, type_url_prefix="example.com/registry/v2")
    assert packed.type_url == "example.com/registry/v2/google.protobuf.Timestamp"
    result = codec.decode(pb.Value(message_value=packed), "value")
    assert type(result) is timestamp_pb2.Timestamp
    assert result == stamp


class Stocked(Exception):
    """Its private attribute is set first: the public ones after it must still travel."""

    def __init__(self, sku: str, qty: int) -> None:
        self._cache = {"private": True}
        super().__init__(f"only {qty} of {sku} left")
        self.sku = sku
        self.qty = qty
        self.handle = Widget()  # no Value: dropped alone
        self.tags = ["a", "b"]

    def describe(self) -> str:
        return f"{self.sku}: {self.qty}"


def test_an_exceptions_public_value_attributes_travel_and_private_ones_stay_home() -> None:
    types = codec.ErrorTypes([Stocked])
    error = codec.encode_error(Stocked("sku-1", 0), types)
    assert sorted(error.attributes) == ["qty", "sku", "tags"]
    assert codec.decode(error.attributes["sku"], "v") == "sku-1"
    result = codec.decode_error(pb.Error.FromString(error.SerializeToString()), types)
    assert type(result) is Stocked
    assert result.args == ("only 0 of sku-1 left",)
    assert (result.sku, result.qty, result.tags) == ("sku-1", 0, ["a", "b"])
    assert not hasattr(result, "handle") and not hasattr(result, "_cache")
    assert result.describe() == "sku-1: 0"


def test_attributes_from_the_wire_never_set_a_private_name_or_shadow_a_method() -> None:
    """Attributes the peer chose are set only when public, decodable and not a method or
    descriptor of the class; each bad one is dropped alone, whatever its place."""
    forged = pb.Value(string_value="forged")
    # (name to try, Value, whether the name may vary): a private name, a method, a
    # descriptor of BaseException, and a Value that does not decode here
    bad_ones = [("_token", forged, True), ("describe", forged, False), ("args", forged, False)]
    bad_ones.append(("broken", CORRUPT_HELLO, True))
    for stem, bad_value, varies in bad_ones:
        # a protobuf map iterates in an order of its own (hashed, seeded per process): where
        # the name may vary, try names until a good attribute comes after the bad one
        for attempt in range(100):
            bad = f"{stem}{attempt}" if varies else stem
            error = pb.Error(type=codec.ErrorTypes.name_of(Stocked), message="m")
            error.attributes[bad].CopyFrom(bad_value)
            error.attributes["sku"].string_value = "sku-2"
            error.attributes["qty"].int_value = 4
            if list(error.attributes)[-1] != bad or not varies:
                break
        assert list(error.attributes)[-1] != bad or not varies
        result = codec.decode_error(error, codec.ErrorTypes([Stocked]))
        assert type(result) is Stocked, bad
        assert (result.sku, result.qty) == ("sku-2", 4), bad
        assert not hasattr(result, bad) or bad in ("describe", "args"), bad
        assert result.describe() == "sku-2: 4", bad
        assert result.args == ("m",), bad


def test_a_registered_type_is_made_by_its_new_given_the_args() -> None:
    class OneArg(Exception):
        def __new__(cls, sku: str) -> OneArg:
            return super().__new__(cls, sku)

    types = codec.ErrorTypes([OneArg])
    result = error_round_trip(OneArg("sku-3"), types)
    assert type(result) is OneArg
    assert result.args == ("sku-3",)


def test_a_type_that_cannot_be_rebuilt_is_remote_error_with_a_warning_saying_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Refuses(Exception):
        def __new__(cls, *args: object) -> Refuses:
            if args:
                raise ValueError("no rebuilding")
            return super().__new__(cls)

    types = codec.ErrorTypes([Refuses])
    exc = raised(Refuses.__new__(Refuses))
    exc.args = ("kept",)
    error = codec.encode_error(exc, types, with_traceback=True)
    with caplog.at_level(logging.WARNING, logger="backchannel"):
        result = codec.decode_error(error, types)
    assert type(result) is errors.RemoteError
    name = codec.ErrorTypes.name_of(Refuses)
    assert (result.type_name, result.remote_message) == (name, "kept")
    assert result.remote_traceback == error.traceback
    assert "Refuses: kept" in result.remote_traceback
    [record] = caplog.records
    assert record.getMessage() == (
        f"registered exception {name} arrived but cannot be rebuilt, so it is raised as "
        f"RemoteError: {Refuses.__qualname__}.__new__(cls, *args) must accept the exception's "
        "args and its public attributes must be settable (ValueError: no rebuilding)"
    )


def test_the_traceback_sent_is_the_whole_formatted_traceback() -> None:
    exc = raised(ValueError("bad"))
    error = codec.encode_error(exc, codec.ErrorTypes(), with_traceback=True)
    assert error.traceback == "".join(traceback.format_exception(exc))


def test_an_error_of_no_type_arrives_as_remote_error_named_by_its_code() -> None:
    result = codec.decode_error(pb.Error(code=pb.NOT_FOUND, message="gone"), codec.ErrorTypes())
    assert type(result) is errors.RemoteError
    assert (result.type_name, str(result)) == ("NOT_FOUND", "NOT_FOUND: gone")


def test_an_error_whose_args_do_not_decode_and_no_message_arrives_empty() -> None:
    for cls in (ValueError, OutOfStock):
        types = codec.ErrorTypes([OutOfStock])
        error = pb.Error(type=types.name_of(cls), args=[CORRUPT_HELLO])
        result = codec.decode_error(error, types)
        assert type(result) is cls
        assert result.args == ()


def test_encode_args_with_and_without_into_carry_callbacks_and_nest_to_the_limit() -> None:
    listener = Widget()
    ref = pb.CallbackRef(id=5, interface="test.Listener")

    def callbacks(obj: object, _: str) -> pb.CallbackRef | None:
        return ref if obj is listener else None

    deepest: object = []
    for _ in range(codec.MAX_NESTING - 1):
        deepest = [deepest]
    call = pb.Call()
    for into in (None, call.args):
        values = codec.encode_args([listener, deepest], ["l", "d"], "f()", callbacks, into)
        assert values[0].callback_value == ref
        assert codec.decode(values[1], "v") == deepest
        # the error path encodes the arguments again, callbacks included: it names the third
        with pytest.raises(errors.EncodeError) as raised:
            codec.encode_args([listener, 1, Widget()], ["l", "n", "w"], "f()", callbacks, into)
        assert str(raised.value).startswith("argument 2 'w' of f(): cannot send an object")
        with pytest.raises(errors.EncodeError, match=r"^argument 1 'd' of f\(\)\[0\]"):
            codec.encode_args([1, [deepest]], ["n", "d"], "f()", callbacks, into)


def nested(levels: int, kind: str) -> pb.Value:
    """A Value of ``levels`` nested lists or maps (key "k"), the innermost empty."""
    value = pb.Value(list_value=pb.ValueList()) if kind == "list" else pb.Value()
    if kind == "map":
        value.map_value.SetInParent()
    for _ in range(levels - 1):
        outer = pb.Value()
        if kind == "list":
            outer.list_value.items.add().CopyFrom(value)
        else:
            outer.map_value.entries["k"].CopyFrom(value)
        value = outer
    return value


@pytest.mark.parametrize("kind", ["list", "map"])
def test_decode_takes_values_nested_to_the_limit_and_refuses_one_more(kind: str) -> None:
    limit = codec.MAX_NESTING
    assert codec.decode(nested(limit, kind), "result") == codec.decode(nested(limit, kind), "r")
    assert codec.decode_args([nested(limit, kind)], "f()") == [
        codec.decode(nested(limit, kind), "r")
    ]
    place = "[0]" if kind == "list" else "['k']"
    too_deep = f"nested deeper than {limit} levels (the nesting limit, codec.MAX_NESTING)"
    with pytest.raises(errors.DecodeError) as raised:
        codec.decode(nested(limit + 1, kind), "result")
    assert str(raised.value) == f"result{place * limit}: {too_deep}"
    with pytest.raises(errors.DecodeError) as raised:
        codec.decode_args([pb.Value(int_value=1), nested(limit + 1, kind)], "f()")
    assert str(raised.value) == f"argument 1 of f(){place * limit}: {too_deep}"


@pytest.mark.parametrize("kind", ["list", "map"])
def test_encode_takes_values_nested_to_the_limit_and_refuses_one_more(kind: str) -> None:
    value: object = [] if kind == "list" else {}
    for _ in range(codec.MAX_NESTING - 1):
        value = [value] if kind == "list" else {"k": value}
    assert round_trip(value) == value
    place = "[0]" if kind == "list" else "['k']"
    with pytest.raises(errors.EncodeError) as raised:
        codec.encode([value] if kind == "list" else {"k": value}, "value")
    assert str(raised.value) == (
        f"value{place * codec.MAX_NESTING}: nested deeper than {codec.MAX_NESTING} levels "
        "(the nesting limit, codec.MAX_NESTING)"
    )


def test_the_error_path_decodes_and_encodes_callbacks_again_to_find_the_culprit() -> None:
    listener = Widget()
    ref = pb.CallbackRef(id=6, interface="test.Listener")
    back = pb.Value(callback_value=ref)
    # before the bad item: a callback, and one nested in a list (decoded again, one level down)
    in_list = pb.Value(list_value=pb.ValueList(items=[back]))
    as_list = pb.Value(list_value=pb.ValueList(items=[back, in_list, pb.Value()]))
    # a protobuf map iterates in an order of its own (hashed, seeded per process): try names
    # for the bad entry until a good one comes first
    for attempt in range(100):
        bad = f"bad{attempt}"
        as_map = pb.Value()
        as_map.map_value.entries[bad].CopyFrom(pb.Value())
        for n in range(4):
            as_map.map_value.entries[f"a{n}"].CopyFrom(in_list)
        if next(iter(as_map.map_value.entries)) != bad:
            break
    assert next(iter(as_map.map_value.entries)) != bad
    decoder = lambda r, _: f"proxy {r.id}"  # noqa: E731
    for value, place in ((as_list, "[2]"), (as_map, f"[{bad!r}]")):
        with pytest.raises(errors.DecodeError, match=rf"^result{re.escape(place)}: empty Value"):
            codec.decode(value, "result", decoder)
        with pytest.raises(errors.DecodeError, match=rf"^argument 1 of f\(\){re.escape(place)}:"):
            codec.decode_args([back, value], "f()", decoder)
    assert codec.decode_args([back], "f()", decoder) == ["proxy 6"]
    in_map = pb.Value()
    in_map.map_value.entries["a"].CopyFrom(in_list)
    assert codec.decode(in_map, "result", decoder) == {"a": ["proxy 6"]}

    def encoder(obj: object, _: str) -> pb.CallbackRef | None:
        return ref if obj is listener else None

    for obj, place in (
        ([listener, [1], Widget()], "[2]"),
        ({"a": listener, "b": [1], "c": Widget()}, "['c']"),
    ):
        with pytest.raises(errors.EncodeError, match=rf"^value{re.escape(place)}: cannot send"):
            codec.encode(obj, "value", encoder)


def test_what_cannot_be_sent_is_refused_with_the_whole_reason() -> None:
    with pytest.raises(errors.EncodeError) as raised:
        codec.encode([Widget()], "value")
    assert str(raised.value) == (
        f"value[0]: cannot send an object of type {__name__}.Widget; backchannel carries None, "
        "bool, int, float, str, bytes, list, tuple, dict with str keys, protobuf messages "
        "and declared callback arguments"
    )
    with pytest.raises(errors.EncodeError) as raised:
        codec.encode({"a": {(1, 2): 3}}, "value")
    assert str(raised.value) == "value['a']: dict keys must be str, got tuple key (1, 2)"
    with pytest.raises(errors.EncodeError) as raised:
        codec.encode([1, 2**63], "value")
    assert str(raised.value) == f"value[1]: int {2**63} does not fit in 64 bits"
    incomplete = descriptor_pb2.UninterpretedOption.NamePart(name_part="x")  # is_extension unset
    with pytest.raises(errors.EncodeError) as raised:
        codec.encode({"m": incomplete}, "value")
    assert str(raised.value).startswith("value['m']: cannot serialize protobuf message: ")
    assert "is_extension" in str(raised.value)


def test_a_callback_where_none_is_declared_is_refused_with_the_whole_reason() -> None:
    value = pb.Value(callback_value=pb.CallbackRef(id=1, interface="test.Listener"))
    with pytest.raises(errors.DecodeError) as raised:
        codec.decode(value, "result")
    assert str(raised.value) == (
        "result: a callback reference arrived where no callback argument is declared"
    )
    with pytest.raises(errors.DecodeError) as raised:
        codec.decode(pb.Value(), "result")
    assert str(raised.value) == (
        "result: empty Value (no kind set, or a kind this side does not know)"
    )


class Label(str):
    pass


class Ratio(float):
    pass


def test_subclasses_of_the_value_types_arrive_as_their_base_type() -> None:
    for obj, expected in (
        (Label("héllo"), "héllo"),
        (Ratio(0.5), 0.5),
        (memoryview(b"ab"), b"ab"),
        (Priority.LOW, 1),
    ):
        result = round_trip(obj)
        assert type(result) is type(expected) and result == expected, obj


def test_error_type_names_on_the_wire() -> None:
    class AppCallError(errors.CallError):
        pass

    name_of = codec.ErrorTypes.name_of
    assert name_of(ValueError) == "ValueError"
    assert name_of(errors.ShuttingDown) == "backchannel.ShuttingDown"
    assert name_of(errors.RemoteError) == "backchannel.RemoteError"
    assert name_of(AppCallError) == f"{__name__}.{AppCallError.__qualname__}"
    assert name_of(OutOfStock) == f"{__name__}.OutOfStock"
    types = codec.ErrorTypes([AppCallError])
    assert types.lookup(f"{__name__}.{AppCallError.__qualname__}") is AppCallError
    assert types.lookup("backchannel.ShuttingDown") is errors.ShuttingDown
    assert types.lookup("KeyError") is KeyError
    assert types.lookup("backchannel.RemoteError") is None  # never rebuilt from the wire
