"""The command grammar, table-driven: each command shape, and the syntax errors it refuses."""

from __future__ import annotations

import datetime

import pytest

from services.store.imap.protocol.command import (
    Append,
    Authenticate,
    Command,
    CopyMove,
    Enable,
    Fetch,
    FetchAtt,
    Id,
    ListArgs,
    Login,
    MailboxArg,
    ParseError,
    QresyncParams,
    QuotaRoot,
    Rename,
    Search,
    SearchKey,
    Section,
    Select,
    SequenceSet,
    Sort,
    Status,
    Store,
    Thread,
    UidExpunge,
)
from services.store.imap.protocol.grammar import (
    announces_appended_message,
    known_charset,
    parse_command,
)
from services.store.imap.protocol.parser import RawCommand


def parse(line: bytes, *literals: bytes) -> Command | ParseError:
    return parse_command(RawCommand("t", line, list(literals)))


def seq(*ranges: tuple[int | None, int | None]) -> SequenceSet:
    return SequenceSet(tuple(ranges))


def one(n: int) -> SequenceSet:
    return seq((n, n))


def AND(*children: SearchKey) -> SearchKey:  # noqa: N802 - reads like the grammar
    return SearchKey("AND", children=children)


FLAGS, INTERNALDATE, SIZE = FetchAtt("FLAGS"), FetchAtt("INTERNALDATE"), FetchAtt("RFC822.SIZE")
UTC = datetime.UTC


