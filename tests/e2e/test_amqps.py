"""RabbitMQ over TLS with a private CA, as an operator with tiers on several machines runs it:
`amqps://` in TIERMAIL_AMQP_URL and the CA's certificate in OpenSSL's `SSL_CERT_FILE`. Both
AMQP clients verify the broker against it: aiormq (filter, store) and pika (spam learning).
The broker is a RabbitMQ node of the test's own with a TLS listener."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator

import pytest

from common.settings import Settings
from services.store.learning import Learning
from tests.e2e.test_inbound_spine import Stack, message, pop3_count, provision, send
from tests.support import (
    PrivateBroker,
    TierProcess,
    TlsFiles,
    private_ca,
    queue_depth,
    wait_until,
)

USER = "alice@example.org"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateBroker,
                                                                           TlsFiles]]:
    files = private_ca(tmp_path_factory.mktemp("private-ca"))
    broker = PrivateBroker(tls=files)
    broker.start()
    yield broker, files
    broker.stop()


@pytest.fixture
def over_tls(settings: Settings, tls_broker: tuple[PrivateBroker, TlsFiles]) -> Settings:
    broker, _ = tls_broker
    return settings.replace(amqp_url=broker.tls_url)


def test_filter_and_store_use_a_broker_whose_ca_is_in_ssl_cert_file(
        over_tls: Settings, tls_broker: tuple[PrivateBroker, TlsFiles],
        run_tier: Callable[..., TierProcess]) -> None:
    _, files = tls_broker
    provision(over_tls)
    trusting = {"SSL_CERT_FILE": str(files.ca)}
    stack = Stack(over_tls, lambda *args: run_tier(*args, extra_env=trusting))
    stack.start_store()
    stack.start_filter()
    send(over_tls, "sender@example.net", [USER], message("over TLS"))
    wait_until(lambda: pop3_count(over_tls, USER) == 1, what="the message in the mailbox")


def test_without_the_ca_the_filter_does_not_trust_the_broker(
        over_tls: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Certificates are verified: without the CA, no connection and no 250."""
    provision(over_tls)
    filter_tier = run_tier(over_tls, "filter", extra_env={"SSL_CERT_FILE": "/nonexistent"})
    filter_tier.wait_for_port(over_tls.smtp_port)
    with smtplib.SMTP("127.0.0.1", over_tls.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        code, reply = smtp.mail("sender@example.net")
    assert code == 451 and reply.startswith(b"4.3.0"), reply
    assert "certificate verify failed" in filter_tier.output()


def test_spam_learning_enqueues_over_tls(over_tls: Settings,
                                         tls_broker: tuple[PrivateBroker, TlsFiles],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, files = tls_broker
    monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))
    learning = Learning(over_tls)
    try:
        learning.declare()
        learning.send("spam", USER, "0" * 32, b"Subject: x\r\n\r\nbody\r\n", 1)
    finally:
        learning.close()
    assert queue_depth(over_tls, learning.queue_name) == 1

