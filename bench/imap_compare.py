#!/usr/bin/env python3
"""IMAP answers side by side with Dovecot's: a compatibility check, not a benchmark.

The same mailbox (the IMAP benchmark's corpus plus a set of malformed messages) goes into a
loopback Dovecot and into tiermail, exactly as bench/imap_bench.py sets them up; then both are
asked the same questions and every difference is counted and shown:

  * ENVELOPE and BODYSTRUCTURE of every message (letter case ignored: MIME names are
    case-insensitive and the two servers write them differently);
  * BODY.PEEK[section] for 17 section forms (parts, MIME, nested parts, HEADER, HEADER.FIELDS
    (.NOT), TEXT, partials);
  * SORT by every key and THREAD by both algorithms;
  * LIST and LSUB on the same tree of mailboxes (wildcards, references, LIST-EXTENDED);
  * a script of changes (APPEND, STORE, EXPUNGE, COPY, MOVE, CLOSE, RENAME...) and every
    response the session gets to it;
  * FLAGS, INTERNALDATE and RFC822.SIZE, and the status and response code of 70 commands at
    the edges (bad sequence numbers, bad syntax, missing mailboxes, refused names);
  * CONDSTORE and QRESYNC after the same random flag changes and expunges: what changed
    since each step, by FETCH CHANGEDSINCE, SEARCH MODSEQ, VANISHED, SELECT QRESYNC and
    STORE UNCHANGEDSINCE;
  * UID SEARCH with random programs (flags, keywords, sizes, dates, header and text
    substrings, sequence and UID sets, NOT, OR, nesting) after the same flags are set on both.

Differences the RFCs leave open are expected; docs/architecture.md ("Store: IMAP") lists the
ones known and why tiermail answers as it does. Anything new is worth a look.

    .venv/bin/python bench/imap_compare.py                 # 400 corpus messages + malformed
    .venv/bin/python bench/imap_compare.py --messages 2000
    .venv/bin/python bench/imap_compare.py --searches 2000 --seed 7

Needs root (Dovecot runs its own master) and Debian's dovecot-imapd (`make install`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import email
import email.policy
import imaplib
import itertools
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
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


# Random SEARCH programs. Flags and keywords are set the same way on both servers first
# (FLAG_PATTERN); the programs are built from what the messages hold, so most keys match
# something and the edges (a size exactly, a header's first or last letters) come up often.

FLAG_PATTERN = [("\\Seen", 3), ("\\Flagged", 5), ("\\Answered", 7), ("\\Deleted", 11),
                ("\\Draft", 13), ("$Label1", 4), ("work", 6)]
FLAG_KEYS = ["ANSWERED", "DELETED", "DRAFT", "FLAGGED", "SEEN", "UNANSWERED", "UNDELETED",
             "UNDRAFT", "UNFLAGGED", "UNSEEN"]
KEYWORDS = ["$Label1", "work", "$Junk", "nosuchkeyword"]
ADDRESS_KEYS = {"FROM": "From", "TO": "To", "CC": "Cc", "BCC": "Bcc", "SUBJECT": "Subject"}
HEADER_NAMES = ["Subject", "From", "To", "List-Id", "Message-ID", "In-Reply-To", "X-Absent"]
_WORD = re.compile(r"\w{3,}")


def flag_uids(count: int) -> dict[str, list[int]]:
    """Which UIDs get which flag: UID u has a flag when u is a multiple of its divisor."""
    return {flag: [uid for uid in range(1, count + 1) if uid % divisor == 0]
            for flag, divisor in FLAG_PATTERN}


@dataclass
class Facts:
    """What one message offers the program generator."""

    size: int
    internal: datetime.date
    sent: datetime.date | None
    headers: dict[str, str]
    words: list[str]


def message_facts(index: int, raw: bytes) -> Facts:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    headers: dict[str, str] = {}
    for name in {*ADDRESS_KEYS.values(), *HEADER_NAMES}:
        try:
            value = message.get(name)
            if value is not None:
                headers[name] = str(value)
        except Exception:  # noqa: BLE001 - a header the parser cannot read offers nothing
            pass
    sent = None
    try:
        date = message.get("Date")
        sent = date.datetime.date() if date is not None and date.datetime else None
    except Exception:  # noqa: BLE001
        pass
    internal = datetime.datetime.fromtimestamp(Mailbox.internaldate(index),
                                               datetime.UTC).date()
    return Facts(len(raw), internal, sent, headers, body_words(message))


def body_words(message: EmailMessage) -> list[str]:
    words: list[str] = []
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            words += _WORD.findall(part.get_content())[:40]
        except Exception:  # noqa: BLE001 - undecodable text offers no words
            continue
    return words


class ProgramMaker:
    """Builds random UID SEARCH programs (the bytes after CHARSET UTF-8)."""

    def __init__(self, facts: list[Facts], rng: random.Random) -> None:
        self.facts, self.rng, self.count = facts, rng, len(facts)
        self.atoms: list[bytes] = []  # every single key made, to find what two answers differ on

    def program(self) -> bytes:
        return b" ".join(self.key(depth=0) for _ in range(self.rng.randint(1, 3)))

    def key(self, depth: int) -> bytes:
        rng = self.rng
        if depth < 3 and rng.random() < 0.25:
            choice = rng.random()
            if choice < 0.4:
                return b"NOT " + self.key(depth + 1)
            if choice < 0.8:
                return b"OR " + self.key(depth + 1) + b" " + self.key(depth + 1)
            return b"(" + b" ".join(self.key(depth + 1)
                                    for _ in range(rng.randint(1, 3))) + b")"
        maker = rng.choice([self.flag, self.flag, self.keyword, self.size, self.date,
                            self.sent_date, self.address, self.address, self.header,
                            self.text, self.text, self.sequence])
        atom = maker()
        self.atoms.append(atom)
        return atom

    def flag(self) -> bytes:
        return self.rng.choice(FLAG_KEYS).encode()

    def keyword(self) -> bytes:
        return self.rng.choice([b"KEYWORD ", b"UNKEYWORD "]) + self.rng.choice(KEYWORDS).encode()

    def size(self) -> bytes:
        size = self.some().size + self.rng.choice([-1, 0, 0, 1])
        return self.rng.choice([b"LARGER ", b"SMALLER "]) + str(max(size, 0)).encode()

    def date(self) -> bytes:
        return self.rng.choice([b"BEFORE ", b"ON ", b"SINCE "]) + self.day(self.some().internal)

    def sent_date(self) -> bytes:
        sent = [f.sent for f in self.facts if f.sent is not None]
        key = self.rng.choice([b"SENTBEFORE ", b"SENTON ", b"SENTSINCE "])
        return key + self.day(self.rng.choice(sent)) if sent else b"ALL"

    def day(self, day: datetime.date) -> bytes:
        day += datetime.timedelta(days=self.rng.choice([-1, 0, 0, 1]))
        return day.strftime("%d-%b-%Y").encode()

    def address(self) -> bytes:
        key = self.rng.choice(list(ADDRESS_KEYS))
        return key.encode() + b" " + self.literal(self.needle(self.some().headers.get(
            ADDRESS_KEYS[key], "")))

    def header(self) -> bytes:
        name = self.rng.choice(HEADER_NAMES)
        value = self.some().headers.get(name, "")
        needle = "" if self.rng.random() < 0.15 else self.needle(value)
        return f"HEADER {name} ".encode() + self.literal(needle)

    def text(self) -> bytes:
        words = self.some().words or ["nothing"]
        needle = self.needle(" ".join(self.rng.sample(words, min(2, len(words)))))
        return self.rng.choice([b"BODY ", b"TEXT "]) + self.literal(needle)

    def sequence(self) -> bytes:
        rng, count = self.rng, self.count
        low, high = sorted(rng.randint(1, count) for _ in range(2))
        sets = [f"{low}:{high}", "*", f"{high}:*", f"*:{low}", f"{low},{high}",
                f"{low}:{high},{rng.randint(1, count)}"]
        chosen = rng.choice(sets).encode()
        return (b"UID " + chosen) if rng.random() < 0.5 else chosen

    def needle(self, value: str) -> str:
        rng = self.rng
        if not value:
            return rng.choice(["zzznothing", "a"])
        length = rng.randint(1, min(12, len(value)))
        start = rng.randint(0, len(value) - length)
        needle = value[start:start + length]
        return {0: needle, 1: needle.upper(), 2: needle.lower()}[rng.randint(0, 2)]

    @staticmethod
    def literal(text: str) -> bytes:
        data = text.encode()
        return b"{%d+}\r\n" % len(data) + data

    def some(self) -> Facts:
        return self.rng.choice(self.facts)


def search_programs(mailbox: Mailbox, count: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """`count` programs, and every single key in them (each once)."""
    facts = [message_facts(index, raw) for index, raw in mailbox.messages()]
    maker = ProgramMaker(facts, random.Random(seed))
    programs = [maker.program() for _ in range(count)]
    return programs, list(dict.fromkeys(maker.atoms))


_search_tags = itertools.count(1)


def set_flags(imap: imaplib.IMAP4, count: int) -> None:
    for flag, uids in flag_uids(count).items():
        if uids:
            ib.command(imap, f"UID STORE {','.join(map(str, uids))} +FLAGS.SILENT ({flag})")


def search(imap: imaplib.IMAP4, program: bytes) -> tuple[int, ...] | str:
    """The UIDs a program finds, or the status word when the server refuses it."""
    completion, lines = exchange(imap, b"UID SEARCH CHARSET UTF-8 " + program)
    status = completion.split(b" ", 1)[0].decode()
    if status != "OK":
        return status
    return tuple(sorted(int(n) for line in lines if line.startswith(b"* SEARCH")
                        for n in line[8:].split()))


# Mailbox names: the same tree on both servers, then LIST and LSUB with wildcards, references
# and LIST-EXTENDED selection and return options. Dovecot gets "/" as its separator (its
# Maildir++ default is ".") and the special-use folders tiermail makes for a new account.

DOVECOT_NAMESPACE = "namespace inbox {\n  inbox = yes\n  separator = /\n}"
# Parents are created first: tiermail makes them real mailboxes when a child is created
# (RFC 3501 6.3.3's SHOULD), Dovecot's Maildir++ leaves them \Noselect.
TREE = ["Drafts", "Sent", "Junk", "Trash", "Archive", "a", "a/b", "a/b/c", "a/d", "ab", "b",
        "b/c", "&AMk-t&AOk-", "&AMk-t&AOk-/sub", "with space", "INBOX/child", "Zz", "Zz/y",
        "Zz/y/x", "x"]
# tiermail subscribes a new account to INBOX and its special-use folders; Dovecot refuses to
# subscribe a name that does not exist (RFC 3501 6.3.6 allows both), so "gone" is deleted after.
SUBSCRIBED = ["INBOX", "Drafts", "Sent", "Junk", "Trash", "Archive", "a/b/c", "ab", "b/c",
              "with space", "x"]
LISTINGS = ['LIST "" "*"', 'LIST "" "%"', 'LIST "" "a/%"', 'LIST "" "a/*"', 'LIST "" "a%"',
            'LIST "" "*/c"', 'LIST "" "%/%"', 'LIST "" "*b*"', 'LIST "" "b"', 'LIST "" "b/%"',
            'LIST "" "INBOX"', 'LIST "" "inbox"', 'LIST "" "Inbox/%"', 'LIST "" "&AMk-*"',
            'LIST "" ""', 'LIST "a/" "%"', 'LIST "a" "/%"', 'LIST "" "A*"', 'LIST "" "Zz/%"',
            'LIST "" "nonexistent*"', 'LIST "" "*x"', 'LSUB "" "*"', 'LSUB "" "%"',
            'LSUB "" "a/%"', 'LIST (SUBSCRIBED) "" "*"', 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
            'LIST "" "%" RETURN (CHILDREN)', 'LIST "" "*" RETURN (SUBSCRIBED)',
            'LIST (REMOTE) "" "%"', 'LIST "" ("a" "ab" "b/*")',
            'LIST "" "a/%" RETURN (STATUS (MESSAGES UIDNEXT UNSEEN))']
# Attributes that say how a server is set up, not what the tree is.
SETUP_ATTRIBUTES = {b"\\drafts", b"\\sent", b"\\junk", b"\\trash", b"\\archive",
                    b"\\marked", b"\\unmarked"}
CHILD_ATTRIBUTES = {b"\\haschildren", b"\\hasnochildren"}


def build_tree(imap: imaplib.IMAP4) -> None:
    for name in TREE:
        answer(imap, f'CREATE "{name}"')
    for name in SUBSCRIBED:
        answer(imap, f'SUBSCRIBE "{name}"')
    answer(imap, 'DELETE "x"')  # subscribed, no longer there


def listings(imap: imaplib.IMAP4) -> dict[str, Any]:
    return {command: normalised(answer(imap, command), extended(command))
            for command in LISTINGS}


def extended(command: str) -> bool:
    r"""LIST-EXTENDED syntax, where \HasChildren and \HasNoChildren are optional unless
    CHILDREN is asked for (RFC 5258 4); Dovecot leaves them out, tiermail sends them."""
    return command.startswith("LIST (") or " (" in command or (
        "RETURN" in command and "CHILDREN" not in command)


def answer(imap: imaplib.IMAP4, text: str) -> tuple[str, list[bytes]]:
    """Status and untagged lines of one command, refused or not."""
    completion, lines = exchange(imap, text)
    return completion.split(b" ", 1)[0].decode(), lines


def exchange(imap: imaplib.IMAP4, text: str | bytes) -> tuple[bytes, list[bytes]]:
    """The tagged completion (after the tag) and the untagged lines of one command. A
    continuation request nobody expected (a literal refused) is answered with an empty line,
    which ends the command."""
    tag = b"m%d" % next(_search_tags)
    imap.send(tag + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
    lines: list[bytes] = []
    while True:
        line = imap.readline()
        if not line:
            raise ib.BenchError(f"connection closed during {text[:60]!r}")
        if line.startswith(tag + b" "):
            return line[len(tag) + 1:].rstrip(b"\r\n"), lines
        if line.startswith(b"+ "):
            imap.send(b"\r\n")
            continue
        lines.append(line.rstrip(b"\r\n"))


def status_and_code(completion: bytes, *, name_only: bool = False) -> bytes:
    """`OK`, `NO [NONEXISTENT]`...: the status word and the response code, without text;
    `name_only` keeps only the code's name (`[APPENDUID]`, `[BADCHARSET]`)."""
    status, _, rest = completion.partition(b" ")
    code = rest.split(b"]")[0] if rest[:1] == b"[" else b""
    if code and name_only:
        code = code.split(b" ")[0]
    return (status + b" " + code + (b"]" if code else b"")).strip()


