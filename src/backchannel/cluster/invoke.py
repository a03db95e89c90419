"""A call through a reference (what proxy methods do): its deadline, its providers, and
the cluster mode that meets its failures. ``failover``, ``failfast`` and ``failsafe``
are this one loop; ``forking`` and ``broadcast`` have their own modules."""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any

from backchannel.cluster.attempt import CONNECTING, CurrentCall, NotSent, invoke_on, left
from backchannel.cluster.broadcast import broadcast
from backchannel.cluster.consumer import Consumer
from backchannel.cluster.directory import NAMED_IN_LOG, Directory, label
from backchannel.cluster.failover import Failover
from backchannel.cluster.forking import forking
from backchannel.cluster.reference import Reference
from backchannel.errors import CredentialsNotSent, DeadlineExceeded, StreamBroken
from backchannel.rpc import attachments, filters
from backchannel.rpc.filters import Invocation
from backchannel.rpc.interface import MethodSpec
from backchannel.transport.auth import token_refusal
from backchannel.wire.text import wire_text

logger = logging.getLogger("backchannel")


async def invoke(
    consumer: Consumer,
    ref: Reference,
    method: MethodSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    current: CurrentCall = None,
    filtered: bool = False,
) -> Any:
    """The whole of one call through a reference (what proxy methods do; what callers
    see is :meth:`backchannel.client.AsyncClient.invoke`'s to say): its deadline from
    the method's timeout, its providers, then its cluster mode. ``failover`` (the
    default), ``failfast`` and ``failsafe`` run here: a call never sent goes to the next
    provider not tried (:class:`~backchannel.cluster.failover.Failover`); one that may
    have reached its provider is re-sent only in ``failover``, ``retries`` times at most.

    The reference's filters run around all of that, once per call (``filtered``: they
    ran already).
    """
    positional = method.bind(args, kwargs)
    if ref.filters and not filtered:
        return await through_filters(consumer, ref, method, positional, current)
    timeout = ref.timeouts[method.name]
    deadline = None if timeout is None else time.monotonic() + timeout
    directory = consumer.directory_of.get(ref.key)  # known already: no coroutine to await
    if directory is None or not directory.ready:
        directory = await consumer.directories.get(ref, deadline, method)
        timeout = left(deadline)
    mode = ref.clusters[method.name]
    if mode == "broadcast":
        return await broadcast(consumer, ref, method, positional, current, directory, deadline)
    if mode == "forking":
        return await forking(consumer, ref, method, positional, current, directory, deadline)
    attempts = 1 + (ref.retries.get(method.name, 0) if mode == "failover" else 0)
    link = consumer.choose(ref, directory, positional)
    # another provider may take the call: a stream being opened gets half the time
    hedge = len(directory.urls) > 1
    failover: Failover | None = None  # made on the first failure: none on the usual path
    attempt = 1
    while True:
        try:
            return await invoke_on(
                consumer, link, ref, method, positional, current, deadline, timeout, hedge
            )
        except NotSent as unsent:
            failover = failover or Failover(consumer, directory)
            error = failover.unsent(link, unsent.error)
            following = failover.next()
            hedge = failover.more()
            if following is None and failover.connecting:  # none left but those
                following = await failover.first_opened(deadline)
                hedge = False
                error = failover.error or error
        except StreamBroken as exc:  # it may have reached the provider
            failover = failover or Failover(consumer, directory)
            failover.tried.add(link.address)
            error = exc
            following = None
        except DeadlineExceeded as exc:
            if failover is None and exc.__cause__ is not CONNECTING:
                if mode == "failsafe":  # one attempt, sent: its own error says it all
                    return ignored(method, exc)
                raise
            failover = failover or Failover(consumer, directory)
            failover.tried.add(link.address)
            return out_of_time(consumer, ref, method, mode, failover, exc)
        except Exception as exc:
            if mode == "failsafe":
                return ignored(method, exc)
            raise
        timeout = left(deadline)
        if timeout is not None and timeout <= 0:
            return out_of_time(consumer, ref, method, mode, failover, error)
        if following is None:  # every provider tried: that was one attempt
            if attempt >= attempts:
                error = with_refusals(consumer, directory, error)
                if mode == "failsafe":
                    return ignored(method, error)
                raise error
            attempt += 1
            failover.restart()
            following = consumer.choose(ref, directory, positional, failover.tried)
            hedge = len(directory.urls) > 1
            logger.info(
                "%s() failed (%s); retry %d of %d",
                method.qualname,
                wire_text(error),
                attempt - 1,
                attempts - 1,
            )
        elif len(failover.tried) == 1:  # one line per call, not one per provider tried
            logger.info(
                "%s() not sent to %s (%s); failing over",
                method.qualname,
                wire_text(link.address),
                wire_text(error),
            )
        link = following