COMMANDS: list[tuple] = [
        (b"a1 CAPABILITY", Command("a1", "CAPABILITY")),
        (b"a1 noop", Command("a1", "NOOP")),
        (b"a1 NOOP  ", Command("a1", "NOOP")),  # trailing spaces tolerated
        (b"a.b-c_~ LOGOUT", Command("a.b-c_~", "LOGOUT")),
        (b"x STARTTLS", Command("x", "STARTTLS")),
        (b"x CHECK", Command("x", "CHECK")),
        (b"x CLOSE", Command("x", "CLOSE")),
        (b"x UNSELECT", Command("x", "UNSELECT")),
        (b"x EXPUNGE", Command("x", "EXPUNGE")),
        (b"x IDLE", Command("x", "IDLE")),
        (b"x NAMESPACE", Command("x", "NAMESPACE")),
        # AUTHENTICATE with and without SASL-IR (RFC 4959)
        (b"t AUTHENTICATE plain", Command("t", "AUTHENTICATE", Authenticate("PLAIN"))),
        (b"t AUTHENTICATE PLAIN =", Command("t", "AUTHENTICATE", Authenticate("PLAIN", b""))),
        (
            b"t AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==",
            Command("t", "AUTHENTICATE", Authenticate("PLAIN", b"\0alice\0secret")),
        ),
        # LOGIN: atoms, quoted strings with escapes, 8-bit quoted as UTF-8
        (b"t LOGIN alice secret", Command("t", "LOGIN", Login("alice", "secret"))),
        (
            b't LOGIN "al ice" "p\\"w\\\\d"',
            Command("t", "LOGIN", Login("al ice", 'p"w\\d')),
        ),
        (b't LOGIN a "p\xc3\xa4ss"', Command("t", "LOGIN", Login("a", "päss"))),
        (b"t LOGIN a]b x", Command("t", "LOGIN", Login("a]b", "x"))),
        # SELECT / EXAMINE
        (b"t SELECT inbox", Command("t", "SELECT", Select("INBOX"))),
        (b't EXAMINE "InBoX"', Command("t", "EXAMINE", Select("INBOX"))),
        (b"t SELECT Entw&APw-rfe", Command("t", "SELECT", Select("Entwürfe"))),
        (b"t SELECT INBOX/sub", Command("t", "SELECT", Select("INBOX/sub"))),
        (b"t SELECT inbox/sub", Command("t", "SELECT", Select("inbox/sub"))),
        (b"t SELECT x (condstore)", Command("t", "SELECT", Select("x", condstore=True))),
        (
            b"t SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
            Command("t", "SELECT", Select("INBOX", qresync=QresyncParams(
                67890007, 20050715194045000, seq((41, 41), (43, 211), (214, 541))))),
        ),
        (
            b"t EXAMINE INBOX (QRESYNC (67890007 90060115194045000 41:211,214:541 "
            b"(1:5,9 100:105,200)) CONDSTORE)",
            Command("t", "EXAMINE", Select("INBOX", True, QresyncParams(
                67890007, 90060115194045000, seq((41, 211), (214, 541)),
                (seq((1, 5), (9, 9)), seq((100, 105), (200, 200)))))),
        ),
        (
            b"t SELECT INBOX (QRESYNC (1 2 (1 5)))",
            Command("t", "SELECT", Select("INBOX", qresync=QresyncParams(
                1, 2, None, (one(1), one(5))))),
        ),
        # CREATE (with RFC 6154 USE), DELETE, RENAME, (UN)SUBSCRIBE, GETQUOTA(ROOT)
        (b"t CREATE foo/bar", Command("t", "CREATE", MailboxArg("foo/bar"))),
        (
            b"t CREATE Spam (USE (\\junk \\Archive \\X-Other))",
            Command("t", "CREATE", MailboxArg("Spam", ("\\Junk", "\\Archive", "\\X-Other"))),
        ),
        (b"t DELETE {3}\r\n", Command("t", "DELETE", MailboxArg("foo")), [b"foo"]),
        (b"t RENAME a &ZeVnLIqe-", Command("t", "RENAME", Rename("a", "日本語"))),
        (b"t SUBSCRIBE INBOX", Command("t", "SUBSCRIBE", MailboxArg("INBOX"))),
        (b't UNSUBSCRIBE "a b"', Command("t", "UNSUBSCRIBE", MailboxArg("a b"))),
        (b"t GETQUOTAROOT inbox", Command("t", "GETQUOTAROOT", MailboxArg("INBOX"))),
        (b't GETQUOTA ""', Command("t", "GETQUOTA", QuotaRoot(""))),
        # LIST, basic and RFC 5258 / 5819 / 6154
        (b't LIST "" *', Command("t", "LIST", ListArgs("", ("*",)))),
        (b"t LIST ~/Mail %", Command("t", "LIST", ListArgs("~/Mail", ("%",)))),
        (b't LIST "" "Entw&APw-rfe/*"', Command("t", "LIST", ListArgs("", ("Entwürfe/*",)))),
        # RFC 5258 3: even empty selection options or RETURN make an extended LIST.
        (b"t LIST () x inbox", Command("t", "LIST", ListArgs("x", ("inbox",), extended=True))),
        (b't LIST "" (x)', Command("t", "LIST", ListArgs("", ("x",), extended=True))),
        (
            (b't LIST (subscribed RECURSIVEMATCH) "" (INBOX "a/%" {2}\r\n) '
             b"RETURN (CHILDREN special-use STATUS (MESSAGES UNSEEN))"),
            Command("t", "LIST", ListArgs(
                "", ("INBOX", "a/%", "b*"), frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
                frozenset({"CHILDREN", "SPECIAL-USE"}), ("MESSAGES", "UNSEEN"), True)),
            [b"b*"],
        ),
        (
            b'LIST "" % RETURN ()',
            ParseError("LIST", "expected a command name"),  # tag LIST, command ""
        ),
        (b't LIST "" % RETURN ()', Command("t", "LIST", ListArgs("", ("%",), extended=True))),
        (b't LSUB "" *', Command("t", "LSUB", ListArgs("", ("*",)))),
        # STATUS
        (
            b"t STATUS inbox (messages UIDNEXT UIDVALIDITY UNSEEN RECENT HIGHESTMODSEQ SIZE)",
            Command("t", "STATUS", Status("INBOX", (
                "MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT", "HIGHESTMODSEQ",
                "SIZE"))),
        ),
        # COPY, MOVE, UID EXPUNGE
        (b"t COPY 2:4 Trash", Command("t", "COPY", CopyMove(seq((2, 4)), "Trash"))),
        (b"t UID MOVE 1,5:* Junk", Command("t", "MOVE", CopyMove(seq((1, 1), (5, None)), "Junk"),
                                           uid=True)),
        (b"t UID EXPUNGE 3:1", Command("t", "EXPUNGE", UidExpunge(seq((3, 1))), uid=True)),
        # ENABLE, ID
        (b"t ENABLE condstore QRESYNC", Command("t", "ENABLE", Enable(("CONDSTORE", "QRESYNC")))),
        (b"t ID NIL", Command("t", "ID", Id(None))),
        (b"t ID ()", Command("t", "ID", Id({}))),
        (
            b't ID ("name" "sodr" "version" "19.34" "vendor" NIL)',
            Command("t", "ID", Id({"name": "sodr", "version": "19.34", "vendor": None})),
        ),
]


