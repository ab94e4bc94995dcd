"""clamd's INSTREAM protocol (clamd(8)): framing and reply parsing. Pure: no I/O.

    zINSTREAM\\0  then chunks <4-byte big-endian length><data>, then a zero-length chunk.
    Reply (NUL-terminated with the z prefix): "stream: OK", "stream: <Signature> FOUND",
    "INSTREAM size limit exceeded. ERROR" (StreamMaxLength), "<text> ERROR".
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

INSTREAM = b"zINSTREAM\0"
PING = b"zPING\0"
PONG = b"PONG"
END_OF_STREAM = b"\0\0\0\0"
CHUNK_SIZE = 64 * 1024
MAX_REPLY = 4096
_LENGTH = struct.Struct("!I")


class ClamdProtocolError(ValueError):
    """clamd answered something we do not understand, or reported an error."""


class ClamdSizeLimit(ValueError):
    """clamd refused the stream: larger than its StreamMaxLength."""


class ClamdScanLimit(ClamdSizeLimit):
    """clamd stopped scanning at one of its limits (MaxScanSize, MaxFileSize, MaxRecursion,
    MaxFiles...: an archive bomb, deep nesting) and, with AlertExceedsMax, says so as a
    finding; without it the rest went unscanned and the reply was OK."""

    def __init__(self, heuristic: str) -> None:
        super().__init__(heuristic)
        self.heuristic = heuristic


LIMITS_EXCEEDED = "Heuristics.Limits.Exceeded"


@dataclass(frozen=True)
class ClamdResult:
    signature: str | None  # None: clean

    @property
    def infected(self) -> bool:
        return self.signature is not None


CLEAN = ClamdResult(None)


def chunks(content: bytes, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The INSTREAM frames of `content`, ending with the zero-length terminator."""
    view = memoryview(content)
    for start in range(0, len(content), size):
        piece = view[start:start + size]
        yield _LENGTH.pack(len(piece)) + piece.tobytes()
    yield END_OF_STREAM


def parse_reply(data: bytes) -> ClamdResult:
    """Parse one INSTREAM reply (with or without the trailing NUL or newline)."""
    text = data.rstrip(b"\0\r\n").decode("utf-8", errors="replace").strip()
    if "size limit exceeded" in text.lower():
        raise ClamdSizeLimit(text[:200])
    if text.endswith(" ERROR"):
        raise ClamdProtocolError(f"clamd error: {text[:200]}")
    name, sep, verdict = text.partition(": ")
    if not sep:
        raise ClamdProtocolError(f"unexpected clamd reply: {text[:200]!r}")
    if verdict == "OK":
        return CLEAN
    if verdict.endswith(" FOUND"):
        signature = verdict[: -len(" FOUND")].strip()
        if signature.startswith(LIMITS_EXCEEDED):
            raise ClamdScanLimit(signature[:200])
        if signature:
            return ClamdResult(signature)
    raise ClamdProtocolError(f"unexpected clamd reply: {text[:200]!r}")
