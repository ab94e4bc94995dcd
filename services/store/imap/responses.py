"""IMAP status replies as named constants, and the one mapping from failures to replies.

Response codes: RFC 3501 7.1, RFC 5530 (IMAP response codes), RFC 4315 (UIDPLUS), RFC 7162
(CONDSTORE/QRESYNC), RFC 9208 (QUOTA). Tests import these constants instead of spelling the
wire text again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.store.imap.protocol import wire
from services.store.mailbox import (
    CannotDelete,
    InvalidMailboxName,
    MailboxExists,
    MailboxReplaced,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchUser,
    OverQuota,
    StorageError,
    TooManyMailboxes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """A status response: OK / NO / BAD / BYE with an optional response code."""

    status: str
    text: str
    code: str | None = None

    def tagged(self, tag: str) -> bytes:
        return wire.tagged(tag, self.status, self.text, self.code)

    def untagged(self) -> bytes:
        code = f"[{self.code}] " if self.code else ""
        return wire.untagged(f"{self.status} {code}{self.text}")

    def with_code(self, code: str) -> Reply:
        return Reply(self.status, self.text, code)


# Greeting and session end
OK_GREETING = Reply("OK", "tiermail IMAP ready")
BYE_LOGOUT = Reply("BYE", "Logging out")
BYE_MAILBOX_DELETED = Reply("BYE", "The selected mailbox was deleted by another session")
BYE_TOO_MANY_ERRORS = Reply("BYE", "Too many protocol errors")
BYE_TOO_MANY_FAILED_LOGINS = Reply("BYE", "Too many failed logins")
BYE_TIMEOUT = Reply("BYE", "Autologout; idle for too long")  # RFC 3501 5.4
BYE_LOGIN_DEADLINE = Reply("BYE", "Too long without logging in")  # settings.imap_login_deadline
BYE_TOO_MANY_CONNECTIONS = Reply("BYE", "Too many connections, try again later", "UNAVAILABLE")
BYE_TOO_MANY_FROM_ADDRESS = Reply("BYE", "Too many connections from your address, try again "
                                  "later", "UNAVAILABLE")
BYE_SHUTDOWN = Reply("BYE", "Server shutting down", "UNAVAILABLE")
BYE_STARTTLS_PIPELINED = Reply("BYE", "Command pipelined after STARTTLS")
BYE_ACCOUNT_DELETED = Reply("BYE", "Account deleted")  # tiermail user del (logins.py)

# Generic completions
OK_DONE = Reply("OK", "Completed")
OK_STILL_HERE = Reply("OK", "Still here")  # an IDLE keepalive
# Sent once in a command when the client has closed its sending side (Session._check_client).
OK_STILL_WORKING = Reply("OK", "Still working on your command")
OK_LOGOUT = Reply("OK", "LOGOUT completed")
OK_LOGGED_IN = Reply("OK", "Logged in")
OK_BEGIN_TLS = Reply("OK", "Begin TLS negotiation now")
OK_IDLE_DONE = Reply("OK", "IDLE terminated")
OK_CLOSED = Reply("OK", "Previous mailbox closed", "CLOSED")  # RFC 7162 3.2.11

# Protocol errors (each counts towards settings.imap_max_errors)
BAD_UNKNOWN = Reply("BAD", "Unknown command")
BAD_WRONG_STATE = Reply("BAD", "Command not allowed in this state")
BAD_LITERAL_TOO_BIG = Reply("BAD", "Literal too large")
BAD_LINE_TOO_LONG = Reply("BAD", "Command line too long")
# RFC 5530 UNAVAILABLE: temporary; the literals arriving on all connections hold all the
# memory the store allows them (settings.imap_literal_memory).
NO_BUSY = Reply("NO", "Server busy, try again later", "UNAVAILABLE")
BAD_IDLE_DONE = Reply("BAD", "Expected DONE")
BAD_AUTH_CANCELLED = Reply("BAD", "Authentication cancelled")
BAD_AUTH_MALFORMED = Reply("BAD", "Malformed SASL response")
BAD_QRESYNC_NOT_ENABLED = Reply("BAD", "QRESYNC not enabled")
BAD_VANISHED = Reply("BAD", "VANISHED needs UID FETCH with CHANGEDSINCE and QRESYNC")
BAD_INVALID_SET = Reply("BAD", "Invalid message sequence number")

# Authentication
NO_AUTH_FAILED = Reply("NO", "Authentication failed", "AUTHENTICATIONFAILED")
NO_AUTH_THROTTLED = Reply("NO", "Too many failed logins, try again later", "UNAVAILABLE")
# RFC 5530 LIMIT (settings.imap_max_userip_connections).
NO_TOO_MANY_USER_SESSIONS = Reply("NO", "Too many sessions of this account from your address",
                                  "LIMIT")
NO_TOO_MANY_KEYWORDS = Reply("NO", "Too many keywords in this mailbox", "LIMIT")
NO_PRIVACY_REQUIRED = Reply("NO", "Use STARTTLS first", "PRIVACYREQUIRED")
NO_AUTH_MECHANISM = Reply("NO", "Unsupported authentication mechanism", "CANNOT")
NO_TLS_ACTIVE = Reply("NO", "TLS already active")
NO_TLS_UNAVAILABLE = Reply("NO", "TLS not available")

# Mailboxes and messages
NO_NONEXISTENT = Reply("NO", "No such mailbox", "NONEXISTENT")
NO_TRYCREATE = Reply("NO", "No such mailbox", "TRYCREATE")
NO_ALREADYEXISTS = Reply("NO", "Mailbox already exists", "ALREADYEXISTS")
NO_CANNOT = Reply("NO", "Invalid mailbox name", "CANNOT")
NO_CANNOT_DELETE = Reply("NO", "This mailbox cannot be deleted", "CANNOT")
NO_OVERQUOTA = Reply("NO", "Quota exceeded", "OVERQUOTA")
# RFC 5530 LIMIT (settings.imap_max_mailboxes).
NO_TOO_MANY_MAILBOXES = Reply("NO", "Too many mailboxes or subscriptions in this account",
                              "LIMIT")
NO_READ_ONLY = Reply("NO", "Mailbox is read-only", "READ-ONLY")
NO_USEATTR = Reply("NO", "Unsupported special-use attribute", "USEATTR")
NO_EXPUNGED = Reply("NO", "Some of the messages no longer exist", "EXPUNGEISSUED")
NO_NO_QUOTA_ROOT = Reply("NO", "No such quota root", "NONEXISTENT")
NO_QUOTA_SET_BY_OPERATOR = Reply("NO", "Quotas are set by the operator", "NOPERM")
NO_SERVERBUG = Reply("NO", "Internal error, try again later", "SERVERBUG")
NO_UNAVAILABLE = Reply("NO", "Storage temporarily unavailable", "UNAVAILABLE")
NO_BADCHARSET = Reply("NO", "Unsupported charset", "BADCHARSET (US-ASCII UTF-8)")

# COMPRESS (RFC 4978)
OK_COMPRESS = Reply("OK", "DEFLATE active")
BAD_COMPRESS_MECHANISM = Reply("BAD", "Only COMPRESS DEFLATE is supported")
# RFC 4978 3: refused because the same compression is active already: NO [COMPRESSIONACTIVE].
NO_COMPRESSION_ACTIVE = Reply("NO", "COMPRESS DEFLATE is already active", "COMPRESSIONACTIVE")
BAD_COMPRESS_PIPELINED = Reply("BAD", "Wait for the reply to COMPRESS before sending more")


def reply_for_failure(exc: BaseException, *, trycreate: bool = False) -> Reply:
    """The one mapping from storage (and unexpected) failures to IMAP replies.

    `trycreate`: the mailbox is the target of APPEND, COPY or MOVE, where RFC 3501 6.3.11 and
    6.4.7 ask for [TRYCREATE] so the client may create it and retry."""
    if isinstance(exc, NoSuchMailbox):
        # Never TRYCREATE when the selected mailbox (the source) is what went away.
        if trycreate and not isinstance(exc, MailboxReplaced):
            return NO_TRYCREATE
        return NO_NONEXISTENT
    if isinstance(exc, MailboxExists):
        return NO_ALREADYEXISTS
    if isinstance(exc, InvalidMailboxName):
        return NO_CANNOT
    if isinstance(exc, CannotDelete):
        return NO_CANNOT_DELETE
    if isinstance(exc, OverQuota):
        return NO_OVERQUOTA
    if isinstance(exc, TooManyMailboxes):
        return NO_TOO_MANY_MAILBOXES
    if isinstance(exc, NoSuchMessage):
        return NO_EXPUNGED
    if isinstance(exc, NoSuchUser):
        return NO_NONEXISTENT
    if isinstance(exc, StorageError):
        return NO_UNAVAILABLE
    return NO_SERVERBUG
