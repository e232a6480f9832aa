"""Smoke tests for the throwaway TLS broker fixture, with only ``ssl`` and py-amqp (no taskq).

Note on py-amqp: ``amqp.Connection(ssl=...)`` takes a dict of options, not an ``SSLContext``
(anything that is not a dict is treated as ``ssl=True``: system CAs and *no* hostname check).
Its hostname check is only on when ``server_hostname`` is passed.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import amqp
import pytest

from .tls_broker import TlsBroker

pytestmark = pytest.mark.rabbitmq


def connect(tls: TlsBroker, port: int, *, ca: object = None, client_cert: bool = False,
            hostname: str | None = None) -> amqp.Connection:
    """An AMQP connection verifying the chain (against ``ca``) and the hostname."""
    options: dict[str, Any] = {
        "ca_certs": str(ca or tls.ca_file),
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": hostname or tls.host,
    }
    if client_cert:
        options.update(certfile=str(tls.client_cert), keyfile=str(tls.client_key))
    conn = amqp.Connection(f"{tls.host}:{port}", ssl=options, connect_timeout=10)
    try:
        conn.connect()
    except BaseException:
        conn.collect()
        raise
    return conn


def handshake(tls: TlsBroker, port: int, context: ssl.SSLContext, hostname: str) -> dict[str, Any]:
    """A bare TLS handshake with the standard library; returns the server certificate."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=hostname) as tls_sock:
        cert = tls_sock.getpeercert()
        assert cert is not None
        return cert


def strict_context(cafile: object) -> ssl.SSLContext:
    """``create_default_context`` (chain + hostname), plus Python 3.13's X509_STRICT default."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def test_amqp_over_tls_verifies_chain_and_hostname(tls: TlsBroker) -> None:
    conn = connect(tls, tls.port)
    try:
        peer = conn.transport.sock.getpeercert()
        assert peer["subjectAltName"] == (("DNS", "localhost"),)
        assert conn.transport.sock.version() in ("TLSv1.2", "TLSv1.3")
        # It is the throwaway node, not the shared rabbit@localhost.  (The default cluster
        # name is the node name with the machine's real hostname, not "localhost".)
        cluster_name = conn.server_properties["cluster_name"]
        assert cluster_name.split("@")[0] == tls.node.split("@")[0]
        channel = conn.channel()
        queue, _, _ = channel.queue_declare(exclusive=True)
        channel.basic_publish(amqp.Message(b"over tls"), exchange="", routing_key=queue)
        message = channel.basic_get(queue, no_ack=True)
        assert message is not None and message.body == b"over tls"
    finally:
        conn.close()


def test_client_certificate_is_optional_on_the_main_port(tls: TlsBroker) -> None:
    connect(tls, tls.port, client_cert=True).close()


def test_stdlib_default_context_accepts_the_server_certificate(tls: TlsBroker) -> None:
    cert = handshake(tls, tls.port, strict_context(tls.ca_file), "localhost")
    assert dict(x[0] for x in cert["subject"])["commonName"] == "localhost"


def test_wrong_ca_is_rejected(tls: TlsBroker) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        connect(tls, tls.port, ca=tls.other_ca_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls, tls.port, strict_context(tls.other_ca_file), "localhost")


def test_certificate_for_another_name_fails_the_hostname_check(tls: TlsBroker) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        connect(tls, tls.mismatched_port)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tls, tls.mismatched_port, strict_context(tls.ca_file), "localhost")
    # Control: the chain itself is fine, only the name is wrong.
    connect(tls, tls.mismatched_port, hostname="wrong.example").close()


def test_ip_address_is_not_a_name_in_the_certificate(tls: TlsBroker) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        handshake(tls, tls.port, strict_context(tls.ca_file), "127.0.0.1")


def test_mutual_tls_requires_a_client_certificate(tls: TlsBroker) -> None:
    connect(tls, tls.mtls_port, client_cert=True).close()
    # TLS 1.3: the server rejects us after the client's handshake finished, so the error
    # (ssl.SSLError "certificate required" alert, or a reset) comes from the first read.
    with pytest.raises(OSError):
        connect(tls, tls.mtls_port)
