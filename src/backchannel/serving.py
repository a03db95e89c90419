"""Running the providers of a configuration until interrupted, and its application
start-up hook once they listen (``backchannel serve``)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable

from backchannel.config import Config
from backchannel.config_keys import StartupHook


class StartupFailed(Exception):
    """The start-up hook raised (or returned what cannot run); the server was stopped."""


def serve(
    config: Config, hook: StartupHook | None, spec: str, ready: Callable[[str], None]
) -> None:
    """Start the config's providers, call ``hook`` with the running server, then call
    ``ready`` with each listening address and serve until KeyboardInterrupt.

    A ``def`` hook is called in this thread with the :class:`~backchannel.Server`; an
    ``async def`` one is awaited with an :class:`~backchannel.AsyncServer` running on this
    thread's loop, so the tasks it starts live as long as the server. A hook that raises
    stops the server and raises :class:`StartupFailed` naming ``spec``.
    """
    if hook is not None and _is_async(hook):
        asyncio.run(_serve_async(config, hook, spec, ready))
        return
    servers = config.start_servers()
    try:
        if hook is not None:
            try:
                outcome = hook(servers[0])
            except Exception as exc:
                raise _failed(spec, exc) from None
            if inspect.isawaitable(outcome):
                if inspect.iscoroutine(outcome):
                    outcome.close()  # never to be awaited: no "never awaited" warning
                raise StartupFailed(
                    f"the startup hook {spec} returned an awaitable, so the server stopped: "
                    "declare it `async def` to have it awaited (it then gets the AsyncServer)"
                )
        for server in servers:
            ready(server.address)
        threading.Event().wait()
    finally:
        for server in servers:
            server.stop(grace=1)


async def _serve_async(
    config: Config, hook: StartupHook, spec: str, ready: Callable[[str], None]
) -> None:
    server = config.async_server()
    await server.start()
    try:
        try:
            await hook(server)
        except Exception as exc:
            raise _failed(spec, exc) from None
        ready(server.address)
        await asyncio.Event().wait()  # until Ctrl-C cancels this task
    finally:
        await server.stop(grace=1)


def _is_async(hook: StartupHook) -> bool:
    """An ``async def`` function (or partial of one), or an object with one as __call__."""
    call = getattr(type(hook), "__call__", None)  # noqa: B004 (the method, not callability)
    return inspect.iscoroutinefunction(hook) or (
        not inspect.isroutine(hook) and inspect.iscoroutinefunction(call)
    )


def _failed(spec: str, exc: Exception) -> StartupFailed:
    text = str(exc).splitlines()[0] if str(exc) else ""
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return StartupFailed(f"the startup hook {spec} failed, so the server stopped: {what}")
