"""SMTP replies of the filter tier, each with its enhanced status code (RFC 2034, RFC 3463).

Tests import these constants instead of repeating the text. `enhance` adds enhanced codes to
the replies that aiosmtpd writes itself ("250 OK", "503 Error: need MAIL command", ...), so
that every 2xx/4xx/5xx reply on the wire carries one. RFC 2034 section 4 exempts the initial
greeting and the replies to HELO/EHLO; the server does not pass those through `enhance`.

Pure functions and constants only: no I/O here.
"""

from __future__ import annotations

import re

# 2xx
OK = "250 2.0.0 OK"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
RECIPIENT_OK = "250 2.1.5 OK"
SENDER_OK = "250 2.1.0 OK"
BYE = "221 2.0.0 Bye"
READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
CANNOT_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"

# 4xx: the sender keeps the message and retries later.
INTERNAL_ERROR = "451 4.3.0 Internal error, please try again later"
DIRECTORY_UNAVAILABLE = "451 4.3.0 Recipient cannot be verified now, please try again later"
QUEUE_UNAVAILABLE = "451 4.3.0 Message not queued, please try again later"
# At MAIL FROM while the broker cannot be reached, or does not confirm what it was given
# (services/filter/stall.py).
QUEUE_NOT_TAKING = "451 4.3.0 Mail queue not taking messages now, please try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
# The same refusal for a client that goes on far past the limit: counted as its error, so its
# text must not begin like TOO_MANY_RECIPIENTS (_SERVER_TROUBLE matches by prefix).
TOO_MANY_RECIPIENTS_COUNTED = "452 4.5.3 Recipient limit reached, send the rest in another message"
# The mailbox has reached its quota (the store publishes which ones, common/directory.py): RFC
# 3463 3.3 X.2.2 "mailbox full", temporary so that the mail waits at the sender.
MAILBOX_FULL = "452 4.2.2 Mailbox full, try again later"
# SIZE declared larger than the recipient's whole quota: it can never fit (RFC 3463 X.2.2).
LARGER_THAN_QUOTA = "552 5.2.2 Message larger than the recipient's mailbox quota"
TOO_MANY_CONNECTIONS = "421 4.7.0 too many connections"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
NON_SMTP_COMMAND = "421 4.7.0 Not an SMTP command, closing connection"
BAD_RECIPIENT_SYNTAX = "501 5.1.3 Bad recipient address syntax"
# aiosmtpd's reply to a path it cannot read, at MAIL and RCPT alike; at MAIL it becomes
# BAD_SENDER_SYNTAX (RFC 3463 3.2: X.1.3 is the destination's syntax, X.1.7 the sender's).
MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address"
BAD_SENDER_SYNTAX = "553 5.1.7 Error: malformed sender address"
# RFC 6531 3.7.1: SMTPUTF8 is not negotiated yet at EHLO, so the client's name is ASCII (an IDN
# as A-labels); RFC 5321 4.1.2: characters a domain may not have MUST get 501.
NON_ASCII_HELO = "501 5.5.2 Syntax: {command} hostname (ASCII only: an IDN as A-labels)"
# Rate limits (common/ratelimit.py), counted across all workers. 4.7.0 before the
# greeting, as Postfix's anvil does; 4.7.1 "not authorized" at MAIL FROM. RFC 3463 3.8.
RATE_CONNECTIONS = ("421 4.7.0 Too many connections from your address, "
                    "please try again later")
RATE_MESSAGES_IP = "451 4.7.1 Too many messages from your address, please try again later"
RATE_MESSAGES_USER = "451 4.7.1 Too many messages from your account, please try again later"
# Scanning (services/filter/rules/spam.py, virus.py). 4.7.0: a security check could not be
# completed; 4.7.1: rspamd asked to try later (soft reject, greylisting). RFC 3463 3.8.
SCANNER_UNAVAILABLE = "451 4.7.0 Message could not be scanned now, please try again later"
SCAN_TOO_BIG_TEMPFAIL = "451 4.7.0 Message too big to be scanned now, please try again later"
# clamd stopped at one of its scan limits inside the message (an archive nested too deep or
# unpacking too large): the same policy as too big (TIERMAIL_VIRUS_OVERSIZE), in its words.
SCAN_LIMITS_TEMPFAIL = ("451 4.7.0 Message could not be scanned whole for viruses now, please "
                        "try again later")
