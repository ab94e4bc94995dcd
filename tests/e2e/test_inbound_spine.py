"""The inbound spine end to end, as users and operators meet it.

Real `tiermail filter` and `tiermail store` processes, the real RabbitMQ and Redis, smtplib on
one side and poplib on the other. Every message is compared byte for byte: what arrives over
POP3 must be exactly what was sent, preceded only by the filter's Received header.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import poplib
import re
import smtplib
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

import pytest
import redis

from common.passwords import hash_password
from common.settings import Settings
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import user_path
from tests.support import (
    TierProcess,
    free_port,
    queue_depth,
    rabbitmqctl,
    run_cli,
    wait_until,
)

PASSWORD = "correct horse"
QUEUED = re.compile(rb"queued as ([A-Z0-9]+)")


def tiermail(settings: Settings, *args: str, stdin: str = "") -> None:
    result = run_cli(settings, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr


def provision(settings: Settings) -> None:
    tiermail(settings, "domain", "add", "example.org")
    for user in ("alice", "bob"):
        tiermail(settings, "user", "add", f"{user}@example.org", "--password-stdin",
                 stdin=PASSWORD + "\n")
    tiermail(settings, "alias", "add", "team@example.org", "alice@example.org")
    tiermail(settings, "alias", "add", "team@example.org", "bob@example.org")
    tiermail(settings, "alias", "add", "postmaster@example.org", "alice@example.org")


@dataclass
class Stack:
    settings: Settings
    start: Callable[..., TierProcess]
    store: TierProcess | None = None
    filter: TierProcess | None = None

    def start_store(self) -> TierProcess:
        self.store = self.start(self.settings, "store")
        self.store.wait_for_port(self.settings.pop3_port)
        return self.store

    def start_filter(self, settings: Settings | None = None) -> TierProcess:
        settings = settings or self.settings
        process = self.start(settings, "filter")
        process.wait_for_port(settings.smtp_port)
        self.filter = self.filter or process
        return process


@pytest.fixture
def stack(settings: Settings, run_tier: Callable[..., TierProcess]) -> Iterator[Stack]:
    provision(settings)
    yield Stack(settings, run_tier)


def message(subject: str, body: bytes = b"Hello.\r\n", headers: bytes = b"") -> bytes:
    msgid = f"<{uuid.uuid4().hex}@client.example.net>".encode()
    return (b"From: Sender <sender@example.net>\r\nTo: alice@example.org\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: " + msgid + b"\r\n" + headers
            + b"\r\n" + body)


def send(settings: Settings, mail_from: str, rcpts: list[str], data: bytes,
         options: tuple[str, ...] = ()) -> str:
    """One SMTP transaction; returns the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=120) as smtp:
        smtp.ehlo("client.example.net")
        code, reply = smtp.mail(mail_from, list(options))
        assert code == 250, reply
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(data)
        assert code == 250, reply
    found = QUEUED.search(reply)
    assert found, reply
    return found.group(1).decode()


