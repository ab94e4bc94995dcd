"""Every response the real server gives, checked against the formal syntax (tests/imapgrammar.py):
a broad corpus of commands and extensions over messages and mailbox names built to stress the
renderers (8-bit and encoded headers, groups and odd addresses, CR and NUL in headers, long
lines, nested and malformed MIME, RFC 2231 parameters, bare LF, empty messages; names with
quotes, backslashes, wildcards, spaces and non-ASCII characters)."""

from __future__ import annotations

import re
import socket

from common.settings import Settings
from services.store.imap.commands import STREAM_OVER
from services.store.imap.protocol import mutf7
from tests.imapgrammar import GrammarError, check_response
from tests.integration.imap.clients import TIMEOUT, Raw, in_thread, quote
from tests.integration.imap.conftest import ALICE, USERS, Deliver, ImapStack, StartImap
from tests.unit.imap.hostile_mime import ADDRESSES, nested_messages, nested_multiparts


class CheckedRaw(Raw):
    """A byte-level client that validates every response it reads and keeps the violations."""

    def __init__(self, sock: socket.socket) -> None:
        self.violations: list[str] = []
        self.kinds: set[bytes] = set()  # what was checked: response names and codes
        self._greeted = False
        super().__init__(sock)

    @classmethod
    def to(cls, port: int) -> CheckedRaw:
        return cls(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))

    def response(self) -> bytes:
        out = super().response()
        if out:
            self.kinds.update(_kinds(out))
            try:
                check_response(out + b"\r\n", greeting=not self._greeted)
            except GrammarError as exc:
                self.violations.append(str(exc))
        self._greeted = True
        return out


def _kinds(response: bytes) -> list[bytes]:
    """b"* 3 FETCH (...)" -> [b"FETCH"]; b"a1 OK [COPYUID ...] x" -> [b"OK", b"COPYUID"]."""
    if response.startswith(b"+"):
        return [b"+"]
    words = response.split(b" ", 3) + [b""]
    kind = words[2] if words[1].isdigit() else words[1]
    code = re.match(rb"[^ ]+ [A-Z]+ \[([A-Z-]+)", response)
    return [kind, code.group(1)] if code else [kind]


# Every kind of response and code the corpus must have drawn from the server (so that a
# server answering BAD to everything fails the test instead of passing it).
EXPECTED_KINDS = {
    b"CAPABILITY", b"ID", b"ENABLED", b"NAMESPACE", b"LIST", b"LSUB", b"STATUS", b"QUOTA",
    b"QUOTAROOT", b"FLAGS", b"EXISTS", b"RECENT", b"FETCH", b"SEARCH", b"ESEARCH", b"SORT",
    b"THREAD", b"VANISHED", b"BYE", b"+", b"PERMANENTFLAGS", b"UIDVALIDITY", b"UIDNEXT",
    b"UNSEEN", b"HIGHESTMODSEQ", b"CLOSED", b"READ-WRITE", b"READ-ONLY", b"APPENDUID",
    b"COPYUID", b"MODIFIED", b"TRYCREATE", b"ALREADYEXISTS", b"NONEXISTENT", b"BADCHARSET",
    b"AUTHENTICATIONFAILED", b"CANNOT", b"BAD", b"EXPUNGE",
}


def _addresses() -> bytes:
    return b", ".join(ADDRESSES)