SPAM_TEMPFAIL = "451 4.7.1 Message deferred, please try again later"
# RFC 5321 4.2.2 452 and RFC 3463 4.3.1 (mail system full): the worker holds as much message
# data as it may at once; the sender retries later.
NO_MEMORY_FOR_DATA = "452 4.3.1 Insufficient system storage, try again later"

# Our own temporary trouble (broker, directory, internal, the worker's memory for uploads, a
# full mailbox) and limits the client could not know (a quota; the recipient limit, whose
# 452s RFC 5321 4.5.3.1.10 has the client answer by sending the rest later): never the
# client's fault, so not counted towards smtp_max_errors.
_SERVER_TROUBLE = ("451 4.3.0", "421", SCANNER_UNAVAILABLE, SCAN_TOO_BIG_TEMPFAIL,
                   SCAN_LIMITS_TEMPFAIL, MAILBOX_FULL, LARGER_THAN_QUOTA, TOO_MANY_RECIPIENTS,
                   NO_MEMORY_FOR_DATA)


def is_client_error(reply: str) -> bool:
    """A 4xx/5xx that the client caused (bad command, refused recipient, refused message)."""
    return reply[:1] in ("4", "5") and not reply.startswith(_SERVER_TROUBLE)
SHUTTING_DOWN = "421 4.3.2 Service shutting down, closing connection"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available"

# 5xx: permanent.
UNKNOWN_USER = "550 5.1.1 Recipient address rejected: no such user"
RELAY_DENIED = "554 5.7.1 Relay access denied"
# RFC 6531 3.5: an address that needs SMTPUTF8 in a transaction without it (or in a HELO
# session, which has no parameters): 550 at MAIL, 553 at RCPT, X.6.7 "non-ASCII addresses not
# permitted for that sender/recipient".
NON_ASCII_SENDER = "550 5.6.7 Non-ASCII sender address not permitted without SMTPUTF8"
NON_ASCII_RECIPIENT = "553 5.6.7 Non-ASCII recipient address not permitted without SMTPUTF8"
# A MAIL parameter given twice: a syntax error in the arguments (RFC 5321 4.2.2 501, RFC 3463
# X.5.4 invalid command arguments).
REPEATED_PARAMETER = "501 5.5.4 MAIL parameter {keyword} given more than once"
# RFC 5321 2.3.8: CR and LF only as CRLF. Refusing bare ones closes the SMTP smuggling hole
# (<LF>.<LF> or <CR>.<CR> read as end-of-data by some other server).
BARE_NEWLINE = "554 5.6.0 Message refused: bare CR or LF in message (RFC 5321 2.3.8)"
FOLDED_START = ("554 5.6.0 Message refused: it starts with a folded line, not a header field "
                "(RFC 5322 2.2)")
MESSAGE_TOO_BIG = "552 5.3.4 Message too big for system"
HEADER_TOO_BIG = "552 5.3.4 Message header section too big (over 1 MiB or 9000 fields)"
SPAM_REJECTED = "550 5.7.1 Message refused as spam"
SPAM_REJECTED_TEXT = "550 5.7.1 {text}"  # rspamd's smtp_message, made one safe line
VIRUS_FOUND = "554 5.7.1 Message refused: virus {signature} found"
SCAN_TOO_BIG_REJECT = "552 5.3.4 Message too big to be scanned for viruses"
SCAN_LIMITS_REJECT = ("554 5.7.1 Message refused: it cannot be scanned whole for viruses "
                      "(archives nested too deep or too large unpacked)")
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"
COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognized"
AUTH_UNAVAILABLE = "502 5.5.1 AUTH not available"
STARTTLS_NOT_OFFERED = "502 5.5.1 STARTTLS not available"  # no certificate configured
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NO_VALID_RECIPIENTS = "554 5.5.1 Error: no valid recipients"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"

