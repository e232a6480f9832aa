"""A throwaway TLS-only RabbitMQ node, for TLS tests that must not touch the shared broker.

``tls_broker()`` makes a private certificate authority with the ``openssl`` CLI, then boots a
second RabbitMQ node on this machine with its own name (``taskq-tls-<random>@localhost``),
Erlang cookie, data/log directories, config file, empty plugin list and ports.  The main node
(``rabbit@localhost``) is never contacted, stopped or reconfigured.

The node has three TLS listeners on 127.0.0.1, all serving certificates from the private CA:

* ``port``: certificate for ``localhost`` (SAN ``DNS:localhost`` only: no IP SAN, so
  connecting as ``127.0.0.1`` fails the hostname check).  A client certificate is optional,
  but verified against the CA if one is sent.
* ``mtls_port``: same server certificate; a client certificate signed by the CA is required.
* ``mismatched_port``: a valid certificate from the same CA, but for ``wrong.example``.

RabbitMQ 3.10 has one global ``ssl_options`` for every AMQP TLS listener, so only ``port``
comes from ``rabbitmq.conf``; the other two are started right after boot with
``rabbitmqctl eval 'rabbit_networking:start_ssl_listener(...)'``, which takes per-listener
options (about 0.4 s, versus several seconds for a second node).

Plain AMQP is disabled.  The user is ``guest``/``guest`` on vhost ``/``.  On exit the node is
stopped with SIGTERM (RabbitMQ shuts down gracefully on it) and its files are deleted; if
pytest itself dies without cleaning up, a small watchdog process does the same.

When the machine cannot run a node (no ``openssl``, no RabbitMQ, the node does not boot)
``tls_broker()`` calls ``pytest.skip`` with the reason and the tail of the node's logs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "localhost"
BIND = "127.0.0.1"
# The distro wrapper in /usr/sbin re-runs the scripts as the rabbitmq user through su, which
# loses our HOME (so our cookie) and cannot read root's temp dirs: use the real scripts.
RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin",)

OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[wrong_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:wrong.example
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TlsBroker:
    host: str
    port: int              # TLS, cert for localhost, client cert optional (verified if sent)
    mtls_port: int         # TLS, cert for localhost, client cert required
    mismatched_port: int   # TLS, cert for wrong.example (same CA)
    ca_file: Path          # the CA that signed every certificate here
    client_cert: Path      # client certificate (CN=taskq-test-client) signed by ca_file
    client_key: Path       # its unencrypted private key
    other_ca_file: Path    # an unrelated CA, for "wrong CA" tests
    node: str
    start_seconds: float   # node boot + extra listeners, as measured
    url_template: str = "amqps://guest:guest@{host}:{port}/{vhost}"

    def url(self, port: int | None = None, vhost: str = "", host: str | None = None) -> str:
        """``amqps://`` URL for a listener (default: ``port``); vhost ``""`` means ``/``."""
        return self.url_template.format(host=host or self.host, port=port or self.port,
                                        vhost=vhost)