@pytest.mark.parametrize(
    ("line", "expected", "literals"), [c if len(c) == 3 else (*c, []) for c in COMMANDS]
)
def test_commands(
    line: bytes, expected: Command | ParseError, literals: list[bytes]
) -> None:
    assert parse(line, *literals) == expected


def test_append() -> None:
    message = b"From: a@b\r\n\r\nhi\r\n"
    assert parse(b"t APPEND INBOX {17}\r\n", message) == Command(
        "t", "APPEND", Append("INBOX", message)
    )
    assert parse(
        b't APPEND Sent (\\Seen $Forwarded) " 7-Jul-1996 02:44:25 -0700" {17+}\r\n', message
    ) == Command("t", "APPEND", Append(
        "Sent", message, ("\\Seen", "$Forwarded"),
        datetime.datetime(1996, 7, 7, 2, 44, 25,
                          tzinfo=datetime.timezone(-datetime.timedelta(hours=7))),
    ))
    assert parse(b't APPEND x () "17-Jul-1996 02:44:25 +0000" {0}\r\n', b"") == Command(
        "t", "APPEND", Append("x", b"", (), datetime.datetime(1996, 7, 17, 2, 44, 25, tzinfo=UTC))
    )


@pytest.mark.parametrize(
    ("args", "atts"),
    [
        (b"1 FAST", (FLAGS, INTERNALDATE, SIZE)),
        (b"1 all", (FLAGS, INTERNALDATE, SIZE, FetchAtt("ENVELOPE"))),
        (b"1 FULL", (FLAGS, INTERNALDATE, SIZE, FetchAtt("ENVELOPE"), FetchAtt("BODY"))),
        (b"1 flags", (FLAGS,)),
        (
            b"1 (UID RFC822 RFC822.HEADER RFC822.TEXT RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY "
            b"MODSEQ INTERNALDATE)",
            tuple(FetchAtt(n) for n in (
                "UID", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "RFC822.SIZE", "ENVELOPE",
                "BODYSTRUCTURE", "BODY", "MODSEQ", "INTERNALDATE")),
        ),
        (b"1 BODY[]", (FetchAtt("BODY[]", Section()),)),
        (b"1 body.peek[]<0.1024>", (FetchAtt("BODY[]", Section(), True, (0, 1024)),)),
        (b"1 BODY[TEXT]", (FetchAtt("BODY[]", Section(text="TEXT")),)),
        (b"1 BODY[1.2.3]", (FetchAtt("BODY[]", Section((1, 2, 3))),)),
        (b"1 BODY[2.MIME]", (FetchAtt("BODY[]", Section((2,), "MIME")),)),
        (b"1 BODY[3.header]", (FetchAtt("BODY[]", Section((3,), "HEADER")),)),
        (
            b"1 (BODY.PEEK[HEADER.FIELDS (From \"To\" list-id)] BODY[1.HEADER.FIELDS.NOT (X)])",
            (
                FetchAtt("BODY[]", Section((), "HEADER.FIELDS", ("FROM", "TO", "LIST-ID")), True),
                FetchAtt("BODY[]", Section((1,), "HEADER.FIELDS.NOT", ("X",))),
            ),
        ),
    ],
)
def test_fetch_items(args: bytes, atts: tuple[FetchAtt, ...]) -> None:
    assert parse(b"t FETCH " + args) == Command("t", "FETCH", Fetch(one(1), atts))


def test_fetch_modifiers() -> None:
    assert parse(b"t FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)") == Command(
        "t", "FETCH", Fetch(seq((1, None)), (FLAGS,), changedsince=12345)
    )
    assert parse(b"t UID FETCH 1:* FLAGS (VANISHED CHANGEDSINCE 9)") == Command(
        "t", "FETCH", Fetch(seq((1, None)), (FLAGS,), 9, True), uid=True
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (b"1 FLAGS \\Seen", Store(one(1), "", False, ("\\Seen",))),
        (b"1 +FLAGS (\\seen \\DELETED)", Store(one(1), "+", False, ("\\Seen", "\\Deleted"))),
        (b"1 -flags.silent $Junk", Store(one(1), "-", True, ("$Junk",))),
        (b"1 FLAGS ()", Store(one(1), "", False, ())),
        (b"1 +FLAGS \\Flagged \\Answered foo",
         Store(one(1), "+", False, ("\\Flagged", "\\Answered", "foo"))),
        (b"1 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)",
         Store(one(1), "+", True, ("\\Deleted",), 320162338)),
    ],
)
def test_store(args: bytes, expected: Store) -> None:
    assert parse(b"t STORE " + args) == Command("t", "STORE", expected)


