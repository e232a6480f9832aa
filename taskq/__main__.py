"""``python -m taskq``: the same as the ``taskq`` command."""

from .cli import main

main()
