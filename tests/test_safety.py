"""Safe defaults: no password in any message, TLS verified fully, oversized messages refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import taskq
from taskq import App

from .apps import basic
from .support import Broker, WorkerProcess, run_taskq
from .tls_broker import TlsBroker

SECRET = "s3cr3t-Pa55"


@pytest.mark.rabbitmq
def test_a_password_never_appears_in_errors_or_worker_logs(broker: Broker, queue: str,
                                                           tmp_path: Path) -> None:
    unreachable = App(f"amqp://guest:{SECRET}@127.0.0.1:1/", publish_timeout=1,
                      connect_timeout=0.2)
    assert SECRET not in repr(unreachable) and SECRET not in unreachable.config.display_url
    with pytest.raises(taskq.BrokerUnavailable) as caught:
        basic.build(unreachable).add.delay(1, 2)
    assert SECRET not in str(caught.value) and "guest:****@127.0.0.1:1/" in str(caught.value)

    wrong_password = f"amqp://guest:{SECRET}@127.0.0.1:5672/{broker.vhost}"
    refused = App(wrong_password, publish_timeout=10)
    started = time.monotonic()
    with pytest.raises(taskq.BrokerUnavailable, match="refused the connection") as caught:
        basic.build(refused).add.delay(1, 2)
    assert time.monotonic() - started < 5  # wrong credentials are not retried for 10s
    assert SECRET not in str(caught.value)

    worker = run_taskq("worker", "-A", "tests.apps.basic:app", "-Q", queue,
                       env={"TASKQ_BROKER_URL": wrong_password}, timeout=30)
    assert worker.returncode == 1
    assert SECRET not in worker.stdout + worker.stderr
    assert "guest:****@" in worker.stderr


def test_a_message_over_the_size_limit_is_refused_before_sending(
        make_app: Callable[..., App], broker: Broker, queue: str) -> None:
    tasks = basic.build(make_app(max_message_size=4096))
    with pytest.raises(taskq.MessageTooLarge, match="over max_message_size=4,096"):
        tasks.echo.delay("x" * 10_000)
    assert isinstance(taskq.MessageTooLarge("x"), ValueError)
    assert not broker.exists(queue)
    tasks.echo.delay("x" * 1000)  # under the limit: fine
    assert broker.counts(queue)[0] == 1


# -- TLS, against a throwaway RabbitMQ node with its own certificate authority ------------------


def tls_app(tls: TlsBroker, port: int | None = None, **settings: object) -> App:
    settings.setdefault("publish_timeout", 10)
    return App(tls.url(port), default_queue="tls-tests", **settings)  # type: ignore[arg-type]


def test_tls_end_to_end_with_chain_and_hostname_verified(
        tls: TlsBroker, broker: Broker, tmp_path: Path) -> None:
    """Given an amqps:// URL and the CA that signed the broker's certificate, a client and a
    worker talk over TLS, each verifying the certificate chain and the host name."""
    app = tls_app(tls, ssl_ca_file=str(tls.ca_file))
    worker = WorkerProcess(broker, "tests.apps.tls:app", ["tls-tests"], tmp_path / "worker.log",
                           concurrency=1, env={"TASKQ_BROKER_URL": tls.url(),
                                               "TASKQ_TEST_TLS_CA": str(tls.ca_file)})
    try:  # the worker's readiness shows in the result: the task waits in the queue till then
        assert basic.build(app).add.delay(2, 3).get(timeout=30) == 5
        assert "amqps://guest:****@localhost" in worker.log()
    finally:
        worker.stop()
        app.close()


def _refused(app: App) -> str:
    started = time.monotonic()
    with pytest.raises(taskq.BrokerUnavailable) as caught:
        basic.build(app).add.delay(1, 1)
    assert time.monotonic() - started < 5  # a TLS failure is final, not retried
    return str(caught.value)


def test_tls_refuses_a_broker_signed_by_another_ca(tls: TlsBroker) -> None:
    assert "certificate verify failed" in _refused(tls_app(tls, ssl_ca_file=str(tls.other_ca_file)))


def test_tls_verifies_against_the_system_store_by_default(tls: TlsBroker) -> None:
    """Without ssl_ca_file the system's CAs decide: a private CA's certificate is refused."""
    assert "certificate verify failed" in _refused(tls_app(tls))


def test_tls_refuses_a_certificate_for_another_host_name(tls: TlsBroker) -> None:
    message = _refused(tls_app(tls, tls.mismatched_port, ssl_ca_file=str(tls.ca_file)))
    assert "Hostname mismatch" in message and "localhost" in message


def test_tls_host_name_check_can_only_be_turned_off_explicitly(tls: TlsBroker) -> None:
    app = tls_app(tls, tls.mismatched_port, ssl_ca_file=str(tls.ca_file),
                  ssl_verify_hostname=False)
    try:
        basic.build(app).add.apply_async((1, 1), ignore_result=True)
    finally:
        app.close()


def test_tls_client_certificates(tls: TlsBroker) -> None:
    """A broker that requires client certificates accepts ours and refuses a client without."""
    with_cert = tls_app(tls, tls.mtls_port, ssl_ca_file=str(tls.ca_file),
                        ssl_cert_file=str(tls.client_cert), ssl_key_file=str(tls.client_key))
    try:
        basic.build(with_cert).add.apply_async((1, 1), ignore_result=True)
    finally:
        with_cert.close()
    without = tls_app(tls, tls.mtls_port, ssl_ca_file=str(tls.ca_file))
    with pytest.raises(taskq.BrokerUnavailable):
        basic.build(without).add.apply_async((1, 1), ignore_result=True)


def test_tls_settings_that_point_nowhere_are_a_clear_error(tls: TlsBroker) -> None:
    app = tls_app(tls, ssl_ca_file="/no/such/ca.pem")
    with pytest.raises(taskq.ConfigurationError, match="TLS file '/no/such/ca.pem' does not"):
        basic.build(app).add.apply_async((1, 1), ignore_result=True)


@pytest.mark.parametrize("url", [
    f"amqp://guest:ab#{SECRET}@127.0.0.1:1/",
    f"amqp://guest:{SECRET}/x@127.0.0.1:1/",
    f"amqp://guest:{SECRET}?x@127.0.0.1:1//",
])
def test_a_password_with_unencoded_characters_is_masked_and_the_fix_named(url: str) -> None:
    """A password with an unencoded '#', '/' or '?' (a user's mistake) makes the URL parse
    wrongly; it is refused with one line that masks it and says to percent-encode it."""
    with pytest.raises(taskq.ConfigurationError) as caught:
        App(url)
    message = str(caught.value)
    assert SECRET not in message and "percent-encode" in message and "\n" not in message


def test_config_and_app_never_show_the_password() -> None:
    app = App(f"amqp://guest:{SECRET}@127.0.0.1:1/")
    for text in (repr(app.config), str(app.config), repr(app), str(vars(app.config))):
        assert SECRET not in text, text


def test_an_unparseable_port_is_one_line_naming_it(queue: str) -> None:
    result = run_taskq("worker", "-A", "tests.apps.basic:app", "-Q", queue,
                       env={"TASKQ_BROKER_URL": f"amqp://guest:{SECRET}@localhost:56x72//"},
                       timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "port" in error and "56x72" in error


def test_dlq_list_with_the_broker_away_is_one_line(queue: str) -> None:
    result = run_taskq("dlq", "list", queue,
                       env={"TASKQ_BROKER_URL": f"amqp://guest:{SECRET}@127.0.0.1:1/"},
                       timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and SECRET not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "127.0.0.1:1" in result.stderr
