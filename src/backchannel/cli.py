"""The ``backchannel`` command line: serve, describe, call, listen.

::

    backchannel serve CONFIG [--startup MOD:FUNC] start the providers a config file names
                                                  (then call its start-up hook)
    backchannel describe ADDRESS                  what a provider exports, as a table
    backchannel describe REGISTRY SERVICE         the providers a registry lists for it
    backchannel call ADDRESS SERVICE METHOD [JSON_ARG ...]   one call, result as JSON
    backchannel listen ADDRESS SERVICE METHOD [JSON_ARG ...] --callback-arg N [--answer JSON]
                                                  print every callback until Ctrl-C (exit 1
                                                  when the provider goes away); each
                                                  callback returns --answer (default null)
    backchannel stubs MODULE [--check]            write MODULE.pyi: typing (docs/typing.md)

ADDRESS is HOST:PORT, or a registry (zookeeper://HOST:PORT, static://H1:P1,H2:P2 or
H1:P1,H2:P2): call and listen then pick one provider of SERVICE through it (weighted
random, as a Client does) and say which on stderr. call and listen refuse a JSON
argument that does not fit its parameter's type, when the provider declares one.

Mistakes (bad arguments, an unreachable address, an unknown service) print one line on
stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from backchannel.client import Client
from backchannel.cluster.loadbalance import load_balance
from backchannel.cluster.registries import open_registry
from backchannel.cluster.registry import RegistryError
from backchannel.cluster.service_url import ServiceURL
from backchannel.errors import BackchannelError
from backchannel.rpc.exports import to_json
from backchannel.rpc.interface import interface
from backchannel.rpc.type_text import mismatch, signature
from backchannel.transport.default import ENVIRONMENT, NAMES
from backchannel.transport.default import resolve as resolve_transport
from backchannel.transport.seam import StatusError
from backchannel.v1 import envelope_pb2 as pb

EXIT_USAGE = 2
EXIT_FAILED = 1


class CommandError(Exception):
    """A mistake to report in one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        return int(options.run(options))
    except CommandError as exc:
        print(f"backchannel {options.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (BackchannelError, OSError, ValueError, TypeError) as exc:
        print(f"backchannel {options.command}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _plain(text: str) -> str:
    """A docstring as plain text for ``--help``: no reST markup (literals, roles, ``::``)."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)  # :class:`~a.B` -> a.B
    text = text.replace("``", "")
    text = re.sub(r"^::\n\n", "", text, flags=re.MULTILINE)  # a bare literal-block marker
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="backchannel",
        description=_plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the table's layout
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="start the providers a config file names",
        description="Start the providers a TOML config file names; serve until Ctrl-C.",
    )
    serve.add_argument("config", help="a TOML configuration file")
    serve.add_argument(
        "--startup",
        metavar="MODULE:FUNCTION",
        help="call this with the running server once it listens (instead of the file's "
        "[application] startup); a def gets the Server, an async def the AsyncServer",
    )
    serve.set_defaults(run=_serve)

    describe = commands.add_parser(
        "describe",
        help="print what a provider exports",
        description="Print what the provider at ADDRESS exports, as a table.",
    )
    describe.add_argument("address", help="HOST:PORT, or a registry (zookeeper://HOST:PORT)")
    describe.add_argument(
        "service", nargs="?", help="with a registry: the interface whose providers to list"
    )
    describe.add_argument("--group", default="", help="with a registry: the export's group")
    describe.add_argument("--version", default="", help="with a registry: the export's version")
    _transport_option(describe)
    describe.set_defaults(run=_describe)

    for name, run, text in (
        ("call", _call, "make one call and print its result as JSON"),
        ("listen", _listen, "call a method with a callback and print every callback"),
    ):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("address", help="HOST:PORT, or a registry (zookeeper://HOST:PORT)")
        sub.add_argument("service", help="the interface name, e.g. com.callback.CallbackService")
        sub.add_argument("method", help="the method name")
        sub.add_argument("args", nargs="*", metavar="JSON_ARG", help="one JSON value per argument")
        sub.add_argument("--group", default="", help="the export's group")
        sub.add_argument("--version", default="", help="the export's version")
        sub.add_argument("--timeout", type=_seconds, default=5.0, help="seconds (default 5)")
        _transport_option(sub)
        sub.set_defaults(run=run)
        if name == "listen":
            sub.add_argument(
                "--callback-arg",
                type=int,
                required=True,
                metavar="N",
                help="the index (from 0) of the callback argument; the listener goes there",
            )
            sub.add_argument(
                "--answer",
                type=_json_value,
                default=None,
                metavar="JSON",
                help="what every callback returns, as JSON (default null); e.g. true for a "
                "listener whose provider expects a bool",
            )
    from backchannel.rpc import stubs  # `backchannel stubs MODULE`: typed interfaces

    stubs.add_command(commands)
    return parser


def _transport_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--transport",
        choices=tuple(NAMES),
        default=None,
        help=f"the gRPC library to connect with (default: ${ENVIRONMENT}, else grpcio)",
    )


def _seconds(text: str) -> float:
    """A finite number of seconds > 0 (argparse reports a bad one as a usage mistake)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return value


def _json_value(text: str) -> Any:
    """One JSON value (argparse reports a bad one as a usage mistake)."""
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not JSON: {text!r} (quote strings: '\"text\"')"
        ) from None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, StatusError):  # the provider's status, as grpc names it
        return f"{exc.code.name}: {exc.details}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _json_args(values: Sequence[str]) -> list[Any]:
    args = []
    for index, text in enumerate(values):
        try:
            args.append(json.loads(text))
        except ValueError:
            raise CommandError(
                f"argument {index} is not JSON: {text!r} (quote strings: '\"text\"')"
            ) from None
    return args


