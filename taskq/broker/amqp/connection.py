"""Opening AMQP connections: URL and TLS options via kombu, bounded retries, clear errors.

kombu parses the URL (``amqp://``, ``amqps://``, ``;``-separated failover lists) and builds the
py-amqp connection; everything after that (channels, confirms, consuming) talks to py-amqp's
channel directly, because the hot paths can't afford kombu's generic layers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import amqp
from amqp import exceptions as amqp_errors
from kombu.connection import Connection

from ...config import Config, mask_url
from ...errors import BrokerUnavailable, ConfigurationError
from .frames import frame_handler

log = logging.getLogger("taskq.broker")

#: Errors after which a new connection may succeed: the broker went away, restarted, closed
#: the connection, or a socket operation timed out.
RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.RecoverableConnectionError,
    amqp_errors.ConnectionError,
    OSError,  # includes socket.timeout, ConnectionResetError, BrokenPipeError
    amqp_errors.RecoverableChannelError,
)
#: The broker said no and will say it again: wrong credentials, unknown vhost.
FATAL_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.AccessRefused,
    amqp_errors.NotAllowed,
)


def is_recoverable(exc: BaseException) -> bool:
    return isinstance(exc, RECOVERABLE_ERRORS) and not isinstance(exc, FATAL_CONNECT_ERRORS)


def ssl_options(config: Config, url: str) -> dict[str, Any] | None:
    """TLS settings for an ``amqps://`` URL: verify the chain *and* the host name by default.

    kombu checks the host name only when told to (and checks 127.0.0.1 when the URL says
    localhost); a TLS connection that doesn't check it trusts anyone holding any certificate
    the CA ever signed, so taskq always names the host from the URL.
    """
    if not url.startswith("amqps://"):
        return None
    for path in (config.ssl_ca_file, config.ssl_cert_file, config.ssl_key_file):
        if path and not os.path.isfile(path):
            raise ConfigurationError(f"TLS file {path!r} does not exist")
    options: dict[str, Any] = {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": config.ssl_ca_file,
        "certfile": config.ssl_cert_file,
        "keyfile": config.ssl_key_file,
    }
    if config.ssl_verify_hostname:
        # py-amqp checks the name only when given one. (Left out, not None: kombu replaces a
        # None with the URL's host, after rewriting localhost to 127.0.0.1.)
        options["server_hostname"] = urlsplit(url).hostname or "localhost"
    return options


class Connector:
    """Opens py-amqp connections to the configured broker, one attempt or retrying to a deadline."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.urls = [part.strip() for part in config.broker_url.split(";") if part.strip()]
        if not self.urls:
            raise ConfigurationError("broker_url is empty")
        self._next = 0
        for url in self.urls:
            scheme = url.split("://", 1)[0] if "://" in url else ""
            if scheme not in ("amqp", "amqps", "pyamqp"):
                raise ConfigurationError(
                    f"broker URL {mask_url(url)} is not an AMQP URL: use "
                    "amqp://user:password@host:5672/vhost or amqps://... for TLS"
                )

    @property
    def display_url(self) -> str:
        return self.config.display_url

    def connect_once(
        self,
        *,
        timeout: float | None = None,
        name: str = "taskq",
        on_blocked: Callable[[str], None] | None = None,
        on_unblocked: Callable[[], None] | None = None,
    ) -> amqp.Connection:
        """One connection attempt to the next URL of the failover list.

        ``name`` is shown by the broker (management UI, ``rabbitmqctl list_connections
        user_provided_name``), with this process's pid: which worker slot, which client.
        """
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        connect_timeout = self.config.connect_timeout
        if timeout is not None:
            connect_timeout = max(0.05, min(connect_timeout, timeout))
        client = Connection(  # type: ignore[no-untyped-call]
            url,
            heartbeat=self.config.heartbeat,
            connect_timeout=connect_timeout,
            ssl=ssl_options(self.config, url),
            transport_options={
                "frame_handler": frame_handler,
                "on_blocked": on_blocked,
                "on_unblocked": on_unblocked,
                "client_properties": {"connection_name": f"{name} pid={os.getpid()}"},
            },
        )
        try:
            conn = client.transport.establish_connection()
        except FATAL_CONNECT_ERRORS as exc:
            raise BrokerUnavailable(
                f"the broker at {self.display_url} refused the connection: {exc}. "
                "Check the user, password and virtual host in the broker URL."
            ) from exc
        except ssl.SSLError as exc:
            raise BrokerUnavailable(
                f"TLS handshake with {self.display_url} failed: {exc}. Check ssl_ca_file "
                "(the CA that signed the broker's certificate) and that the URL's host name "
                "is one the certificate names."
            ) from exc
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _read_ahead(conn.transport)
        # Setting up (channels, confirm mode, declarations) gets the connect timeout; the
        # link relaxes the bound once it is set up.
        conn.taskq_bound = Bound(conn.sock, connect_timeout)
        return conn


