"""Send a traced task: the worker's span is a child of the span around ``.delay()``."""

from __future__ import annotations

from opentelemetry import trace
from tasks import resize

with trace.get_tracer("shop").start_as_current_span("checkout") as span:
    result = resize.delay("cat.png", 200)
    print("sent in trace", format(span.get_span_context().trace_id, "032x"))
print(result.get(timeout=10))
