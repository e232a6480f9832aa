"""The quickstart's tasks. Start a worker for them with:  taskq worker -A tasks:app -c 2"""

from __future__ import annotations

from taskq import App

app = App()  # $TASKQ_BROKER_URL, else the embedded broker in ./taskq.db (no server needed)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def word_count(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts
