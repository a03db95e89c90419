"""Draw the trace of the seed's callback scenario: docs/trace.svg and a text tree on stdout.

``PYTHONPATH=src python scripts/trace_picture.py`` runs a provider and a consumer in this
process on 127.0.0.1, with the OpenTelemetry SDK collecting spans in memory; the consumer
adds a listener inside an application span ("handle request"), the provider notifies it
at once, as the seed's CallbackServiceImpl does. The spans are drawn as a waterfall (one
bar per span, indented under its parent, on a shared time axis). Needs opentelemetry-sdk.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import backchannel
from backchannel import Argument, Method, telemetry

OUT = Path(__file__).resolve().parent.parent / "docs" / "trace.svg"


@backchannel.interface("com.callback.CallbackListener")
class CallbackListener:
    def changed(self, msg: str) -> None: ...


@backchannel.interface("com.callback.CallbackService")
class CallbackService:
    def addListener(self, key: str, listener: CallbackListener) -> None: ...


class CallbackServiceImpl:
    def addListener(self, key: str, listener: Any) -> None:
        listener.changed("Changed: " + key)


class Printer(CallbackListener):
    def changed(self, msg: str) -> None:
        print("callback1:" + msg)


def collect() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.configure(tracer_provider=provider)
    methods = [Method("addListener", arguments=[Argument(index=1, callback=True)])]
    with backchannel.Server("127.0.0.1:0") as server:
        server.export(CallbackService, CallbackServiceImpl(), methods=methods)
        with backchannel.Client(server.address) as client:
            service = client.reference(CallbackService, methods=methods)
            service.addListener("warm-up", Printer())  # the stream opens outside the trace
            exporter.clear()
            with provider.get_tracer("app").start_as_current_span("handle request"):
                service.addListener("foo.bar", Printer())
    telemetry.configure()
    return list(exporter.get_finished_spans())


def tree(spans: list[ReadableSpan]) -> list[tuple[int, ReadableSpan]]:
    """(depth, span) in depth-first order, children by start time."""
    ids = {span.context.span_id for span in spans if span.context is not None}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent if parent in ids else None, []).append(span)
    ordered: list[tuple[int, ReadableSpan]] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            ordered.append((depth, span))
            assert span.context is not None
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return ordered


def side(span: ReadableSpan) -> str:
    kind = span.kind.name.lower()
    if span.name == "handle request":
        return "consumer app"
    callback = span.name.startswith("com.callback.CallbackListener/")
    consumer = (kind == "client") != callback
    return f"{'consumer' if consumer else 'provider'} {kind}"


COLOURS = {
    "consumer app": "#9e9e9e",
    "consumer client": "#1f77b4",
    "provider server": "#2ca02c",
    "provider client": "#ff7f0e",
    "consumer server": "#9467bd",
}


def svg(rows: list[tuple[int, ReadableSpan]]) -> str:
    start = min(span.start_time or 0 for _d, span in rows)
    end = max(span.end_time or 0 for _d, span in rows)
    total = max(end - start, 1)
    label_width, bar_width, row_height, top = 480, 380, 26, 40
    width = label_width + bar_width + 90
    height = top + row_height * len(rows) + 30
    trace_id = rows[0][1].context.trace_id if rows[0][1].context else 0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-weight="bold">trace {trace_id:032x}: '
        "the seed's addListener, with its changed callback</text>",
    ]
    for row, (depth, span) in enumerate(rows):
        y = top + row * row_height
        x0 = label_width + bar_width * ((span.start_time or 0) - start) / total
        w = max(bar_width * ((span.end_time or 0) - (span.start_time or 0)) / total, 2)
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        name = html.escape(f"{'  ' * depth}{span.name}")
        colour = COLOURS.get(side(span), "#444")
        out += [
            f'<text x="10" y="{y + 16}" xml:space="preserve">{name}</text>',
            f'<text x="{label_width - 10}" y="{y + 16}" text-anchor="end" fill="{colour}">'
            f"{side(span)}</text>",
            f'<rect x="{x0:.1f}" y="{y + 4}" width="{w:.1f}" height="16" fill="{colour}"/>',
            f'<text x="{x0 + w + 4:.1f}" y="{y + 16}">{ms:.2f} ms</text>',
        ]
    out.append(
        f'<text x="10" y="{height - 10}" fill="#666">one bar per span, on one time axis '
        f"({total / 1e6:.1f} ms); rendered by scripts/trace_picture.py</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    rows = tree(collect())
    for depth, span in rows:
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        print(f"{'  ' * depth}{span.name}  [{side(span)}, {ms:.2f} ms]")
    OUT.write_text(svg(rows), encoding="utf-8")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
