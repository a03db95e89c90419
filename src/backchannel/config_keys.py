"""Reading one key of a parsed TOML configuration: each check names the file and the key
when the value is not what it should be (:mod:`backchannel.config` reads the tables)."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backchannel.rpc.interface import find_interface_spec


class ConfigError(ValueError):
    """A mistake in a configuration file; the message names the file and the key."""


#: an application start-up hook (``[application] startup``): called with the running
#: server once it listens (a ``def`` with a Server, an ``async def`` with an AsyncServer)
StartupHook = Callable[[Any], Any]


class KeyReader:
    """Checks and reads the values of a parsed TOML file, one key at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, got: object = None) -> ConfigError:
        """The error to raise: ``key`` holds ``got``, not ``expected``."""
        suffix = "" if got is None else f", got {got!r}"
        return ConfigError(f"{self.path}: {key}: expected {expected}{suffix}")

    def table(self, data: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(key, "a table", data)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"one of the keys {', '.join(sorted(allowed))}")
        return data

    def tables(self, data: dict[str, Any], name: str, key: str) -> list[dict[str, Any]]:
        value = data.get(name, [])
        if not isinstance(value, list):
            raise self.fail(f"{key}{name}", f"an array of tables ([[{name}]])", value)
        return value

    def string(self, data: dict[str, Any], name: str, key: str, required: bool = False) -> Any:
        value = data.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key}.{name}", "a non-empty string", value)
        return value

    def number(self, data: dict[str, Any], name: str, key: str, integer: bool = False) -> Any:
        """An integer >= 0, or (``integer=False``) a number of seconds > 0."""
        value = data.get(name)
        kinds = (int,) if integer else (int, float)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or value < 0
            or (not integer and not value > 0)
        ):
            raise self.fail(
                f"{key}.{name}", "an integer >= 0" if integer else "a number > 0", value
            )
        return value

    def limit(self, data: dict[str, Any], key: str) -> int | None:
        """A consumer's ``callbacks`` limit: an integer >= 1, or None when not given."""
        value = data.get("callbacks")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise self.fail(
                f"{key}.callbacks", "an integer >= 1 (live listeners per stream)", value
            )
        return value

    def boolean(self, data: dict[str, Any], name: str, key: str) -> Any:
        value = data.get(name)
        if value is not None and not isinstance(value, bool):
            raise self.fail(f"{key}.{name}", "true or false", value)
        return value

    def resolve(self, dotted: str, key: str) -> Any:
        """``module:attr`` or ``module:attr.method``, imported from the config's folder."""
        module_name, colon, attribute = dotted.partition(":")
        if not colon or not module_name or not attribute:
            raise self.fail(key, "an import path 'module:attr' (or 'module:attr.method')", dotted)
        folder = str(self.path.resolve().parent)
        sys.path.insert(0, folder)
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise self.fail(key, f"an importable module ({exc})", dotted) from None
        except Exception as exc:  # the module itself is broken: SyntaxError, NameError, ...
            raise self.fail(
                key, f"a module that imports cleanly ({describe_error(exc)})", dotted
            ) from None
        finally:
            sys.path.remove(folder)
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise self.fail(key, f"a name that exists ({part!r} is missing)", dotted)
            target = getattr(target, part)
        return target

    def hook(self, spec: str, key: str) -> StartupHook:
        """A start-up hook ``module:function``: imported now, and able to take one
        argument (the running server)."""
        target = self.resolve(spec, key)
        expected = "a function taking one argument, the running server"
        if not callable(target) or isinstance(target, type):
            raise self.fail(key, expected, spec)
        try:
            inspect.signature(target).bind(None)
        except TypeError as exc:
            raise self.fail(key, f"{expected} ({exc})", spec) from None
        except ValueError:  # no signature to read (a builtin): the call will say
            pass
        return target  # type: ignore[no-any-return]

    def interface(self, data: dict[str, Any], key: str) -> type:
        name = self.string(data, "interface", key, required=True)
        cls = self.resolve(name, f"{key}.interface")
        if not isinstance(cls, type) or find_interface_spec(cls) is None:
            raise self.fail(
                f"{key}.interface", "a class declared with @backchannel.interface", name
            )
        return cls


def describe_error(exc: BaseException) -> str:
    """``Type: message`` in one line, with the line of a SyntaxError."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        return f"SyntaxError: {exc.msg} ({where})"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Option(KeyReader):
    """Checks a command-line option as :class:`KeyReader` checks a key: resolved from the
    current directory, and named alone in the error (there is no file to name)."""

    def fail(self, key: str, expected: str, got: object = None) -> ConfigError:
        suffix = "" if got is None else f", got {got!r}"
        return ConfigError(f"{key}: expected {expected}{suffix}")


def startup_hook(spec: str, option: str = "--startup") -> StartupHook:
    """The hook ``module:function`` given on the command line, imported from the current
    directory; a bad one is a :class:`ConfigError` naming ``option`` and ``spec``."""
    return _Option(Path.cwd() / option).hook(spec, option)
