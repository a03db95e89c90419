"""Dubbo's ``forking`` cluster mode: one call sent to several providers at once, the
first success its result."""

from __future__ import annotations

import asyncio
from typing import Any

from backchannel.cluster.attempt import CurrentCall, NotSent, invoke_on, left
from backchannel.cluster.consumer import Consumer
from backchannel.cluster.directory import Directory, label
from backchannel.cluster.loadbalance import NoProvider
from backchannel.cluster.providers import ProviderLink
from backchannel.cluster.reference import Reference
from backchannel.rpc.interface import MethodSpec


async def forking(
    consumer: Consumer,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
    directory: Directory,
    deadline: float | None,
) -> Any:
    """Dubbo's ``forking``: the call goes to ``forks`` providers at once, the first
    success is the result; it fails only when every one of them failed."""
    chosen: list[ProviderLink] = []
    for _ in range(min(ref.forks, len(directory.urls))):
        link = consumer.choose(ref, directory, positional, {c.address for c in chosen})
        if link in chosen:
            break
        chosen.append(link)
    timeout = left(deadline)
    tasks = [
        asyncio.ensure_future(
            invoke_on(consumer, link, ref, method, positional, current, deadline, timeout)
        )
        for link in chosen
    ]
    for task in tasks:  # the losers run on; their outcomes are not wanted
        task.add_done_callback(_consume)
    error: BaseException | None = None
    for next_done in asyncio.as_completed(tasks):
        try:
            return await next_done
        except NotSent as unsent:
            error = unsent.error
        except Exception as exc:
            error = exc
    if error is None:  # no provider at all
        raise NoProvider(f"no provider of {label(ref.key)} in {consumer.where}")
    raise error


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
