"""The text log format keeps one event on one line, whatever a client sent (common/logs.py)."""

from __future__ import annotations

import json
import logging

from common.logs import JsonFormatter, TextFormatter, _TierFilter, one_word


def record_of(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("services.store.imap", logging.INFO, __file__, 1, message,
                               args, None)
    record.__dict__.update(extra)
    return record


def formatted(message: str, *args: object, **extra: object) -> str:
    return TextFormatter().format(record_of(message, *args, **extra))


def test_the_context_of_a_line_follows_its_message_as_key_value_pairs() -> None:
    """What `grep queue_id=...` across the tiers' logs finds."""
    line = formatted("delivered to %d mailbox(es)", 2, queue_id="4XJ7Q2", user="u@example.org",
                     event="delivered")
    assert line.split(" ", 3)[1:] == [
        "INFO", "services.store.imap",
        "delivered to 2 mailbox(es) queue_id=4XJ7Q2 user=u@example.org event=delivered"]


def test_a_json_line_carries_the_same_context_as_fields() -> None:
    line = JsonFormatter().format(record_of("delivered", queue_id="4XJ7Q2", user="u@x.org",
                                            session=None))
    assert {k: v for k, v in json.loads(line).items() if k != "ts"} == {
        "level": "INFO", "logger": "services.store.imap", "msg": "delivered",
        "queue_id": "4XJ7Q2", "user": "u@x.org"}


def test_each_line_names_its_tier_unless_it_names_one_itself() -> None:
    tier = _TierFilter("filter")
    plain, own = record_of("accepted"), record_of("taken", tier="store")
    assert tier.filter(plain) and tier.filter(own)
    assert TextFormatter().format(plain).endswith(" accepted tier=filter")
    assert TextFormatter().format(own).endswith(" taken tier=store")


def test_a_login_name_with_a_line_feed_or_a_tab_forges_no_line_or_field() -> None:
    """An IMAP LOGIN literal `evil\\nqueue_id=FORGED` made a second line that a grep for
    the queue id found; a tab made a second field for a key=value reader."""
    line = formatted("login failed", user="evil\nqueue_id=FORGED wrong", session="s1")
    assert "\n" not in line
    assert line.endswith('user="evil\\nqueue_id=FORGED wrong" session=s1')
    line = formatted("login failed", user="evil\tqueue_id=FORGED2")
    assert line.endswith('user="evil\\tqueue_id=FORGED2"')
    assert formatted("x", user="jörg@example.org").endswith("user=jörg@example.org")


def test_a_login_name_with_a_space_forges_no_field() -> None:
    line = formatted("login failed", user="x queue_id=FORGED", session="s1")
    assert line.endswith(' login failed user="x queue_id=FORGED" session=s1')


def test_an_address_in_the_message_is_one_word() -> None:
    """A quoted local part may hold spaces: `"x queue_id=FORGED"@example.net`."""
    assert one_word('"x queue_id=F"@example.net') == '"x\\x20queue_id=F"@example.net'
    assert one_word("a\tb\\c\u2028d") == "a\\x09b\\x5cc\\u2028d"
    assert one_word("jörg@example.org") == "jörg@example.org"


def test_client_text_in_the_message_is_escaped_too() -> None:
    line = formatted("unknown command %s", "FOO\r\nqueue_id=FORGED\x1b[31m")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "unknown command FOO\\r\\nqueue_id=FORGED\\x1b[31m" in line