def k(kind: str, value: object = None, name: str | None = None) -> SearchKey:
    return SearchKey(kind, value, name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (b"ALL", Search(AND(k("ALL")))),
        (
            b"answered DELETED DRAFT FLAGGED NEW OLD RECENT SEEN UNANSWERED UNDELETED UNDRAFT "
            b"UNFLAGGED UNSEEN",
            Search(AND(*(k(n) for n in (
                "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN",
                "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN")))),
        ),
        (
            b'BCC a CC "b c" FROM {3}\r\n BODY x SUBJECT y TEXT z TO w',
            Search(AND(k("BCC", "a"), k("CC", "b c"), k("FROM", "d e"), k("BODY", "x"),
                       k("SUBJECT", "y"), k("TEXT", "z"), k("TO", "w"))),
        ),
        (
            b'BEFORE 1-Feb-1994 ON "01-feb-1994" SINCE 28-Feb-2024 SENTBEFORE 1-Jan-2000 '
            b"SENTON 2-Mar-2001 SENTSINCE 31-Dec-1999",
            Search(AND(
                k("BEFORE", datetime.date(1994, 2, 1)), k("ON", datetime.date(1994, 2, 1)),
                k("SINCE", datetime.date(2024, 2, 28)), k("SENTBEFORE", datetime.date(2000, 1, 1)),
                k("SENTON", datetime.date(2001, 3, 2)), k("SENTSINCE", datetime.date(1999, 12, 31)),
            )),
        ),
        (
            b'HEADER Message-ID "<a@b>" KEYWORD $Junk UNKEYWORD \\seen LARGER 100 SMALLER 0',
            Search(AND(k("HEADER", "<a@b>", "Message-ID"), k("KEYWORD", "$Junk"),
                       k("UNKEYWORD", "\\Seen"), k("LARGER", 100), k("SMALLER", 0))),
        ),
        (
            b"1:3,5 UID 2:* NOT OR SEEN (FROM x DELETED) NOT NOT 4",
            Search(AND(
                k("SEQ", seq((1, 3), (5, 5))), k("UID", seq((2, None))),
                SearchKey("NOT", children=(SearchKey("OR", children=(
                    k("SEEN"), AND(k("FROM", "x"), k("DELETED")))),)),
                SearchKey("NOT", children=(SearchKey("NOT", children=(k("SEQ", one(4)),)),)),
            )),
        ),
        (b"MODSEQ 620162338", Search(AND(k("MODSEQ", 620162338)))),
        (b'MODSEQ "/flags/\\\\draft" all 0', Search(AND(k("MODSEQ", 0)))),
        (b"charset utf-8 SUBJECT \"caf\xc3\xa9\"", Search(AND(k("SUBJECT", "café")), "UTF-8")),
        (b"SUBJECT \"caf\xc3\xa9\"", Search(AND(k("SUBJECT", "café")))),
        (b"CHARSET ISO-8859-1 TEXT {4}\r\n", Search(AND(k("TEXT", "café")), "ISO-8859-1")),
        (b"CHARSET X-UNKNOWN TEXT x", Search(AND(k("TEXT", "x")), "X-UNKNOWN")),
        (b"RETURN (MIN max COUNT) UNSEEN", Search(AND(k("UNSEEN")), None, ("MIN", "MAX", "COUNT"))),
        (b"RETURN () CHARSET US-ASCII ALL", Search(AND(k("ALL")), "US-ASCII", ("ALL",))),
        (b"((SEEN))", Search(AND(AND(AND(k("SEEN")))))),
    ],
)
def test_search(args: bytes, expected: Search) -> None:
    literals = [b"caf\xe9"] if b"{4}" in args else [b"d e"] if b"{3}" in args else []
    assert parse(b"t SEARCH " + args, *literals) == Command("t", "SEARCH", expected)
    assert parse(b"t UID SEARCH " + args, *literals) == Command("t", "SEARCH", expected, True)


