"""RabbitMQ's management plugin, where it is enabled: what AMQP can't tell ``taskq status``.

AMQP can't list a vhost's queues, nor say how many of a queue's messages are taken and not
yet acked; the plugin's HTTP API (``/api/queues/<vhost>``) can. taskq asks it only for
``taskq status`` and only if it answers at once: the plugin is optional, and its figures lag
by its stats interval (5 s by default).
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from kombu.utils.url import url_to_parts

from . import topology

#: The plugin's ports when the setting names none: plain for amqp://, TLS for amqps:// (the
#: broker's credentials never go over plain HTTP to a broker reached over TLS).
PORT, TLS_PORT = 15672, 15671
#: After the plugin did not answer, taskq asks again only this much later (seconds).
RETRY_AFTER = 60.0
#: Queues that are taskq's or Celery's own machinery, not work queues.
_MACHINERY = re.compile(
    r"^(taskq\.(reply|delayed|lost|once|chord|rate|broadcast|worker|beat|revoked)\b"
    r"|celeryev\.)|\.celery\.pidbox$|\.dlq$"
    r"|^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"  # Celery rpc:// replies
)
COLUMNS = "name,messages_ready,messages_unacknowledged,consumers"


def is_work_queue(name: str) -> bool:
    return not _MACHINERY.search(name) and not topology.is_broadcast_queue(name)


class Management:
    """The plugin's view of one vhost; every failure is "not available" (None)."""

    def __init__(self, broker_url: str, setting: str | None, timeout: float) -> None:
        parts = url_to_parts(broker_url.split(";")[0].strip())
        self.vhost = parts.path or "/"
        self.timeout = timeout
        if setting == "":
            self.base: str | None = None
        elif setting:
            self.base = setting.rstrip("/")
        elif parts.scheme == "amqps":
            self.base = f"https://{parts.hostname or 'localhost'}:{TLS_PORT}"
        else:
            self.base = f"http://{parts.hostname or 'localhost'}:{PORT}"
        user, password = parts.username or "guest", parts.password or "guest"
        if self.base is not None:
            given = urlsplit(self.base)
            if given.username:  # credentials of its own: sent as the header, not in the URL
                user, password = unquote(given.username), unquote(given.password or "")
                host = given.hostname or "localhost"
                netloc = f"{host}:{given.port}" if given.port else host
                self.base = given._replace(netloc=netloc).geturl()
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self._answered: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._failed_at: float | None = None
        # straight to the broker's host: no proxy from the environment sees the credentials
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def queues(self) -> dict[str, dict[str, Any]] | None:
        """{name: {"messages_ready", "messages_unacknowledged", "consumers"}}: asked again
        after a second; after it did not answer, only RETRY_AFTER later."""
        if self.base is None:
            return None
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
            return None
        if self._answered is not None and time.monotonic() - self._answered[0] < 1.0:
            return self._answered[1]
        url = f"{self.base}/api/queues/{quote(self.vhost, safe='')}?columns={COLUMNS}"
        request = urllib.request.Request(url, headers={"Authorization": self._auth})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                rows = json.load(response)
        except (OSError, ValueError):
            rows = None
        if not isinstance(rows, list):
            self._failed_at = time.monotonic()
            return None
        self._failed_at = None
        found = {str(row["name"]): row for row in rows if isinstance(row, dict) and "name" in row}
        self._answered = (time.monotonic(), found)
        return found