def _exports(address: str, timeout: float = 5, transport: str | None = None) -> pb.DescribeResponse:
    """What the provider at ``address`` exports (its Describe RPC)."""
    describe = resolve_transport(transport).unary(
        address, "Describe", pb.DescribeRequest(), pb.DescribeResponse, timeout
    )
    response: pb.DescribeResponse = asyncio.run(describe)
    return response


def _is_registry(address: str) -> bool:
    return "," in address or "://" in address


def _providers(options: argparse.Namespace) -> list[ServiceURL]:
    """The providers a registry lists for the options' service, group and version."""
    try:
        zookeeper = options.address.startswith("zookeeper://")
        registry = open_registry(options.address, **({"connect_timeout": 5.0} if zookeeper else {}))
    except (ValueError, RegistryError) as exc:
        raise CommandError(str(exc)) from None
    try:
        subscription = registry.subscribe(
            options.service, group=options.group, version=options.version
        )
        return sorted(subscription.providers, key=lambda url: url.address)
    except RegistryError as exc:
        raise CommandError(str(exc)) from None
    finally:
        registry.close()


def _pick(options: argparse.Namespace) -> str:
    """HOST:PORT of one provider: the address itself, or one a registry lists."""
    if not _is_registry(options.address):
        return str(options.address)
    providers = _providers(options)
    if not providers:
        raise CommandError(f"{options.address} lists no provider of {_label(options)}")
    chosen = load_balance("random").select(tuple(providers), ())
    print(f"provider {chosen.address} (of {len(providers)})", file=sys.stderr, flush=True)
    return chosen.address


def _label(options: argparse.Namespace) -> str:
    return str(options.service) + "".join(
        f" {name} {value!r}"
        for name, value in (("group", options.group), ("version", options.version))
        if value
    )


