"""Send a few tasks and print their results (needs a worker: taskq worker -A tasks:app)."""

from __future__ import annotations

from tasks import add, word_count

import taskq


def main() -> None:
    result = add.delay(2, 3)  # returns once the broker has stored the message
    print(f"add(2, 3) = {result.get(timeout=10)}")

    results = [add.delay(i, i) for i in range(10)]  # many in flight at once
    doubles = taskq.gather(results, timeout=10, progress=True)  # a bar on a terminal's stderr
    print(f"doubles: {doubles}")

    print(f"word_count: {word_count.delay('the cat and the hat').get(timeout=10)}")

    try:
        add.delay(1, "two").get(timeout=10)  # the worker's TypeError comes back as itself
    except TypeError as exc:
        print(f"add(1, 'two') failed on the worker: {exc}")

    try:
        add.delay(1)  # checked before sending: nothing reaches the queue
    except TypeError as exc:
        print(f"add.delay(1) was refused: {exc}")

    result = add.delay(40, 2)
    print(f"state {result.state} -> {result.get(timeout=10)} -> state {result.state}")
    print(f"taskq {taskq.__version__}: all done")


if __name__ == "__main__":
    main()
