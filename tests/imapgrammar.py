"""A strict validator of IMAP server responses, for tests only: a recursive-descent parser of
the formal syntax of RFC 3501 section 9 and of the extensions tiermail advertises (RFC 2342
NAMESPACE, 2971 ID, 4315 UIDPLUS, 4731 ESEARCH, 5161 ENABLE, 5256 SORT/THREAD, 5258/5819
LIST-EXTENDED/LIST-STATUS, 6154 SPECIAL-USE, 7162 CONDSTORE/QRESYNC, 9208 QUOTA, 5530 response
codes). The server claims neither UTF8=ACCEPT nor BINARY, so quoted strings are 7-bit and
literal8 is refused.

`check_response(data)` takes one whole response as the server sent it: the line with its
literals inline and the final CRLF (what `Raw.response()` returns, plus CRLF). It raises
`GrammarError` naming the rule broken and where; it returns nothing when the response is valid.
ABNF string literals are case-insensitive (RFC 5234 2.3), so keywords are matched that way.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_NUMBER = 2**32 - 1  # RFC 3501 9: number is an unsigned 32-bit integer
MAX_NUMBER64 = 2**63 - 1  # RFC 9208 number64, RFC 7162 mod-sequence-value
_CTL = frozenset(range(0x20)) | {0x7F}
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | _CTL
_MONTHS = (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT",
           b"NOV", b"DEC")
_DATE_TIME = re.compile(rb'"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-]\d{4})"')
_SYSTEM_FLAGS = {b"\\ANSWERED", b"\\FLAGGED", b"\\DELETED", b"\\SEEN", b"\\DRAFT"}
_LIST_SFLAGS = {b"\\NOSELECT", b"\\MARKED", b"\\UNMARKED", b"\\NONEXISTENT"}


class GrammarError(AssertionError):
    """The response breaks the formal syntax."""


class _Reader:
    """The response's octets and a position; every rule below reads from it or raises."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, rule: str, why: str = "") -> GrammarError:
        around = self.data[max(0, self.pos - 40):self.pos + 40]
        return GrammarError(f"{rule}: {why or 'unexpected input'} at octet {self.pos} "
                            f"(...{around!r}...) in {self.data[:300]!r}")

    def peek(self, count: int = 1) -> bytes:
        return self.data[self.pos:self.pos + count]

    def at(self, word: bytes) -> bool:
        return self.peek(len(word)).upper() == word.upper()

    def take(self, word: bytes, rule: str) -> None:
        if not self.at(word):
            raise self.fail(rule, f"expected {word!r}")
        self.pos += len(word)

    def accept(self, word: bytes) -> bool:
        if self.at(word):
            self.pos += len(word)
            return True
        return False

    def sp(self, rule: str) -> None:
        self.take(b" ", rule)

    def end(self) -> None:
        self.take(b"\r\n", "CRLF")
        if self.pos != len(self.data):
            raise self.fail("response", "octets after the final CRLF")

    def while_in(self, allowed: Callable[[int], bool]) -> bytes:
        start = self.pos
        while self.pos < len(self.data) and allowed(self.data[self.pos]):
            self.pos += 1
        return self.data[start:self.pos]


# --- RFC 3501 9 basic rules ---------------------------------------------------------------

def _atom_char(octet: int) -> bool:
    return octet < 0x80 and octet not in _ATOM_SPECIALS


def _astring_char(octet: int) -> bool:
    return _atom_char(octet) or octet == ord("]")


def _text_char(octet: int) -> bool:
    return 0x01 <= octet <= 0x7F and octet not in (0x0A, 0x0D)


def atom(r: _Reader, rule: str = "atom") -> bytes:
    value = r.while_in(_atom_char)
    if not value:
        raise r.fail(rule, "expected an atom")
    return value


def number(r: _Reader, rule: str = "number", *, nonzero: bool = False,
           limit: int = MAX_NUMBER) -> int:
    digits = r.while_in(lambda o: 0x30 <= o <= 0x39)
    if not digits:
        raise r.fail(rule, "expected digits")
    value = int(digits)
    if nonzero and (value == 0 or digits.startswith(b"0")):
        raise r.fail(rule, f"nz-number {digits!r} must not be zero nor start with 0")
    if value > limit:
        raise r.fail(rule, f"{value} is out of range (max {limit})")
    return value