def test_sort_and_thread() -> None:
    assert parse(b"t SORT (REVERSE ARRIVAL subject) UTF-8 SINCE 1-Feb-1994 SEEN") == Command(
        "t", "SORT", Sort(("REVERSE", "ARRIVAL", "SUBJECT"), "UTF-8",
                          AND(k("SINCE", datetime.date(1994, 2, 1)), k("SEEN")))
    )
    assert parse(b"t UID SORT RETURN (MIN) (DATE) us-ascii ALL") == Command(
        "t", "SORT", Sort(("DATE",), "US-ASCII", AND(k("ALL")), ("MIN",)), uid=True
    )
    assert parse(b"t UID THREAD references UTF-8 ALL") == Command(
        "t", "THREAD", Thread("REFERENCES", "UTF-8", AND(k("ALL"))), uid=True
    )
    assert parse(b"t THREAD ORDEREDSUBJECT UTF-8 1:*") == Command(
        "t", "THREAD", Thread("ORDEREDSUBJECT", "UTF-8", AND(k("SEQ", seq((1, None)))))
    )


@pytest.mark.parametrize(
    ("line", "tag", "text"),
    [
        (b"", "*", "missing or invalid tag"),
        (b"+a NOOP", "*", "missing or invalid tag"),
        (b"a{ NOOP", "*", "missing or invalid tag"),
        (b"a", "a", "missing command name"),
        (b"a FROB", "a", "unknown command"),
        (b"a UID NOOP", "a", "UID NOOP is not a UID command"),
        (b"a NOOP x", "a", None),
        (b"a LOGIN alice", "a", None),
        (b"a LOGIN alice \"pw", "a", "unterminated quoted string"),
        (b'a LOGIN alice "p\\w"', "a", None),  # only \" and \\ may be escaped
        (b"a LOGIN {5}\r\n {3}\r\n", "a", "missing literal data"),
        (b"a AUTHENTICATE PLAIN ab$=", "a", None),
        (b"a AUTHENTICATE PLAIN abc", "a", "bad base64 in initial response"),
        (b"a SELECT &Jjo", "a", "mailbox name is not valid modified UTF-7"),
        (b'a SELECT "Entw\xc3\xbcrfe"', "a", "mailbox name is not valid modified UTF-7"),
        (b"a SELECT x (FOO)", "a", "unknown SELECT parameter FOO"),
        (b"a SELECT x ()", "a", "empty list"),
        (b"a CREATE x (FOO (bar))", "a", None),
        (b"a LIST (RECURSIVEMATCH) \"\" *", "a",
         "RECURSIVEMATCH needs the SUBSCRIBED selection option"),
        (b"a LIST (REMOTE RECURSIVEMATCH) \"\" *", "a",
         "RECURSIVEMATCH needs the SUBSCRIBED selection option"),
        (b"a LIST (RECURSIVEMATCH SPECIAL-USE) \"\" *", "a",
         "RECURSIVEMATCH needs the SUBSCRIBED selection option"),
        (b"a LIST (BOGUS) \"\" *", "a", "unknown LIST selection option BOGUS"),
        (b"a LIST \"\" * RETURN (BOGUS)", "a", "unknown LIST return option BOGUS"),
        (b"a STATUS x ()", "a", "empty list"),
        (b"a STATUS x (MESSAGES BOGUS)", "a", "unknown STATUS item BOGUS"),
        (b"a APPEND x \"hello\"", "a", None),
        (b"a APPEND x ~{5}\r\n", "a", "literal8 (BINARY) is not supported"),
        (b'a APPEND x "31-Feb-2020 00:00:00 +0000" {0}\r\n', "a", "bad date-time"),
        (b'a APPEND x "1-Feb-2020 00:00:00 +2400" {0}\r\n', "a", "bad time zone"),
        (b'a APPEND x "01-Jan-0001 00:00:00 +0001" {0}\r\n', "a", "bad date-time"),
        (b'a APPEND x "31-Dec-9999 23:59:59 -0001" {0}\r\n', "a", "bad date-time"),
        (b"a FETCH 0 FLAGS", "a", None),
        (b"a FETCH 1:$ FLAGS", "a", "search result references ($) are not supported"),
        (b"a FETCH 1 (FLAGS", "a", None),
        (b"a FETCH 1 ()", "a", "empty list"),
        (b"a FETCH 1 (FAST)", "a", "unknown FETCH item FAST"),
        (b"a FETCH 1 BINARY[1]", "a", "BINARY is not supported"),
        (b"a FETCH 1 BODY[MIME]", "a", "bad section"),
        (b"a FETCH 1 BODY[0]", "a", "bad section part number"),
        (b"a FETCH 1 BODY[1.]", "a", "bad section"),
        (b"a FETCH 1 BODY[HEADER.FIELDS ()]", "a", "empty list"),
        (b"a FETCH 1 BODY[]<0.0>", "a", None),
        (b"a FETCH 1 BODY.PEEK", "a", "unknown FETCH item BODY.PEEK"),
        (b"a FETCH 1 FLAGS (VANISHED)", "a", "VANISHED needs UID FETCH and CHANGEDSINCE"),
        (b"a UID FETCH 1 FLAGS (VANISHED)", "a", "VANISHED needs UID FETCH and CHANGEDSINCE"),
        (b"a FETCH 1 FLAGS (CHANGEDSINCE 99999999999999999999)", "a", None),
        (b"a STORE 1 FLAGZ (\\Seen)", "a", "expected FLAGS or FLAGS.SILENT"),
        (b"a STORE 1 FLAGS (\\*)", "a", None),
        (b"a EXPUNGE 1", "a", "this command takes no arguments"),
        (b"a SEARCH", "a", None),
        (b"a SEARCH FOO", "a", "unknown search key FOO"),
        (b"a SEARCH RETURN (SAVE) ALL", "a", "unsupported RETURN option SAVE"),
        (b"a SEARCH SINCE 30-Feb-2020", "a", "bad date"),
        (b"a SEARCH SINCE 1-Foo-2020", "a", "bad month"),
        (b"a SEARCH LARGER 4294967296", "a", None),
        (b"a SEARCH ()", "a", "empty list"),
        (b"a SEARCH " + b"(" * 100 + b"ALL" + b")" * 100, "a",
         "search program nested too deeply"),
        (b"a SEARCH " + b"NOT " * 100 + b"ALL", "a", "search program nested too deeply"),
        # Each key is a pass over the mailbox: 16,000 in one line held the store for 14 s.
        (b"a SEARCH" + b" 1:*" * 1001, "a", "more than 1000 search keys"),
        (b"a SEARCH" + b" OR 1 2" * 334, "a", "more than 1000 search keys"),
        # Each pattern is matched against every name: 8,000 held the store for 3 s.
        (b'a LIST "" (' + b" ".join(b"*q%d" % n for n in range(101)) + b")", "a",
         "more than 100 mailbox patterns"),
        # Each header-fields item goes through the whole header: 2,000 held the store 3.6 s.
        (b"a FETCH 1 (" + b" ".join(b"BODY.PEEK[HEADER.FIELDS (N%d)]" % n for n in range(101))
         + b")", "a", "more than 100 FETCH items"),
        (b"a SORT (REVERSE) UTF-8 ALL", "a", "REVERSE needs a sort key"),
        (b"a SORT (BOGUS) UTF-8 ALL", "a", "bad sort criterion BOGUS"),
        (b"a SORT (DATE) ALL", "a", None),
        (b"a THREAD BOGUS UTF-8 ALL", "a", "unsupported threading algorithm BOGUS"),
        (b"a ENABLE", "a", "ENABLE needs a capability"),
        (b"a NOOP\r\nx", "a", None),
        # RFC 3501 2.3.2: a flag-extension is for future standards; none can be stored.
        (b"a STORE 1 +FLAGS (\\Seen \\Bogus)", "a", "unknown system flag \\Bogus"),
        (b"a APPEND INBOX (\\Important) {0}\r\n", "a", "unknown system flag \\Important"),
    ],
)
def test_syntax_errors(line: bytes, tag: str, text: str | None) -> None:
    result = parse(line)
    assert isinstance(result, ParseError), result
    assert result.tag == tag
    if text is not None:
        assert result.text == text
    assert result.text and "\n" not in result.text


