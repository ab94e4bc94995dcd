#!/usr/bin/env python3
"""IMAP answers side by side with Dovecot's: a compatibility check, not a benchmark.

The same mailbox (the IMAP benchmark's corpus plus a set of malformed messages) goes into a
loopback Dovecot and into tiermail, exactly as bench/imap_bench.py sets them up; then both are
asked the same questions and every difference is counted and shown:

  * ENVELOPE and BODYSTRUCTURE of every message (letter case ignored: MIME names are
    case-insensitive and the two servers write them differently);
  * BODY.PEEK[section] for 17 section forms (parts, MIME, nested parts, HEADER, HEADER.FIELDS
    (.NOT), TEXT, partials);
  * SORT by every key and THREAD by both algorithms.

Differences the RFCs leave open are expected; docs/architecture.md ("Store: IMAP") lists the
ones known and why tiermail answers as it does. Anything new is worth a look.

    .venv/bin/python bench/imap_compare.py                 # 400 corpus messages + malformed
    .venv/bin/python bench/imap_compare.py --messages 2000

Needs root (Dovecot runs its own master) and Debian's dovecot-imapd (`make install`).
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import imap_bench as ib
from benchlib import TiermailStack, log, temp_root
from imapclient.response_parser import parse_fetch_response

SECTIONS = ["1", "1.MIME", "2", "2.MIME", "1.1", "1.2", "2.1", "2.1.MIME", "2.HEADER", "2.TEXT",
            "TEXT", "HEADER", "HEADER.FIELDS (Subject From)",
            "HEADER.FIELDS.NOT (Subject Received)", "1.HEADER.FIELDS (Content-Type)",
            "1<3.20>", "TEXT<0.15>"]
ORDERINGS = ["SORT (SUBJECT) UTF-8 ALL", "SORT (FROM) UTF-8 ALL", "SORT (DATE) UTF-8 ALL",
             "SORT (ARRIVAL) UTF-8 ALL", "SORT (SIZE) UTF-8 ALL", "SORT (REVERSE DATE) UTF-8 ALL",
             "SORT (CC) UTF-8 ALL", "SORT (TO) UTF-8 ALL", "SORT (SUBJECT REVERSE SIZE) UTF-8 ALL",
             "THREAD ORDEREDSUBJECT UTF-8 ALL", "THREAD REFERENCES UTF-8 ALL"]

_HEAD = ("From: Ann <ann@example.org>\r\nTo: bob@example.org\r\nSubject: s\r\n"
         "Date: Tue, 03 Feb 2026 10:00:00 +0000\r\n")
_MIME = "MIME-Version: 1.0\r\n"


def malformed_messages() -> list[bytes]:
    """Hand-made edge cases: MIME that is broken, unusual or deep, odd addresses and dates."""
    inner = ("From: Inner <in@example.org>\r\nSubject: =?utf-8?q?inn=C3=A9r?=\r\n" + _MIME
             + 'Content-Type: multipart/alternative; boundary="in"\r\n\r\n--in\r\n'
             "Content-Type: text/plain; charset=utf-8\r\n\r\nplain\r\n--in\r\n"
             "Content-Type: text/html\r\n\r\n<p>h</p>\r\n--in--\r\n")
    nested = "Content-Type: text/plain\r\n\r\nleaf\r\n"
    for depth in range(6):
        nested = (f'Content-Type: multipart/mixed; boundary="n{depth}"\r\n\r\n--n{depth}\r\n'
                  f"{nested}--n{depth}--\r\n")
    texts = [
        _HEAD + "\r\nno content type\r\n",
        _HEAD + _MIME + "Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain"
        "\r\n\r\nno boundary parameter\r\n--x--\r\n",
        _HEAD + _MIME + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\npreamble\r\n--b\r\n'
        "Content-Type: text/plain\r\n\r\none\r\n--b\r\nContent-Type: text/html\r\n\r\n"
        "<b>never closed</b>\r\n",
        _HEAD + _MIME + 'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
        "Content-Type: text/plain\r\n\r\nforwarded\r\n--o\r\nContent-Type: message/rfc822\r\n"
        "\r\n" + inner + "\r\n--o--\r\n",
        _HEAD + _MIME + 'Content-Type: multipart/mixed; boundary="z"\r\n\r\n--z\r\n'
        'Content-Type: application/pdf; name*0="long"; name*1="name.pdf"\r\n'
        "Content-Disposition: attachment; filename*=utf-8''%C3%A9t%C3%A9.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--z--\r\n",
        _HEAD + _MIME + 'Content-Type: Text/PLAIN (comment) ; CharSet="ISO-8859-1"\r\n'
        "Content-Transfer-Encoding: Quoted-Printable\r\n\r\ncaf=E9\r\n",
        _HEAD + _MIME + "Content-Type: text\r\n\r\nno subtype\r\n",
        _HEAD + "\r\n",
        _HEAD.rstrip("\r\n") + "\r\n",  # a header and no blank line
        "From: Zoë <zoe@example.org>\r\nSubject: Grüße aus Köln\r\n\r\nraw UTF-8 header\r\n",
        "From: ann@example.org\r\nTo: undisclosed-recipients:;\r\nCc: Friends: a@example.org, "
        '"B B" <b@example.org>;, c@example.org\r\nSubject: groups\r\n\r\nx\r\n',
        'From: "Doe, John" <"john.doe"@example.org> (work)\r\nTo: (nobody) bob\r\n'
        "Reply-To: <@route.example:alice@example.org>\r\nSubject: addresses\r\n\r\nx\r\n",
        "From: a@example.org\r\nSubject: impossible date\r\nDate: 31 Feb 26 25:61 XYZ\r\n\r\nx\r\n",
        "From: =?utf-8?b?w4lsb2TDrWU=?= <e@example.org>\r\nSubject: =?utf-8?q?one?=\r\n"
        " =?utf-8?q?_two?= three\r\n\r\nx\r\n",
        _HEAD + _MIME + 'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
        "From: x@example.org\r\nSubject: d1\r\n\r\nfirst\r\n--d\r\n\r\nFrom: y@example.org\r\n"
        "Subject: d2\r\n\r\nsecond\r\n--d--\r\n",
        _HEAD + _MIME + "Content-Type: message/rfc822\r\n\r\nFrom: w@example.org\r\n"
        "Subject: wrapped\r\n\r\nwrapped body\r\n",
        _HEAD + _MIME + nested,
        _HEAD + _MIME + 'Content-Type: multipart/mixed; boundary="q"\r\n\r\n--q\r\n\r\n'
        "a part without headers\r\n--q--\r\n",
    ]
    return [text.encode() for text in texts]


class Mailbox:
    """What both servers get: the benchmark corpus's first N messages after the malformed
    ones, in the shape populate_maildir and populate_maildb take (an ib.Corpus stand-in)."""

    seed = 0

    def __init__(self, corpus_messages: int) -> None:
        corpus = ib.Corpus(corpus_messages, 4) if corpus_messages else None
        self.items = malformed_messages() + (
            [message for _, message in corpus.messages()] if corpus else [])
        self.count = len(self.items)

    @staticmethod
    def internaldate(index: int) -> float:
        return ib.Corpus.internaldate(index)

    def messages(self) -> Iterator[tuple[int, bytes]]:
        return enumerate(self.items)


def ask(port: int) -> dict[str, Any]:
    """Every question, answered by the server on `port`."""
    imap, _ = ib.login_select(port)
    try:
        answers: dict[str, Any] = {"STRUCTURE": fetch(imap, "(ENVELOPE BODYSTRUCTURE)")}
        for section in SECTIONS:
            name, _, partial = section.partition("<")
            item = f"BODY.PEEK[{name}]" + (f"<{partial}" if partial else "")
            answers[section] = fetch(imap, f"({item})")
        for command in ORDERINGS:  # the untagged answer (the tags differ between runs)
            answers[command] = [line for line in ib.command(imap, command).lines
                                if line.startswith(b"* ")]
        return answers
    finally:
        ib.logout(imap)


def fetch(imap: imaplib.IMAP4, items: str) -> dict[int, list[Any]]:
    typ, data = imap.uid("FETCH", "1:*", items)
    if typ != "OK":
        return {0: [typ, data]}
    return {uid: [value for key, value in sorted(fields.items()) if key != b"SEQ"]
            for uid, fields in parse_fetch_response(data).items()}


def folded(value: Any) -> Any:
    """Letter case left out of the comparison, everywhere (names are case-insensitive)."""
    if isinstance(value, bytes):
        return value.lower()
    if isinstance(value, tuple | list):
        return tuple(folded(item) for item in value)
    return value


def compare(name: str, dovecot: Any, tiermail: Any, fold: Callable[[Any], Any]) -> int:
    if isinstance(dovecot, dict):
        differing = [uid for uid in sorted(set(dovecot) | set(tiermail))
                     if fold(dovecot.get(uid)) != fold(tiermail.get(uid))]
        print(f"{name}: {len(differing)} of {len(dovecot)} messages differ"
              + (f" (UIDs {differing[:12]})" if differing else ""))
        for uid in differing[:2]:
            print(f"    UID {uid}\n      dovecot  {str(dovecot.get(uid))[:300]}"
                  f"\n      tiermail {str(tiermail.get(uid))[:300]}")
        return len(differing)
    same = dovecot == tiermail
    print(f"{name}: {'same' if same else 'DIFFERENT'}")
    if not same:
        print(f"      dovecot  {str(dovecot)[:300]}\n      tiermail {str(tiermail)[:300]}")
    return 0 if same else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400,
                        help="benchmark corpus messages after the malformed ones")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    mailbox = Mailbox(args.messages)
    with temp_root("tiermail-imap-compare-", args.keep) as root:
        dovecot = ib.DovecotStack(root / "dovecot", [])
        dovecot.configure()
        ib.populate_maildir(dovecot.maildir, mailbox)
        dovecot.start()
        try:
            log(f"dovecot: asking about {mailbox.count} messages")
            theirs = ask(dovecot.port)
        finally:
            dovecot.stop()
        tiermail = TiermailStack(root / "tiermail", args.redis_db)
        try:
            tiermail.setup()
            from common.settings import Settings

            inline_max = Settings.from_env(tiermail.env).store_inline_max
            asyncio.run(ib.populate_maildb(tiermail.data_dir / "store", mailbox,
                                           inline_max))
            tiermail.start_store()
            ib.wait_for(lambda: ib.port_open(tiermail.imap_port), 60, "tiermail IMAP")
            log(f"tiermail: asking about {mailbox.count} messages")
            ours = ask(tiermail.imap_port)
        finally:
            tiermail.close()
    print(f"\n{mailbox.count} messages ({len(malformed_messages())} malformed, UIDs 1-"
          f"{len(malformed_messages())}); Dovecot {ib.dovecot_version()}")
    differences = compare("ENVELOPE BODYSTRUCTURE", theirs["STRUCTURE"], ours["STRUCTURE"],
                          folded)
    for question in [*SECTIONS, *ORDERINGS]:
        differences += compare(question, theirs[question], ours[question], lambda v: v)
    print(f"\n{differences} differences in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
