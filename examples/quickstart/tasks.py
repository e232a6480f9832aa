"""The quickstart's tasks. Start a worker for them with:  taskq worker -A tasks:app -c 2"""

from __future__ import annotations

from taskq import App

app = App()  # broker URL from $TASKQ_BROKER_URL, else amqp://guest:guest@localhost:5672//


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def word_count(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts
