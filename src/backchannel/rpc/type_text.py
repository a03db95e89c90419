"""Declared parameter types as text, and JSON values checked against that text.

A provider states each parameter's type in ``MethodInfo.parameter_types`` as Python
writes it (:func:`type_text`: ``"str"``, ``"list[int]"``, ``"str | None"``); a tool that
sends JSON arguments (``backchannel call``) reads the text back and checks each value
(:func:`accepts`) before sending. Only simple types are checked: ``str``, ``int``,
``float``, ``bool``, ``bytes``, ``None``, ``Any``/``object``, ``list``, ``dict`` and
``tuple`` (parameterised or not), ``Optional`` and unions of them. Text naming anything
else checks nothing: the provider still checks what it runs.
"""

from __future__ import annotations

import functools
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from backchannel.v1 import envelope_pb2 as pb

__all__ = ["accepts", "mismatch", "signature", "type_text"]

#: type text longer than this, or nested deeper, is not read (checks nothing): the text
#: comes from the provider
MAX_TEXT = 1000
MAX_DEPTH = 16

_UNIONS = (typing.Union, types.UnionType)


def type_text(hint: object) -> str:
    """An annotation as Python writes it: ``str``, ``list[int]``, ``str | None``, a
    class by its qualified name; a string annotation (unresolved) as it is."""
    if hint is None or hint is type(None):
        return "None"
    if hint is typing.Any:
        return "Any"
    if isinstance(hint, str):
        return hint
    if isinstance(hint, typing.ForwardRef):
        return hint.__forward_arg__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return " | ".join(type_text(arg) for arg in args)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is not None:
        if origin is typing.Literal:
            inner = ", ".join(repr(arg) for arg in args)
        else:
            inner = ", ".join("..." if arg is Ellipsis else type_text(arg) for arg in args)
        return f"{_name(origin)}[{inner}]" if args else _name(origin)
    return _name(hint)


def _name(thing: object) -> str:
    name = getattr(thing, "__qualname__", None) or getattr(thing, "_name", None)
    return name if isinstance(name, str) else repr(thing)


# ------------------------------------------------------------- reading the text back

#: a parsed type: (name, arguments); name "?" checks nothing
_Type = tuple[str, tuple[Any, ...]]
_UNKNOWN: _Type = ("?", ())
_TOKEN = re.compile(r"\s*(\.\.\.|[A-Za-z_][\w.]*|[\[\],|])")
_PREFIXES = ("typing.", "typing_extensions.", "builtins.", "collections.abc.")
_ALIASES = {
    "List": "list",
    "Dict": "dict",
    "Tuple": "tuple",
    "NoneType": "None",
    "object": "Any",
}
_KNOWN = frozenset({"str", "int", "float", "bool", "bytes", "None", "Any", "list", "dict", "tuple"})


class _Unreadable(Exception):
    """Type text this module does not read."""


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> _Type:
    """``text`` as a parsed type; ``_UNKNOWN`` when it cannot be read."""
    if len(text) > MAX_TEXT:
        return _UNKNOWN
    tokens: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position:].strip():
                return _UNKNOWN  # a literal, a string, anything else: not read
            break
        tokens.append(match.group(1))
        position = match.end()
    try:
        parsed, rest = _union(tokens, 0)
    except (_Unreadable, IndexError):
        return _UNKNOWN
    return parsed if rest == len(tokens) else _UNKNOWN


def _union(tokens: list[str], at: int, depth: int = 0) -> tuple[_Type, int]:
    if depth > MAX_DEPTH:
        raise _Unreadable
    members = []
    member, at = _term(tokens, at, depth)
    members.append(member)
    while at < len(tokens) and tokens[at] == "|":
        member, at = _term(tokens, at + 1, depth)
        members.append(member)
    return (members[0] if len(members) == 1 else ("|", tuple(members))), at


