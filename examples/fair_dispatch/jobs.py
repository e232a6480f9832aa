"""Tasks for the fair-dispatch demo: some long, some short."""

from __future__ import annotations

import os
import socket
import time

from taskq import App

app = App(default_queue="fair-dispatch-demo")


@app.task
def work(label: str, seconds: float) -> str:
    time.sleep(seconds)
    return f"{label} ran {seconds:g}s in {socket.gethostname()}:{os.getpid()}"
