"""Run the benchmarks: ``python benchmarks/run.py [--quick]`` from the repo root (see README.md).

Equivalent to ``python -m benchmarks.suite``; this file only puts the repo root on sys.path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
