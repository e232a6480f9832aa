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
pytest itself dies without cleaning up, a small watchdog process does the same.  The node
machinery (environment, boot, watchdog, stop) is shared with other throwaway nodes: see
``rabbit_node.py``.

When the machine cannot run a node (no ``openssl``, no RabbitMQ, the node does not boot)
``tls_broker()`` calls ``pytest.skip`` with the reason and the tail of the node's logs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .rabbit_node import BIND, HOST, RabbitNode, erl_string

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
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="taskq-tls-", dir=base_dir))
        stack.callback(shutil.rmtree, work, True)
        certs = _make_certs(openssl, work / "certs")
        node = _Node(work, certs)
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


class _Node(RabbitNode):
    """The TLS node: the generic throwaway node (rabbit_node.py) with TLS listeners only."""

    kind = "tls"
    label = "TLS broker"

    def __init__(self, work: Path, certs: dict[str, Path]) -> None:
        self.certs = certs  # config() reads them, during RabbitNode.__init__
        super().__init__(work, ("tls", "mtls", "mismatched"), on_unavailable=pytest.skip)

    def config(self) -> str:
        ssl_options = "\n".join(
            f"ssl_options.{key} = {value}" for key, value in (
                ("cacertfile", self.certs["ca"]), ("certfile", self.certs["server"]),
                ("keyfile", self.certs["server_key"]), ("verify", "verify_peer"),
                ("fail_if_no_peer_cert", "false")))
        return (f"listeners.tcp = none\n"
                f"listeners.ssl.default = {BIND}:{self.ports['tls']}\n{ssl_options}\n")

    def wait_ready(self, timeout: float = 60) -> None:
        """Poll until the TLS listener completes a verified handshake (listeners start last)."""
        context = ssl.create_default_context(cafile=str(self.certs["ca"]))
        deadline = time.monotonic() + timeout
        failed_handshakes = 0
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_running()
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
                    self._unavailable(f"TLS handshakes with the new node fail: {exc!r}")
            time.sleep(0.1)
        self._unavailable(f"node did not open its TLS listener within {timeout}s "
                          f"({last_error!r})")

    def after_boot(self) -> None:
        """rabbitmq.conf has one global ssl_options; these two listeners need other options."""
        certs = self.certs

        def listener(port: int, cert: str, key: str, extra: str = "") -> str:
            return (f"rabbit_networking:start_ssl_listener({{{erl_string(BIND)}, {port}}}, "
                    f"[{{cacertfile, {erl_string(certs['ca'])}}}, "
                    f"{{certfile, {erl_string(certs[cert])}}}, "
                    f"{{keyfile, {erl_string(certs[key])}}}{extra}], 1)")

        mtls = listener(self.ports["mtls"], "server", "server_key",
                        ", {verify, verify_peer}, {fail_if_no_peer_cert, true}")
        mismatched = listener(self.ports["mismatched"], "wrong", "wrong_key")
        expression = f"{{{mtls}, {mismatched}}}."
        output = self.ctl("eval", expression)
        if output.strip() != "{ok,ok}":
            self._unavailable(f"could not start the extra TLS listeners: {output.strip()}")
