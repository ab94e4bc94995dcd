"""aiormq's connection-loss records, as the tiers log them (common.logs.BrokerLinkNotes)."""

from __future__ import annotations

import logging
import sys

from common.logs import BrokerLinkNotes


def record(level: int, msg: str, *args: object, exc: BaseException | None = None,
           name: str = "aiormq.connection") -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, level, "connection.py", 1, msg, args, exc_info)


def test_a_failed_connect_attempt_is_dropped() -> None:
    refused = record(logging.ERROR, "error when creating transport: %r",
                     ConnectionRefusedError(111, "Connection refused"))
    assert BrokerLinkNotes().filter(refused) is False


def test_a_lost_connection_is_one_info_line_without_the_traceback() -> None:
    try:
        raise ConnectionResetError("Server connection unexpectedly closed")
    except ConnectionResetError as exc:
        lost = record(logging.WARNING, "Cancelling cause reader exited abnormally", exc=exc)
    assert sys.exc_info() == (None, None, None)
    assert BrokerLinkNotes().filter(lost) is True
    assert (lost.levelname, lost.levelno) == ("INFO", logging.INFO)
    assert lost.getMessage() == "broker connection lost: Server connection unexpectedly closed"
    assert lost.exc_info is None


def test_a_close_the_broker_sent_is_a_warning() -> None:
    closed = record(logging.ERROR, 'Unexpected connection close from remote "%s", '
                    "Connection.Close(reply_code=%r, reply_text=%r)",
                    "amqp://127.0.0.1", 320, "CONNECTION_FORCED - broker forced connection")
    assert BrokerLinkNotes().filter(closed) is True
    assert (closed.levelname, closed.levelno) == ("WARNING", logging.WARNING)
    assert "CONNECTION_FORCED" in closed.getMessage()


def test_a_dramatiq_consumer_that_reconnects_by_itself_is_a_warning() -> None:
    lost = record(logging.CRITICAL, "Consumer encountered a connection error: %s",
                  "Transport indicated EOF", name="dramatiq.worker.ConsumerThread(t.learn)")
    assert BrokerLinkNotes().filter(lost) is True
    assert (lost.levelname, lost.levelno) == ("WARNING", logging.WARNING)


def test_other_records_pass_unchanged() -> None:
    for other in (record(logging.WARNING, "Got unexpected UpdateSecretOk frame"),
                  record(logging.CRITICAL, "Worker crashed", name="dramatiq.worker.Worker"),
                  record(logging.ERROR, "error when creating transport", name="our.module")):
        level = other.levelno
        assert BrokerLinkNotes().filter(other) is True
        assert other.levelno == level
