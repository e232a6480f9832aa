"""An app instrumented by examples/opentelemetry (``-A tests.apps.traced:app``): the worker's
spans go, one JSON line each, to the file named by $SPAN_LOG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from examples.opentelemetry.tracing import instrument
from taskq import App


class FileExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(os.environ["SPAN_LOG"], "a") as f:
            for span in spans:
                context, parent = span.get_span_context(), span.parent
                f.write(json.dumps({
                    "name": span.name,
                    "trace_id": format(context.trace_id, "032x") if context else None,
                    "parent_id": format(parent.span_id, "016x") if parent else None,
                    "status": span.status.status_code.name,
                    "outcome": (span.attributes or {}).get("taskq.outcome"),
                }) + "\n")
        return SpanExportResult.SUCCESS


def build(app: App, provider: TracerProvider) -> Any:
    instrument(app, provider)

    @app.task(name="tests.apps.traced.work")
    def work(fail: bool) -> str:
        if fail:
            raise ValueError("failed on purpose")
        return "done"

    return work


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
app = App()
work = build(app, provider)
