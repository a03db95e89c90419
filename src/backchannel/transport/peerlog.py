"""Warnings a peer causes, rate-limited per stream, so no peer can flood the log.

Every line about what a peer sent (a protocol mistake, a call refused past the in-flight
limit, a Fault it reports) goes through one :class:`PeerLog` per stream: at most
:data:`PEER_WARNINGS` lines per :data:`PEER_WARNING_WINDOW` seconds are logged at
WARNING; the rest of that window's go to DEBUG only (formatted only when DEBUG is on),
and one WARNING summary line says how many, when the window ends or the stream does.

A provider also owns one for the whole server: the endings of streams whose peer broke a
limit (no Hello in time, too many Faults, not reading) and its refusals past
``max_streams``, one line per stream otherwise, which a peer reopening streams could
repeat without end.
"""

from __future__ import annotations

import asyncio
import logging

from backchannel.wire.text import wire_text

#: warning lines one stream's peer may cause per window; the rest go to DEBUG
PEER_WARNINGS = 10
#: seconds of one window of :data:`PEER_WARNINGS`
PEER_WARNING_WINDOW = 10.0


class PeerLog:
    """The rate-limited WARNING lines about one peer, on one stream (on its loop); or,
    with ``per`` and ``sender`` worded so, about the peers of a whole provider."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        peer: str,
        logger: logging.Logger,
        *,
        per: str = "a stream",
        sender: str = "it",
    ) -> None:
        self._loop = loop
        self._peer = peer
        self._logger = logger
        self._per = per  # what the limit applies to, for the summary
        self._sender = sender  # who sent it, for the summary
        self._window_end = 0.0
        self._logged = 0  # lines at WARNING in this window
        self._suppressed = 0  # lines sent to DEBUG only in this window
        self._summary: asyncio.TimerHandle | None = None

    def warning(self, template: str, text: str) -> bool:
        """Log ``template % (peer, wire_text(text))`` at WARNING while this window has
        room, else at DEBUG (and count it for the summary); True if at WARNING."""
        return self.line(template, self._peer, wire_text(text))

    def line(self, template: str, *args: object) -> bool:
        """Log ``template % args`` (made safe to log by the caller) as :meth:`warning`
        does; True if at WARNING."""
        now = self._loop.time()
        if now >= self._window_end:
            self.summarize()
            self._window_end = now + PEER_WARNING_WINDOW
        if self._logged < PEER_WARNINGS:
            self._logged += 1
            self._logger.warning(template, *args)
            return True
        self._suppressed += 1
        if self._summary is None:
            self._summary = self._loop.call_at(self._window_end, self.summarize)
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(template, *args)
        return False

    def summarize(self) -> None:
        """End the window: say how many lines it sent to DEBUG only, if any."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self._suppressed:
            self._logger.warning(
                "%s: %d more warnings about what %s sent were suppressed (logged at DEBUG "
                "only): at most %d %s per %g s (PEER_WARNINGS)",
                self._peer,
                self._suppressed,
                self._sender,
                PEER_WARNINGS,
                self._per,
                PEER_WARNING_WINDOW,
            )
        self._logged = self._suppressed = 0
        self._window_end = 0.0
