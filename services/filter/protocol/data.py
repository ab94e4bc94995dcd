"""The message content of SMTP DATA, collected from raw chunks (RFC 5321 4.1.1.4, 4.5.2).

aiosmtpd reads DATA one line at a time (an awaited `readuntil` and several list operations
per line: for a 4 KB message about 80 of each). `DataReceiver` takes whatever the socket
delivered and does the per-line work with C-level bytes operations instead:

- the content ends only at <CRLF>.<CRLF>: a "." alone on a line. A lone <LF>.<LF> or
  <CR>.<CR> is content (no SMTP smuggling by line-ending tricks; the bare-newline rule then
  refuses such a message);
- dot-unstuffing: one leading "." is removed from every line that starts with one (4.5.2);
- limits, reported only once the content has ended (4.2.5: the reply comes after the
  data): more than `size_limit` octets (CRLFs included, stuffing dots and the final "."
  line not: RFC 1870 4) is TOO_MUCH, and from then on nothing more is kept; a line longer than
  `line_limit` octets (its CRLF included, a stuffing dot not: 4.5.3.1.6) is TOO_LONG;
- memory: every octet kept is first taken from the worker's MemoryBudget, shared by all its
  sessions: the data as sent, stuffing dots and the final "." line included (at most
  `common.settings.data_wire_octets(size_limit)`), what a pipelining client sent after it
  not. When it runs out, the content is dropped as for TOO_MUCH and the result is
  NO_ROOM, a temporary refusal: many large uploads at once are refused, one by one, instead
  of making the worker run out of memory and drop every session. The session gives the
  octets back (`DataReceiver.release`) when the transaction is over.

Pure: no I/O. The session feeds it chunks and pushes back the bytes after the end (a
pipelining client may send its next command in the same packet).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from common.budget import Hold, MemoryBudget

END = b"\r\n.\r\n"
_STUFFED = b"\r\n."  # a line that starts with a dot: the first one is stuffing (4.5.2)
_LINE_START = b"\r\n"  # a virtual line ending before the first line: "." first ends at once


class DataError(enum.Enum):
    TOO_MUCH = "too much mail data"
    TOO_LONG = "line too long"
    NO_ROOM = "no memory left for mail data"


@dataclass(frozen=True)
class DataResult:
    content: bytes  # unstuffed; empty when `error` is set
    error: DataError | None
    leftover: bytes  # what followed the final ".": belongs to the command stream


class DataReceiver:
    def __init__(self, size_limit: int | None, line_limit: int,
                 memory: MemoryBudget | None = None) -> None:
        self._size_limit = size_limit or None
        self._line_limit = line_limit
        self._hold = Hold(memory)
        self._buffer = bytearray(_LINE_START)
        self._offset = 0  # stream position of buffer[0] (the virtual CRLF is position 0)
        self._search_from = 0
        self._dots = 0  # stuffing dots ("\r\n." in the stream) before buffer[_dots_from]
        self._dots_from = 0
        self._too_much = False
        self._no_room = False

    def feed(self, chunk: bytes) -> DataResult | None:
        """Add received bytes; the result once the end of data has arrived, else None."""
        buffer = self._buffer
        buffer += chunk
        end = buffer.find(END, self._search_from)
        # What follows the end is the next commands', not this message's: not held.
        data = len(chunk) if end < 0 else end + len(END) - (len(buffer) - len(chunk))
        if not (self._too_much or self._no_room or self._hold.take(data)):
            self._no_room = True
        if end < 0:
            self._search_from = max(0, len(buffer) - (len(END) - 1))
            # The last len(END) - 1 octets may be the start of the end marker: not counted.
            if not self._too_much and self._over_limit(len(buffer) - (len(END) - 1)):
                self._too_much = True
            if self._too_much or self._no_room:
                self._drop_content()
            return None
        leftover = bytes(buffer[end + len(END):])
        # The CRLF that precedes the "." ends the last line: it is content.
        if self._too_much or self._over_limit(end + len(_LINE_START)):
            return DataResult(b"", DataError.TOO_MUCH, leftover)
        if self._no_room:
            return DataResult(b"", DataError.NO_ROOM, leftover)
        # One copy of the content at a time (the worker's memory budget counts it once): out
        # of the buffer without the virtual CRLF, the buffer freed, unstuffed in one pass.
        with memoryview(buffer) as view:
            content = bytes(view[len(_LINE_START):end + len(_LINE_START)])
        buffer.clear()
        self._buffer = bytearray()
        if _has_line_over(content, self._line_limit):
            return DataResult(b"", DataError.TOO_LONG, leftover)
        if content.startswith(b"."):  # the first line's stuffing dot
            content = content[1:]
        return DataResult(content.replace(_STUFFED, b"\r\n"), None, leftover)

    def release(self) -> None:
        """Give back what this message held of the worker's memory (once it is published,
        refused or abandoned)."""
        self._hold.release()

    def _over_limit(self, content_end: int) -> bool:
        """Whether the content up to buffer index `content_end` exceeds the size limit."""
        if self._size_limit is None:
            return False
        self._count_dots(content_end)
        size = self._offset + content_end - len(_LINE_START) - self._dots
        return size > self._size_limit

    def _count_dots(self, upto: int) -> None:
        """Count the stuffing dots that end before buffer index `upto` (a "\r\n." that
        runs past it is counted next time)."""
        if upto - self._dots_from >= len(_STUFFED):
            self._dots += self._buffer.count(_STUFFED, self._dots_from, upto)
            self._dots_from = upto - (len(_STUFFED) - 1)

    def _drop_content(self) -> None:
        """Past the size limit or out of memory: keep only what may be the start of the end
        marker."""
        self.release()
        excess = len(self._buffer) - (len(END) - 1)
        if excess > 0:
            # The dots of the octets dropped, and of a "\r\n." that begins among them; not
            # one that begins in what is kept: it may be the end marker's.
            self._count_dots(excess + len(_STUFFED) - 1)
            del self._buffer[:excess]
            self._offset += excess
            self._search_from = 0
            self._dots_from = max(0, self._dots_from - excess)


def _has_line_over(raw: bytes, limit: int) -> bool:
    """Whether a CRLF-terminated line of `raw` (the content, stuffed, ending with the last
    line's CRLF) is longer than `limit` octets, its CRLF counted and a stuffing dot not
    (RFC 5321 4.5.3.1.6).

    Neither split (the copies of every line and their object headers took more memory than
    the message itself) nor walked a line at a time (25 MB of empty lines held the worker's
    loop for 2 s: found in review): a line that may be too long is at least `limit` - 1
    octets without its CRLF, so it holds a whole block of half that at some multiple of the
    block's size; only blocks without a line break are looked at closer."""
    shortest_suspect = max(1, limit - 1)  # octets of a line, its CRLF not counted
    block = max(1, shortest_suspect // 2)
    position = 0
    while position < len(raw):
        # A CRLF starting from just before the block to its last octet breaks it.
        if raw.find(b"\r\n", max(position - 1, 0), position + block + 1) >= 0:
            position += block
            continue
        before = raw.rfind(b"\r\n", 0, position)
        line_start = 0 if before < 0 else before + 2
        line_end = raw.find(b"\r\n", position + block)
        line_end = len(raw) if line_end < 0 else line_end
        length = line_end - line_start + 2
        if length > limit and not (length == limit + 1
                                   and raw.startswith(b".", line_start)):
            return True
        position = (line_end // block + 1) * block  # the next block after this line
    return False