def test_a_login_that_is_not_utf8_is_no_syntax_error() -> None:
    """RFC 9051 4.3: a literal holds any octet but NUL; such a login is no account's."""
    result = parse(b'a LOGIN alice "p\xff"')
    assert not isinstance(result, ParseError), result
    assert result.args == Login("alice", "", readable=False)
    assert parse(b"a LOGIN alice pw").args == Login("alice", "pw")


def test_a_search_program_of_the_most_keys_is_taken() -> None:
    result = parse(b"a SEARCH" + b" 1:*" * 1000)
    assert not isinstance(result, ParseError), result


def test_a_list_of_the_most_patterns_is_taken() -> None:
    result = parse(b'a LIST "" (' + b" ".join(b"*q%d" % n for n in range(100)) + b")")
    assert not isinstance(result, ParseError), result


def test_multiappend_is_refused() -> None:
    assert parse(b"a APPEND x {1}\r\n {1}\r\n", b"1", b"2") == ParseError(
        "a", "MULTIAPPEND is not supported"
    )


def test_unused_literal_is_an_error() -> None:
    assert parse(b"a NOOP", b"x") == ParseError("a", "unexpected literal")


def test_literal_length_must_match() -> None:
    assert parse(b"a LOGIN {5}\r\n x", b"bob") == ParseError("a", "literal length mismatch")


