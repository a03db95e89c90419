"""Replaying the resubscribe calls whose stream ended, in order, on a live provider:
the task a :class:`~backchannel.cluster.consumer.Consumer` starts when it has any."""

from __future__ import annotations

import asyncio
import logging
import time

from backchannel.cluster.attempt import NotSent, invoke_on, left
from backchannel.cluster.backoff import Backoff
from backchannel.cluster.consumer import Consumer
from backchannel.errors import ShuttingDown, TransportError
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")


async def resubscribe(consumer: Consumer) -> None:
    """Make every orphaned resubscribe call again, in order, each on a provider
    chosen as for any call, until each one succeeded on a stream that is still
    open, or the client closes.

    A replay that fails for the connection's sake (no provider reachable, the stream
    breaks again, no answer in time, the provider is shutting down) is tried again
    after a backoff; one the provider refuses with any other error is logged and
    dropped (replaying it again would be refused again).
    """
    retry = Backoff()
    while not consumer.closed and consumer.orphans:
        key, (ref, method, args) = next(iter(consumer.orphans.items()))
        if any(
            key in link.subscriptions and link.session is not None and link.session.usable
            for link in consumer.links.values()
        ):  # made again meanwhile, by its caller (or broadcast to several)
            consumer.orphans.pop(key, None)
            continue
        try:
            timeout = ref.timeouts[method.name]
            deadline = None if timeout is None else time.monotonic() + timeout
            directory = await consumer.directories.get(ref, deadline, method)
            link = consumer.choose(ref, directory, args)
            await invoke_on(consumer, link, ref, method, args, None, deadline, left(deadline))
        except (NotSent, TransportError, ShuttingDown, TimeoutError, LookupError) as exc:
            error = exc.error if isinstance(exc, NotSent) else exc
            logger.warning(
                "resubscribing %s() failed: %s; trying again", method.qualname, wire_text(error)
            )
            retry.failed()
            await asyncio.sleep(retry.wait())
            continue
        except Exception as exc:
            logger.warning(
                "resubscribing %s() was refused: %s; not replayed again",
                method.qualname,
                wire_text(exc),
            )
            consumer.orphans.pop(key, None)
            continue
        retry.succeeded()
