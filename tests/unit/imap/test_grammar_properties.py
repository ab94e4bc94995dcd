"""Grammar properties: commands generated from strategies, written the way a client may write
them (atoms, quoted strings, synchronizing and non-synchronizing literals), framed by the
CommandParser and parsed back to the same value; arbitrary bytes never raise."""

from __future__ import annotations

import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.imap.protocol import mutf7
from services.store.imap.protocol.command import (
    Append,
    Command,
    CopyMove,
    Fetch,
    FetchAtt,
    Login,
    MailboxArg,
    ParseError,
    Rename,
    Search,
    SearchKey,
    Section,
    Select,
    SequenceSet,
    Status,
    Store,
)
from services.store.imap.protocol.grammar import (
    MONTHS,
    SEARCH_DATE_KEYS,
    SEARCH_FLAG_KEYS,
    SEARCH_STRING_KEYS,
    STATUS_ITEMS,
    parse_command,
)
from services.store.imap.protocol.parser import (
    CommandParser,
    Complete,
    LiteralWanted,
    NeedMore,
    Refused,
)
from services.store.imap.protocol.sequence import MAX_NUMBER, format_sequence_set

BOUNDED = settings(max_examples=200, deadline=None)
ATOM_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$&'+,-./:;<=>?@^_`|~"
)

# -- a client-side writer ---------------------------------------------------------------------


def write_string(draw: st.DrawFn, value: bytes, atom_ok: bool = True) -> bytes:
    """One of the ways a client may send `value`: atom, quoted string, or a literal."""
    choices = ["sync", "nonsync"]
    if b"\r" not in value and b"\n" not in value and b"\0" not in value:
        choices.append("quoted")
    text = value.decode("latin-1")
    if atom_ok and value and set(text) <= ATOM_SAFE and value.upper() != b"NIL":
        choices.append("atom")
    how = draw(st.sampled_from(choices))
    if how == "atom":
        return value
    if how == "quoted":
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    plus = b"+" if how == "nonsync" else b""
    return b"{%d%s}\r\n" % (len(value), plus) + value


def write_mailbox(draw: st.DrawFn, name: str) -> bytes:
    return write_string(draw, mutf7.encode(name).encode("ascii"))


def write_date(day: datetime.date) -> bytes:
    return f"{day.day}-{MONTHS[day.month - 1].title()}-{day.year:04d}".encode()


def write_set(s: SequenceSet) -> bytes:
    return format_sequence_set(s).encode()


def write_section(section: Section) -> bytes:
    words = [str(p) for p in section.part] + ([section.text] if section.text else [])
    out = ".".join(words).encode()
    if section.fields:
        out += b" (" + b" ".join(f.encode() for f in section.fields) + b")"
    return b"[" + out + b"]"


def write_att(att: FetchAtt) -> bytes:
    if att.section is None:
        return att.name.encode()
    out = (b"BODY.PEEK" if att.peek else b"BODY") + write_section(att.section)
    if att.partial:
        out += b"<%d.%d>" % att.partial
    return out


def write_key(draw: st.DrawFn, key: SearchKey) -> bytes:
    kind = key.kind.encode()
    if key.kind == "AND":
        return b"(" + b" ".join(write_key(draw, k) for k in key.children) + b")"
    if key.kind in ("NOT", "OR"):
        return kind + b" " + b" ".join(write_key(draw, k) for k in key.children)
    if key.kind == "SEQ":
        assert isinstance(key.value, SequenceSet)
        return write_set(key.value)
    if isinstance(key.value, SequenceSet):
        return kind + b" " + write_set(key.value)
    if isinstance(key.value, datetime.date):
        return kind + b" " + write_date(key.value)
    if isinstance(key.value, int):
        return kind + b" %d" % key.value
    if key.kind in ("KEYWORD", "UNKEYWORD"):
        return kind + b" " + str(key.value).encode()
    if key.kind == "HEADER":
        assert key.name is not None and isinstance(key.value, str)
        return (kind + b" " + write_string(draw, key.name.encode()) + b" "
                + write_string(draw, key.value.encode()))
    if isinstance(key.value, str):
        return kind + b" " + write_string(draw, key.value.encode())
    return kind


def frame_and_parse(data: bytes) -> Command | ParseError:
    parser = CommandParser(max_line=1 << 20, max_literal=1 << 20)
    parser.feed(data)
    while True:
        event = parser.next_event()
        if isinstance(event, Complete):
            assert parser.next_event() == NeedMore()
            return parse_command(event.raw)
        assert isinstance(event, LiteralWanted), event


# -- strategies -------------------------------------------------------------------------------

