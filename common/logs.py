"""Structured logging for every tier.

Log calls pass context through `extra`, e.g.
    log.info("accepted", extra={"queue_id": qid, "session": sid, "peer": peer})
and the formatter prints those fields as key=value (text) or as JSON objects (json), so one
queue id can be followed through filter and store logs with grep.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

CONTEXT_FIELDS = ("tier", "session", "peer", "queue_id", "user", "mailbox", "event")
_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


_NOT_IN_A_WORD = re.compile(r"[\s\\\x00-\x1f\x7f-\x9f]")


def one_word(text: str) -> str:
    """Text a client gave (an address, whose quoted local part may hold spaces) for the
    message part of a line, as one word: it cannot pass for more key=value pairs of the line
    (`"x queue_id=..."@example.net`) or start a new line. Whitespace, control characters and
    the backslash are written as escapes (\\x20, \\u2028, \\x5c)."""
    return _NOT_IN_A_WORD.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once per second, not once per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        parts = [f"{self._stamp}.{int(record.msecs):03d}Z", record.levelname, record.name]
        parts.append(one_line(record.getMessage()))
        parts.extend(f"{k}={_quote(v)}" for k, v in _context(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_context(record))
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", tier: str | None = None) -> None:
    # Neither formatter prints the caller's file and line, thread or process, so the records
    # need not collect them: the logging HOWTO's "Optimization" settings. Collecting the
    # caller walks the stack on every record, a measurable share of a filter's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(BrokerLinkNotes())
    handler.addFilter(SmtpLibraryNotes())
    if tier:
        handler.addFilter(_TierFilter(tier))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at INFO (every connection) drowns our own lines.
    for noisy in ("mail.log", "aiormq", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pika (under dramatiq: the learner, and the store's learn-job publisher) logs each step
    # of a lost or refused connection as an ERROR, six lines an attempt; what runs it says
    # so once (dramatiq's consumer, below; the store's `learn jobs wait for the broker`).
    logging.getLogger("pika").setLevel(logging.CRITICAL)


class BrokerLinkNotes(logging.Filter):
    """The AMQP libraries log a lost or refused broker connection as an ERROR or CRITICAL,
    some with a traceback. Our tiers expect the broker to come and go and say so at WARNING
    with the reason (`broker session ended: ...`, `broker unreachable (...)`), so that an
    ERROR line keeps meaning something unexpected. aiormq: a failed connect attempt is
    dropped, a lost connection becomes one INFO line, a close the broker sent (a node
    shutting down, an operator closing connections) a WARNING. dramatiq: a consumer's
    connection error (it reconnects by itself) is a WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiormq.connection":
            return _aiormq_note(record)
        if (record.name.startswith("dramatiq.worker.ConsumerThread")
                and str(record.msg).startswith("Consumer encountered a connection error")):
            _relevel(record, logging.WARNING)
        return True


class SmtpLibraryNotes(logging.Filter):
    """aiosmtpd logs each unrecognised command at WARNING: a client sending junk (a port
    scanner, an HTTP request on port 25) wrote a line per command, five of them before it is
    shown the door with `too many bogus commands`, the one line of it worth a WARNING. Each
    unrecognised command is an INFO line, like aiosmtpd's other per-connection lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mail.log" and str(record.msg).endswith(" unrecognised: %s"):
            _relevel(record, logging.INFO)
            return logging.getLogger("mail.log").isEnabledFor(logging.INFO)
        return True


def _aiormq_note(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    if text.startswith("error when creating transport"):
        return False
    if text.startswith("Cancelling cause reader exited abnormally"):
        cause = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = "broker connection lost: %s", (cause,)
        record.exc_info = record.exc_text = None
        _relevel(record, logging.INFO)
    elif text.startswith("Unexpected connection close from remote"):
        _relevel(record, logging.WARNING)
    return True


def _relevel(record: logging.LogRecord, level: int) -> None:
    record.levelno, record.levelname = level, logging.getLevelName(level)


class OncePerOutage:
    """The level of a line that every session would repeat while one condition lasts (a full
    disk, met by each SELECT): WARNING the first time, DEBUG after it until `over()` (the
    condition has ended), then WARNING again. The filter's `broker unreachable` and the login
    throttle's Redis line are said once per outage the same way."""

    def __init__(self) -> None:
        self._said = False

    def level(self) -> int:
        if self._said:
            return logging.DEBUG
        self._said = True
        return logging.WARNING

    def over(self) -> None:
        self._said = False


class _TierFilter(logging.Filter):
    def __init__(self, tier: str) -> None:
        super().__init__()
        self._tier = tier

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "tier"):
            record.tier = self._tier
        return True


def _quote(value: object) -> str:
    """A field's value as one word: quoted (JSON's escapes) when it has white space, a
    quote or a control character (a client's login name with a line feed or a tab made a
    second line, or a second field, that looked like our own)."""
    text = str(value)
    if text and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


def one_line(text: str) -> str:
    """The text with control and format characters (bidi overrides, zero widths) escaped:
    one line that shows what it holds, whatever a client sent."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
