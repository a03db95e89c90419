"""Python values to and from Value, exceptions to and from Error; no I/O."""

from __future__ import annotations

import enum
import math

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from backchannel import codec, errors
from backchannel.v1 import envelope_pb2 as pb


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