def bound(conn: amqp.Connection) -> Bound:
    """The :class:`Bound` of a connection made by :meth:`Connector.connect_once`."""
    value: Bound = conn.taskq_bound
    return value


#: Longest one read or write on a connection may block when no operation set a bound of its
#: own: a broker silent for this long in the middle of a frame is treated as gone.
STALL_LIMIT = 60.0
_TIMEVAL = struct.Struct("@ll")


class Bound:
    """Bounds every blocking read and write on one connection's socket, in the kernel.

    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` keep the socket in blocking mode (no mode switch per
    call, which the hot paths can't afford) and bound py-amqp's own blocking waits too: a
    channel open, ``confirm_select``, a declaration, ``basic.cancel``, a write into a socket
    the broker stopped reading (a memory alarm). A read past the bound raises
    ``socket.timeout``, a write ``BlockingIOError``: both are recoverable connection errors.
    """

    def __init__(self, sock: Any, seconds: float) -> None:
        self._sock = sock
        self._seconds = -1.0
        self.set(seconds)

    def set(self, seconds: float) -> None:
        """Bound each call to ``seconds`` from now on (e.g. :data:`STALL_LIMIT` once set up)."""
        seconds = max(0.001, seconds)
        if abs(seconds - self._seconds) < 0.0005:
            return
        whole = int(seconds)
        value = _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
        with contextlib.suppress(OSError):  # a closed socket fails the call that follows
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        self._seconds = seconds

    def relax(self) -> None:
        self.set(STALL_LIMIT)

    @contextlib.contextmanager
    def until(self, deadline: float) -> Iterator[None]:
        """Within the block, no single call waits past ``deadline`` (monotonic), give or take
        a second: a deadline that near the standing bound costs no system call."""
        before = self._seconds
        seconds = deadline - time.monotonic()
        if before - 1.0 <= seconds <= before:
            yield
            return
        self.set(seconds)
        try:
            yield
        finally:
            self.set(before)


#: Bytes asked of each recv(): py-amqp asks for exactly what the frame part it reads needs,
#: three calls a frame; reading ahead takes a whole small message (3 frames) in one call.
#: py-amqp keeps what it read beyond the frame in its buffer (``buffered()`` checks it).
READ_AHEAD = 4096


def _read_ahead(transport: Any) -> None:
    recv = transport._quick_recv

    def read(size: int) -> Any:
        try:
            return recv(max(size, READ_AHEAD))
        except (BlockingIOError, ssl.SSLWantReadError):
            # The kernel's receive timeout (Bound) passed: py-amqp would retry forever.
            raise TimeoutError("timed out waiting for the broker") from None

    transport._quick_recv = read


def describe(exc: BaseException) -> str:
    """A short, password-free description of a connection error."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def close_quietly(conn: amqp.Connection | None, timeout: float = 2.0) -> None:
    """Close a connection the AMQP way, but never wait long for the broker's close-ok.

    py-amqp waits for close-ok with no timeout; a broker that stopped reading (a memory
    alarm) or went away would hang the caller.
    """
    if conn is None:
        return
    try:
        sock = conn.transport.sock if conn.transport is not None else None
        if sock is not None:
            sock.settimeout(timeout)
        conn.close()
    except Exception:
        drop(conn)


def drop(conn: amqp.Connection | None) -> None:
    """Close a broken connection's socket without any AMQP handshake."""
    if conn is None:
        return
    with contextlib.suppress(Exception):
        conn.collect()


def abandon_after_fork(conn: amqp.Connection | None) -> None:
    """Drop a connection inherited from a parent process without touching the parent's socket.

    Closing it the AMQP way would send frames on a socket the parent still uses; shutting the
    socket down would cut the parent off. Closing our file descriptor does neither.
    """
    if conn is None:
        return
    sock = getattr(getattr(conn, "transport", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
        conn.transport.sock = None
    conn.channels = None
    conn.transport = None
