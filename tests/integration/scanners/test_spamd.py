"""The `spamd` fixture: a real SpamAssassin spamd spoken to with the spamc protocol."""

from __future__ import annotations

import time

from services.devscanners.runner import connect
from tests.support import GTUBE


def check(address: str, body: str) -> str:
    raw = (f"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: lunch\r\n"
           f"Message-ID: <lunch-2@example.org>\r\n\r\n{body}\r\n").encode()
    with connect(address, timeout=30) as sock:
        sock.sendall(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(raw) + raw)
        reply = b""
        while part := sock.recv(4096):
            reply += part
    return reply.decode()


def test_gtube_is_spam_above_the_reject_score(spamd: str) -> None:
    reply = check(spamd, GTUBE)
    assert reply.startswith("SPAMD/1.")
    spam_line = next(line for line in reply.splitlines() if line.startswith("Spam:"))
    assert spam_line.startswith("Spam: True")
    score = float(spam_line.split(";")[1].split("/")[0])
    assert score >= 15.0  # TIERMAIL_SPAMASSASSIN_REJECT_SCORE's default


def test_ham_is_not_spam(spamd: str) -> None:
    started = time.perf_counter()
    reply = check(spamd, "Hi Bob, lunch tomorrow at noon? Alice")
    print(f"spamd CHECK of a ham message: {(time.perf_counter() - started) * 1000:.1f} ms")
    assert "Spam: False" in reply