_LIST_LINE = re.compile(rb"^\* (LIST|LSUB) \(([^)]*)\) (.*)$")


def normalised(reply: tuple[str, list[bytes]], extended: bool) -> tuple[str, list[bytes]]:
    """Untagged lines in a fixed order, LIST attributes lower-cased and sorted, the ones that
    only reflect set-up (or are optional here) left out, CHILDINFO unquoted."""
    status, lines = reply
    ignored = SETUP_ATTRIBUTES | (CHILD_ATTRIBUTES if extended else set())
    out = []
    for line in lines:
        match = _LIST_LINE.match(line)
        if match:
            attributes = sorted({a.lower() for a in match.group(2).split()} - ignored)
            rest = match.group(3).replace(b'"CHILDINFO"', b"CHILDINFO")
            line = b"* %s (%s) %s" % (match.group(1), b" ".join(attributes), rest)
        out.append(line)
    return status, sorted(out)


# Commands at the edges, in the selected INBOX after the LIST tree exists: the status word and
# response code each server answers with (texts differ freely).
EDGES = ["FETCH 0 FLAGS", "FETCH 99999 FLAGS", "UID FETCH 99999 FLAGS", "FETCH 1:0 FLAGS",
         "FETCH * (FLAGS)", "UID FETCH 0 FLAGS", "FETCH 1 (FLAGS", "FETCH 1 NOSUCHITEM",
         "FETCH 1 BODY[0]", "FETCH 1 BODY[1.0]", "FETCH 1 BODY[HEADER.FIELDS ()]",
         "FETCH 1 BODY[]<5>", "FETCH 1 BODY.PEEK[MIME]", "STORE 1 +FLAGS (\\Recent)",
         "STORE 1 FLAGS.SILENT (\\Seen", "STORE 99999 +FLAGS (\\Seen)",
         "UID STORE 99999 +FLAGS (\\Seen)", "STORE 1 +FLAGS (\\Bogus)", "STORE 1 XFLAGS (a)",
         "SEARCH 99999", "SEARCH UID 0", "SEARCH BEFORE 31-Feb-2026", "SEARCH LARGER -1",
         "SEARCH NOT", "SEARCH OR SEEN", "SEARCH ()", "SEARCH CHARSET KOI9 ALL",
         "SEARCH HEADER", "SEARCH KEYWORD \\Seen", "SEARCH SINCE 1-Jan-2026 ALL",
         'SELECT "nonexistent"', 'EXAMINE ""', 'CREATE "INBOX"', 'CREATE "inbox"',
         'CREATE "a"', 'CREATE "a/"', 'CREATE ""', 'DELETE "INBOX"', 'DELETE "nonexistent"',
         'RENAME "a" "a"', 'RENAME "nonexistent" "q"', 'RENAME "ab" "a/b"',
         'RENAME "ab" "INBOX"', 'COPY 99999 "a"', 'COPY 1 "nonexistent"', 'UID COPY 99999 "a"',
         'MOVE 1 "nonexistent"', 'STATUS "nonexistent" (MESSAGES)', 'STATUS "a" (BOGUS)',
         'STATUS "a" ()', 'APPEND "nonexistent" {1+}\r\nx', 'APPEND "a" (\\Bogus) {1+}\r\nx',
         'APPEND "a" "32-Jan-2026 10:00:00 +0000" {1+}\r\nx', "EXPUNGE extra", "CHECK",
         "NOOP extra", "UID EXPUNGE 99999", "UID BOGUS 1", "LIST", 'LIST "" "" extra',
         'SUBSCRIBE ""', 'UNSUBSCRIBE "neversubscribed"', "ENABLE BOGUS", "ID NIL",
         "ID (\"name\")", "NAMESPACE", "GETQUOTAROOT INBOX", 'SELECT "a" (CONDSTORE)',
         "UNSELECT", "CLOSE", "FETCH 1 FLAGS"]