def nz_number(r: _Reader, rule: str = "nz-number") -> int:
    return number(r, rule, nonzero=True)


def mod_sequence_value(r: _Reader, *, zero_ok: bool = False) -> int:
    """RFC 7162 mod-sequence-value (1..2^63-1) or, with zero_ok, mod-sequence-valzer."""
    rule = "mod-sequence-valzer" if zero_ok else "mod-sequence-value"
    return number(r, rule, nonzero=not zero_ok, limit=MAX_NUMBER64)


def quoted(r: _Reader) -> bytes:
    r.take(b'"', "quoted")
    out = bytearray()
    while True:
        octet = r.data[r.pos] if r.pos < len(r.data) else None
        if octet is None:
            raise r.fail("quoted", "unterminated")
        if octet == ord('"'):
            r.pos += 1
            return bytes(out)
        if octet == ord("\\"):
            escaped = r.data[r.pos + 1:r.pos + 2]
            if escaped not in (b'"', b"\\"):
                raise r.fail("QUOTED-CHAR", f"backslash before {escaped!r}")
            out += escaped
            r.pos += 2
            continue
        if not _text_char(octet):
            raise r.fail("QUOTED-CHAR", f"octet 0x{octet:02x} not allowed in a quoted string")
        out.append(octet)
        r.pos += 1


def literal(r: _Reader) -> bytes:
    if r.at(b"~{"):
        raise r.fail("literal", "literal8 without BINARY (RFC 3516)")
    r.take(b"{", "literal")
    count = number(r, "literal")
    r.take(b"}\r\n", "literal")
    data = r.data[r.pos:r.pos + count]
    if len(data) != count:
        raise r.fail("literal", f"announces {count} octets, {len(data)} follow")
    if b"\x00" in data:
        r.pos += data.index(b"\x00")
        raise r.fail("CHAR8", "NUL inside a literal")
    r.pos += count
    return data


def string(r: _Reader, rule: str = "string") -> bytes:
    if r.at(b'"'):
        return quoted(r)
    if r.at(b"{") or r.at(b"~{"):
        return literal(r)
    raise r.fail(rule, "expected a quoted string or a literal")


def is_nil(r: _Reader) -> bool:
    """NIL as a whole word (not the start of an atom such as NILS)."""
    following = r.data[r.pos + 3:r.pos + 4]
    return r.at(b"NIL") and not (following and _astring_char(following[0]))


def nstring(r: _Reader, rule: str = "nstring") -> bytes | None:
    if is_nil(r):
        r.pos += 3
        return None
    return string(r, rule)


def astring(r: _Reader, rule: str = "astring") -> bytes:
    if r.at(b'"') or r.at(b"{") or r.at(b"~{"):
        return string(r, rule)
    value = r.while_in(_astring_char)
    if not value:
        raise r.fail(rule, "expected an astring")
    return value


def mailbox(r: _Reader) -> bytes:
    name = astring(r, "mailbox")
    if any(octet > 0x7E or octet < 0x20 for octet in name):
        raise r.fail("mailbox", f"{name!r}: not 7-bit modified UTF-7 (RFC 3501 5.1.3)")
    return name


def nil(r: _Reader, rule: str) -> None:
    if not is_nil(r):
        raise r.fail(rule, "expected NIL")
    r.pos += 3


def text(r: _Reader, rule: str = "text") -> bytes:
    """RFC 3501 text = 1*TEXT-CHAR: 7-bit, no CR or LF, not empty."""
    value = r.while_in(lambda o: o not in (0x0A, 0x0D))
    if not value:
        raise r.fail(rule, "empty text")
    for offset, octet in enumerate(value):
        if not _text_char(octet):
            r.pos -= len(value) - offset
            raise r.fail("TEXT-CHAR", f"octet 0x{octet:02x} in text")
    return value


