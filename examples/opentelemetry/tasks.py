"""A traced app: ``taskq worker -A tasks:app`` in this folder, then ``python send.py``.

Spans go to the console here (ConsoleSpanExporter); point an OTLP exporter at your collector
instead (opentelemetry-exporter-otlp) to see caller and worker in one trace.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from tracing import instrument

from taskq import App

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)

app = App()
instrument(app)


@app.task
def resize(image: str, width: int) -> str:
    with trace.get_tracer("images").start_as_current_span("resize"):  # a child of the run
        return f"{image}@{width}px"
