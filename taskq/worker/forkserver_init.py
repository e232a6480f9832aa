"""Imported by a worker's fork server only, first in its preload list: it ignores SIGTERM.

The supervisor starts its slot processes through multiprocessing's fork server. A SIGTERM
sent to every process of the worker (systemd's default ``KillMode=control-group``, or
``kill -- -PGID``) would otherwise kill the fork server, and the supervisor would read the
exit status of every slot as 255 (the server that reports it is gone) while the slots still
run their tasks: it would give their messages back and run them a second time. The slots
and executors ignore SIGTERM themselves (shutdown is the supervisor's call); the fork server
goes when the supervisor does (its pipe closes). Importing this module anywhere else would
make that process ignore SIGTERM too: nothing does.
"""

from __future__ import annotations

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
