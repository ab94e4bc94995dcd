"""The text log format keeps one event on one line, whatever a client sent (common/logs.py)."""

from __future__ import annotations

import logging

from common.logs import TextFormatter


def formatted(message: str, *args: object, **extra: object) -> str:
    record = logging.LogRecord("services.store.imap", logging.INFO, __file__, 1, message,
                               args, None)
    record.__dict__.update(extra)
    return TextFormatter().format(record)


def test_a_login_name_with_a_line_feed_or_a_tab_forges_no_line_or_field() -> None:
    """An IMAP LOGIN literal `evil\\nqueue_id=FORGED` made a second line that a grep for
    the queue id found; a tab made a second field for a key=value reader."""
    line = formatted("login failed", user="evil\nqueue_id=FORGED wrong", session="s1")
    assert "\n" not in line
    assert line.endswith('user="evil\\nqueue_id=FORGED wrong" session=s1')
    line = formatted("login failed", user="evil\tqueue_id=FORGED2")
    assert line.endswith('user="evil\\tqueue_id=FORGED2"')
    assert formatted("x", user="jörg@example.org").endswith("user=jörg@example.org")


def test_client_text_in_the_message_is_escaped_too() -> None:
    line = formatted("unknown command %s", "FOO\r\nqueue_id=FORGED\x1b[31m")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "unknown command FOO\\r\\nqueue_id=FORGED\\x1b[31m" in line
