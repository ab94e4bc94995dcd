"""The test-only response validator (tests/imapgrammar.py) itself: it accepts the examples of
the RFCs and rejects each kind of violation it is meant to catch, and every FETCH response the
pure renderer gives for a hostile message is valid."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from services.store.imap import responses
from services.store.imap.protocol import fetch, mime
from tests.imapgrammar import GrammarError, check_response
from tests.unit.imap.hostile_mime import fetch_atts, hostile_message, info_for

VALID = [
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n",
    b"a1 OK [READ-WRITE] SELECT completed\r\n",
    b"a1 NO [TRYCREATE] No such mailbox\r\n",
    b"a1 OK [APPENDUID 38505 3955] APPEND completed\r\n",
    b"a1 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n",
    b"a1 OK [MODIFIED 7,9] Conditional STORE failed\r\n",
    b"a1 NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset\r\n",
    b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n",
    b"* OK [HIGHESTMODSEQ 715194045007] Highest\r\n",
    b"* CAPABILITY IMAP4rev1 IDLE\r\n",
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Junk)\r\n",
    b"* 172 EXISTS\r\n", b"* 0 RECENT\r\n", b"* 44 EXPUNGE\r\n",
    b'* LIST (\\Noselect) "/" ""\r\n',
    b'* LIST (\\HasNoChildren \\Sent) "/" "Sent Items"\r\n',
    b'* LIST (\\Marked \\NoInferiors) NIL inbox\r\n',
    b'* LIST (\\NonExistent \\HasChildren) "/" Foo ("CHILDINFO" ("SUBSCRIBED"))\r\n',
    b'* LIST () "/" {3}\r\na"b\r\n',
    b"* LSUB () \".\" #news.comp.mail.misc\r\n",
    b"* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292 HIGHESTMODSEQ 0)\r\n",
    b"* STATUS INBOX (APPENDLIMIT 257890)\r\n", b"* STATUS x (APPENDLIMIT NIL)\r\n",
    b"* SEARCH 2 3 6\r\n", b"* SEARCH\r\n", b"* SEARCH 2 5 6 7 11 (MODSEQ 917162500)\r\n",
    b"* SORT 2 84 882\r\n",
    b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n',
    b'* ESEARCH (TAG "a") UID ALL 4:18,21,28 MODSEQ 9\r\n',
    b"* THREAD (166)(167)(168)(169)(172)(170)(171)(173)(174 (175)(176)(178)(181)(180))\r\n",
    b"* THREAD ((3)(5))(2)\r\n", b"* THREAD\r\n",
    b"* ENABLED CONDSTORE QRESYNC\r\n", b"* ENABLED\r\n",
    b'* ID ("name" "Cyrus" "version" "1.5" "os" NIL)\r\n', b"* ID NIL\r\n",
    b'* NAMESPACE (("" "/")) NIL NIL\r\n',
    b'* NAMESPACE (("" "/")("#mh/" "/" "X-PARAM" ("FLAG1" "FLAG2"))) NIL (("" "."))\r\n',
    b'* QUOTA "" (STORAGE 10 512)\r\n', b'* QUOTAROOT INBOX ""\r\n', b"* QUOTAROOT comp\r\n",
    b"* VANISHED (EARLIER) 41,43:116,118,120:211,214:540\r\n", b"* VANISHED 405\r\n",
    b"+ Ready for literal data\r\n", b"+ \r\n",
    b"+ YGgGCSqGSIb3EgECAgIBAAD/////6jcyG4GE3KkTzmeTxmPvFd4=\r\n",
    b"* BYE Autologout; idle for too long\r\n",
    b'* 12 FETCH (FLAGS (\\Seen) INTERNALDATE " 1-Jul-1996 02:44:25 -0700" RFC822.SIZE 4286'
    b' UID 4 MODSEQ (12121231000))\r\n',
    b'* 12 FETCH (ENVELOPE ("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg"'
    b' (("Terry Gray" NIL "gray" "cac.washington.edu")) NIL NIL'
    b' ((NIL NIL "imap" "cac.washington.edu")) ((NIL NIL "minutes" "CNRI.Reston.VA.US")'
    b'("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL "<B27397-0100000@cac.washington.edu>"))'
    b"\r\n",
    b"* 1 FETCH (ENVELOPE (NIL NIL ((NIL NIL \"group\" NIL)(NIL NIL \"a\" \"b\")"
    b"(NIL NIL NIL NIL)) NIL NIL NIL NIL NIL NIL NIL))\r\n",
    b'* 12 FETCH (BODY ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92))\r\n',
    b'* 1 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23'
    b' NIL NIL NIL NIL)("APPLICATION" "OCTET-STREAM" ("NAME" "a.bin") "<id>" "d" "BASE64" 4554'
    b' NIL ("ATTACHMENT" ("FILENAME" "a.bin")) ("en" "de") NIL) "MIXED" ("BOUNDARY" "x")'
    b' NIL NIL NIL))\r\n',
    b'* 1 FETCH (BODY ("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 10 (NIL NIL NIL NIL NIL NIL NIL'
    b' NIL NIL NIL) ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 2 1) 3))\r\n',
    b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\n",
    b"* 1 FETCH (BODY[1.2.HEADER.FIELDS (FROM \"X A\")]<0> {0}\r\n UID 3)\r\n",
    b"* 1 FETCH (BODY[1.MIME] NIL RFC822.HEADER \"\" BODY[2] {1}\r\n\xff)\r\n",
]

INVALID = [
    (b"* OK ready", "CRLF"),
    (b"* OK \r\n", "empty text"),
    (b"a1 OK caf\xc3\xa9\r\n", "TEXT-CHAR"),
    (b"* CAPABILITY IDLE\r\n", "IMAP4rev1"),
    (b"* 0 EXPUNGE\r\n", "nz-number"),
    (b"* 1 FETCH (UID 0)\r\n", "nz-number"),
    (b"* 1 FETCH ()\r\n", "msg-att"),
    (b"* 1 FETCH (MODSEQ (0))\r\n", "mod-sequence-value"),
    (b"* 1 FETCH (MODSEQ (9223372036854775808))\r\n", "out of range"),
    (b"* OK [HIGHESTMODSEQ 0] x\r\n", "mod-sequence-value"),
    (b"* 1 FETCH (RFC822.SIZE 4294967296)\r\n", "out of range"),
    (b'* 1 FETCH (ENVELOPE ("a\rb" NIL NIL NIL NIL NIL NIL NIL NIL NIL))\r\n', "QUOTED-CHAR"),
    (b'* 1 FETCH (ENVELOPE ("caf\xc3\xa9" NIL NIL NIL NIL NIL NIL NIL NIL NIL))\r\n',
     "QUOTED-CHAR"),
    (b'* 1 FETCH (ENVELOPE ("a\\b" NIL NIL NIL NIL NIL NIL NIL NIL NIL))\r\n', "QUOTED-CHAR"),
    (b'* 1 FETCH (ENVELOPE ("a"b" NIL NIL NIL NIL NIL NIL NIL NIL NIL))\r\n', "envelope"),
    (b"* 1 FETCH (ENVELOPE (NIL NIL () NIL NIL NIL NIL NIL NIL NIL))\r\n", "empty address"),
    (b"* 1 FETCH (ENVELOPE (NIL NIL ((NIL NIL \"g\" NIL)) NIL NIL NIL NIL NIL NIL NIL))\r\n",
     "group not ended"),
    (b"* 1 FETCH (BODY[] {60}\r\nab\r\nc)\r\n", "announces 60 octets"),
    (b"* 1 FETCH (BODY[] {4}\r\nab\r\nc)\r\n", "msg-att"),
    (b"* 1 FETCH (BODY[] {3}\r\na\x00b)\r\n", "NUL"),
    (b"* 1 FETCH (BODY[] ~{1}\r\na)\r\n", "literal8"),
    (b'* 1 FETCH (BODY ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3))\r\n', "body-type-text"),
    (b'* 1 FETCH (BODY ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 1 NIL))\r\n', "non-extensible"),
    (b'* 1 FETCH (BODYSTRUCTURE ("TEXT" "PLAIN" () NIL NIL "7BIT" 3 1))\r\n', "body-fld-param"),
    (b'* 1 FETCH (BODYSTRUCTURE ("MIXED"))\r\n', "media-type"),
    (b'* LIST (\\Noselect \\Marked) "/" a\r\n', "sflag"),
    (b'* LIST () "//" a\r\n', "delimiter"),
    (b'* LIST () "/" caf\xc3\xa9\r\n', "CRLF"),
    (b'* LIST () "/" {5}\r\ncaf\xc3\xa9\r\n', "modified UTF-7"),
    (b"* THREAD ((3))\r\n", "thread-nested"),
    (b"* THREAD (1 (3))\r\n", "thread-nested"),
    (b"* VANISHED 1:*\r\n", "known-uids"),
    (b"* STATUS a (UIDNEXT 0)\r\n", "nz-number"),
    (b"* FLAGS (\\Seen foo%)\r\n", "flag-list"),
    (b"* 3 FETCH (FLAGS (\\Seen) INTERNALDATE \"7-Jul-1996 02:44:25 -0700\")\r\n", "date-time"),
    (b"* ID (\"a\" \"b\" \"c\")\r\n", "id-params-list"),
    (b"* NAMESPACE ((\"\" \"/\")) NIL\r\n", "Namespace-Response"),
]


@pytest.mark.parametrize("line", VALID)
def test_valid_responses_pass(line: bytes) -> None:
    check_response(line, greeting=line.startswith(b"* OK [CAPABILITY"))


@pytest.mark.parametrize(("line", "why"), INVALID)
def test_each_violation_is_named(line: bytes, why: str) -> None:
    with pytest.raises(GrammarError, match=why):
        check_response(line)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_message())
def test_fetch_of_a_hostile_message_is_valid(raw: bytes) -> None:
    atts = fetch_atts(mime.parse_message(raw))
    check_response(fetch.render_fetch(1, info_for(raw), atts, raw))


REPLIES = [value for value in vars(responses).values() if isinstance(value, responses.Reply)]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda reply: f"{reply.status} {reply.text}")
def test_every_reply_constant_is_valid_where_it_may_go(reply: responses.Reply) -> None:
    if reply.status != "BYE":  # BYE is never tagged (RFC 3501 7.1.5)
        check_response(reply.tagged("a1"))
    check_response(reply.untagged())