MESSAGES = [
    (b"From: Zo\xc3\xab Caf\xc3\xa9 <zoe@example.org>\r\nSubject: caf\xc3\xa9 cr\xe8me\r\n"
     b"To: \"Ren\xc3\xa9\" <r@x.example>\r\nContent-Type: text/plain; charset=utf-8\r\n"
     b"Content-Description: d\xc3\xa9j\xc3\xa0\r\n\r\n8-bit body \xc3\xa9\r\n"),
    (b"From: =?utf-8?q?Zo=C3=AB?= <z@e.example>\r\nSubject: =?utf-8?b?Y2Fmw6k=?= "
     b"=?x-bogus?q?x?=\r\n\r\nencoded words\r\n"),
    b"From: " + _addresses() + b"\r\nTo: " + _addresses() + b"\r\nCc: undisclosed:;\r\n"
    b"Bcc: \"a \\\"quoted\\\" \\\\ name\" <q@x.example>, <@route,@r2:a@b.example>\r\n"
    b"Sender: <>\r\nReply-To: g: ;\r\nSubject: addresses\r\n\r\nbody\r\n",
    b"Subject: \r\nFrom: \r\nTo:\r\nIn-Reply-To: \r\nMessage-ID:\r\n\r\nempty fields\r\n",
    b"Subject: a\rb\r\nX-Nul: c\x00d\r\nFrom: N\x00ul <n@x.example>\r\n\r\nnul\x00body\r\n",
    b"Subject: " + b"long " * 3000 + b"\r\nX-Long: " + b"y" * 20000 + b"\r\n\r\nlong\r\n",
    b"Subject: quote \" and backslash \\ and {5}\r\n\r\nspecials\r\n",
    nested_multiparts(6),
    nested_messages(6),
    (b"Subject: digest\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
     b"Subject: inner\r\n\r\ninner body\r\n--d\r\nContent-Type: message/rfc822\r\n"
     b"Content-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA0KDQp4DQo=\r\n--d--\r\n"),
    b"Subject: no boundary\r\nContent-Type: multipart/mixed\r\n\r\nnot really multipart\r\n",
    (b"Subject: bad params\r\nContent-Type: text/plain; charset; =x; a=\"unterminated\r\n"
     b"Content-Disposition: attachment; filename*0*=utf-8''caf%C3%A9; filename*1=\".txt\"\r\n"
     b"Content-Language: en, de-DE\r\nContent-Location: http://x.example/a\"b\r\n"
     b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\nContent-ID: <id@x>\r\n\r\nbody\r\n"),
    (b"Subject: quoted params\r\nContent-Type: multipart/mixed; boundary=\"a \\\"b\\\"\"\r\n\r\n"
     b"--a \"b\"\r\nContent-Type: application/x; name=\"say \\\"hi\\\" \\\\ \xc3\xa9\"\r\n"
     b"Content-Disposition: inline; filename=\"\xe9t\xe9.txt\"\r\n\r\nx\r\n--a \"b\"--\r\n"),
    b"Subject: bare LF\nFrom: lf@x.example\n\nline one\nline two\n",
    b"Subject: bare CR\rContent-Type: multipart/mixed; boundary=a\r\r--a\rx\r--a--\r",
    b"",
    b"Subject: only a header, no line end",
    (b"Content-Type: text/plain; charset=\"\"\r\nContent-Transfer-Encoding: \xff\r\n\r\n"
     b"\xff\xfe\r\n"),
    # Three replies to a message nobody has: REFERENCES threads them under a dummy parent.
    b"Subject: re: lost\r\nMessage-ID: <t1@x>\r\nReferences: <lost@x>\r\n\r\n1\r\n",
    b"Subject: re: lost\r\nMessage-ID: <t2@x>\r\nReferences: <lost@x>\r\n\r\n2\r\n",
    b"Subject: re: lost\r\nMessage-ID: <t3@x>\r\nReferences: <lost@x> <t1@x>\r\n\r\n3\r\n",
]

MAILBOXES = ["quote\"d", "back\\slash", "per%cent", "st*ar", "with space", "caf\u00e9",
             "\u65e5\u672c/\u8a9e", "NIL", "a]b", "amp&er", "p/c/d", "Trash", "br{3}ace",
             "(paren)", "NIL/x"]

FETCH_ITEMS = (
    "(FLAGS INTERNALDATE RFC822.SIZE UID ENVELOPE BODY BODYSTRUCTURE)",
    "(BODY.PEEK[] BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[1] BODY.PEEK[1.MIME] "
    "BODY.PEEK[2] BODY.PEEK[1.1] BODY.PEEK[1.2.MIME] BODY.PEEK[1.HEADER] BODY.PEEK[1.TEXT])",
    "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM \"X-NUL\" NIL)] "
    "BODY.PEEK[HEADER.FIELDS.NOT (X-LONG)] BODY.PEEK[TEXT]<2.7> BODY.PEEK[]<0.5>)",
    "(RFC822.HEADER RFC822.TEXT RFC822 MODSEQ)",
)


def _mailbox_arg(name: str) -> str:
    return quote(mutf7.encode(name))


def exercise(raw: CheckedRaw) -> None:
    """The command corpus: each reply is validated as it is read."""
    raw.command("CAPABILITY")
    raw.command('ID ("name" "grammar" "os" NIL)')
    raw.command("ID NIL")
    raw.command("ENABLE CONDSTORE QRESYNC X-UNKNOWN")
    raw.command("NAMESPACE")
    for name in MAILBOXES:
        raw.command(f"CREATE {_mailbox_arg(name)}")
        raw.command(f"SUBSCRIBE {_mailbox_arg(name)}")
    raw.command("CREATE Archive (USE (\\Archive))")
    raw.command(b"CREATE \"ctl\x01x\"")
    raw.command(b"CREATE \"tab\tx\"")
    raw.command(b"CREATE \"del\x7fx\"")
    raw.command(b"CREATE {1002+}\r\n" + b"m" * 1002)
    raw.command("SUBSCRIBE gone/child")
    raw.command("DELETE p/c")
    raw.command("RENAME \"with space\" \"with  two  spaces\"")
    raw.command('CREATE "quote\\"d"')  # exists: NO [ALREADYEXISTS]
    for command in ('LIST "" ""', 'LIST "" "*"', 'LIST "" "%"', 'LIST "p/" "%"',
                    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "*"', 'LIST (SPECIAL-USE) "" "*"',
                    'LIST "" "*" RETURN (CHILDREN SUBSCRIBED SPECIAL-USE STATUS (MESSAGES '
                    'UIDNEXT UIDVALIDITY UNSEEN RECENT HIGHESTMODSEQ SIZE DELETED '
                    'DELETED-STORAGE APPENDLIMIT))', 'LIST "" ("INBOX" "*r*")', 'LSUB "" "*"',
                    'LSUB "" "%"', 'LSUB "gone/" "%"'):
        raw.command(command)
    for name in ("INBOX", *MAILBOXES, "nonexistent"):
        raw.command(f"STATUS {_mailbox_arg(name)} (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN "
                    "HIGHESTMODSEQ SIZE DELETED DELETED-STORAGE APPENDLIMIT)")
    raw.command("GETQUOTAROOT INBOX")
    raw.command('GETQUOTA ""')
    raw.command("EXAMINE INBOX")
    raw.command("SELECT INBOX (CONDSTORE)")
    for items in FETCH_ITEMS:
        raw.command(f"FETCH 1:* {items}")
        raw.command(f"UID FETCH 1:* {items}")
    for field in (b"{2+}\r\n\xc3\xa9", b"{3+}\r\na\x00b", b"{4+}\r\na\r\nb", b"a]b",
                  b"{3+}\r\na]b", b"\"x y\"", b"\"\"", b"{1002+}\r\n" + b"n" * 1002):
        raw.command(b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (" + field + b")] "
                    b"BODY.PEEK[1.HEADER.FIELDS.NOT (" + field + b" X)])")
    raw.command("FETCH 1:* (FLAGS) (CHANGEDSINCE 1)")
    raw.command("UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
    raw.command("STORE 1:3 +FLAGS ($Junk \\Flagged key_word)")
    raw.command("STORE 2 FLAGS.SILENT (\\Seen)")
    raw.command("STORE 1:* (UNCHANGEDSINCE 1) +FLAGS (\\Answered)")
    raw.command("UID STORE 1:* -FLAGS (key_word)")
    raw.command("FETCH 4 (BODY[1])")  # sets \Seen: FLAGS come with it
    for criteria in (b"ALL", b"SUBJECT {5+}\r\ncaf\xc3\xa9", b"MODSEQ 1", b"KEYWORD nothing",
                     b"OR FROM zoe TEXT nul", b"HEADER X-Nul c", b"UNSEEN SMALLER 100",
                     b"SUBJECT lost", b"OR HEADER Message-ID t2 HEADER Message-ID t3"):
        raw.command(b"SEARCH CHARSET UTF-8 " + criteria)
        raw.command(b"UID SEARCH RETURN (MIN MAX COUNT ALL) CHARSET UTF-8 " + criteria)
        raw.command(b"SEARCH RETURN () " + criteria)
        raw.command(b"SORT (REVERSE SUBJECT FROM ARRIVAL) UTF-8 " + criteria)
        raw.command(b"UID SORT (DATE SIZE) UTF-8 " + criteria)
        for algorithm in (b"REFERENCES", b"ORDEREDSUBJECT"):
            raw.command(b"THREAD " + algorithm + b" UTF-8 " + criteria)
            raw.command(b"UID THREAD " + algorithm + b" UTF-8 " + criteria)
    raw.command("SEARCH CHARSET KOI9 ALL")
    raw.command("SORT (BOGUS) UTF-8 ALL")
    raw.command("FETCH 999 FLAGS")
    raw.command("COPY 1:3 Trash")
    raw.command("UID COPY 3,1 Trash")
    raw.command("COPY 1 nonexistent")
    raw.command("MOVE 5:6 Trash")
    raw.command("STORE 1 +FLAGS (\\Deleted)")
    raw.command("EXPUNGE")
    raw.command("UID EXPUNGE 1:*")
    raw.literal_command(b"APPEND Trash (\\Seen kw) \" 5-Mar-2026 10:00:00 +0100\"",
                        b"Subject: appended\r\n\r\nx\r\n")
    raw.literal_command(b"APPEND nonexistent", b"x")
    raw.command("SELECT Trash")
    raw.command("FETCH 1:* (UID FLAGS MODSEQ ENVELOPE)")
    raw.command("UNSELECT")
    raw.command(f"DELETE {_mailbox_arg('Trash')}")
    _idle(raw)
    raw.command("NOOP")
    raw.command("BOGUS")
    raw.command("FETCH 1 FLAGS")  # not selected: BAD


def _idle(raw: CheckedRaw) -> None:
    tag = next(raw.tags)
    raw.send(tag.encode() + b" IDLE\r\n")
    raw.response()  # the continuation
    raw.send(b"DONE\r\n")
    raw.reply(tag)


def other_sessions_changes(raw: CheckedRaw) -> None:
    """What a session is told of another's changes: new keywords, flags, expunges, mail."""
    raw.command("SELECT INBOX (CONDSTORE)")
    other = CheckedRaw.to(raw.sock.getpeername()[1])
    try:
        other.ok(f"LOGIN {quote(ALICE)} {quote(USERS[ALICE])}")
        other.command("SELECT INBOX")
        other.command("STORE 1:2 +FLAGS (fresh_keyword \\Deleted)")
        other.command("EXPUNGE")
        other.literal_command(b"APPEND INBOX (\\Flagged)", b"Subject: new\r\n\r\nx\r\n")
        other.command("STORE 3 +FLAGS (\\Answered other_keyword)")
        raw.command("NOOP")
        tag = next(raw.tags)
        raw.send(tag.encode() + b" IDLE\r\n")
        raw.response()  # the continuation
        other.command("STORE 4 +FLAGS (\\Flagged)")
        raw.response()  # IDLE tells of it
        raw.send(b"DONE\r\n")
        raw.reply(tag)
    finally:
        other.close()
    raw.violations += other.violations
    raw.kinds |= other.kinds


def qresync_session(raw: CheckedRaw) -> None:
    raw.command("ENABLE QRESYNC")
    status = raw.command("STATUS INBOX (UIDVALIDITY)").untagged[0]
    uidvalidity = status.rsplit(b" ", 1)[1].rstrip(b")").decode()
    raw.command(f"SELECT INBOX (QRESYNC ({uidvalidity} 1 1:100 (1:3 1:3)))")
    raw.command("STORE 1 +FLAGS (\\Deleted)")
    raw.command("EXPUNGE")
    raw.command("UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
    raw.command("SELECT \"quote\\\"d\"")  # OK [CLOSED] first
    raw.command("LOGOUT")


BAD_COMMANDS = [
    b"r1 SEARCH \xc3\xa9", b"r1 SORT (\xc3\xa9) UTF-8 ALL", b"r1 THREAD \xc3\xa9 UTF-8 ALL",
    b"r1 FETCH 1 (\xc3\xa9)", b"r1 FETCH 1 (FLAGS) (\xc3\xa9 1)", b"r1 LIST (\xc3\xa9) \"\" *",
    b"r1 LIST \"\" * RETURN (\xc3\xa9)", b"r1 STATUS INBOX (\xc3\xa9)",
    b"r1 SELECT INBOX (\xc3\xa9)", b"r1 STORE 1 +FLAGS (\\\xc3\xa9)", b"r1 SEARCH \x00",
    b"r1 SEARCH RETURN (\xc3\xa9) ALL", b"r1 \xc3\xa9", b"r1 UID \xc3\xa9",
    b"r1 SEARCH CHARSET \xc3\xa9 ALL", b"r1 SEARCH CHARSET {5+}\r\n\xc3\xa9\x00\x01\x7f ALL",
    b"r1 SEARCH SUBJECT \"\xff\"", b"r1 APPEND INBOX (\\\xc3\xa9) {1+}\r\nx",
    b"r1 CREATE \"\xc3\xa9\"", b"r1 FETCH \xc3\xa9 FLAGS", b"r1 ID (\"\xc3\xa9\" NIL)",
    b"r1 ENABLE \xc3\xa9", b"r1 FETCH 1 BODY[\xc3\xa9]", b"r1 COMPRESS \xc3\xa9",
    b"r1 AUTHENTICATE \xc3\xa9",
]
BAD_TAGS = [b"\xc3\xa9 NOOP", b"a\"b NOOP", b"* NOOP", b"+ NOOP", b"a{1} NOOP", b"\x01 NOOP"]


def bad_input(raw: CheckedRaw) -> None:
    """Malformed commands: the replies (which may echo what the client sent) stay valid."""
    raw.command("SELECT INBOX")
    for line in BAD_COMMANDS:
        raw.send(line + b"\r\n")
        raw.reply("r1")
    for line in BAD_TAGS:
        raw.send(line + b"\r\n")
        raw.response()
        raw.command("NOOP")


def oversized(raw: CheckedRaw) -> None:
    """Literals and lines over the limits (their own session: each counts as an error)."""
    for line in (b"r1 APPEND INBOX {99999999999}", b"r1 APPEND INBOX {4294967296}",
                 b"r1 NOOP " + b"x" * 100_000, b"\xff" * 100_000):
        raw.send(line + b"\r\n")
        raw.response()
        raw.command("NOOP")


def before_login(port: int) -> CheckedRaw:
    raw = CheckedRaw.to(port)
    try:
        raw.command("CAPABILITY")
        raw.command("NOOP")
        raw.command("LOGIN nobody wrong")
        tag = next(raw.tags)
        raw.send(tag.encode() + b" AUTHENTICATE PLAIN\r\n")
        raw.response()  # "+ "
        raw.send(b"*\r\n")
        raw.reply(tag)
        raw.literal_command(b"LOGIN " + quote(ALICE).encode(), USERS[ALICE].encode())
        raw.command("LOGOUT")
    finally:
        raw.close()
    return raw


async def test_every_response_is_valid_by_the_formal_syntax(
        start_imap: StartImap, settings: Settings, deliver: Deliver) -> None:
    stack = await start_imap(settings.replace(default_quota=10_000_000))
    for body in MESSAGES:
        await deliver(ALICE, body)

    def dialog() -> tuple[list[str], set[bytes]]:
        first = before_login(stack.port)
        violations, kinds = first.violations, first.kinds
        for session in (exercise, other_sessions_changes, qresync_session, bad_input,
                        oversized):
            raw = CheckedRaw.to(stack.port)
            try:
                raw.ok(f"LOGIN {quote(ALICE)} {quote(USERS[ALICE])}")
                session(raw)
            finally:
                raw.close()
            violations += raw.violations
            kinds |= raw.kinds
        return violations, kinds

    violations, kinds = await in_thread(dialog)
    assert not violations, "\n".join(violations)
    assert kinds >= EXPECTED_KINDS, EXPECTED_KINDS - kinds


async def test_nul_in_a_message_sent_from_its_file_arrives_as_0x80(
        imap_server: ImapStack, deliver: Deliver) -> None:
    """A message over STREAM_OVER goes from its file a chunk at a time; its NULs are sent as
    0x80 there too (RFC 3501 9: a literal's CHAR8 is %x01-ff), the octet count unchanged."""
    text = b"".join(b"line %07d \x00 " % n + b"x" * 60 + b"\r\n" for n in range(8000))
    large = b"Subject: large with NUL\r\n\r\n" + text
    assert len(large) > 2 * STREAM_OVER
    await deliver(ALICE, large)

    def dialog() -> CheckedRaw:
        raw = CheckedRaw.to(imap_server.port)
        try:
            raw.ok(f"LOGIN {quote(ALICE)} {quote(USERS[ALICE])}")
            raw.ok("SELECT INBOX")
            whole = raw.ok("FETCH 1 (BODY.PEEK[])").untagged[0]
            assert whole.endswith(b"{%d}\r\n" % len(large) + large.replace(b"\x00", b"\x80")
                                  + b")")
            partial = raw.ok("FETCH 1 (BODY.PEEK[TEXT]<300000.70000>)").untagged[0]
            assert partial.endswith(text[300_000:370_000].replace(b"\x00", b"\x80") + b")")
        finally:
            raw.close()
        return raw

    raw = await in_thread(dialog)
    assert not raw.violations, raw.violations
