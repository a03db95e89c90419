"""OpenTelemetry traces and metrics of backchannel calls (``pip install backchannel[otel]``).

One job: turn the calls a session sends and runs into spans and measurements that follow
the OpenTelemetry RPC semantic conventions (v1.45.0, see docs/observability.md), and
carry the trace context inside the envelope (``Call.trace_context``, W3C Trace Context).

The rest of the library calls in at a few marked places through the slots of
:mod:`backchannel.transport.observe`, each behind ``if observe.AVAILABLE:``; importing
this package fills them when OpenTelemetry is installed (the Client and Server facades
import it). Without opentelemetry-api installed a hook costs one attribute test and
nothing from ``opentelemetry`` is imported. Installed but with no tracer provider and no
meter provider configured (the API's default proxies), every hook returns after one
provider check: nothing is allocated or propagated.

Providers are OpenTelemetry's global ones unless :func:`configure` names others (tests
do, to keep their exporters to themselves). The parts: :mod:`.providers` (which tracer
and meter, the instruments), :mod:`.streams` (what a session's spans share),
:mod:`.spans` (client, server and notify spans, outcomes).
"""

from __future__ import annotations

from backchannel.telemetry.providers import AVAILABLE as AVAILABLE
from backchannel.telemetry.providers import SCHEMA_URL as SCHEMA_URL
from backchannel.telemetry.providers import _instruments as _instruments
from backchannel.telemetry.providers import _tracer as _tracer
from backchannel.telemetry.providers import carry as carry
from backchannel.telemetry.providers import collecting as collecting
from backchannel.telemetry.providers import configure as configure
from backchannel.telemetry.streams import MAX_LINKS as MAX_LINKS
from backchannel.telemetry.streams import SYSTEM as SYSTEM
from backchannel.telemetry.streams import track as track
from backchannel.transport import observe

if AVAILABLE:
    from backchannel.telemetry.spans import hooks_async as hooks_async
    from backchannel.telemetry.spans import hooks_sync as hooks_sync
    from backchannel.telemetry.spans import sending as sending
    from backchannel.telemetry.spans import serve as serve

    # the layers below call these through observe's slots, never importing this package
    observe.collecting = collecting
    observe.carry = carry
    observe.track = track
    observe.sending = sending
    observe.serve = serve
    observe.hooks_sync = hooks_sync
    observe.hooks_async = hooks_async
    observe.AVAILABLE = True