async def through_filters(
    consumer: Consumer,
    ref: Reference,
    method: MethodSpec,
    positional: tuple[Any, ...],
    current: CurrentCall,
) -> Any:
    """A call through its reference's filters, then :func:`invoke` (per call, retries
    and failover included: a filter sees one call, whatever it takes)."""
    given = attachments.outgoing() or attachments.EMPTY
    invocation = Invocation(
        "consumer",
        "call",
        ref.spec.name,
        method.name,
        list(positional),
        dict(given),
        group=ref.group,
        version=ref.version,
        peer=consumer.where,
    )

    async def call(invocation: Invocation) -> Any:
        arguments = tuple(invocation.args)
        if invocation.attachments == given:
            return await invoke(consumer, ref, method, arguments, {}, current, True)
        token = attachments.set_outgoing(invocation.attachments)  # checked: InvalidArguments
        try:
            return await invoke(consumer, ref, method, arguments, {}, current, True)
        finally:
            attachments.STATE.reset(token)

    return await filters.run(ref.filters, invocation, call)


def with_refusals(consumer: Consumer, directory: Directory, error: BaseException) -> BaseException:
    """The error of a call no provider is left to try, saying which listed providers
    the token may not go to (their links are not chosen once they exist): all of
    them, CredentialsNotSent; some, how many more (at most 10 named)."""
    links = consumer.links
    settings = consumer.settings
    refused = [
        address
        for address in directory.addresses
        if (links[address].token_refused if address in links else settings.token_refused(address))
    ]
    if not refused:
        return error
    named = [wire_text(address) for address in heapq.nsmallest(NAMED_IN_LOG, refused)]
    if len(refused) > len(named):
        named.append(f"and {len(refused) - len(named)} more")
    if len(refused) == len(directory.addresses) or isinstance(error, CredentialsNotSent):
        return CredentialsNotSent(token_refusal(named))
    # the unsent errors (TransportError, ShuttingDown) take a message and nothing else
    return type(error)(f"{error}; {len(refused)} more refused: {token_refusal(named)}")


def out_of_time(
    consumer: Consumer,
    ref: Reference,
    method: MethodSpec,
    mode: str,
    failover: Failover,
    last: BaseException,
) -> Any:
    """A call whose time ran out: DeadlineExceeded saying where it went (failsafe:
    logged, and None)."""
    connecting = len(failover.connecting)
    error = DeadlineExceeded(
        f"{method.qualname}() did not finish within its {ref.timeouts[method.name]} s "
        f"timeout: {len(failover.tried)} of the {len(consumer.directory_of[ref.key].urls)} "
        f"providers of {label(ref.key)} tried, {failover.unreachable} unreachable"
        + (f", {connecting} still connecting" if connecting else "")
        + f"; last: {wire_text(last)}"
    )
    if mode == "failsafe":
        return ignored(method, error)
    raise error from last


def ignored(method: MethodSpec, error: BaseException) -> None:
    """Dubbo's ``failsafe``: the failure is logged, the caller gets None."""
    logger.warning("%s() failed, ignored (failsafe): %s", method.qualname, wire_text(error))
    return None
