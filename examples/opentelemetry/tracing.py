"""OpenTelemetry for taskq through its hooks: a trace that starts where ``.delay()`` is called
continues in the worker that runs the task.

    from taskq import App
    from tracing import instrument

    app = App()
    instrument(app)            # in the app module: callers and workers both load it

* ``on_send``: the caller's current trace context goes into each message's headers
  (W3C ``traceparent``/``tracestate``, OpenTelemetry's default propagator);
* ``before_task``: the worker reads it back and starts a span for the run, a child of the
  caller's span, current while the task runs (spans the task makes are its children);
* ``after_task``: the span ends with the outcome, the runtime and, for a failure, the
  exception and an error status.

Needs ``pip install 'taskq[otel]'`` (opentelemetry-api and -sdk); taskq itself never imports
OpenTelemetry. A hook that raises is logged by taskq and changes nothing for the task.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from taskq import App, TaskRun


def instrument(app: App, tracer_provider: TracerProvider | None = None) -> None:
    tracer = trace.get_tracer("taskq", tracer_provider=tracer_provider)
    #: The span of each run in progress, and the context token to detach when it ends.
    running: dict[int, tuple[trace.Span, object]] = {}

    @app.on_send
    def inject(headers: dict[str, Any]) -> None:
        propagate.inject(headers)

    @app.before_task
    def start(run: TaskRun) -> None:
        parent = propagate.extract(run.request.headers)
        span = tracer.start_span(
            f"run {run.task.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "taskq",
                "messaging.message.id": run.request.id or "",
                "taskq.task": run.task.name,
                "taskq.retries": run.request.retries,
            },
        )
        running[id(run)] = (span, context.attach(trace.set_span_in_context(span)))

    @app.after_task
    def end(run: TaskRun) -> None:
        span, token = running.pop(id(run), (None, None))
        if span is None:
            return
        context.detach(token)  # type: ignore[arg-type]
        span.set_attribute("taskq.outcome", run.outcome or "")
        span.set_attribute("taskq.runtime", run.runtime)
        if run.exception is not None:
            span.record_exception(run.exception)
        if run.outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, type(run.exception).__name__))
        span.end()