@pytest.mark.parametrize(
    ("name", "known"),
    [("UTF-8", True), ("us-ascii", True), ("ISO-8859-1", True), ("KOI8-R", True),
     ("X-BOGUS", False), ("base64", False), ("rot13", False),
     # Python codecs but no charsets: punycode decodes in quadratic time, in the event loop.
     ("punycode", False), ("idna", False), ("unicode-escape", False),
     ("raw_unicode_escape", False), ("UTF-7", True)],
)
def test_known_charset(name: str, known: bool) -> None:
    assert known_charset(name) is known


@pytest.mark.parametrize(("line", "literals"), [
    # The full-text index failed on these (NO [SERVERBUG]): RFC 3501's strings hold no NUL.
    (b"a SEARCH TEXT {3}\r\n", (b"a\x00b",)),
    (b"a UID SEARCH OR SUBJECT x FROM {1}\r\n", (b"\x00",)),
    (b"a SEARCH CHARSET UTF-16LE BODY {4}\r\n", (b"a\x00\x00\x00",)),
    (b"a SEARCH CHARSET UTF-7 BODY +2AA-", ()),  # half a surrogate pair
    (b"a SORT (SUBJECT) UTF-8 HEADER X-A {1}\r\n", (b"\x00",)),
])
def test_search_strings_that_no_search_can_look_for_are_bad(
        line: bytes, literals: tuple[bytes, ...]) -> None:
    result = parse(line, *literals)
    assert isinstance(result, ParseError), result
    assert result.tag == "a"


@pytest.mark.parametrize("line", [
    b"a FETCH 1 BODY[HEADER.FIELDS ({3}\r\n)]",
    b"a UID FETCH 1 BODY.PEEK[1.HEADER.FIELDS.NOT (X-A {3}\r\n)]",
])
def test_header_field_names_with_nul_are_bad(line: bytes) -> None:
    # The FETCH response echoes the name, and no IMAP string may hold NUL (RFC 3501 9 CHAR8).
    assert not isinstance(parse(line, b"a-b"), ParseError)
    result = parse(line, b"a\x00b")
    assert isinstance(result, ParseError), result
    assert result.tag == "a"


@pytest.mark.parametrize(("command", "message"), [
    (b"a APPEND INBOX {10}\r\n", True),
    (b"a append INBOX (\\Seen) \"05-Mar-2026 10:00:00 +0000\" {10}\r\n", True),
    (b"a APPEND {5}\r\n {10}\r\n", True),  # the mailbox name was the first literal
    (b"a APPEND \"a{b\" {10}\r\n", True),
    (b"a APPEND {5}\r\n", False),  # this literal is the mailbox name
    (b"a LOGIN alice {10}\r\n", False),
    (b"a APPENDX INBOX {10}\r\n", False),
    (b"APPEND {10}\r\n", False),
])
def test_announces_appended_message(command: bytes, message: bool) -> None:
    """Which synchronizing literal is an APPEND's message (the session checks its size
    against the quota before sending `+`)."""
    assert announces_appended_message(command) is message