def flag(r: _Reader, rule: str = "flag", *, allow: tuple[bytes, ...] = ()) -> bytes:
    """flag: a system flag, "\\" atom (flag-extension) or a keyword atom; `allow` adds "\\*"
    (flag-perm)."""
    for extra in allow:
        if r.accept(extra):
            return extra
    if r.accept(b"\\"):
        return b"\\" + atom(r, rule)
    return atom(r, rule)


def flag_list(r: _Reader, rule: str = "flag-list", *, allow: tuple[bytes, ...] = ()
              ) -> list[bytes]:
    r.take(b"(", rule)
    flags: list[bytes] = []
    while not r.accept(b")"):
        if flags:
            r.sp(rule)
        flags.append(flag(r, rule, allow=allow))
    return flags


def sequence_set(r: _Reader, rule: str = "sequence-set", *, star: bool = True) -> None:
    """sequence-set, or uid-set / known-uids (star=False: "*" is not allowed)."""
    while True:
        for _ in range(2):
            if star and r.accept(b"*"):
                pass
            else:
                nz_number(r, rule)
            if not r.accept(b":"):
                break
        if not r.accept(b","):
            return


def date_time(r: _Reader) -> None:
    match = _DATE_TIME.match(r.data, r.pos)
    if not match:
        raise r.fail("date-time")
    day, month, _year, hour, minute, second, _zone = match.groups()
    if (month.upper() not in _MONTHS or not 1 <= int(day) <= 31 or int(hour) > 23
            or int(minute) > 59 or int(second) > 60):
        raise r.fail("date-time", "field out of range")
    r.pos = match.end()


# --- responses ----------------------------------------------------------------------------

def check_response(data: bytes, *, greeting: bool = False) -> None:
    """Validate one whole response (literals inline, final CRLF included)."""
    r = _Reader(data)
    if r.accept(b"+"):
        _continue_req(r)
    elif r.accept(b"* "):
        if greeting:
            _greeting(r)
        else:
            _response_data(r)
    else:
        _tagged(r)
    r.end()