def edges(imap: imaplib.IMAP4) -> dict[str, str]:
    return {command: status_and_code(exchange(imap, command)[0], name_only=True).decode()
            for command in EDGES}


# CONDSTORE and QRESYNC: the same random flag changes and expunges on both servers, the
# HIGHESTMODSEQ after each step noted on each, then "what changed since step k" asked both
# ways (FETCH CHANGEDSINCE, SEARCH MODSEQ, VANISHED, SELECT QRESYNC, STORE UNCHANGEDSINCE).
# MODSEQ values differ between servers; what they select must not.

_UID = re.compile(rb"UID (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
_CODE_NUMBER = re.compile(rb"\[(HIGHESTMODSEQ|UIDVALIDITY) (\d+)\]")
_MODIFIED = re.compile(rb"\[MODIFIED ([\d:,]+)\]")


def uid_set(text: bytes) -> list[int]:
    out: list[int] = []
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        first, last = int(low), int(high or low)
        out += range(min(first, last), max(first, last) + 1)
    return sorted(out)


def changes(lines: list[bytes]) -> dict[str, Any]:
    """FETCH answers as {uid: flags}, VANISHED (EARLIER) UIDs, SEARCH UIDs."""
    fetched, vanished, found = {}, [], []
    for line in lines:
        if line.startswith(b"* VANISHED"):
            vanished += uid_set(line.split()[-1])
        elif line.startswith(b"* SEARCH"):
            found += [int(n) for n in line.split()[2:] if n.isdigit()]
        elif b" FETCH (" in line and (uid := _UID.search(line)):
            flags = _FLAGS.search(line)
            fetched[int(uid.group(1))] = sorted(
                set(flags.group(1).split() if flags else []) - {b"\\Recent"})
    return {"fetched": fetched, "vanished": sorted(vanished), "search": sorted(found)}


def modseq_story(port: int, seed: int, steps: int = 16) -> dict[str, Any]:
    imap = ib.connect(port)
    try:
        ib.ok(imap.login(ib.USER, ib.PASSWORD), "LOGIN")
        answer(imap, "ENABLE QRESYNC")
        answer(imap, 'CREATE "cs"')
        answer(imap, "SELECT INBOX")
        answer(imap, 'UID COPY 1:40 "cs"')
        _, lines = answer(imap, 'SELECT "cs" (CONDSTORE)')
        codes = {m.group(1): int(m.group(2)) for line in lines
                 for m in _CODE_NUMBER.finditer(line)}
        uids = changes(answer(imap, "UID SEARCH ALL")[1])["search"]
        marks = [codes[b"HIGHESTMODSEQ"]]
        rng = random.Random(seed)
        for _ in range(steps):
            step(imap, rng, uids)
            status = answer(imap, 'STATUS "cs" (HIGHESTMODSEQ)')[1]
            marks.append(int(re.findall(rb"HIGHESTMODSEQ (\d+)", b" ".join(status))[0]))
        story: dict[str, Any] = {}
        for k, mark in enumerate(marks[:-1]):
            story[f"FETCH CHANGEDSINCE step {k}"] = changes(
                answer(imap, f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mark} VANISHED)")[1])
            story[f"SEARCH MODSEQ step {k}"] = changes(
                answer(imap, f"UID SEARCH MODSEQ {mark + 1}")[1])["search"]
        answer(imap, "UNSELECT")
        for k, mark in enumerate(marks[:-1]):
            qresync = f'SELECT "cs" (QRESYNC ({codes[b"UIDVALIDITY"]} {mark}))'
            story[f"SELECT QRESYNC step {k}"] = changes(answer(imap, qresync)[1])
        middle = marks[len(marks) // 2]
        completion, lines = exchange(imap, f"UID STORE 1:* (UNCHANGEDSINCE {middle}) +FLAGS (zz)")
        modified = _MODIFIED.search(completion)
        story["STORE UNCHANGEDSINCE"] = {
            "status": completion.split(b" ", 1)[0], "fetched": changes(lines)["fetched"],
            "modified": uid_set(modified.group(1)) if modified else []}
        return story
    finally:
        ib.logout(imap)


def step(imap: imaplib.IMAP4, rng: random.Random, uids: list[int]) -> None:
    chosen = ",".join(map(str, sorted(rng.sample(uids, min(len(uids), rng.randint(1, 5))))))
    kind = rng.choice(["+FLAGS", "+FLAGS", "-FLAGS", "FLAGS", "again", "expunge"])
    flag = rng.choice(["\\Seen", "\\Flagged", "kw1", "kw2"])
    if kind == "expunge" and len(uids) > 10:
        answer(imap, f"UID STORE {chosen} +FLAGS.SILENT (\\Deleted)")
        answer(imap, f"UID EXPUNGE {chosen}")
        uids[:] = [uid for uid in uids if str(uid) not in chosen.split(",")]
    elif kind == "again":  # setting what is already set changes nothing
        answer(imap, f"UID STORE {chosen} +FLAGS.SILENT ({flag})")
        answer(imap, f"UID STORE {chosen} +FLAGS.SILENT ({flag})")
    else:
        answer(imap, f"UID STORE {chosen} {kind}.SILENT ({flag})")


# Changes and what a session is told about them: the same script on both servers, every
# untagged response and the tagged status with its code compared (UIDVALIDITY and MODSEQ
# values, which are each server's own, replaced by placeholders).
MUTATIONS = [
    'CREATE "mut"', 'CREATE "mut2"', "SELECT INBOX", 'UID COPY 1:6 "mut"', 'SELECT "mut"',
    'APPEND "mut" (\\Seen $Label1) "03-Feb-2026 10:00:00 +0100" {25+}\r\n'
    "Subject: appended\r\n\r\nhi\r\n",
    'APPEND "mut" () " 3-Feb-2026 23:59:59 -1200" {25+}\r\nSubject: appended\r\n\r\nhi\r\n',
    "FETCH 7:* (UID FLAGS INTERNALDATE RFC822.SIZE)", "NOOP",
    "STORE 1:3 +FLAGS (\\Deleted)", "STORE 2 -FLAGS (\\Deleted)", "EXPUNGE",
    "FETCH 1:* (UID FLAGS)", 'COPY 1:2 "mut2"', 'MOVE 1 "mut2"', "FETCH 1:* (UID)",
    'UID MOVE 5:* "mut2"', 'STATUS "mut2" (MESSAGES UNSEEN UIDNEXT)',
    "STORE 1 FLAGS.SILENT (\\Deleted)", "UID EXPUNGE 1:4", "UID EXPUNGE 1:*",
    "FETCH 1:* (UID FLAGS)", 'SELECT "mut2"', "FETCH 1:* (UID FLAGS)",
    "SEARCH SEEN", "CLOSE", 'STATUS "mut2" (MESSAGES RECENT UNSEEN UIDNEXT)',
    'DELETE "mut2"', 'RENAME "mut" "mut3"', 'STATUS "mut3" (MESSAGES)',
]
_VOLATILE = [(re.compile(rb"(UIDVALIDITY|APPENDUID|COPYUID) \d+"), rb"\1 V"),
             (re.compile(rb"\((MODSEQ|HIGHESTMODSEQ) \d+\)|(HIGHESTMODSEQ) \d+"), rb"MODSEQ"),
             (re.compile(rb"\[(READ-WRITE|READ-ONLY)\].*"), rb"[\1]"),
             (re.compile(rb"\* OK \[(UNSEEN|PERMANENTFLAGS|UIDNEXT)[^]]*\].*"), rb"* OK [\1]"),
             (re.compile(rb"\* FLAGS .*"), rb"* FLAGS"),
             (re.compile(rb"\* (\d+) RECENT"), rb"* n RECENT")]


_FLAG_LIST = re.compile(rb"FLAGS \(([^)]*)\)")
_STATUS_ITEMS = re.compile(rb"^(\* STATUS \S+ )\((.*)\)$")
_OK_TEXT = re.compile(rb"^(\* OK \[[^]]*\]).*")


def mutations(port: int) -> list[tuple[bytes, list[bytes]]]:
    imap = ib.connect(port)
    try:
        ib.ok(imap.login(ib.USER, ib.PASSWORD), "LOGIN")
        steps = []
        for command in MUTATIONS:
            completion, lines = exchange(imap, command)
            steps.append((volatile_out(status_and_code(completion)),
                          [volatile_out(line) for line in lines]))
        return steps
    finally:
        ib.logout(imap)


def volatile_out(line: bytes) -> bytes:
    """A response line with each server's own numbers, word order and wording left out:
    flags and STATUS items sorted, a date's leading space a zero, OK texts dropped."""
    for pattern, replacement in _VOLATILE:
        line = pattern.sub(replacement, line)
    line = _FLAG_LIST.sub(lambda m: b"FLAGS (" + b" ".join(sorted(m.group(1).split())) + b")",
                          line)
    line = _STATUS_ITEMS.sub(lambda m: m.group(1) + b"(" + b" ".join(
        sorted(re.findall(rb"\w+ \d+", m.group(2)))) + b")", line)
    line = line.replace(b'INTERNALDATE " ', b'INTERNALDATE "0')
    return _OK_TEXT.sub(rb"\1", line).strip()


def ask(port: int, programs: list[bytes], atoms: list[bytes], count: int,
        seed: int) -> dict[str, Any]:
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
        build_tree(imap)
        answers["LISTS"] = listings(imap)
        set_flags(imap, count)
        # \Recent left out: Dovecot takes messages found in cur/ as seen by someone already.
        answers["FLAGS"] = {uid: [sorted(set(value) - {b"\\Recent"}) if key == b"FLAGS" else value
                                  for key, value in sorted(fields.items()) if key != b"SEQ"]
                            for uid, fields in parse_fetch_response(
                                imap.uid("FETCH", "1:*", "(FLAGS INTERNALDATE RFC822.SIZE)")[1]
                            ).items()}
        answers["SEARCH"] = {number: search(imap, program)
                             for number, program in enumerate(programs)}
        answers["KEYS"] = {atom: search(imap, atom) for atom in atoms}
        answers["MODSEQ"] = modseq_story(port, seed)  # before the edges: they set \Seen
        answers["MUTATIONS"] = mutations(port)  # before the edges, as MODSEQ above
        answers["EDGES"] = edges(imap)
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


def compare_searches(programs: list[bytes], dovecot: dict[str, Any],
                     tiermail: dict[str, Any]) -> int:
    """Programs answered differently, then the single keys behind them, grouped by kind."""
    differing = [n for n, program in enumerate(programs)
                 if dovecot["SEARCH"][n] != tiermail["SEARCH"][n]]
    print(f"UID SEARCH: {len(differing)} of {len(programs)} programs differ")
    for number in differing[:5]:
        print(f"    {shown(programs[number])[:160]}\n      "
              f"{difference(dovecot['SEARCH'][number], tiermail['SEARCH'][number])}")
    keys = [atom for atom in dovecot["KEYS"] if dovecot["KEYS"][atom] != tiermail["KEYS"][atom]]
    print(f"  single keys: {len(keys)} of {len(dovecot['KEYS'])} differ")
    for kind, group in itertools.groupby(sorted(keys), key=lambda atom: atom.split(b" ")[0]):
        group = list(group)
        print(f"    {kind.decode()}: {len(group)}")
        for atom in group[:8]:
            print(f"      {shown(atom)[:100]}: "
                  f"{difference(dovecot['KEYS'][atom], tiermail['KEYS'][atom])}")
    return len(differing)


def compare_listings(dovecot: dict[str, Any], tiermail: dict[str, Any]) -> int:
    differing = [command for command in LISTINGS if dovecot[command] != tiermail[command]]
    print(f"LIST/LSUB: {len(differing)} of {len(LISTINGS)} commands differ")
    for command in differing:
        (d_status, d_lines), (t_status, t_lines) = dovecot[command], tiermail[command]
        print(f"    {command}: dovecot {d_status}, tiermail {t_status}")
        for line in sorted(set(d_lines) - set(t_lines)):
            print(f"      only dovecot  {line.decode(errors='replace')}")
        for line in sorted(set(t_lines) - set(d_lines)):
            print(f"      only tiermail {line.decode(errors='replace')}")
    return len(differing)


def shown(program: bytes) -> str:
    """A program with its literals written as quoted strings, for reading."""
    def quoted(match: re.Match[bytes]) -> bytes:
        return b'"' + program[match.end():match.end() + int(match.group(1))] + b'"'
    out, position = [], 0
    for match in re.finditer(rb"\{(\d+)\+\}\r\n", program):
        out += [program[position:match.start()], quoted(match)]
        position = match.end() + int(match.group(1))
    return b"".join([*out, program[position:]]).decode(errors="replace")


def difference(theirs: Any, ours: Any) -> str:
    if isinstance(theirs, tuple) and isinstance(ours, tuple):
        only_d, only_t = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        return f"only dovecot {only_d[:10]}, only tiermail {only_t[:10]}"
    return f"dovecot {str(theirs)[:80]}, tiermail {str(ours)[:80]}"


@contextlib.contextmanager
def store_holding(mailbox: Mailbox, root: Path, redis_db: int) -> Iterator[TiermailStack]:
    """A tiermail store whose benchmark user holds `mailbox`, IMAP and POP3 listening."""
    from common.settings import Settings

    tiermail = TiermailStack(root, redis_db)
    try:
        tiermail.setup()
        inline_max = Settings.from_env(tiermail.env).store_inline_max
        asyncio.run(ib.populate_maildb(tiermail.data_dir / "store", mailbox, inline_max))
        tiermail.start_store()
        for port in (tiermail.imap_port, tiermail.pop3_port):
            ib.wait_for(lambda port=port: ib.port_open(port), 60, f"tiermail on {port}")
        yield tiermail
    finally:
        tiermail.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400,
                        help="benchmark corpus messages after the malformed ones")
    parser.add_argument("--searches", type=int, default=500, help="random SEARCH programs")
    parser.add_argument("--seed", type=int, default=1, help="seed of the SEARCH programs")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    mailbox = Mailbox(args.messages)
    programs, atoms = search_programs(mailbox, args.searches, args.seed)
    with temp_root("tiermail-imap-compare-", args.keep) as root:
        dovecot = ib.DovecotStack(root / "dovecot", [DOVECOT_NAMESPACE])
        dovecot.configure()
        ib.populate_maildir(dovecot.maildir, mailbox)
        dovecot.start()
        try:
            log(f"dovecot: asking about {mailbox.count} messages")
            theirs = ask(dovecot.port, programs, atoms, mailbox.count, args.seed)
        finally:
            dovecot.stop()
        with store_holding(mailbox, root / "tiermail", args.redis_db) as tiermail:
            log(f"tiermail: asking about {mailbox.count} messages")
            ours = ask(tiermail.imap_port, programs, atoms, mailbox.count, args.seed)
    print(f"\n{mailbox.count} messages ({len(malformed_messages())} malformed, UIDs 1-"
          f"{len(malformed_messages())}); Dovecot {ib.dovecot_version()}")
    differences = compare("ENVELOPE BODYSTRUCTURE", theirs["STRUCTURE"], ours["STRUCTURE"],
                          folded)
    for question in [*SECTIONS, *ORDERINGS]:
        differences += compare(question, theirs[question], ours[question], lambda v: v)
    differences += compare_searches(programs, theirs, ours)
    differences += compare_listings(theirs["LISTS"], ours["LISTS"])
    differences += compare("FLAGS INTERNALDATE RFC822.SIZE", theirs["FLAGS"], ours["FLAGS"],
                           lambda v: v)
    story = theirs["MODSEQ"]
    differing = [q for q in story if story[q] != ours["MODSEQ"][q]]
    print(f"CONDSTORE/QRESYNC: {len(differing)} of {len(story)} questions answered differently")
    for question in differing:
        print(f"    {question}:\n      dovecot  {str(story[question])[:300]}\n"
              f"      tiermail {str(ours['MODSEQ'][question])[:300]}")
    differences += len(differing)
    differing = [n for n, _ in enumerate(MUTATIONS)
                 if theirs["MUTATIONS"][n] != ours["MUTATIONS"][n]]
    print(f"Changes and what a session hears of them: {len(differing)} of {len(MUTATIONS)} "
          "steps answered differently")
    for n in differing:
        print(f"    {MUTATIONS[n][:70]!r}\n      dovecot  {theirs['MUTATIONS'][n]}\n"
              f"      tiermail {ours['MUTATIONS'][n]}")
    differences += len(differing)
    differing = [c for c in EDGES if theirs["EDGES"][c] != ours["EDGES"][c]]
    print(f"Edge commands: {len(differing)} of {len(EDGES)} answered differently")
    for command in differing:
        print(f"    {command!r}: dovecot {theirs['EDGES'][command]}, "
              f"tiermail {ours['EDGES'][command]}")
    differences += len(differing)
    print(f"\n{differences} differences in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
