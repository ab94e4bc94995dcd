"""Scanning verdicts end to end: real `tiermail filter` and `tiermail store` processes, the real
rspamd and clamd, RabbitMQ and Redis; the result is read where a user would find it, in the
mailbox folders (INBOX over POP3, Junk from the store's index: IMAP comes later)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import smtplib
import sqlite3
from collections.abc import Callable, Iterator

from common.settings import Settings
from services.store.backends.maildb import user_path
from tests.e2e.test_inbound_spine import pop3_retrieve_all, provision, send
from tests.integration.scanning.conftest import (
    add_header_band,
    eicar_attachment,
    gtube,
    ham,
    take_all,
)
from tests.support import TcpProxy, TierProcess, queue_depth, run_cli, wait_until

USER = "alice@example.org"
MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def folder(settings: Settings, name: str) -> list[bytes]:
    """The stored messages of one of USER's folders, read from the store's index (inline
    bodies) and files."""
    base = user_path(settings.store_dir / "mail", USER)
    index = base / "index.sqlite"
    if not index.exists():
        return []
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT m.guid, body.data FROM message m JOIN mailbox b ON b.id = m.mailbox_id"
            " LEFT JOIN body ON body.guid = m.guid WHERE b.name = ? ORDER BY m.uid",
            (name,)).fetchall()
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith("no such table"):
            raise
        return []  # the store is creating the index: its file is there, its tables not yet
    finally:
        conn.close()
    return [data if data is not None else (base / "m" / guid[:2] / guid).read_bytes()
            for guid, data in rows]


def message_ids(messages: list[bytes]) -> list[bytes]:
    ids = []
    for raw in messages:
        found = MESSAGE_ID.search(raw.split(b"\r\n\r\n", 1)[0])
        assert found, raw[:300]
        ids.append(found.group(1))
    return ids


def header(raw: bytes, name: str) -> str | None:
    for line in raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.lower() == name.lower():
            return value.strip()
    return None


def refused(settings: Settings, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("sender@example.net")
        smtp.rcpt(USER)
        return smtp.data(data)


def scanning(settings: Settings, rspamd: str, clamd: str, policy: str = "tempfail") -> Settings:
    return settings.replace(spam="rspamd", rspamd_url=rspamd, virus="clamd",
                            clamd_address=clamd, scan_failure=policy)


@contextlib.contextmanager
def scanners_away(settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str,
                  clamd: str) -> Iterator[tuple[Settings, Callable[[], None]]]:
    """A store and a filter under `defer` whose rspamd and clamd (reached through proxies)
    do not answer; the function given with the settings brings them back."""
    rspamd_proxy = TcpProxy(int(rspamd.rsplit(":", 1)[1]))
    clamd_proxy = TcpProxy(int(clamd.rsplit(":", 1)[1]))
    try:
        s = scanning(settings, f"http://127.0.0.1:{rspamd_proxy.port}",
                     f"127.0.0.1:{clamd_proxy.port}", policy="defer")
        provision(s)
        run_tier(s, "store").wait_for_port(s.pop3_port)
        rspamd_proxy.cut()
        clamd_proxy.cut()
        run_tier(s, "filter").wait_for_port(s.smtp_port)

        def back() -> None:
            rspamd_proxy.start()
            clamd_proxy.start()

        yield s, back
    finally:
        rspamd_proxy.cut()
        clamd_proxy.cut()


def test_verdicts_land_in_the_right_folder_or_are_refused(
        settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str,
        clamd: str) -> None:
    s = scanning(settings, rspamd, clamd)
    provision(s)
    run_tier(s, "store").wait_for_port(s.pop3_port)
    run_tier(s, "filter").wait_for_port(s.smtp_port)

    send(s, "sender@example.net", [USER], ham("e2e ham"))
    send(s, "sender@example.net", [USER], add_header_band("e2e suspicious"))
    code, reply = refused(s, gtube("e2e gtube"))
    assert (code, reply[:5]) == (550, b"5.7.1"), reply
    code, reply = refused(s, eicar_attachment("e2e eicar"))
    assert (code, reply[:5]) == (554, b"5.7.1") and b"UNOFFICIAL" in reply, reply

    wait_until(lambda: len(folder(s, "INBOX")) == 1 and len(folder(s, "Junk")) == 1,
               what="ham in INBOX and the add-header message in Junk")
    (inbox,) = pop3_retrieve_all(s, USER)
    assert message_ids([inbox]) == [b"<e2e.ham@remote.test>"]
    assert (header(inbox, "X-Spam-Status") or "").startswith("No")
    (junk,) = folder(s, "Junk")
    assert message_ids([junk]) == [b"<e2e.suspicious@remote.test>"]
    assert header(junk, "X-Spam") == "Yes" and header(junk, "X-Spam-Score")
    assert queue_depth(s) == 0
    assert queue_depth(s, s.topology.quarantine_queue) == 0


def test_deferred_mail_stays_out_of_mailboxes_until_scanned_then_lands_once(
        settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str,
        clamd: str) -> None:
    """Both scanners go away (their ports close) while mail arrives under `defer`; when they
    come back, the same running filter notices by itself and drains the scan-pending queue."""
    with scanners_away(settings, run_tier, rspamd, clamd) as (s, scanners_back):
        kinds = {"ham": (ham, 40), "gtube": (gtube, 30), "eicar": (eicar_attachment, 30)}
        sent: dict[str, set[bytes]] = {}
        for kind, (make, count) in kinds.items():
            sent[kind] = set()
            for n in range(count):
                data = make(f"deferred {kind} {n}")
                send(s, "sender@example.net", [USER], data)
                sent[kind] |= set(message_ids([data]))
        assert queue_depth(s, s.topology.scan_queue) == 100
        assert queue_depth(s) == 0
        assert folder(s, "INBOX") == [] and folder(s, "Junk") == []

        scanners_back()
        # The scan queue's depth counts no message the drainer holds: the quarantine's own
        # count says when the last eicar is through (nothing consumes the quarantine).
        wait_until(lambda: queue_depth(s, s.topology.scan_queue) == 0
                   and queue_depth(s) == 0 and len(folder(s, "INBOX")) == 40
                   and len(folder(s, "Junk")) == 30
                   and queue_depth(s, s.topology.quarantine_queue) >= 30, timeout=120,
                   what="every deferred message scanned and delivered or quarantined")

    inbox_ids = message_ids(folder(s, "INBOX"))
    junk_ids = message_ids(folder(s, "Junk"))
    quarantined = asyncio.run(take_all(s, s.topology.quarantine_queue))
    quarantine_ids = message_ids([q.body for q in quarantined])
    assert sorted(inbox_ids) == sorted(sent["ham"]) and len(set(inbox_ids)) == 40
    assert sorted(junk_ids) == sorted(sent["gtube"]) and len(set(junk_ids)) == 30
    assert sorted(quarantine_ids) == sorted(sent["eicar"]) and len(set(quarantine_ids)) == 30


def test_an_operator_releases_a_quarantined_false_positive_into_the_mailbox(
        settings: Settings, run_tier: Callable[..., TierProcess], rspamd: str,
        clamd: str) -> None:
    """Mail accepted while the scanners were away and found infected afterwards waits in
    the quarantine; `tiermail quarantine list` says what was found, and `release` (the
    operator judged it harmless) delivers it, its virus header on top, exactly once."""
    with scanners_away(settings, run_tier, rspamd, clamd) as (s, scanners_back):
        send(s, "sender@example.net", [USER], eicar_attachment("e2e false positive"))
        scanners_back()
        wait_until(lambda: queue_depth(s, s.topology.quarantine_queue) == 1, timeout=120,
                   what="the deferred scan to quarantine the message")

    listing = run_cli(s, "quarantine", "list", "--json")
    (held,) = json.loads(listing.stdout)["messages"]
    assert held["reason"].startswith("virus ") and held["reason"].endswith(".UNOFFICIAL")
    assert held["recipients"] == [USER] and folder(s, "INBOX") == []
    released = run_cli(s, "quarantine", "release", held["queue_id"])
    assert released.returncode == 0, released.stderr
    wait_until(lambda: len(folder(s, "INBOX")) == 1, what="the released message delivered")
    (delivered,) = folder(s, "INBOX")
    assert message_ids([delivered]) == [b"<e2e.false.positive@remote.test>"]
    assert (header(delivered, "X-Tiermail-Virus") or "").endswith(".UNOFFICIAL")
    assert queue_depth(s, s.topology.quarantine_queue) == 0