def _continue_req(r: _Reader) -> None:
    r.sp("continue-req")
    if r.at(b"\r\n"):
        return  # base64 may be empty
    if r.at(b"["):
        _resp_text(r)
        return
    rest = r.data[r.pos:-2]
    if re.fullmatch(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", rest):
        r.pos += len(rest)
        return
    text(r, "continue-req")


def _tagged(r: _Reader) -> None:
    tag = r.while_in(lambda o: _astring_char(o) and o != ord("+"))
    if not tag:
        raise r.fail("tag")
    r.sp("response-tagged")
    _resp_cond_state(r)


def _greeting(r: _Reader) -> None:
    if r.accept(b"BYE "):
        _resp_text(r)
        return
    for word in (b"OK ", b"PREAUTH "):
        if r.accept(word):
            _resp_text(r)
            return
    raise r.fail("greeting")


def _resp_cond_state(r: _Reader) -> None:
    for word in (b"OK ", b"NO ", b"BAD "):
        if r.accept(word):
            _resp_text(r)
            return
    raise r.fail("resp-cond-state")


def _resp_text(r: _Reader) -> None:
    if r.accept(b"["):
        _resp_text_code(r)
        r.take(b"]", "resp-text")
        r.sp("resp-text")
    text(r, "resp-text")


def _code_name(r: _Reader) -> bytes:
    return r.while_in(lambda o: _atom_char(o)).upper()


def _resp_text_code(r: _Reader) -> None:
    start = r.pos
    name = _code_name(r)
    if not name:
        raise r.fail("resp-text-code")
    handler = _CODES.get(name)
    if handler is None:
        # atom [SP 1*<any TEXT-CHAR except "]">]
        if r.accept(b" ") and not r.while_in(lambda o: _text_char(o) and o != ord("]")):
            raise r.fail("resp-text-code", "empty text after the code's SP")
        return
    if name == b"CAPABILITY":
        r.pos = start  # capability-data spells its own name
    handler(r)


def _badcharset(r: _Reader) -> None:
    if r.accept(b" "):
        r.take(b"(", "BADCHARSET")
        astring(r, "charset")
        while r.accept(b" "):
            astring(r, "charset")
        r.take(b")", "BADCHARSET")


def _permanentflags(r: _Reader) -> None:
    r.sp("PERMANENTFLAGS")
    flag_list(r, "flag-perm", allow=(b"\\*",))


def _sp_nz(rule: str) -> Callable[[_Reader], None]:
    def read(r: _Reader) -> None:
        r.sp(rule)
        nz_number(r, rule)
    return read


def _nothing(r: _Reader) -> None:
    return None


def _appenduid(r: _Reader) -> None:
    r.sp("APPENDUID")
    nz_number(r, "APPENDUID")
    r.sp("APPENDUID")
    sequence_set(r, "append-uid", star=False)


def _copyuid(r: _Reader) -> None:
    r.sp("COPYUID")
    nz_number(r, "COPYUID")
    for _ in range(2):
        r.sp("COPYUID")
        sequence_set(r, "uid-set", star=False)


def _highestmodseq_code(r: _Reader) -> None:
    r.sp("HIGHESTMODSEQ")
    mod_sequence_value(r)


def _modified(r: _Reader) -> None:
    r.sp("MODIFIED")
    sequence_set(r, "MODIFIED")


def _capability_data(r: _Reader) -> None:
    r.take(b"CAPABILITY", "capability-data")
    names = []
    while r.accept(b" "):
        names.append(atom(r, "capability").upper())
    if b"IMAP4REV1" not in names:
        raise r.fail("capability-data", "IMAP4rev1 missing")


_CODES: dict[bytes, Callable[[_Reader], None]] = {
    b"ALERT": _nothing, b"PARSE": _nothing, b"READ-ONLY": _nothing, b"READ-WRITE": _nothing,
    b"TRYCREATE": _nothing, b"CLOSED": _nothing, b"NOMODSEQ": _nothing,
    b"UIDNOTSTICKY": _nothing,
    b"BADCHARSET": _badcharset,
    b"CAPABILITY": _capability_data,
    b"PERMANENTFLAGS": _permanentflags,
    b"UIDNEXT": _sp_nz("UIDNEXT"), b"UIDVALIDITY": _sp_nz("UIDVALIDITY"),
    b"UNSEEN": _sp_nz("UNSEEN"),
    b"APPENDUID": _appenduid, b"COPYUID": _copyuid,
    b"HIGHESTMODSEQ": _highestmodseq_code, b"MODIFIED": _modified,
    # RFC 5530 codes are bare atoms
    **{name: _nothing for name in (
        b"UNAVAILABLE", b"AUTHENTICATIONFAILED", b"AUTHORIZATIONFAILED", b"EXPIRED",
        b"PRIVACYREQUIRED", b"CONTACTADMIN", b"NOPERM", b"INUSE", b"EXPUNGEISSUED",
        b"CORRUPTION", b"SERVERBUG", b"CLIENTBUG", b"CANNOT", b"LIMIT", b"OVERQUOTA",
        b"ALREADYEXISTS", b"NONEXISTENT", b"USEATTR")},
}


def _response_data(r: _Reader) -> None:
    if r.at(b"BYE "):
        r.pos += 4
        _resp_text(r)
        return
    for word in (b"OK ", b"NO ", b"BAD "):
        if r.at(word):
            _resp_cond_state(r)
            return
    if r.peek().isdigit():
        _numbered(r)
        return
    if r.at(b"CAPABILITY"):
        _capability_data(r)
        return
    name = _code_name(r)
    handler = _DATA.get(name)
    if handler is None:
        raise r.fail("response-data", f"unknown response {name!r}")
    handler(r)


def _numbered(r: _Reader) -> None:
    value = number(r)
    r.sp("message-data")
    if r.accept(b"EXISTS") or r.accept(b"RECENT"):
        return
    if value == 0:
        raise r.fail("message-data", "nz-number: message number 0")
    if r.accept(b"EXPUNGE"):
        return
    r.take(b"FETCH ", "message-data")
    _msg_att(r)


def _search(r: _Reader) -> None:
    while r.accept(b" "):
        if r.accept(b"(MODSEQ "):
            mod_sequence_value(r)
            r.take(b")", "search-sort-mod-seq")
            return
        nz_number(r, "mailbox-data SEARCH")


def _flags_data(r: _Reader) -> None:
    r.sp("FLAGS")
    flag_list(r)


def _list_data(r: _Reader) -> None:
    r.sp("mailbox-list")
    flags = [f.upper() for f in flag_list(r, "mbx-list-flags")]
    if any(not f.startswith(b"\\") for f in flags):
        raise r.fail("mbx-list-flags", f"{flags}: every flag is \\atom")
    if len([f for f in flags if f in _LIST_SFLAGS]) > 1:  # RFC 9051 adds \NonExistent
        raise r.fail("mbx-list-flags", f"{flags}: more than one mbx-list-sflag")
    r.sp("mailbox-list")
    if r.at(b'"'):
        delimiter = quoted(r)
        if len(delimiter) != 1:
            raise r.fail("mailbox-list", "the delimiter is one QUOTED-CHAR")
    else:
        nil(r, "mailbox-list")
    r.sp("mailbox-list")
    mailbox(r)
    if r.accept(b" "):
        _mbox_list_extended(r)


def _mbox_list_extended(r: _Reader) -> None:
    """RFC 5258 mbox-list-extended = "(" [item *(SP item)] ")"."""
    r.take(b"(", "mbox-list-extended")
    first = True
    while not r.accept(b")"):
        if not first:
            r.sp("mbox-list-extended")
        first = False
        tag = astring(r, "mbox-list-extended-item-tag").upper()
        r.sp("mbox-list-extended-item")
        if tag == b"CHILDINFO":
            _childinfo(r)
        else:
            _tagged_ext_val(r)


def _childinfo(r: _Reader) -> None:
    r.take(b"(", "childinfo-extended-item")
    while True:
        if quoted(r).upper() not in (b"SUBSCRIBED",):
            raise r.fail("list-select-base-opt-quoted")
        if not r.accept(b" "):
            break
    r.take(b")", "childinfo-extended-item")


def _tagged_ext_val(r: _Reader) -> None:
    """RFC 4466 tagged-ext-val = tagged-ext-simple / "(" [tagged-ext-comp] ")"."""
    if r.accept(b"("):
        depth = 1
        while depth:
            if r.accept(b"("):
                depth += 1
            elif r.accept(b")"):
                depth -= 1
            elif r.accept(b" "):
                pass
            else:
                astring(r, "tagged-ext-comp")
        return
    if r.peek().isdigit():
        sequence_set(r, "tagged-ext-simple")
        return
    astring(r, "tagged-ext-simple")


def _status(r: _Reader) -> None:
    r.sp("STATUS")
    mailbox(r)
    r.take(b" (", "STATUS")
    first = True
    while not r.accept(b")"):
        if not first:
            r.sp("status-att-list")
        first = False
        name = _code_name(r)
        r.sp("status-att-val")
        if name == b"HIGHESTMODSEQ":
            mod_sequence_value(r, zero_ok=True)
        elif name in (b"UIDNEXT", b"UIDVALIDITY"):
            nz_number(r, f"status-att-val {name.decode()}")
        elif name == b"APPENDLIMIT":  # RFC 7889 5: number / nil
            if not r.accept(b"NIL"):
                number(r, "APPENDLIMIT", limit=MAX_NUMBER64)
        elif name in (b"DELETED-STORAGE", b"SIZE"):
            number(r, name.decode(), limit=MAX_NUMBER64)
        elif name in (b"MESSAGES", b"RECENT", b"UNSEEN", b"DELETED"):
            number(r, name.decode())
        else:
            raise r.fail("status-att", f"unknown status item {name!r}")


def _esearch(r: _Reader) -> None:
    if r.accept(b" (TAG "):
        string(r, "tag-string")
        r.take(b")", "search-correlator")
    if r.at(b" UID") and r.data[r.pos + 4:r.pos + 5] in (b" ", b"\r"):
        r.pos += 4
    while r.accept(b" "):
        name = _code_name(r)
        r.sp("search-return-data")
        if name in (b"MIN", b"MAX"):
            nz_number(r, name.decode())
        elif name == b"COUNT":
            number(r, "COUNT")
        elif name == b"ALL":
            sequence_set(r, "ALL", star=False)
        elif name == b"MODSEQ":
            mod_sequence_value(r)
        else:
            raise r.fail("search-return-data", f"unknown {name!r}")


def _thread(r: _Reader) -> None:
    if r.accept(b" "):
        _thread_list(r)
        while r.at(b"("):
            _thread_list(r)


def _thread_list(r: _Reader) -> None:
    """RFC 5256: thread-list = "(" (thread-members / thread-nested) ")";
    thread-members = nz-number *(SP nz-number) [SP thread-nested];
    thread-nested = 2*thread-list."""
    r.take(b"(", "thread-list")
    if r.at(b"("):
        _thread_nested(r)
    else:
        nz_number(r, "thread-members")
        while r.accept(b" "):
            if r.at(b"("):
                _thread_nested(r)
                break
            nz_number(r, "thread-members")
    r.take(b")", "thread-list")


def _thread_nested(r: _Reader) -> None:
    count = 0
    while r.at(b"("):
        _thread_list(r)
        count += 1
    if count < 2:
        raise r.fail("thread-nested", "needs at least two thread-lists")


def _enabled(r: _Reader) -> None:
    while r.accept(b" "):
        atom(r, "capability")


def _id(r: _Reader) -> None:
    r.sp("id-response")
    if is_nil(r):
        r.pos += 3
        return
    r.take(b"(", "id-params-list")
    first = True
    while not r.accept(b")"):
        if not first:
            r.sp("id-params-list")
        first = False
        value = string(r, "id-params-list")
        if len(value) > 30:
            raise r.fail("id-params-list", "field name longer than 30 octets (RFC 2971 3.3)")
        r.sp("id-params-list")
        nstring(r, "id-params-list")


def _namespace(r: _Reader) -> None:
    for _ in range(3):
        r.sp("Namespace-Response")
        if is_nil(r):
            r.pos += 3
            continue
        r.take(b"(", "Namespace")
        while r.accept(b"("):
            string(r, "Namespace prefix")
            r.sp("Namespace")
            if r.at(b'"'):
                if len(quoted(r)) != 1:
                    raise r.fail("Namespace", "delimiter is one QUOTED_CHAR")
            else:
                nil(r, "Namespace")
            while r.accept(b" "):
                string(r, "Namespace_Response_Extension")
                r.take(b" (", "Namespace_Response_Extension")
                string(r, "Namespace_Response_Extension")
                while r.accept(b" "):
                    string(r, "Namespace_Response_Extension")
                r.take(b")", "Namespace_Response_Extension")
            r.take(b")", "Namespace")
        r.take(b")", "Namespace")


def _quota(r: _Reader) -> None:
    r.sp("quota-response")
    astring(r, "quota-root-name")
    r.take(b" (", "quota-list")
    while True:
        atom(r, "resource-name")
        r.sp("quota-resource")
        number(r, "resource-usage", limit=MAX_NUMBER64)
        r.sp("quota-resource")
        number(r, "resource-limit", limit=MAX_NUMBER64)
        if not r.accept(b" "):
            break
    r.take(b")", "quota-list")


def _quotaroot(r: _Reader) -> None:
    r.sp("quotaroot-response")
    mailbox(r)
    while r.accept(b" "):
        astring(r, "quota-root-name")


def _vanished(r: _Reader) -> None:
    r.sp("expunged-resp")
    r.accept(b"(EARLIER) ")
    sequence_set(r, "known-uids", star=False)


_DATA: dict[bytes, Callable[[_Reader], None]] = {
    b"FLAGS": _flags_data, b"LIST": _list_data, b"LSUB": _list_data,
    b"SEARCH": _search, b"SORT": _search, b"STATUS": _status, b"ESEARCH": _esearch,
    b"THREAD": _thread, b"ENABLED": _enabled, b"ID": _id, b"NAMESPACE": _namespace,
    b"QUOTA": _quota, b"QUOTAROOT": _quotaroot, b"VANISHED": _vanished,
}


# --- FETCH --------------------------------------------------------------------------------

def _msg_att(r: _Reader) -> None:
    r.take(b"(", "msg-att")
    _msg_att_item(r)  # at least one
    while r.accept(b" "):
        _msg_att_item(r)
    r.take(b")", "msg-att")


def _msg_att_item(r: _Reader) -> None:
    name = r.while_in(lambda o: _atom_char(o) and o != ord("[")).upper()
    if name == b"FLAGS":
        r.sp("msg-att-dynamic")
        flag_list(r, "flag-fetch")
    elif name == b"MODSEQ":
        r.take(b" (", "fetch-mod-resp")
        mod_sequence_value(r)
        r.take(b")", "fetch-mod-resp")
    elif name == b"ENVELOPE":
        r.sp("msg-att-static")
        envelope(r)
    elif name == b"INTERNALDATE":
        r.sp("msg-att-static")
        date_time(r)
    elif name in (b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT"):
        r.sp("msg-att-static")
        nstring(r, name.decode())
    elif name == b"RFC822.SIZE":
        r.sp("msg-att-static")
        number(r, "RFC822.SIZE")
    elif name in (b"BODY", b"BODYSTRUCTURE") and r.at(b" "):
        r.sp("msg-att-static")
        body(r, extensible=name == b"BODYSTRUCTURE")
    elif name == b"BODY" and r.at(b"["):
        _section(r)
        if r.accept(b"<"):
            number(r, "origin")
            r.take(b">", "msg-att-static")
        r.sp("msg-att-static")
        nstring(r, "BODY[section]")
    elif name == b"UID":
        r.sp("msg-att-static")
        nz_number(r, "uniqueid")
    else:
        raise r.fail("msg-att", f"unknown item {name!r}")


def _section(r: _Reader) -> None:
    """section = "[" [section-spec] "]"."""
    r.take(b"[", "section")
    if r.accept(b"]"):
        return
    parts = 0
    while r.peek().isdigit():
        nz_number(r, "section-part")
        parts += 1
        if not r.accept(b"."):
            break
    if parts and r.at(b"]"):
        r.pos += 1
        return
    name = r.while_in(lambda o: o in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
    name = name.upper()
    if name in (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        r.take(b" (", "header-list")
        astring(r, "header-fld-name")
        while r.accept(b" "):
            astring(r, "header-fld-name")
        r.take(b")", "header-list")
    elif name == b"MIME":
        if not parts:
            raise r.fail("section-text", "MIME needs a part number")
    elif name not in (b"HEADER", b"TEXT"):
        raise r.fail("section-msgtext", f"{name!r}")
    r.take(b"]", "section")


def envelope(r: _Reader) -> None:
    r.take(b"(", "envelope")
    nstring(r, "env-date")
    r.sp("envelope")
    nstring(r, "env-subject")
    for rule in ("env-from", "env-sender", "env-reply-to", "env-to", "env-cc", "env-bcc"):
        r.sp("envelope")
        _address_list(r, rule)
    r.sp("envelope")
    nstring(r, "env-in-reply-to")
    r.sp("envelope")
    nstring(r, "env-message-id")
    r.take(b")", "envelope")


def _address_list(r: _Reader, rule: str) -> None:
    """"(" 1*address ")" / nil, with RFC 3501 7.4.2's groups: a start (NIL host, the group
    name as mailbox) is closed by an end (NIL mailbox and host) before another starts."""
    if is_nil(r):
        r.pos += 3
        return
    r.take(b"(", rule)
    in_group = False
    count = 0
    while not r.accept(b")"):
        _mailbox_name, host = _address(r)
        count += 1
        if host is None and _mailbox_name is not None:
            if in_group:
                raise r.fail(rule, "group start inside a group (RFC 3501 7.4.2)")
            in_group = True
        elif host is None:
            if not in_group:
                raise r.fail(rule, "group end without a start (RFC 3501 7.4.2)")
            in_group = False
    if not count:
        raise r.fail(rule, "an empty address list is NIL, not ()")
    if in_group:
        raise r.fail(rule, "group not ended (RFC 3501 7.4.2)")


def _address(r: _Reader) -> tuple[bytes | None, bytes | None]:
    r.take(b"(", "address")
    nstring(r, "addr-name")
    r.sp("address")
    nstring(r, "addr-adl")
    r.sp("address")
    mailbox_name = nstring(r, "addr-mailbox")
    r.sp("address")
    host = nstring(r, "addr-host")
    r.take(b")", "address")
    return mailbox_name, host


def body(r: _Reader, *, extensible: bool) -> None:
    r.take(b"(", "body")
    if r.at(b"("):
        _body_type_mpart(r, extensible)
    else:
        _body_type_1part(r, extensible)
    r.take(b")", "body")


def _body_type_mpart(r: _Reader, extensible: bool) -> None:
    while r.at(b"("):
        body(r, extensible=extensible)
    r.sp("body-type-mpart")
    string(r, "media-subtype")
    if r.at(b" "):
        if not extensible:
            raise r.fail("body", "extension data in BODY (RFC 3501 7.4.2: non-extensible)")
        r.sp("body-ext-mpart")
        _body_fld_param(r)
        _body_ext_rest(r)


def _body_type_1part(r: _Reader, extensible: bool) -> None:
    media_type = string(r, "media-type").upper()
    r.sp("media-type")
    subtype = string(r, "media-subtype").upper()
    r.sp("body-fields")
    _body_fields(r)
    if media_type == b"MESSAGE" and subtype == b"RFC822":
        r.sp("body-type-msg")
        envelope(r)
        r.sp("body-type-msg")
        body(r, extensible=extensible)
        r.sp("body-type-msg")
        number(r, "body-fld-lines")
    elif media_type == b"TEXT":
        r.sp("body-type-text")
        number(r, "body-fld-lines")
    if r.at(b" "):
        if not extensible:
            raise r.fail("body", "extension data in BODY (RFC 3501 7.4.2: non-extensible)")
        r.sp("body-ext-1part")
        nstring(r, "body-fld-md5")
        _body_ext_rest(r)


def _body_ext_rest(r: _Reader) -> None:
    """[SP body-fld-dsp [SP body-fld-lang [SP body-fld-loc *(SP body-extension)]]]"""
    if not r.accept(b" "):
        return
    _body_fld_dsp(r)
    if not r.accept(b" "):
        return
    _body_fld_lang(r)
    if not r.accept(b" "):
        return
    nstring(r, "body-fld-loc")
    while r.accept(b" "):
        _body_extension(r)


def _body_fields(r: _Reader) -> None:
    _body_fld_param(r)
    r.sp("body-fields")
    nstring(r, "body-fld-id")
    r.sp("body-fields")
    nstring(r, "body-fld-desc")
    r.sp("body-fields")
    string(r, "body-fld-enc")
    r.sp("body-fields")
    number(r, "body-fld-octets")


def _body_fld_param(r: _Reader) -> None:
    if is_nil(r):
        r.pos += 3
        return
    r.take(b"(", "body-fld-param")
    while True:
        string(r, "body-fld-param")
        r.sp("body-fld-param")
        string(r, "body-fld-param")
        if not r.accept(b" "):
            break
    r.take(b")", "body-fld-param")


def _body_fld_dsp(r: _Reader) -> None:
    if is_nil(r):
        r.pos += 3
        return
    r.take(b"(", "body-fld-dsp")
    string(r, "body-fld-dsp")
    r.sp("body-fld-dsp")
    _body_fld_param(r)
    r.take(b")", "body-fld-dsp")


def _body_fld_lang(r: _Reader) -> None:
    if not r.accept(b"("):
        nstring(r, "body-fld-lang")
        return
    string(r, "body-fld-lang")
    while r.accept(b" "):
        string(r, "body-fld-lang")
    r.take(b")", "body-fld-lang")


def _body_extension(r: _Reader) -> None:
    if r.accept(b"("):
        _body_extension(r)
        while r.accept(b" "):
            _body_extension(r)
        r.take(b")", "body-extension")
    elif r.peek().isdigit():
        number(r, "body-extension")
    else:
        nstring(r, "body-extension")