tags = st.text(alphabet=sorted(ATOM_SAFE - {"+"}), min_size=1, max_size=8)
bounds = st.one_of(st.none(), st.integers(1, MAX_NUMBER))
sequence_sets = st.lists(st.tuples(bounds, bounds), min_size=1, max_size=5).map(
    lambda r: SequenceSet(tuple(r))
)
mailbox_names = st.text(max_size=20)
texts = st.text(max_size=20)
# RFC 3501 strings hold no NUL; only a search string is refused for one (the index cannot
# look for it), the others are taken as they come.
search_texts = st.text(st.characters(exclude_characters="\x00"), max_size=20)
keywords = st.text(alphabet=sorted(ATOM_SAFE), min_size=1, max_size=10)
system_flags = st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"])
flags = st.one_of(system_flags, keywords)
header_names = st.text(alphabet=sorted(ATOM_SAFE - {"."}), min_size=1, max_size=12).map(
    str.upper
)
dates = st.dates(min_value=datetime.date(1, 1, 1))


def normal_mailbox(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


@st.composite
def sections(draw: st.DrawFn) -> Section:
    part = tuple(draw(st.lists(st.integers(1, 30), max_size=3)))
    choices: list[str | None] = [None, "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"]
    if part:
        choices.append("MIME")
    text = draw(st.sampled_from(choices))
    if text is None and not part:
        return Section()
    fields = tuple(draw(st.lists(header_names, min_size=1, max_size=3))) if (
        text and text.startswith("HEADER.FIELDS")) else ()
    return Section(part, text, fields)


simple_atts = st.sampled_from(
    ["ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
     "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID", "MODSEQ"]
).map(FetchAtt)
section_atts = st.builds(
    lambda s, peek, partial: FetchAtt("BODY[]", s, peek, partial),
    sections(),
    st.booleans(),
    st.one_of(st.none(), st.tuples(st.integers(0, MAX_NUMBER), st.integers(1, MAX_NUMBER))),
)
fetch_atts = st.one_of(simple_atts, section_atts)

leaf_keys = st.one_of(
    st.sampled_from(sorted(SEARCH_FLAG_KEYS)).map(SearchKey),
    st.builds(SearchKey, st.sampled_from(sorted(SEARCH_STRING_KEYS)), search_texts),
    st.builds(SearchKey, st.sampled_from(sorted(SEARCH_DATE_KEYS)), dates),
    st.builds(SearchKey, st.sampled_from(["KEYWORD", "UNKEYWORD"]), flags),
    st.builds(SearchKey, st.sampled_from(["LARGER", "SMALLER"]), st.integers(0, MAX_NUMBER)),
    st.builds(SearchKey, st.just("MODSEQ"), st.integers(0, 2**63 - 1)),
    st.builds(SearchKey, st.sampled_from(["UID", "SEQ"]), sequence_sets),
    st.builds(lambda n, v: SearchKey("HEADER", v, n), header_names, search_texts),
)
search_keys = st.recursive(
    leaf_keys,
    lambda inner: st.one_of(
        inner.map(lambda k: SearchKey("NOT", children=(k,))),
        st.tuples(inner, inner).map(lambda ks: SearchKey("OR", children=ks)),
        st.lists(inner, min_size=1, max_size=3).map(
            lambda ks: SearchKey("AND", children=tuple(ks))
        ),
    ),
    max_leaves=8,
)


@st.composite
def commands(draw: st.DrawFn) -> tuple[Command, bytes]:
    """A command value and one way of writing it on the wire."""
    tag = draw(tags)
    kind = draw(st.sampled_from(
        ["LOGIN", "SELECT", "CREATE", "RENAME", "STATUS", "APPEND", "FETCH", "STORE", "COPY",
         "SEARCH"]
    ))
    uid = False
    if kind == "LOGIN":
        user, password = draw(texts), draw(texts)
        args: object = Login(user, password)
        wire = (write_string(draw, user.encode()) + b" " + write_string(draw, password.encode()))
    elif kind == "SELECT":
        name, condstore = draw(mailbox_names), draw(st.booleans())
        kind = draw(st.sampled_from(["SELECT", "EXAMINE"]))
        args = Select(normal_mailbox(name), condstore)
        wire = write_mailbox(draw, name) + (b" (CONDSTORE)" if condstore else b"")
    elif kind == "CREATE":
        name = draw(mailbox_names)
        kind = draw(st.sampled_from(["CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE"]))
        args, wire = MailboxArg(normal_mailbox(name)), write_mailbox(draw, name)
    elif kind == "RENAME":
        old, new = draw(mailbox_names), draw(mailbox_names)
        args = Rename(normal_mailbox(old), normal_mailbox(new))
        wire = write_mailbox(draw, old) + b" " + write_mailbox(draw, new)
    elif kind == "STATUS":
        name = draw(mailbox_names)
        items = tuple(draw(st.lists(st.sampled_from(sorted(STATUS_ITEMS)), min_size=1)))
        args = Status(normal_mailbox(name), items)
        wire = write_mailbox(draw, name) + b" (" + " ".join(items).encode() + b")"
    elif kind == "APPEND":
        name, message = draw(mailbox_names), draw(st.binary(max_size=50))
        message_flags = tuple(draw(st.lists(flags, max_size=3)))
        when = draw(st.one_of(st.none(), st.datetimes(
            min_value=datetime.datetime(1000, 1, 1), timezones=st.just(datetime.UTC)
        ).map(lambda d: d.replace(microsecond=0))))
        args = Append(normal_mailbox(name), message, message_flags, when)
        wire = write_mailbox(draw, name)
        if message_flags or draw(st.booleans()):
            wire += b" (" + " ".join(message_flags).encode() + b")"
        if when is not None:
            wire += when.strftime(' "%d-%b-%Y %H:%M:%S +0000"').encode()
        plus = draw(st.sampled_from([b"", b"+"]))
        wire += b" {%d%s}\r\n" % (len(message), plus) + message
    elif kind == "FETCH":
        s, atts = draw(sequence_sets), tuple(draw(st.lists(fetch_atts, min_size=1, max_size=4)))
        changedsince = draw(st.one_of(st.none(), st.integers(1, 2**63 - 1)))
        uid = draw(st.booleans())
        args = Fetch(s, atts, changedsince)
        wire = write_set(s) + b" (" + b" ".join(write_att(a) for a in atts) + b")"
        if changedsince is not None:
            wire += b" (CHANGEDSINCE %d)" % changedsince
    elif kind == "STORE":
        s, mode, silent = draw(sequence_sets), draw(st.sampled_from(["", "+", "-"])), draw(
            st.booleans())
        store_flags = tuple(draw(st.lists(flags, max_size=4)))
        uid = draw(st.booleans())
        args = Store(s, mode, silent, store_flags)
        wire = write_set(s) + b" " + mode.encode() + (b"FLAGS.SILENT" if silent else b"FLAGS")
        wire += b" (" + " ".join(store_flags).encode() + b")"
    elif kind == "COPY":
        s, name = draw(sequence_sets), draw(mailbox_names)
        kind, uid = draw(st.sampled_from(["COPY", "MOVE"])), draw(st.booleans())
        args = CopyMove(s, normal_mailbox(name))
        wire = write_set(s) + b" " + write_mailbox(draw, name)
    else:
        keys = tuple(draw(st.lists(search_keys, min_size=1, max_size=4)))
        charset = draw(st.sampled_from([None, "UTF-8"]))
        uid = draw(st.booleans())
        args = Search(SearchKey("AND", children=keys), charset)
        wire = (b"CHARSET UTF-8 " if charset else b"") + b" ".join(
            write_key(draw, k) for k in keys)
    prefix = tag.encode() + (b" UID " if uid else b" ") + kind.encode() + b" "
    return Command(tag, kind, args, uid), prefix + wire + b"\r\n"


# -- properties -------------------------------------------------------------------------------


@BOUNDED
@given(commands())
def test_written_commands_parse_back(case: tuple[Command, bytes]) -> None:
    command, wire = case
    assert frame_and_parse(wire) == command


some_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(
        [b"a ", b"UID ", b"FETCH ", b"SEARCH ", b"LIST ", b"SELECT ", b"STORE ", b"APPEND ",
         b"(", b")", b"[", b"]", b"<", b">", b".", b" ", b"1", b"*", b":", b",", b'"', b"\\",
         b"{3}\r\nabc", b"{0+}\r\n", b"NOT ", b"OR ", b"BODY", b"HEADER.FIELDS", b"\xc3",
         b"&", b"-", b"NIL", b"~{1}\r\nx", b"1-Feb-1994", b"\r\n", b"CHARSET "]
    ), max_size=30).map(b"".join),
)


@BOUNDED
@given(some_bytes, st.lists(st.integers(0, 300), max_size=6))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    parser = CommandParser(max_line=120, max_literal=40)
    previous = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        parser.feed(data[previous:cut])
        previous = max(previous, cut)
        while not isinstance(event := parser.next_event(), NeedMore):
            assert isinstance(event, Complete | LiteralWanted | Refused)
            if isinstance(event, Complete):
                result = parse_command(event.raw)
                assert isinstance(result, Command | ParseError)