def pop3_retrieve_all(settings: Settings, user: str) -> list[bytes]:
    with closing(poplib.POP3("127.0.0.1", settings.pop3_port, timeout=60)) as pop:
        pop.user(user)
        pop.pass_(PASSWORD)
        count = pop.stat()[0]
        messages = [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
        pop.quit()
    return messages


def pop3_count(settings: Settings, user: str) -> int:
    with closing(poplib.POP3("127.0.0.1", settings.pop3_port, timeout=60)) as pop:
        pop.user(user)
        pop.pass_(PASSWORD)
        count = int(pop.stat()[0])
        pop.quit()
    return count


ADDED_HEADERS = (b"return-path", b"delivered-to", b"received")


def assert_delivered_exactly(stored: bytes, sent: bytes, queue_id: str) -> None:
    """The stored message is the sent one byte for byte, after the trace headers that the
    filter (Received) and the delivering store (Return-Path, Delivered-To) put on top."""
    assert stored.endswith(sent), "the message body or headers were altered in transit"
    added = stored[: len(stored) - len(sent)]
    assert b"Received: " in added and queue_id.encode() in added, added[:300]
    for line in added.split(b"\r\n")[:-1]:
        if line.startswith((b" ", b"\t")):
            continue  # a folded continuation
        assert line.split(b":", 1)[0].lower() in ADDED_HEADERS, line


def test_plain_8bit_and_smtputf8_arrive_byte_for_byte(stack: Stack) -> None:
    stack.start_store()
    stack.start_filter()
    plain = message("plain")
    eight_bit = message("8-bit", body="Grüße aus Köln, ½ €.\r\n".encode(),
                        headers=b"Content-Type: text/plain; charset=utf-8\r\n"
                                b"Content-Transfer-Encoding: 8bit\r\nMIME-Version: 1.0\r\n")
    utf8 = message("UTF-8", body="Привет, мир.\r\n".encode(),
                   headers="X-Name: Jörg Müller\r\n".encode())
    sent = {
        send(stack.settings, "sender@example.net", ["alice@example.org"], plain): plain,
        send(stack.settings, "sender@example.net", ["alice@example.org"], eight_bit,
             ("BODY=8BITMIME",)): eight_bit,
        send(stack.settings, "jörg@exämple.net", ["alice@example.org"], utf8,
             ("SMTPUTF8", "BODY=8BITMIME")): utf8,
    }
    wait_until(lambda: pop3_count(stack.settings, "alice@example.org") == 3,
               what="three messages in alice's mailbox")
    stored = pop3_retrieve_all(stack.settings, "alice@example.org")
    for queue_id, data in sent.items():
        (match,) = [s for s in stored if queue_id.encode() in s.split(b"\r\n\r\n", 1)[0]]
        assert_delivered_exactly(match, data, queue_id)


def test_twenty_megabyte_message(stack: Stack) -> None:
    store = stack.start_store()
    stack.start_filter()
    payload = base64.encodebytes(os.urandom(15 * 1024 * 1024)).replace(b"\n", b"\r\n")
    big = message("big", body=payload, headers=b"Content-Transfer-Encoding: base64\r\n")
    assert len(big) > 20_000_000
    queue_id = send(stack.settings, "sender@example.net", ["bob@example.org"], big)
    wait_until(lambda: pop3_count(stack.settings, "bob@example.org") == 1, timeout=120,
               what="the 20 MB message in bob's mailbox")
    (stored,) = pop3_retrieve_all(stack.settings, "bob@example.org")
    assert_delivered_exactly(stored, big, queue_id)
    # The text index is still busy with the body (base64 with no Content-Type: text/plain,
    # some 15 MB of it): the store used to log `store stopped` and then wait for that
    # write to exit, past TierProcess.stop's 15 s, and be SIGKILLed.
    store.stop()
    assert store.proc.returncode == 0, store.output()


def test_several_recipients_and_aliases_get_one_copy_each(stack: Stack) -> None:
    stack.start_store()
    stack.start_filter()
    data = message("to many")
    queue_id = send(stack.settings, "sender@example.net",
                    ["alice@example.org", "team@example.org", "postmaster@example.org"], data)
    wait_until(lambda: pop3_count(stack.settings, "bob@example.org") == 1,
               what="bob's copy (through the team alias)")
    wait_until(lambda: pop3_count(stack.settings, "alice@example.org") >= 1,
               what="alice's copy")
    assert queue_depth(stack.settings) == 0
    for user in ("alice@example.org", "bob@example.org"):
        (stored,) = pop3_retrieve_all(stack.settings, user)
        assert_delivered_exactly(stored, data, queue_id)


# Addresses near RFC 5321's 254-octet limit, so that a few hundred of them fill more than one
# envelope header (common.topology.ENVELOPE_HEADER_BUDGET) and the message must be split.
LONG_DOMAIN = ".".join(["a" * 60, "b" * 60, "c" * 60, "example.org"])
STAFF = [f"staff{i:03d}-{'x' * 40}@{LONG_DOMAIN}" for i in range(700)]


def inbox_count(settings: Settings, user: str) -> int:
    """Messages in the user's INBOX, read from the index as another process may (read-only,
    so the test never creates or locks what the store is writing); 0 before the first."""
    index = user_path(settings.store_dir / "mail", user) / "index.sqlite"
    if not index.exists():
        return 0
    with closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            row = conn.execute("SELECT messages FROM mailbox WHERE name = 'INBOX'").fetchone()
        except sqlite3.OperationalError:  # the store is creating the index
            return 0
    return 0 if row is None else int(row[0])


def stored_counts(settings: Settings, users: list[str]) -> list[int]:
    return [inbox_count(settings, user) for user in users]


def test_an_alias_too_large_for_one_envelope_reaches_every_mailbox_once(
        stack: Stack, redis_client: redis.Redis) -> None:
    """Its mailboxes do not fit in one AMQP header frame: the filter publishes the message
    as several, each for some of them, and answers 250 once all are confirmed."""
    tiermail(stack.settings, "domain", "add", LONG_DOMAIN)
    with AccountDB.for_store(stack.settings.store_dir) as accounts:
        accounts.add_users_bulk((user, hash_password(PASSWORD)) for user in STAFF[:1])
        accounts.add_users_bulk((user, accounts.password_hash(STAFF[0]) or "")
                                for user in STAFF[1:])
        for user in STAFF:
            accounts.add_alias(f"all@{LONG_DOMAIN}", user)
    stack.start_store()
    # Added behind Redis's back (no CLI mirroring): the store publishes them a moment after
    # it listens; until then the filter knows no such user.
    wait_until(lambda: redis_client.sismember(stack.settings.redis_prefix + "dir:users",
                                              STAFF[-1]), what="the store to publish the staff")
    filter_process = stack.start_filter()
    data = message("to everyone")
    queue_id = send(stack.settings, "sender@example.net", [f"all@{LONG_DOMAIN}",
                                                           "alice@example.org"], data)
    wait_until(lambda: sum(stored_counts(stack.settings, [*STAFF, "alice@example.org"]))
               >= len(STAFF) + 1, timeout=120, what="a copy in every mailbox")
    wait_until(lambda: queue_depth(stack.settings) == 0, what="the queue to drain")
    assert set(stored_counts(stack.settings, [*STAFF, "alice@example.org"])) == {1}
    assert "published as 3 messages" in filter_process.output()
    for user in (STAFF[0], "alice@example.org"):
        (stored,) = pop3_retrieve_all(stack.settings, user)
        assert_delivered_exactly(stored, data, queue_id)


def test_queue_id_is_logged_by_every_tier(stack: Stack) -> None:
    store = stack.start_store()
    smtp = stack.start_filter()
    queue_id = send(stack.settings, "sender@example.net", ["bob@example.org"], message("log"))
    wait_until(lambda: pop3_count(stack.settings, "bob@example.org") == 1, what="delivery")
    wait_until(lambda: queue_id in store.output(), what="the queue id in the store's log")
    assert queue_id in smtp.output()


def test_mail_is_accepted_while_the_store_is_down_and_delivered_once(stack: Stack) -> None:
    stack.start_filter()
    total, senders = 1000, 4

    def send_batch(worker: int) -> set[bytes]:
        ids = set()
        with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=60) as smtp:
            for n in range(total // senders):
                data = message(f"batch {worker}/{n}")
                ids.add(re.search(rb"Message-ID: (<[^>]+>)", data).group(1))  # type: ignore[union-attr]
                smtp.sendmail("sender@example.net", ["alice@example.org"], data)
        return ids

    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        sent_ids = set().union(*pool.map(send_batch, range(senders)))
    assert len(sent_ids) == total
    assert queue_depth(stack.settings) == total

    stack.start_store()
    wait_until(lambda: queue_depth(stack.settings) == 0, timeout=120, what="queue drained")
    # The store writes the last messages it took (up to its prefetch) after the queue is
    # empty; a shortfall that lasts is a loss, and fails the count below.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: pop3_count(stack.settings, "alice@example.org") >= total,
                   timeout=60, interval=0.5, what="every message in the mailbox")
    with closing(poplib.POP3("127.0.0.1", stack.settings.pop3_port, timeout=60)) as pop:
        pop.user("alice@example.org")
        pop.pass_(PASSWORD)
        count = pop.stat()[0]
        stored_ids = []
        for i in range(1, count + 1):
            headers = b"\r\n".join(pop.top(i, 0)[1])
            stored_ids.append(re.search(rb"Message-ID: (<[^>]+>)", headers).group(1))  # type: ignore[union-attr]
        pop.quit()
    assert count == total
    assert len(set(stored_ids)) == total, "a message was delivered twice"
    assert set(stored_ids) == sent_ids


