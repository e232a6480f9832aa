"""examples/opentelemetry: a trace begun around ``.delay()`` continues in the worker's run of
the task (the ``traceparent`` header through taskq's hooks), failures marked as errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskq import App

from .apps import traced
from .support import WorkerProcess, wait_for


def test_the_workers_span_is_a_child_of_the_callers(
        make_app: Callable[..., App], tmp_path: Path,
        start_worker: Callable[..., WorkerProcess]) -> None:
    span_log = tmp_path / "spans"
    start_worker(app="tests.apps.traced:app", env={"SPAN_LOG": str(span_log)})
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    work = traced.build(make_app(), provider)
    tracer = provider.get_tracer("test")
    callers = {}
    for fail in (False, True):
        with tracer.start_as_current_span(f"caller-{fail}") as span:
            result = work.delay(fail)
        callers[fail] = span.get_span_context()
        if fail:
            with pytest.raises(ValueError):
                result.get(timeout=15)
        else:
            assert result.get(timeout=15) == "done"
    wait_for(lambda: span_log.exists() and len(span_log.read_text().splitlines()) == 2, 10,
             "the worker's two spans")
    spans = [json.loads(line) for line in span_log.read_text().splitlines()]
    by_outcome = {span["outcome"]: span for span in spans}
    for fail, outcome, status in ((False, "succeeded", "UNSET"), (True, "failed", "ERROR")):
        span = by_outcome[outcome]
        assert span["name"] == "run tests.apps.traced.work"
        assert span["trace_id"] == format(callers[fail].trace_id, "032x")
        assert span["parent_id"] == format(callers[fail].span_id, "016x")
        assert span["status"] == status
