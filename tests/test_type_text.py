"""Declared types as text (MethodInfo.parameter_types) and JSON values checked against
it (rpc/type_text.py): pure units."""

from __future__ import annotations

import typing
from typing import Any, Optional, Union

import pytest

import backchannel
from backchannel.rpc.interface import interface_spec
from backchannel.rpc.type_text import MAX_DEPTH, MAX_TEXT, accepts, mismatch, signature, type_text
from backchannel.v1 import envelope_pb2 as pb


@backchannel.interface("t.Listener")
class Listener:
    def changed(self, msg: str) -> None: ...


@pytest.mark.parametrize(
    ("hint", "text"),
    [
        (str, "str"),
        (None, "None"),
        (type(None), "None"),
        (Any, "Any"),
        (list[int], "list[int]"),
        (typing.List[int], "list[int]"),  # noqa: UP006
        (dict[str, list[float]], "dict[str, list[float]]"),
        (tuple[int, ...], "tuple[int, ...]"),
        (Optional[str], "str | None"),  # noqa: UP045
        (Union[int, str], "int | str"),  # noqa: UP007
        (int | None, "int | None"),
        (typing.Annotated[int, "unit"], "int"),
        (typing.Literal["a", 1], "Literal['a', 1]"),
        (Listener, "Listener"),
        ("Later", "Later"),
    ],
)
def test_type_text_is_how_python_writes_it(hint: object, text: str) -> None:
    assert type_text(hint) == text


def test_an_unresolvable_annotation_is_kept_as_written() -> None:
    @backchannel.interface("t.Odd")
    class Odd:
        def m(self, a: int, b: Missing, c) -> None: ...  # type: ignore[no-untyped-def]  # noqa: F821

    spec = interface_spec(Odd).methods["m"]
    assert [spec.parameter_type_text(i) for i in range(3)] == ["int", "Missing", ""]


@pytest.mark.parametrize(
    ("text", "value", "fits"),
    [
        ("str", "42", True),
        ("str", 42, False),
        ("int", 42, True),
        ("int", True, False),  # a bool is no int here
        ("int", 4.5, False),
        ("float", 4, True),  # an int is a float
        ("bool", 1, False),
        ("None", None, True),
        ("bytes", "aGk=", False),  # JSON has no bytes
        ("list", [1, "a"], True),
        ("list[int]", [1, "a"], False),
        ("List[int]", [1, 2], True),
        ("typing.Optional[list[str]]", None, True),
        ("Optional[list[str]]", ["a", 1], False),
        ("Union[int, str]", "a", True),
        ("int | str", [], False),
        ("dict[str, int]", {"a": 1}, True),
        ("dict[int, str]", {"1": "a"}, False),  # JSON keys are strings
        ("tuple[int, ...]", [1, 2, 3], True),
        ("tuple[int, str]", [1, "a"], True),
        ("tuple[int, str]", [1], False),
        ("Any", object(), True),
        ("object", 1, True),
        # text not read: nothing checked
        ("CallbackListener", 1, True),
        ("Literal['a']", 1, True),
        ("set[int]", "x", True),
        ("list[Foo] | int", "x", False),  # ... but what is read still checks
        ("int | Foo", "x", True),
        ("list[", 1, True),
        ("int]", "x", True),
        ("int" + " | int" * MAX_TEXT, "x", True),  # too long
        ("list[" * (MAX_DEPTH + 2) + "int" + "]" * (MAX_DEPTH + 2), 1, True),  # too deep
    ],
)
def test_accepts(text: str, value: object, fits: bool) -> None:
    assert accepts(text, value) is fits


def test_signature_and_mismatch_name_the_parameter() -> None:
    method = pb.MethodInfo(
        name="say",
        parameters=["text", "times"],
        required=2,
        parameter_types=["str", ""],
        one_way=True,
    )
    assert signature(method) == "say(text: str, times) one-way"
    assert signature(pb.MethodInfo(name="f", parameters=["a"], required=1)) == "f(a)"
    defaults = pb.MethodInfo(name="g", parameters=["a", "b", "c"], required=1)
    defaults.parameter_types.extend(["int", "", "list[str]"])
    assert signature(defaults) == "g(a: int, b=..., c: list[str] = ...)"
    assert mismatch(method, ["hi", "anything"], "S.say()") is None
    assert mismatch(method, [42], "S.say()", skip=0) is None
    assert mismatch(method, [42], "S.say()") == (
        "argument 0 (text) of S.say() is declared str, got 42 (int); "
        """quote a string in JSON: '"42"'"""
    )
    long = mismatch(method, [list(range(100))], "S.say()")
    assert long is not None and long.endswith(
        "got [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16... (list)"
    )
    assert mismatch(pb.MethodInfo(name="f", parameters=["a"]), [1], "f()") is None


def test_a_describe_whose_lists_disagree_is_checked_only_where_both_state_a_parameter() -> None:
    # more types than parameters (a buggy or hostile provider): the extras are not checked,
    # and nothing indexes past either list
    extra = pb.MethodInfo(name="f", parameters=["a"], required=1, parameter_types=["str", "str"])
    assert mismatch(extra, ["x", 7, 8], "S.f()") is None
    assert mismatch(extra, [[7]], "S.f()") == (
        "argument 0 (a) of S.f() is declared str, got [7] (list)"
    )
    assert signature(extra) == "f(a: str)"
    # fewer types than parameters: the unstated ones are not checked
    fewer = pb.MethodInfo(name="g", parameters=["a", "b"], required=2, parameter_types=["int"])
    assert mismatch(fewer, [1, "anything"], "S.g()") is None
    assert signature(fewer) == "g(a: int, b)"