def test_two_filter_workers_both_deliver(stack: Stack) -> None:
    stack.start_store()
    first = stack.settings
    second = first.replace(smtp_port=free_port())
    stack.start_filter(first)
    stack.start_filter(second)
    ids = {send(s, "sender@example.net", ["bob@example.org"], message(f"via {s.smtp_port}"))
           for s in (first, second)}
    wait_until(lambda: pop3_count(first, "bob@example.org") == 2, what="both messages")
    stored = b"".join(pop3_retrieve_all(first, "bob@example.org"))
    assert all(queue_id.encode() in stored for queue_id in ids)


def test_two_filter_workers_share_one_port(stack: Stack) -> None:
    stack.start_store()
    workers = [stack.start_filter(), stack.start_filter()]
    for n in range(20):
        send(stack.settings, "sender@example.net", ["bob@example.org"], message(f"shared {n}"))
    wait_until(lambda: pop3_count(stack.settings, "bob@example.org") == 20, what="20 messages")
    assert all(w.alive for w in workers)


@pytest.mark.parametrize("their_bind", ["127.0.0.1", "localhost"])
def test_a_filter_of_another_stack_cannot_join_the_port(stack: Stack, their_bind: str) -> None:
    """SO_REUSEPORT let a filter with other queues or another directory join the port:
    the kernel gave it half of the connections (451 for every recipient, or mail into the
    other stack's queues). It is refused at start (exit 3); the port's filter goes on.
    Also when it names the address otherwise (`localhost`): the check went by the
    TIERMAIL_BIND text, and 6 of 10 messages went into the other stack's mailbox."""
    assert stack.settings.bind == "127.0.0.1"
    stack.start_store()
    ours = stack.start_filter()
    other_stack = stack.settings.replace(redis_prefix="another-stack:", bind=their_bind)
    other = stack.start(other_stack, "filter")
    assert other.proc.wait(timeout=60) == 3, other.output()
    assert (f"filters of another stack serve port {stack.settings.smtp_port} (broker "
            f"127.0.0.1:5672 vhost {stack.settings.amqp_url.rsplit('/', 1)[1]}"
            ) in other.output()
    send(stack.settings, "sender@example.net", ["bob@example.org"], message("still ours"))
    wait_until(lambda: pop3_count(stack.settings, "bob@example.org") == 1, what="the message")
    assert ours.alive


