"""SEARCH TEXT/BODY/SUBJECT answered by the full-text index (FTS5 trigrams) and by reading the
messages must agree, for random needles cut from the messages' own decoded text (HTML, file
names of attachments and attached messages' headers included): parts of
words, one and two characters (too short for trigrams), mixed case, spaces, non-ASCII, and
the characters FTS5 queries give meaning to (" * ( ) - :). Two servers on one mailbox, one
with the index filled and one without; and both must find what a plain substring test on
the decoded text finds (RFC 3501 6.4.4: case-insensitive substring).
"""

from __future__ import annotations

import asyncio
import random
from email.message import EmailMessage

from common.settings import Settings
from services.store.backends.maildb import MailDB
from services.store.backends.textindex import (
    MessageText,
    TextIndex,
    TextIndexer,
    fold,
    message_text,
)
from services.store.imap.server import ImapDeps, start_imap_servers
from services.store.mailbox import INBOX
from tests.integration.imap.clients import Raw, Server, in_thread
from tests.integration.imap.conftest import ALICE, USERS, Deliver, StartImap
from tests.support import free_port

# With letters whose case Python and SQLite fold differently: a capital sigma that ends a
# word (str.lower() makes it ς, the index σ), ς itself, the micro sign and long s.
WORDS = ["vortex", "Kumquat", "naïve", "Grüße", "straße", "ÉCOLE", "日本語", "zq7", "a-b",
         '"quoted"', "star*", "(paren)", "key:value", "AND", "NEAR", "o'neil", "x",
         "ΟΔΟΣ", "ΟΔΟΣΜΟΥ", "δρόμος", "5µm", "Maſs"]


def random_message(rng: random.Random, n: int) -> bytes:
    def phrase(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    message = EmailMessage()
    message["From"] = f"{rng.choice(['Zoë', 'Bob', 'Ann'])} <sender{n}@example.org>"
    message["To"] = ALICE
    message["Subject"] = f"{phrase(3)} {n}"
    message["Date"] = "Tue, 03 Feb 2026 10:00:00 +0000"
    text = "\n".join(phrase(rng.randint(2, 8)) for _ in range(rng.randint(1, 6))) + "\n"
    cte = rng.choice(["8bit", "quoted-printable", "base64"])
    message.set_content(text, cte=cte)
    if rng.random() < 0.3:
        message.add_alternative(f"<p>{phrase(2)}<b>{phrase(1)}</b>{phrase(2)}</p>",
                                subtype="html")
    if rng.random() < 0.3:  # a file name (RFC 2231 encoded when not ASCII) is searchable
        message.add_attachment(b"%PDF-1.4 " + phrase(2).encode(), maintype="application",
                               subtype="pdf", filename=f"{phrase(2)}.pdf")
    if rng.random() < 0.2:  # so is an attached message's header
        forwarded = EmailMessage()
        forwarded["From"] = f"{rng.choice(WORDS)} <orig{n}@example.net>"
        forwarded["Subject"] = phrase(3)
        forwarded.set_content(phrase(5) + "\n")
        message.add_attachment(forwarded)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def needles(rng: random.Random, texts: list[str], count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        text = rng.choice(texts)
        if not text.strip():
            continue
        size = rng.choice([1, 2, 3, 4, 6, 9])
        start = rng.randint(0, max(0, len(text) - size))
        needle = text[start:start + size]
        if not needle.strip() or "\r" in needle or "\n" in needle:
            continue
        if rng.random() < 0.3:
            needle = needle.swapcase()
        found.append(needle)
    return found


def search(raw: Raw, key: str, needle: str) -> list[int]:
    data = needle.encode()
    reply = raw.literal_command(f"UID SEARCH CHARSET UTF-8 {key}".encode(), data, plus=True)
    assert reply.status == "OK", (key, needle, reply)
    [line] = reply.lines(b"SEARCH")
    return sorted(int(word) for word in line.split()[2:])


async def test_the_text_index_and_reading_the_messages_agree(
        start_imap: StartImap, settings: Settings, maildb: MailDB, deliver: Deliver) -> None:
    rng = random.Random(7)
    raws = [random_message(rng, n) for n in range(60)]
    for raw in raws:
        await deliver(ALICE, raw)
    infos = await maildb.list_messages(ALICE, INBOX)
    texts = {info.uid: message_text(raw) for info, raw in zip(infos, raws, strict=True)}

    plain = await start_imap()  # no text index: SEARCH reads the messages
    index = TextIndex(maildb.root)
    indexer = TextIndexer(maildb, index)
    indexing = asyncio.create_task(indexer.run())
    try:
        indexer.request(ALICE)
        await indexer.wait_idle()
        assert len(index.indexed(ALICE)) == len(raws)
        deps = ImapDeps(store=maildb, accounts=plain.accounts, throttle=plain.deps.throttle,
                        text_index=index, indexer=indexer)
        indexed = settings.replace(imap_port=free_port(), imaps_port=free_port())
        servers = await start_imap_servers(indexed, deps)
        try:
            def dialog() -> list[tuple[str, str, list[int], list[int], list[int]]]:
                disagreements = []
                with_index = Server(indexed.imap_port, indexed.imaps_port, dict(USERS))
                sessions = [Server.of(plain).raw(ALICE), with_index.raw(ALICE)]
                for session in sessions:
                    session.ok("SELECT INBOX")
                corpus = [t.body for t in texts.values()] + [t.header for t in texts.values()]
                for needle in needles(rng, corpus, 80):
                    key = rng.choice(["TEXT", "BODY", "SUBJECT"])
                    answers = [search(session, key, needle) for session in sessions]
                    expected = sorted(uid for uid, text in texts.items()
                                      if reference(text, key, needle))
                    if answers[0] != answers[1] or answers[0] != expected:
                        disagreements.append((key, needle, *answers, expected))
                for session in sessions:
                    session.close()
                return disagreements

            assert await in_thread(dialog) == []
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()
    finally:
        indexing.cancel()
        index.close()


def reference(text: MessageText, key: str, needle: str) -> bool:
    """Case-insensitive substring of the decoded text; SUBJECT looks at the Subject field's
    decoded value only."""
    header, body = text.header, text.body
    wanted = fold(needle)
    if key == "BODY":
        return wanted in fold(body)
    if key == "TEXT":
        return wanted in fold(header) or wanted in fold(body)
    subject = next((line[len("subject:"):].lstrip() for line in header.split("\n")
                    if line.lower().startswith("subject:")), "")
    return wanted in fold(subject)