# aiosmtpd's own texts with a fixed replacement. Anything not listed gets a code from
# _BY_REPLY_CODE, then from the reply class.
_REWRITES: dict[str, str] = {
    "250 OK": OK,
    "221 Bye": BYE,
    "220 Ready to start TLS": READY_FOR_TLS,
    "454 TLS not available": TLS_UNAVAILABLE,
    "503 Error: need MAIL command": NEED_MAIL,
    "503 Error: need RCPT command": NEED_RCPT,
    "503 Error: nested MAIL command": NESTED_MAIL,
    "500 Command line too long": COMMAND_TOO_LONG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": LINE_TOO_LONG,
    "552 Error: Too much mail data": MESSAGE_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": SIZE_EXCEEDED,
    # aiosmtpd's fallback when handle_exception itself fails: never a permanent error.
    "500 Error: Cannot describe error": INTERNAL_ERROR,
}

# RFC 3463 detail codes for the reply codes aiosmtpd uses.
_BY_REPLY_CODE: dict[str, str] = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",  # syntax error, command unrecognised
    "501": "5.5.4",  # invalid command arguments
    "502": "5.5.1",  # command not implemented
    "503": "5.5.1",  # bad sequence of commands
    "504": "5.5.4",
    "530": "5.7.0",
    "538": "5.7.11",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}

_BY_CLASS = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_REPLY = re.compile(r"^(\d{3})([ -])(.*)$", re.DOTALL)
# aiosmtpd's default handle_exception text: "500 Error: (ExcName) message".
_LEAKED_EXCEPTION = re.compile(r"^\d{3} Error: \(")
# aiosmtpd echoes an unknown command, which may hold a bare CR, NUL or escape sequences: none
# of that goes into a reply (RFC 5321 2.3.8, 4.2).
_UNKNOWN_COMMAND = re.compile(r'^500 Error: command "(.*)" not recognized$', re.DOTALL)
_ECHO_LIMIT = 64


def ehlo_lines(hostname: str, keywords: list[str]) -> list[str]:
    """The EHLO reply (RFC 5321 4.1.1.1): "250-" on every line but the last."""
    lines = [hostname, *keywords]
    return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]


def queued(queue_id: str) -> str:
    return QUEUED.format(queue_id=queue_id)


def enhance(reply: str) -> str:
    """Give one reply (possibly several CRLF-joined lines) enhanced status codes."""
    if "\r\n" in reply:
        return "\r\n".join(_enhance_line(line) for line in reply.split("\r\n"))
    return _enhance_line(reply)


def _enhance_line(line: str) -> str:
    rewritten = _REWRITES.get(line)
    if rewritten is not None:
        return rewritten
    if _HAS_ENHANCED.match(line):  # most replies: ours all have one
        return line
    if _LEAKED_EXCEPTION.match(line):
        return INTERNAL_ERROR
    unknown = _UNKNOWN_COMMAND.match(line)
    if unknown is not None and not _echoable(unknown.group(1)):
        return UNKNOWN_COMMAND
    match = _REPLY.match(line)
    if match is None:
        return line
    code, separator, text = match.groups()
    if code == "220" or code[0] not in _BY_CLASS:
        return line  # greeting, 354 and other intermediate replies carry none
    enhanced = _BY_REPLY_CODE.get(code, _BY_CLASS[code[0]])
    return f"{code}{separator}{enhanced} {text}".rstrip()


def _echoable(command: str) -> bool:
    """Whether an unknown command may go back in the reply: printable, and short enough for
    the reply to stay within 512 octets (RFC 5321 4.5.3.1.5; the command may be that long)."""
    return len(command) <= _ECHO_LIMIT and command.isprintable()


def reply_code(reply: str) -> int:
    return int(reply[:3])