def test_broker_unreachable_means_451_never_250(stack: Stack) -> None:
    stack.start_store()  # declares the queue, so its depth can be read
    broken = stack.settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    stack.start_filter(broken)
    with smtplib.SMTP("127.0.0.1", broken.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        code, reply = smtp.mail("sender@example.net")  # known before the upload
    assert code == 451 and reply.startswith(b"4.3.0"), reply
    assert queue_depth(stack.settings) == 0


def test_refusals_through_the_real_process(stack: Stack) -> None:
    stack.start_filter()
    with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("sender@example.net")
        code, reply = smtp.rcpt("nobody@example.org")
        assert (code, reply[:5]) == (550, b"5.1.1"), reply
        code, reply = smtp.rcpt("victim@elsewhere.example")
        assert (code, reply[:5]) == (554, b"5.7.1"), reply
        smtp.rset()
        code, reply = smtp.mail("sender@example.net",
                                [f"SIZE={stack.settings.max_message_size + 1}"])
        assert (code, reply[:5]) == (552, b"5.3.4"), reply
    assert queue_depth(stack.settings) == 0


def test_two_stacks_side_by_side_do_not_see_each_other(
        stack: Stack, run_tier: Callable[..., TierProcess]) -> None:
    vhost = f"tiermail-test-other-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    s = stack.settings
    other_prefix = f"other{uuid.uuid4().hex[:8]}:"
    second: Stack | None = None
    try:
        other = s.replace(
            smtp_port=free_port(), pop3_port=free_port(), pop3s_port=free_port(),
            submission_port=free_port(), imap_port=free_port(), imaps_port=free_port(),
            amqp_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            redis_url=s.redis_url.rsplit("/", 1)[0] + "/10",
            data_dir=s.data_dir.parent / "other-var", queue_prefix="tiermail",
            redis_prefix=other_prefix)
        provision(other)
        second = Stack(other, run_tier)
        for each in (stack, second):
            each.start_store()
            each.start_filter()
        first_id = send(s, "sender@example.net", ["alice@example.org"], message("first"))
        second_id = send(other, "sender@example.net", ["alice@example.org"], message("second"))
        for each in (s, other):
            wait_until(lambda each=each: pop3_count(each, "alice@example.org") == 1,
                       what="one message per stack")
        (in_first,) = pop3_retrieve_all(s, "alice@example.org")
        (in_second,) = pop3_retrieve_all(other, "alice@example.org")
        assert first_id.encode() in in_first and second_id.encode() in in_second
    finally:
        for process in (second.store, second.filter) if second else ():
            if process is not None:
                process.stop()
        client = redis.Redis.from_url(s.redis_url.rsplit("/", 1)[0] + "/10")
        keys = list(client.scan_iter(match=other_prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()
        rabbitmqctl("delete_vhost", vhost)


def test_directory_lost_from_redis_means_451_until_the_store_republishes(
        stack: Stack, redis_client: redis.Redis) -> None:
    """Redis restarted empty: recipients must be deferred, never refused, and the store must
    put the directory back on its own."""
    stack.start_store()
    stack.start_filter()
    keys = list(redis_client.scan_iter(match=stack.settings.redis_prefix + "dir:*"))
    assert keys
    redis_client.delete(*keys)

    def rcpt_reply() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=30) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("sender@example.net")
            return smtp.rcpt("alice@example.org")

    code, reply = rcpt_reply()
    if code != 250:  # the store may already have noticed; if not, the filter must defer
        assert (code, reply[:5]) == (451, b"4.3.0"), reply
    wait_until(lambda: rcpt_reply()[0] == 250, timeout=30, interval=0.5,
               what="the store to republish the directory")


def message_of_exact_size(size: int) -> bytes:
    """A valid message of exactly `size` octets as sent (base64 lines, never dot-stuffed)."""
    head = message("exact size", body=b"", headers=b"Content-Transfer-Encoding: base64\r\n")
    line = base64.b64encode(os.urandom(57)) + b"\r\n"  # 78 octets
    data = head + line * ((size - len(head)) // len(line) - 1)
    padding = size - len(data)  # 78 to 155 octets: one last line of filler
    data += b"A" * (padding - 2) + b"\r\n"
    assert len(data) == size
    return data


def test_a_message_at_exactly_the_maximum_size_travels_and_one_octet_more_is_refused(
        stack: Stack) -> None:
    stack.start_store()
    stack.start_filter()
    limit = stack.settings.max_message_size
    assert limit == 25 * 1024 * 1024  # the default, as an operator gets it
    at_limit = message_of_exact_size(limit)
    queue_id = send(stack.settings, "sender@example.net", ["bob@example.org"], at_limit)
    with smtplib.SMTP("127.0.0.1", stack.settings.smtp_port, timeout=120) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("sender@example.net")
        smtp.rcpt("bob@example.org")
        code, reply = smtp.data(message_of_exact_size(limit + 1))
        assert (code, reply[:5]) == (552, b"5.3.4"), reply
        smtp.rset()
        assert smtp.noop()[0] == 250  # the session survived the refusal
    wait_until(lambda: pop3_count(stack.settings, "bob@example.org") == 1, timeout=120,
               what="the 25 MiB message in bob's mailbox")
    (stored,) = pop3_retrieve_all(stack.settings, "bob@example.org")
    assert_delivered_exactly(stored, at_limit, queue_id)


def test_the_store_republishes_a_change_that_was_not_mirrored(
        stack: Stack, redis_client: redis.Redis) -> None:
    """The account database is the authority: a change that never reached Redis (the CLI's
    mirroring failed) reaches it anyway, from the store."""
    from common.passwords import hash_password
    from services.store.backends.accounts import AccountDB

    stack.start_store()
    users_key = stack.settings.redis_prefix + "dir:users"
    wait_until(lambda: redis_client.sismember(users_key, "alice@example.org"), what="publish")
    accounts = AccountDB.for_store(stack.settings.store_dir)
    accounts.add_user("carol@example.org", hash_password(PASSWORD))  # behind Redis's back
    accounts.close()
    wait_until(lambda: redis_client.sismember(users_key, "carol@example.org"), timeout=30,
               what="the store to notice the change and republish")