@contextmanager
def tls_broker(base_dir: Path | str | None = None, boot_timeout: float = 60) -> Iterator[TlsBroker]:
    """Start a throwaway TLS RabbitMQ node; stop it and delete its files on exit."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("TLS broker: the openssl CLI is not installed")
    server, ctl = _rabbitmq_scripts()
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="taskq-tls-", dir=base_dir))
        stack.callback(shutil.rmtree, work, True)
        certs = _make_certs(openssl, work / "certs")
        node = _Node(server, ctl, work, certs)
        stack.callback(node.stop)
        node.start(boot_timeout)
        yield TlsBroker(
            host=HOST, port=node.ports["tls"], mtls_port=node.ports["mtls"],
            mismatched_port=node.ports["mismatched"], ca_file=certs["ca"],
            client_cert=certs["client"], client_key=certs["client_key"],
            other_ca_file=certs["other_ca"], node=node.name, start_seconds=node.start_seconds,
        )


# -- certificates ------------------------------------------------------------------------------


def _make_certs(openssl: str, out: Path) -> dict[str, Path]:
    """CA + server (localhost), mismatched server (wrong.example), client; and an unrelated CA.

    EC P-256 keys: generating them takes milliseconds, RSA-2048 takes ~0.3 s each.
    """
    out.mkdir(mode=0o700)
    cnf = out / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    env = {**os.environ, "OPENSSL_CONF": str(cnf)}

    def run(*args: str) -> None:
        proc = subprocess.run([openssl, *args], cwd=out, env=env, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            pytest.skip(f"TLS broker: openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")

    newkey = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other_ca"):
        run("req", "-x509", *newkey, "-config", str(cnf), "-extensions", "ca_ext",
            "-subj", f"/CN=taskq test {ca} {secrets.token_hex(4)}", "-days", "3",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    for name, cn in (("server", "localhost"), ("wrong", "wrong.example"),
                     ("client", "taskq-test-client")):
        run("req", "-new", *newkey, "-config", str(cnf), "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-days", "3",
            "-extfile", str(cnf), "-extensions", f"{name}_ext", "-out", f"{name}.pem")
    paths = {name: out / f"{name}.pem" for name in ("ca", "other_ca", "server", "wrong", "client")}
    paths.update({f"{name}_key": out / f"{name}.key" for name in ("server", "wrong", "client")})
    return paths


# -- the node ----------------------------------------------------------------------------------


def _rabbitmq_scripts() -> tuple[str, str]:
    for directory in RABBITMQ_BIN_DIRS:
        server, ctl = Path(directory, "rabbitmq-server"), Path(directory, "rabbitmqctl")
        if os.access(server, os.X_OK) and os.access(ctl, os.X_OK):
            return str(server), str(ctl)
    server_path, ctl_path = shutil.which("rabbitmq-server"), shutil.which("rabbitmqctl")
    if server_path is None or ctl_path is None:
        pytest.skip("TLS broker: rabbitmq-server/rabbitmqctl not found")
    return server_path, ctl_path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((BIND, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _erl_string(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Node:
    def __init__(self, server: str, ctl: str, work: Path, certs: dict[str, Path]) -> None:
        self.server, self.ctl, self.work, self.certs = server, ctl, work, certs
        self.name = f"taskq-tls-{secrets.token_hex(4)}@{HOST}"
        tls, mtls, mismatched, dist = _free_ports(4)
        self.ports = {"tls": tls, "mtls": mtls, "mismatched": mismatched, "dist": dist}
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        work = self.work
        home = work / "home"
        home.mkdir(mode=0o700)
        # Our own cookie: the CLI finds it through HOME too.  The main node's cookie is neither
        # needed nor readable (it belongs to the rabbitmq user).
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (work / "enabled_plugins").write_text("[].\n")
        (work / "rabbitmq-env.conf").write_text("")
        ssl_options = "\n".join(
            f"ssl_options.{key} = {value}" for key, value in (
                ("cacertfile", self.certs["ca"]), ("certfile", self.certs["server"]),
                ("keyfile", self.certs["server_key"]), ("verify", "verify_peer"),
                ("fail_if_no_peer_cert", "false")))
        (work / "rabbitmq.conf").write_text(
            f"listeners.tcp = none\n"
            f"listeners.ssl.default = {BIND}:{self.ports['tls']}\n{ssl_options}\n")
        # Start from a clean environment: no RABBITMQ_*/ERL_* settings leak in from the caller,
        # and /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost) is not read.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_CONF_ENV_FILE=str(work / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(work / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(work / "advanced.config"),  # does not exist
            RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(work / "mnesia"),
            RABBITMQ_LOG_BASE=str(work / "log"),
            # Default would be 25672, the main node's distribution port.
            RABBITMQ_DIST_PORT=str(self.ports["dist"]),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS=BIND,  # only used if this node has to start epmd itself
            ERL_CRASH_DUMP=str(work / "erl_crash.dump"),
        )
        return env

    # -- start ---------------------------------------------------------------------------------

    def start(self, boot_timeout: float) -> None:
        began = time.monotonic()
        with open(self.work / "server.out", "wb") as out:
            self.proc = subprocess.Popen(
                [self.server], cwd=self.work, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._start_watchdog()
        self._wait_for_listener(boot_timeout)
        self._start_extra_listeners()
        self.start_seconds = time.monotonic() - began

    def _start_watchdog(self) -> None:
        """If this (pytest) process dies without cleaning up, stop the node and delete files."""
        assert self.proc is not None
        # POSIX sh (dash): "kill -TERM -PGID", no "--".
        script = ('while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -TERM "-$2"; n=0; '
                  'while kill -0 "-$2" 2>/dev/null && [ $n -lt 40 ]; do sleep 0.25; n=$((n+1)); '
                  'done; kill -KILL "-$2" 2>/dev/null; rm -rf -- "$3"')
        self.watchdog = subprocess.Popen(
            ["sh", "-c", script, "taskq-tls-watchdog", str(os.getpid()), str(self.proc.pid),
             str(self.work)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def _wait_for_listener(self, timeout: float) -> None:
        """Poll until the TLS listener completes a verified handshake (listeners start last)."""
        assert self.proc is not None
        context = ssl.create_default_context(cafile=str(self.certs["ca"]))
        deadline = time.monotonic() + timeout
        failed_handshakes = 0
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._skip(f"node exited with status {self.proc.returncode} during boot")
            try:
                sock = socket.create_connection((BIND, self.ports["tls"]), timeout=2)
            except OSError as exc:  # not listening yet
                last_error = exc
                time.sleep(0.05)
                continue
            try:
                with sock, context.wrap_socket(sock, server_hostname=HOST):
                    return
            except OSError as exc:  # listening, but TLS fails (e.g. a key Erlang cannot read)
                failed_handshakes += 1
                last_error = exc
                if failed_handshakes >= 10:
                    self._skip(f"TLS handshakes with the new node fail: {exc!r}")
            time.sleep(0.1)
        self._skip(f"node did not open its TLS listener within {timeout}s ({last_error!r})")

    def _start_extra_listeners(self) -> None:
        """rabbitmq.conf has one global ssl_options; these two listeners need other options."""
        certs = self.certs

        def listener(port: int, cert: str, key: str, extra: str = "") -> str:
            return (f"rabbit_networking:start_ssl_listener({{{_erl_string(BIND)}, {port}}}, "
                    f"[{{cacertfile, {_erl_string(certs['ca'])}}}, "
                    f"{{certfile, {_erl_string(certs[cert])}}}, "
                    f"{{keyfile, {_erl_string(certs[key])}}}{extra}], 1)")

        mtls = listener(self.ports["mtls"], "server", "server_key",
                        ", {verify, verify_peer}, {fail_if_no_peer_cert, true}")
        mismatched = listener(self.ports["mismatched"], "wrong", "wrong_key")
        expression = f"{{{mtls}, {mismatched}}}."
        output = self._ctl("eval", expression)
        if output.strip() != "{ok,ok}":
            self._skip(f"could not start the extra TLS listeners: {output.strip()}")

    def _ctl(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run([self.ctl, "-n", self.name, *args], cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            self._skip(f"rabbitmqctl {args[0]} failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def _skip(self, reason: str) -> None:
        pytest.skip(f"TLS broker {self.name}: {reason}\n{self._log_tail()}")

    def _log_tail(self, lines: int = 6) -> str:
        parts = []
        for path in (self.work / "server.out", self.work / "log" / f"{self.name}.log"):
            with suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}:\n" + "\n".join(text))
        return "\n".join(parts)

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the node's process group (a graceful stop), SIGKILL it if that hangs.

        ``rabbitmqctl stop`` works too, but costs a CLI VM start (~0.6 s) on top of the same
        ~1 s halt, and needs distribution and the cookie to work; a signal does not.
        """
        proc = self.proc
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
                    break
            # The wrapper script waits for the Erlang VM, but reap anything left in the group.
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()
