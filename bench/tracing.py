"""Runs a bench script with OpenTelemetry in one of three states, for the tracing figures.

``python bench/tracing.py MODE SCRIPT [ARGS...]`` sets OpenTelemetry up, then runs
``SCRIPT`` as ``__main__`` with ``ARGS``. ``bench/run.py`` starts both the provider and
the consumer of a tracing figure this way, so both ends are in the same state:

- ``absent``: ``opentelemetry`` cannot be imported (as when the otel extra is not
  installed); the script checks that nothing of it was loaded;
- ``no-provider``: installed, but no tracer provider configured (the API's default);
- ``sdk``: the SDK's ``TracerProvider`` as the global provider, with a
  ``BatchSpanProcessor`` feeding an exporter that drops every span: the cost of making,
  propagating and ending spans, without the cost of a collector.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

MODES = ("absent", "no-provider", "sdk")


class _NoOpenTelemetry(MetaPathFinder):
    """Refuses every ``opentelemetry`` module."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"{name}: OpenTelemetry is blocked (tracing mode 'absent')")
        return None


def _check_absent() -> None:
    loaded = [name for name in sys.modules if name.startswith("opentelemetry")]
    if loaded:
        raise SystemExit(f"tracing mode 'absent' but loaded: {loaded}")


def set_up(mode: str) -> None:
    """Put OpenTelemetry in ``mode`` for this process."""
    if mode == "absent":
        sys.meta_path.insert(0, _NoOpenTelemetry())
        atexit.register(_check_absent)
    elif mode == "sdk":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class DropSpans(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(DropSpans()))
        trace.set_tracer_provider(provider)
    elif mode != "no-provider":
        raise SystemExit(f"tracing mode must be one of {', '.join(MODES)}, got {mode!r}")


def main() -> None:
    mode, script, *args = sys.argv[1:]
    set_up(mode)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