def _term(tokens: list[str], at: int, depth: int) -> tuple[_Type, int]:
    name = tokens[at]
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    name = _ALIASES.get(name, name)
    at += 1
    args: list[_Type] = []
    if at < len(tokens) and tokens[at] == "[":
        while True:
            if tokens[at + 1] == "...":
                args.append(("...", ()))
                at += 2
            else:
                arg, at = _union(tokens, at + 1, depth + 1)
                args.append(arg)
            if tokens[at] == "]":
                at += 1
                break
            if tokens[at] != ",":
                raise _Unreadable
    if name == "Optional" and len(args) == 1:
        return ("|", (args[0], ("None", ()))), at
    if name == "Union" and args:
        return ("|", tuple(args)), at
    if name not in _KNOWN or name in {"[", "]", ",", "|", "..."}:
        return _UNKNOWN, at
    return (name, tuple(args)), at


def accepts(text: str, value: object) -> bool:
    """Whether a JSON ``value`` fits the declared type ``text`` (True when the text is
    not read: unknown types are not checked)."""
    return _fits(_parse(text), value)


def _fits(declared: _Type, value: object) -> bool:
    name, args = declared
    if name in ("?", "Any"):
        return True
    if name == "|":
        return any(_fits(member, value) for member in args)
    if name == "str":
        return isinstance(value, str)
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":  # an int is a float, as Python's typing has it
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "None":
        return value is None
    if name == "bytes":
        return False  # JSON has no bytes
    if name == "list":
        return isinstance(value, list) and (not args or all(_fits(args[0], v) for v in value))
    if name == "tuple":  # a JSON array: tuple[int, ...], or tuple[int, str] item by item
        if not isinstance(value, list):
            return False
        if not args or (len(args) == 2 and args[1][0] == "..."):
            return not args or all(_fits(args[0], v) for v in value)
        return len(args) == len(value) and all(map(_fits, args, value))
    if name == "dict":  # JSON object keys are strings: dict[int, X] fits none
        if not isinstance(value, dict):
            return False
        if len(args) != 2:
            return True
        return all(_fits(args[0], k) and _fits(args[1], v) for k, v in value.items())
    return True


# ------------------------------------------------------------- a method's declarations


def signature(method: pb.MethodInfo) -> str:
    """A method as Python declares it, from its MethodInfo: ``name(a: int, b, c: str =
    ...)`` (``...`` for a default), marked ``one-way`` when it is one."""
    types = [*method.parameter_types, *[""] * len(method.parameters)]
    params = []
    for index, (name, text) in enumerate(zip(method.parameters, types, strict=False)):
        default = index >= method.required
        if text:
            params.append(f"{name}: {text} = ..." if default else f"{name}: {text}")
        else:
            params.append(f"{name}=..." if default else name)
    return f"{method.name}({', '.join(params)})" + (" one-way" if method.one_way else "")


def mismatch(
    method: pb.MethodInfo, args: Sequence[object], where: str, skip: int = -1
) -> str | None:
    """Why JSON ``args`` do not fit the types ``method`` (``where``, for the message)
    declares, naming the argument, its parameter, the declared type and what was given;
    None when they fit or no types are stated. Argument ``skip`` (a listener) is not
    checked, nor one with no stated parameter and type: a Describe whose lists disagree
    (a buggy or hostile provider's) gets no check beyond the shorter; the provider checks
    what it runs."""
    stated = zip(args, method.parameters, method.parameter_types, strict=False)
    for index, (value, parameter, declared) in enumerate(stated):
        if index == skip or not declared or accepts(declared, value):
            continue
        given = json.dumps(value)
        given = given if len(given) <= 60 else given[:57] + "..."
        if accepts(declared, given) and not isinstance(value, list | dict):
            hint = f"; quote a string in JSON: '{json.dumps(given)}'"
        elif "bytes" in declared:
            hint = "; JSON carries no bytes"
        else:
            hint = ""
        kind = "None" if value is None else type(value).__name__
        return (
            f"argument {index} ({parameter}) of {where} is declared {declared}, "
            f"got {given} ({kind}){hint}"
        )
    return None
