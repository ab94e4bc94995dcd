"""Incremental IMAP command reader: frames commands and their literals. Pure, never raises.

The session feeds whatever bytes arrived (`feed`) and asks for events (`next_event`) until it
gets `NeedMore`:

- `Complete(raw)`: one whole command. `raw.line` is the command text without its final CRLF
  and without literal octets: each literal stays in the line as its marker followed by CRLF
  (`{5}\\r\\n`, `{5+}\\r\\n`, exactly the RFC 3501 syntax minus the octets), and its octets are
  the next item of `raw.literals`. `grammar.parse_command` reads that shape.
- `LiteralWanted(tag, size)`: the line ended with a synchronizing literal `{n}` (RFC 3501
  section 7.5): the client waits for `+ Ready for literal data` before sending it; write that,
  then keep feeding and asking. Or answer the command at once (`tag NO ...`) and call
  `decline_literal`: the client then sends neither the literal nor the rest of the command.
  `command` is the command's text so far, up to and including the literal's marker.
- `Refused(tag, reason, close)`: a line longer than `max_line`, a literal larger than
  `max_literal` (RFC 7888 section 4), or a literal the process has no memory for right now
  (its `MemoryBudget`, shared by every connection, is held by literals still arriving). The
  session answers `tag BAD ...`, `tag NO [TOOBIG] ...` or `tag NO [UNAVAILABLE] ...` (by
  `reason`) and closes the connection if `close`. Refused input is skipped without being
  buffered: a refused synchronizing literal is never sent by the client (it waits for our `+`);
  a refused non-synchronizing literal `{n+}` is counted down octet by octet and dropped together
  with the rest of its command.
- `NeedMore()`: feed more bytes.

A literal's octets are taken from the memory budget when its marker is read and given back
when its command is complete (the session's handling is quick: it is the arrival that a slow
client can stretch) or dropped, or when the connection ends (`discard`).

`read_line` serves AUTHENTICATE responses and IDLE's DONE: one line, no literal processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.budget import Hold, MemoryBudget

REASON_LINE_TOO_LONG = "line too long"
REASON_LITERAL_TOO_BIG = "literal too big"
REASON_NO_MEMORY = "no memory for the literal now"

# RFC 7888 section 5: under LITERAL- a non-synchronizing literal may carry at most 4096 octets.
LITERAL_MINUS_LIMIT = 4096
# A literal marker at the end of a discarded line is recognised from this many trailing octets.
_TAIL_KEPT = 32
_MAX_DIGITS = 20
_MAX_TAG_WINDOW = 64
_UNBOUNDED = 2**64
_TAG_SPECIALS = frozenset(b'(){ %*"\\+')


@dataclass(frozen=True)
class RawCommand:
    tag: str  # "*" when the line does not start with a valid tag
    line: bytes
    literals: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class NeedMore:
    pass


@dataclass(frozen=True)
class Complete:
    raw: RawCommand


@dataclass(frozen=True)
class LiteralWanted:
    tag: str
    size: int
    command: bytes = field(default=b"", compare=False)


@dataclass(frozen=True)
class Refused:
    tag: str
    reason: str  # REASON_LINE_TOO_LONG or REASON_LITERAL_TOO_BIG
    close: bool


Event = NeedMore | Complete | LiteralWanted | Refused


@dataclass(frozen=True)
class _Marker:
    """A literal announced at the end of a line: `{n}`, `{n+}`, `~{n}` or `~{n+}`."""

    size: int
    synchronizing: bool


def _literal_marker(line: bytes) -> _Marker | None:
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    inner = line[start + 1 : -1]
    synchronizing = not inner.endswith(b"+")
    digits = inner if synchronizing else inner[:-1]
    if not digits or not digits.isdigit():
        return None
    size = int(digits) if len(digits) <= _MAX_DIGITS else _UNBOUNDED
    return _Marker(size, synchronizing)


def _tag_of(line: bytes, window: int) -> str:
    """RFC 3501 `tag`: 1*<any ASTRING-CHAR except "+">, up to the first space.

    Only the first `window` octets are looked at, so a line refused before its end and the same
    line refused once complete report the same tag."""
    tag, space, _ = line[:window].partition(b" ")
    if not space or any(b <= 0x20 or b >= 0x7F or b in _TAG_SPECIALS for b in tag):
        return "*"
    return tag.decode("ascii")


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


class CommandParser:
    """Frames IMAP commands out of a byte stream; see the module docstring for the events."""

    def __init__(self, max_line: int, max_literal: int, literal_minus: bool = False,
                 memory: MemoryBudget | None = None) -> None:
        self.max_line = max_line
        self._literal_minus = literal_minus
        self.limit_literals(max_literal)
        self._hold = Hold(memory)  # what the current command's literals hold of `memory`
        self._tag_window = max(1, min(_MAX_TAG_WINDOW, max_line - 1))
        self._buf = bytearray()
        self._scanned = 0  # octets of _buf known to contain no LF
        self._consumed = 0  # octets (CRLF included) of the last line taken
        # The command being assembled.
        self._segments: list[bytes] = []
        self._literals: list[bytes] = []
        self._line_length = 0
        self._literal_total = 0
        self._tag = "*"
        self._literal_remaining: int | None = None  # reading a literal's octets
        self._literal_charged = 0  # of them, arrived and taken from `memory`
        # Skipping refused input.
        self._refusal: Refused | None = None
        self._skip_octets = 0
        self._skipping_line = False
        self._skipped = 0
        self._skip_tail = b""
        self._skip_follows_literals = True
        self.closed = False  # after Refused(close=True): input is ignored from then on

    def limit_literals(self, max_literal: int) -> None:
        """Literals larger than this are refused from the next command on."""
        self.max_literal = max_literal
        self._non_sync_limit = max_literal
        if self._literal_minus:
            self._non_sync_limit = min(max_literal, LITERAL_MINUS_LIMIT)
        # Beyond this much refused input we stop counting and ask the session to hang up.
        self._sanity_limit = 2 * max_literal + self.max_line

    def decline_literal(self) -> None:
        """The session answered the command whose literal was wanted instead of sending `+`:
        the client sends nothing more of it, the next line starts a new command."""
        self._reset_command()

    def discard(self) -> None:
        """The connection has ended: give back what the command in progress held."""
        self._hold.release()

    def feed(self, data: bytes) -> None:
        if not self.closed:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed: STARTTLS refuses anything pipelined behind it
        (RFC 3501 6.2.1)."""
        return len(self._buf)

    # -- command mode -------------------------------------------------------------------------

    def next_event(self) -> Event:
        while not self.closed:
            if self._refusal is not None:
                event = self._skip()
                if event is not None:
                    return event
                continue
            if self._literal_remaining is not None:
                if not self._take_literal():
                    return NeedMore()
                continue
            line = self._take_line()
            if line is None:
                if self._line_length + len(self._buf) > self.max_line:
                    self._start_skipping_line(REASON_LINE_TOO_LONG, literals=True)
                    continue
                return NeedMore()
            event = self._on_line(line)
            if event is not None:
                return event
        return NeedMore()

    def _on_line(self, line: bytes) -> Event | None:
        if not self._segments and not line:
            return None  # blank lines between commands are ignored
        if not self._segments:
            self._tag = _tag_of(line, self._tag_window)
        self._line_length += len(line) + 2
        if self._line_length > self.max_line:
            self._refuse_after_line(REASON_LINE_TOO_LONG, line)
            return None
        marker = _literal_marker(line)
        if marker is None:
            self._segments.append(line)
            raw = RawCommand(self._tag, b"".join(self._segments), self._literals)
            self._reset_command()
            return Complete(raw)
        return self._on_marker(line, marker)

    def _on_marker(self, line: bytes, marker: _Marker) -> Event | None:
        tag = self._tag
        room = self.max_literal - self._literal_total
        # Memory is taken as the octets arrive (`_take_literal`), not for what is announced: a
        # literal announced and never sent held its whole size, and a few sessions doing so
        # refused every other user's APPEND (and literal LOGIN) for as long as they stayed.
        if marker.synchronizing:
            reason = (REASON_LITERAL_TOO_BIG if marker.size > room
                      else None if self._hold.fits(marker.size) else REASON_NO_MEMORY)
            if reason is not None:
                # The client waits for "+" that never comes: nothing of this command follows.
                self._reset_command()
                return Refused(tag, reason, close=False)
            self._segments.append(line + b"\r\n")
            self._literal_remaining = marker.size
            return LiteralWanted(tag, marker.size, b"".join(self._segments))
        too_big = marker.size > min(room, self._non_sync_limit)
        if too_big or not self._hold.fits(marker.size):
            if too_big and marker.size > self._sanity_limit:
                return self._close(tag, REASON_LITERAL_TOO_BIG)
            self._reset_command()
            self._refusal = Refused(tag, REASON_LITERAL_TOO_BIG if too_big else REASON_NO_MEMORY,
                                    close=False)
            self._skip_follows_literals = True
            self._skip_octets = marker.size
            self._skipped = marker.size
            self._skipping_line = True
            self._skip_tail = b""
            return None
        self._segments.append(line + b"\r\n")
        self._literal_remaining = marker.size
        return None

    def _take_literal(self) -> bool:
        """Take the literal once all of it is here (True), charging what has arrived so far;
        when the memory runs out on the way, its command is refused: the rest of it is
        skipped and NO_MEMORY reported (True, with the refusal under way)."""
        size = self._literal_remaining
        assert size is not None
        arrived = min(len(self._buf), size)
        if arrived > self._literal_charged:
            if not self._hold.take(arrived - self._literal_charged):
                self._refuse_mid_literal(size)
                return True
            self._literal_charged = arrived
        if len(self._buf) < size:
            return False
        self._literals.append(bytes(self._buf[:size]))
        del self._buf[:size]
        self._scanned = 0
        self._literal_total += size
        self._literal_remaining = None
        self._literal_charged = 0
        return True

    def _refuse_mid_literal(self, size: int) -> None:
        tag = self._tag
        self._reset_command()  # gives back what the command held
        self._refusal = Refused(tag, REASON_NO_MEMORY, close=False)
        self._skip_follows_literals = True
        self._skip_octets = size  # the literal's octets, from the start of the buffer
        self._skipped = size
        self._skipping_line = True  # and the rest of the command's line
        self._skip_tail = b""

    def _reset_command(self) -> None:
        self._hold.release()
        self._segments = []
        self._literals = []
        self._line_length = 0
        self._literal_total = 0
        self._tag = "*"
        self._literal_remaining = None
        self._literal_charged = 0

    # -- line mode ----------------------------------------------------------------------------

    def read_line(self) -> bytes | Refused | None:
        """One line without its CRLF (None: need more), for AUTHENTICATE and IDLE.

        A line over `max_line` is skipped up to its end and reported as Refused. Call it only
        between commands (after `Complete` or `Refused`)."""
        while not self.closed:
            if self._refusal is not None:
                event = self._skip()
                if isinstance(event, Refused):
                    return event
                if isinstance(event, NeedMore):
                    return None
                continue
            line = self._take_line()
            if line is not None and len(line) + 2 <= self.max_line:
                return line
            if line is None and len(self._buf) <= self.max_line:
                return None
            if line is None:
                self._start_skipping_line(REASON_LINE_TOO_LONG, literals=False)
            else:
                return Refused("*", REASON_LINE_TOO_LONG, close=False)
        return None

    def _take_line(self) -> bytes | None:
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            return None
        line = _strip_cr(bytes(self._buf[:end]))
        self._consumed = end + 1
        del self._buf[: end + 1]
        self._scanned = 0
        return line

    # -- skipping refused input ---------------------------------------------------------------

    def _start_skipping_line(self, reason: str, literals: bool) -> None:
        if not literals:
            tag = "*"  # a line read by read_line is not a command
        elif self._segments:
            tag = self._tag
        else:
            tag = _tag_of(bytes(self._buf[: self._tag_window]), self._tag_window)
        self._reset_command()
        self._refusal = Refused(tag, reason, close=False)
        self._skip_follows_literals = literals
        self._skip_octets = 0
        self._skipping_line = True
        self._skipped = 0
        self._skip_tail = b""

    def _refuse_after_line(self, reason: str, line: bytes) -> None:
        """The current line is already complete: skip only what its literal marker announces."""
        tag = self._tag
        self._reset_command()
        self._refusal = Refused(tag, reason, close=False)
        self._skip_follows_literals = True
        self._skip_octets = 0
        self._skipping_line = False
        self._skipped = self._consumed
        self._skip_tail = line[-_TAIL_KEPT:]

    def _skip(self) -> Event | None:
        """Advance through refused input. Returns NeedMore, the final Refused, or None to go on."""
        assert self._refusal is not None
        if self._skip_octets:
            dropped = min(self._skip_octets, len(self._buf))
            del self._buf[:dropped]
            self._scanned = 0
            self._skip_octets -= dropped
            if self._skip_octets:
                return NeedMore()
        if self._skipping_line:
            end = self._buf.find(b"\n")
            if end < 0:
                self._skipped += len(self._buf)
                self._skip_tail = (self._skip_tail + bytes(self._buf))[-_TAIL_KEPT:]
                self._buf.clear()
                self._scanned = 0
                if self._skipped > self._sanity_limit:
                    return self._finish_skip(close=True)
                return NeedMore()
            self._skip_tail = _strip_cr((self._skip_tail + bytes(self._buf[:end]))[-_TAIL_KEPT:])
            self._skipped += end + 1
            del self._buf[: end + 1]
            self._scanned = 0
            self._skipping_line = False
        if self._skipped > self._sanity_limit:
            return self._finish_skip(close=True)
        marker = _literal_marker(self._skip_tail) if self._skip_follows_literals else None
        if marker is not None and not marker.synchronizing:
            # The client sends these octets without waiting: they belong to the refused command.
            self._skipped += marker.size
            if self._skipped > self._sanity_limit:
                return self._finish_skip(close=True)
            self._skip_octets = marker.size
            self._skipping_line = True
            self._skip_tail = b""
            return None
        return self._finish_skip(close=False)

    def _close(self, tag: str, reason: str) -> Refused:
        self.closed = True
        self._reset_command()
        self._buf.clear()
        return Refused(tag, reason, close=True)

    def _finish_skip(self, close: bool) -> Refused:
        assert self._refusal is not None
        if close:
            refusal = self._close(self._refusal.tag, self._refusal.reason)
        else:
            refusal = Refused(self._refusal.tag, self._refusal.reason, close=False)
        self._refusal = None
        self._skip_octets = 0
        self._skipping_line = False
        self._skipped = 0
        self._skip_tail = b""
        return refusal