def _describe_providers(options: argparse.Namespace) -> int:
    if not options.service:
        raise CommandError(f"describe {options.address} needs a SERVICE (an interface name)")
    providers = _providers(options)
    print(f"{options.address}: {len(providers)} provider(s) of {_label(options)}")
    rows = [("ADDRESS", "GROUP", "VERSION", "WEIGHT", "APPLICATION", "METHODS")]
    for url in providers:
        rows.append(
            (
                url.address,
                url.group or "-",
                url.version or "-",
                str(url.weight),
                url.application or "-",
                ",".join(url.methods) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _describe(options: argparse.Namespace) -> int:
    if _is_registry(options.address):
        return _describe_providers(options)
    if options.service:
        raise CommandError(f"describe {options.address} takes no SERVICE (it is no registry)")
    response = _exports(options.address, transport=options.transport)
    rows = [("SERVICE", "GROUP", "VERSION", "METHOD", "ARGS", "CALLBACKS", "REMOVERS", "ONE-WAY")]
    for service in response.services:
        for method in service.methods:
            rows.append(
                (
                    service.name,
                    service.group or "-",
                    service.version or "-",
                    method.name,
                    ", ".join(method.parameters) or "-",
                    ",".join(map(str, method.callback_arguments)) or "-",
                    ",".join(map(str, method.remover_arguments)) or "-",
                    "yes" if method.one_way else "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    name = response.application or "provider"
    print(f"{options.address}: {name}, protocol {response.protocol_version}")
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    _print_signatures(response)
    return 0


def _print_signatures(response: pb.DescribeResponse) -> None:
    """Below the table: each method that declares types or callback interfaces as a
    signature, and what the provider may call on each listener."""
    lines = []
    for service in response.services:
        for method in service.methods:
            if method.parameter_types or method.callback_interfaces:
                lines.append(f"{service.name}.{signature(method)}")
            for listener in method.callback_interfaces:
                at = listener.argument
                named = f" ({method.parameters[at]})" if at < len(method.parameters) else ""
                lines.append(f"  callback argument {at}{named}: {listener.name}")
                lines.extend(f"    {signature(callback)}" for callback in listener.methods)
    if lines:
        print("\n" + "\n".join(lines))


def _call(options: argparse.Namespace) -> int:
    args = _json_args(options.args)
    options.address = _pick(options)
    _check_types(_exports(options.address, options.timeout, options.transport), options, args)
    call = pb.Call(
        service=options.service,
        group=options.group,
        version=options.version,
        method=options.method,
        json_args=json.dumps(args),
    )
    transport = resolve_transport(options.transport)
    invoke = transport.unary(options.address, "Invoke", call, pb.Result, options.timeout)
    try:
        result: pb.Result = asyncio.run(invoke)
    except StatusError as exc:  # a failed call: its Error is in the status details
        if exc.error is None:
            raise
        raise CommandError(f"{exc.error.type}: {exc.error.message}") from None
    if result.HasField("error"):  # a provider from before errors were statuses
        raise CommandError(f"{result.error.type}: {result.error.message}")
    print(result.json or "null")
    return 0


class _PrintingListener:
    """A listener of any interface: prints each callback as one JSON line and returns
    ``answer`` (``--answer``; None, sent as null, by default)."""

    def __init__(self, answer: Any = None) -> None:
        self._lock = threading.Lock()
        self._answer = answer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def callback(*args: Any) -> Any:
            with self._lock:
                _print_line(json.dumps({"callback": name, "args": json.loads(to_json(args))}))
            return self._answer

        return callback


def _listen(options: argparse.Namespace) -> int:
    args = _json_args(options.args)
    index = options.callback_arg
    if not 0 <= index <= len(args):
        raise CommandError(f"--callback-arg {index} must be between 0 and {len(args)}")
    options.address = _pick(options)
    exports = _exports(options.address, options.timeout, options.transport)
    _check_callback_argument(exports, options)
    _check_types(exports, options, [*args[:index], None, *args[index:]], skip=index)
    args.insert(index, _PrintingListener(options.answer))
    service = _dynamic_interface(options.service, options.method)
    with Client(options.address, timeout=options.timeout, transport=options.transport) as client:
        proxy: Any = client.reference(service, group=options.group, version=options.version)
        result = getattr(proxy, options.method)(*args)
        _print_line(json.dumps({"result": json.loads(to_json(result))}))
        # callbacks print from the client's threads until Ctrl-C or the stream ends
        cause = _stream_end(client).result()
    raise CommandError(
        f"the stream to {options.address} ended, no more callbacks will come "
        f"({_one_line(cause) if cause else 'closed'})"
    )


def _stream_end(client: Client) -> concurrent.futures.Future[BaseException | None]:
    """Resolves with why the client's current stream ended (the provider went away,
    the connection broke); the listener's callbacks come on that stream only.

    The sync Client has no public hook for this, so it looks at its stream's session."""
    core = client._core
    session = core._session
    if session is None:
        raise CommandError(f"no stream to {client.address} is open")

    async def ended() -> BaseException | None:
        await session.closed.wait()
        return session.cause

    return client._portal.submit(ended())


def _check_types(
    exports: pb.DescribeResponse, options: argparse.Namespace, args: list[Any], skip: int = -1
) -> None:
    """Each JSON argument fits its parameter's type when the provider states it
    (MethodInfo.parameter_types), or a CommandError saying which does not; nothing is
    checked for a method not exported (the provider will say so)."""
    wanted = (options.service, options.group, options.version, options.method)
    for service in exports.services:
        for method in service.methods:
            if (service.name, service.group, service.version, method.name) == wanted:
                wrong = mismatch(method, args, f"{options.service}.{options.method}()", skip)
                if wrong:
                    raise CommandError(wrong)


def _check_callback_argument(exports: pb.DescribeResponse, options: argparse.Namespace) -> None:
    """The export, its method and the callback argument exist, or a clear CommandError."""
    wanted = (options.service, options.group, options.version)
    label = options.service + "".join(
        f" {name} {value!r}"
        for name, value in (("group", wanted[1]), ("version", wanted[2]))
        if value
    )
    named = [s for s in exports.services if s.name == options.service]
    if not named:
        known = ", ".join(sorted({s.name for s in exports.services})) or "nothing"
        raise CommandError(f"no service {options.service!r} is exported here (exported: {known})")
    found = [s for s in named if (s.name, s.group, s.version) == wanted]
    if not found:
        exported = ", ".join(f"group {s.group!r} version {s.version!r}" for s in named)
        raise CommandError(f"{label} is not exported here; it is exported as: {exported}")
    methods = {m.name: m for m in found[0].methods}
    method = methods.get(options.method)
    if method is None:
        known = ", ".join(sorted(methods)) or "none"
        raise CommandError(f"{label} has no method {options.method!r} (its methods: {known})")
    if options.callback_arg not in method.callback_arguments:
        declared = ", ".join(map(str, method.callback_arguments)) or "none"
        raise CommandError(
            f"argument {options.callback_arg} of {options.service}.{options.method}() is not "
            f"a callback argument (its callback arguments: {declared})"
        )


def _dynamic_interface(service: str, method: str) -> type:
    """An interface with one method taking any arguments (the provider's declarations
    arrive in the handshake)."""

    def remote(self: object, *args: Any) -> Any:
        """A method known only by name."""

    remote.__name__ = method
    return interface(service)(type("Remote", (), {method: remote}))


def _serve(options: argparse.Namespace) -> int:
    from backchannel.config import load_config  # only `serve` needs these
    from backchannel.config_keys import startup_hook
    from backchannel.serving import StartupFailed, serve

    config = load_config(options.config)
    if not config.services:
        raise CommandError(f"{config.path}: no [[service]] to serve (nothing would listen)")
    hook, spec = config.startup, config.startup_spec
    if options.startup is not None:  # checked before anything listens, as the file is
        hook, spec = startup_hook(options.startup), options.startup
    try:
        serve(config, hook, spec, lambda address: print(f"listening on {address}", flush=True))
    except StartupFailed as exc:
        raise CommandError(str(exc)) from None
    return 0


_print_lock = threading.Lock()


def _print_line(line: str) -> None:
    """One whole line on stdout: listeners run in several threads, and print() writes a
    line and its newline separately, so two lines could interleave."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
