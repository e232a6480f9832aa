"""Run the benchmarks: ``python benchmarks/run.py [--quick]`` from the repo root (see README.md).

Equivalent to ``python -m benchmarks.suite``; this file only puts the repo root on sys.path.
``--only canvas`` runs the workflow benchmark instead (chain of 10, chord of 1,000, against
Celery: ``benchmarks/canvas.py``), with that benchmark's own options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import main

SECTIONS = ("canvas",)


def run(argv: list[str]) -> int:
    """The suite, or the one section named by ``--only NAME`` / ``--only=NAME``."""
    only = None
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == "--only" and i + 1 < len(rest):
            only, rest = rest[i + 1], rest[:i] + rest[i + 2:]
            break
        if arg.startswith("--only="):
            only, rest = arg.split("=", 1)[1], rest[:i] + rest[i + 1:]
            break
    if only is None:
        return main(rest)
    if only == "canvas":
        from benchmarks.canvas import main as canvas_main

        return canvas_main(rest)
    print(f"--only: unknown section {only!r} (known: {', '.join(SECTIONS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
