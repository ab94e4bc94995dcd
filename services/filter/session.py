"""One SMTP session's decisions: aiosmtpd handler hooks for EHLO, MAIL, RCPT and DATA.

A FilterSession is created per connection (by the server's protocol factory) with its
dependencies passed in: the recipient directory, the publisher, the rules and the worker's
counters. It holds the current transaction (queue id, accepted recipients with their
mailboxes). aiosmtpd replaces its Envelope object on RSET, HELO/EHLO and after DATA, so a
transaction belongs to exactly one aiosmtpd Envelope and is recognised by identity.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, TLSSetupException
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session as SMTPSession
from redis.exceptions import RedisError

from common.broker import PublishFailed
from common.directory import Lookup, Resolution
from common.envelope import Envelope, Recipient
from common.ids import new_queue_id
from common.logs import one_word
from common.ratelimit import UNLIMITED, Limit, RateLimits
from common.tls import describe_handshake_failure
from common.topology import DELIVER_ROUTING_KEY, SCAN_ROUTING_KEY
from services.filter.convert import peer_ip, tls_description, to_envelope
from services.filter.hooks import hook_dir
from services.filter.protocol import replies
from services.filter.protocol.auth_results import (
    claimed_by,
    without_claimed_results,
    without_fields,
)
from services.filter.protocol.message import (
    RETURN_PATH_FIELD,
    ReceivedInfo,
    header_section_end,
    header_section_too_big,
    received_header,
)
from services.filter.protocol.scan_headers import OUR_FIELDS, SPAM_FIELDS, our_authserv_id
from services.filter.rules import Rule, evaluate, format_headers
from services.filter.stall import PublishWatch
from services.filter.stats import WorkerStats
from services.filter.unconfirmed import UnconfirmedLedger, names_itself, transaction_digest

log = logging.getLogger(__name__)

def postmaster_problem(resolution: Resolution) -> str:
    """What is wrong with a TIERMAIL_POSTMASTER that resolves to `resolution`."""
    if resolution is Resolution.NOT_LOCAL:
        return "not in a local domain"
    return "no local mailbox (tiermail user add, or alias add)"


class RecipientDirectory(Protocol):
    async def resolve(self, address: str) -> Lookup: ...

    async def usages(self, mailboxes: Sequence[str]) -> list[int]: ...


class MessagePublisher(Protocol):
    async def publish(self, envelope: Envelope, body: bytes,
                      routing_key: str = DELIVER_ROUTING_KEY,
                      headers: Mapping[str, Any] | None = None) -> None: ...

    async def ready(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    @property
    def stalled(self) -> bool: ...


@dataclass(frozen=True)
class SessionPolicy:
    hostname: str
    max_recipients: int
    publish_deadline: float  # bound on the whole publish, connect included
    lookup_timeout: float = 10.0
    postmaster: str = ""  # where postmaster mail goes when a domain has no postmaster
    spam_scanning: bool = False  # a spam scanner writes X-Spam-*: a sender's are removed


@dataclass
class Transaction:
    smtp_envelope: SMTPEnvelope
    queue_id: str = field(default_factory=new_queue_id)
    recipients: list[Recipient] = field(default_factory=list)
    overshoot: int = 0  # RCPTs refused for being past the recipient limit


class FilterSession:
    def __init__(
        self,
        *,
        session_id: str,
        directory: RecipientDirectory,
        publisher: MessagePublisher,
        rules: Sequence[Rule],
        stats: WorkerStats,
        policy: SessionPolicy,
        clock: Callable[[], float] = time.time,
        rate_limits: RateLimits = UNLIMITED,
        publishes: PublishWatch | None = None,
        unconfirmed: UnconfirmedLedger | None = None,
    ) -> None:
        self.session_id = session_id
        self.peer = ""
        self._directory = directory
        self._publisher = publisher
        self._rules = rules
        self._stats = stats
        self._policy = policy
        self._clock = clock
        self._rate_limits = rate_limits
        # Shared by the worker's sessions (FilterServer); a test's session gets its own.
        self._publishes = publishes or PublishWatch()
        self._unconfirmed = UnconfirmedLedger(None, "") if unconfirmed is None else unconfirmed
        self._txn: Transaction | None = None
        self.queued = 0  # messages this connection got a 250 for
        # Set by the connection when the client closes its side: a reply from then on may
        # never be read (a client that gave up waiting), so a 250 is no certain outcome.
        self.client_closed = False

    def __dir__(self) -> list[str]:
        return hook_dir(super().__dir__)  # see services/filter/hooks.py

    # Logging context

    def log_extra(self, queue_id: str | None = None) -> dict[str, Any]:
        return {"session": self.session_id, "peer": self.peer, "queue_id": queue_id}

    def log_refused(self, envelope: SMTPEnvelope, why: str, reply: str,
                    size: int | None = None) -> None:
        """The line for a message refused after its content came: like `queued`, with the
        reason and the reply's codes instead of a 250."""
        txn = self._transaction(envelope)
        log.info("refused from=<%s> to=<%s>%s %s: %s",
                 one_word(envelope.mail_from or ""),
                 ">,<".join(one_word(r.address) for r in txn.recipients),
                 "" if size is None else f" size={size}", " ".join(reply.split()[:2]), why,
                 extra=self.log_extra(txn.queue_id))

    @property
    def current_queue_id(self) -> str | None:
        return self._txn.queue_id if self._txn is not None else None

    def _transaction(self, envelope: SMTPEnvelope) -> Transaction:
        if self._txn is None or self._txn.smtp_envelope is not envelope:
            self._txn = Transaction(envelope)
        return self._txn

    # aiosmtpd hooks

    async def handle_MAIL(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: SMTPEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        txn = self._transaction(envelope)
        if self._publishes.stalled or self._publisher.stalled:
            self._stats.broker_stalled += 1
            log.info("sender %s refused: the broker is not confirming", one_word(address),
                     extra=self.log_extra(txn.queue_id))
            return replies.QUEUE_NOT_TAKING
        if not await self._publisher.ready():
            # Known before the upload: the sender keeps its message and retries.
            self._stats.broker_unreachable += 1
            log.info("sender %s refused: the broker is unreachable", one_word(address),
                     extra=self.log_extra(txn.queue_id))
            return replies.QUEUE_NOT_TAKING
        # Every MAIL FROM counts against the message rates (as in Postfix's anvil), across
        # all workers; a refused one counts nothing and leaves no sender set.
        exceeded = await self._rate_limits.message(
            peer_ip(session.peer), authenticated_user(session), self.log_extra(txn.queue_id))
        if exceeded is not None:
            log.info("sender %s refused: rate limit %s", one_word(address), exceeded.value,
                     extra=self.log_extra(txn.queue_id))
            return _RATE_REPLIES[exceeded]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        log.debug("sender %s", one_word(address), extra=self.log_extra(txn.queue_id))
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: SMTPEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        txn = self._transaction(envelope)
        extra = self.log_extra(txn.queue_id)
        if address == "<>":  # the null path is a sender's only (RFC 5321 4.1.1.3)
            return replies.BAD_RECIPIENT_SYNTAX
        if len(envelope.rcpt_tos) >= self._policy.max_recipients:
            # RFC 5321 4.5.3.1.10: 452 for too many recipients, the client sends the rest later.
            # Not an error of the client's, up to as many again; past that, a client that
            # does not stop is counted like any other (Postfix's recipient overshoot limit).
            log.info("recipient %s refused: too many recipients", one_word(address),
                     extra=extra)
            txn.overshoot += 1
            if txn.overshoot > self._policy.max_recipients:
                return replies.TOO_MANY_RECIPIENTS_COUNTED
            return replies.TOO_MANY_RECIPIENTS
        size = declared_size(envelope.mail_options)
        try:
            async with asyncio.timeout(self._policy.lookup_timeout):
                lookup = await self._directory.resolve(address)
                if self._goes_to_postmaster(address, lookup):
                    lookup = await self._postmaster_lookup(extra)
                too_full = await self._without_room(lookup, size)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("directory unavailable: %s: %s", type(exc).__name__, exc, extra=extra)
            return replies.DIRECTORY_UNAVAILABLE
        if lookup.over_quota or too_full:
            # Refused whole, even when an alias has other mailboxes with room: the sender
            # retries later and nobody's copy is silently dropped or pushed further over.
            too_big = [mailbox for mailbox, limit in lookup.limits if size > limit]
            log.info("recipient %s refused: %s (%s)", one_word(address),
                     "message larger than the quota" if too_big else "mailbox full",
                     ",".join(too_big or lookup.over_quota or too_full), extra=extra)
            # 552 only when no mailbox of the recipient can ever take it: one member's small
            # quota made a whole alias bounce the message for every member (RFC 1870 6.1
            # ties 552 to the recipient's own limit, and an alias has none).
            never_fits = bool(too_big) and len(lookup.mailboxes) == 1
            return replies.LARGER_THAN_QUOTA if never_fits else replies.MAILBOX_FULL
        resolution = lookup.resolution
        if resolution is Resolution.NOT_LOCAL and "@" not in address:
            # <postmaster> with no TIERMAIL_POSTMASTER: ours to have, not a relay attempt.
            resolution = Resolution.UNKNOWN_USER
        reply = _recipient_reply(resolution)
        if resolution is Resolution.LOCAL:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            txn.recipients.append(Recipient(address, lookup.mailboxes))
            log.debug("recipient %s -> %s", one_word(address), ",".join(lookup.mailboxes),
                      extra=extra)
        else:
            log.info("recipient %s refused: %s", one_word(address), resolution.value,
                     extra=extra)
        return reply

    async def _without_room(self, lookup: Lookup, size: int) -> list[str]:
        """The mailboxes with a quota that a message of the size declared at MAIL FROM would
        take over it (RFC 1870: the server may refuse at RCPT). Usage is read fresh, for
        those only; nothing is read when no SIZE was declared or no mailbox has a quota."""
        if not size or not lookup.limits:
            return []
        usages = await self._directory.usages([mailbox for mailbox, _ in lookup.limits])
        return [mailbox for (mailbox, limit), usage in zip(lookup.limits, usages, strict=True)
                if usage + size > limit]

    async def _postmaster_lookup(self, extra: Mapping[str, Any]) -> Lookup:
        """TIERMAIL_POSTMASTER's mailboxes; one that is no local mailbox (mail to it would be
        relayed, which the filter never does) is a missing postmaster, as when unset: 550
        5.1.1, not 554 relay access denied for postmaster@ one of our domains."""
        lookup = await self._directory.resolve(self._policy.postmaster)
        if lookup.resolution is Resolution.LOCAL:
            return lookup
        log.warning("TIERMAIL_POSTMASTER=%s is %s: postmaster mail refused",
                    self._policy.postmaster, postmaster_problem(lookup.resolution),
                    extra={**extra, "event": "bad-postmaster"})
        return Lookup(Resolution.UNKNOWN_USER)

    def _goes_to_postmaster(self, address: str, lookup: Lookup) -> bool:
        """A postmaster address nobody has claimed: a bare <postmaster>, or postmaster@ one
        of our domains without its own (RFC 5321 4.5.1), when a postmaster is configured."""
        if not self._policy.postmaster or lookup.resolution is Resolution.LOCAL:
            return False
        if address.partition("@")[0].lower() != "postmaster":
            return False
        return "@" not in address or lookup.resolution is Resolution.UNKNOWN_USER

    async def handle_DATA(
        self, server: SMTP, session: SMTPSession, envelope: SMTPEnvelope
    ) -> str:
        txn = self._transaction(envelope)
        content = envelope.original_content
        assert isinstance(content, bytes)  # decode_data=False
        header_end = header_section_end(content)  # looked for once
        if header_section_too_big(content, header_end):
            self.log_refused(envelope, "header section too big", replies.HEADER_TOO_BIG)
            return replies.HEADER_TOO_BIG
        content = self._without_forged_fields(content, header_end, txn)

        @functools.cache  # asked for the lookup, then again if the publish fails
        def digest() -> str | None:
            if not names_itself(content):
                return None  # only a message with a Message-ID is matched as a retry
            return transaction_digest(envelope.mail_from or "",
                                      [r.address for r in txn.recipients], content)

        retry_of: str | None = None  # the digest, when this is a retry of an unconfirmed one
        if len(self._unconfirmed) and (key := digest()) is not None:
            retry_of = key if self._reuse_unconfirmed_queue_id(txn, key) else None
        received_at = self._clock()
        tls = tls_description(session.ssl)
        client_ip = peer_ip(session.peer)
        helo = session.host_name or ""
        smtp_envelope = envelope
        header = received_header(
            ReceivedInfo(
                helo=helo,
                client_ip=client_ip,
                hostname=self._policy.hostname,
                queue_id=txn.queue_id,
                recipients=[r.address for r in txn.recipients],
                received_at=received_at,
                esmtp=bool(session.extended_smtp),
                tls=tls,
                smtputf8=bool(smtp_envelope.smtp_utf8),
            )
        )
        message_envelope = to_envelope(
            smtp_envelope,
            queue_id=txn.queue_id,
            recipients=txn.recipients,
            client_ip=client_ip,
            helo=helo,
            tls=tls,
            received_at=received_at,
            size=len(header) + len(content),
        )
        checks_started = time.perf_counter()
        decision = await evaluate(self._rules, message_envelope, content)
        checks_ms = (time.perf_counter() - checks_started) * 1000
        if decision.reply is not None:
            self.log_refused(envelope, f"by rule {decision.refused_by}", decision.reply,
                             message_envelope.size)
            return decision.reply
        # Our headers go on top, newest first: the scan results above our Received line.
        head = format_headers(decision.headers) + header
        if decision.headers or decision.junk:  # else the envelope is as it was evaluated
            message_envelope = replace(message_envelope, junk=decision.junk,
                                       size=len(head) + len(content))
        routing_key = SCAN_ROUTING_KEY if decision.defer else DELIVER_ROUTING_KEY
        return await self._publish(message_envelope, head + content, envelope, digest,
                                   retry_of, routing_key, checks_ms)

    def _without_forged_fields(self, content: bytes, header_end: int,
                               txn: Transaction) -> bytes:
        """The message without Authentication-Results that claim our authserv-id or a domain
        it is for (services/filter/protocol/auth_results.py), and without scan result
        fields that only we write (protocol/scan_headers.py). The domains it is for are those
        of its recipients and of the mailboxes they resolve to: sent to an alias or to a bare
        `postmaster`, a `dmarc=pass` in the name of the mailbox's own domain was kept (found
        in review)."""
        domains = {address.rpartition("@")[2] for r in txn.recipients
                   for address in (r.address, *r.mailboxes)}
        claimed = claimed_by(our_authserv_id(self._policy.hostname), domains - {""})
        ours = SPAM_FIELDS if self._policy.spam_scanning else OUR_FIELDS
        removals: tuple[tuple[Callable[[bytes, int], tuple[bytes, int]], str], ...] = (
            (lambda text, end: without_claimed_results(text, claimed, end),
             "Authentication-Results field(s) in our name (RFC 8601 section 5)"),
            (lambda text, end: without_fields(text, ours, _every, end),
             "scan result field(s) the sender wrote"),
            (lambda text, end: without_fields(text, RETURN_PATH_FIELD, _every, end),
             "Return-Path field(s) the sender wrote"))
        for remove, what in removals:
            cleaned, removed = remove(content, header_end)
            if removed:
                log.info("removed %d %s", removed, what, extra=self.log_extra(txn.queue_id))
                header_end -= len(content) - len(cleaned)  # all removed from the header
                content = cleaned
        return content

    def _reuse_unconfirmed_queue_id(self, txn: Transaction, digest: str) -> bool:
        earlier = self._unconfirmed.queue_id_for(digest)
        if earlier is None:
            return False
        log.info("retry of a message whose publish went unconfirmed: queue id %s again",
                 earlier, extra=self.log_extra(txn.queue_id))
        txn.queue_id = earlier
        return True

    async def _publish(
        self, message_envelope: Envelope, body: bytes, smtp_envelope: SMTPEnvelope,
        digest: Callable[[], str | None], retry_of: str | None = None,
        routing_key: str = DELIVER_ROUTING_KEY, checks_ms: float = 0.0,
    ) -> str:
        """Publish and answer. A publish that went out unconfirmed is remembered by the
        transaction's `digest` (services/filter/unconfirmed.py); a confirmed retry of one
        (`retry_of`, its digest) is forgotten."""
        extra = self.log_extra(message_envelope.queue_id)
        # Drop aiosmtpd's reference to the received content: `body` is the copy we send.
        smtp_envelope.content = smtp_envelope.original_content = None
        try:
            async with asyncio.timeout(self._policy.publish_deadline):
                with self._publishes.publishing(), \
                        self._unconfirmed.in_flight(digest, message_envelope.queue_id):
                    await self._publisher.publish(message_envelope, body, routing_key)
        except asyncio.CancelledError:  # the client went away, or the worker stops
            if (key := digest()) is not None:
                self._unconfirmed.remember_soon(key, message_envelope.queue_id)
            raise
        except (PublishFailed, TimeoutError) as exc:
            maybe_queued = isinstance(exc, TimeoutError) or exc.maybe_queued
            log.warning("not queued%s: %s",
                        " for sure (the broker may hold it: a retry reuses the queue id)"
                        if maybe_queued else "", exc or type(exc).__name__, extra=extra)
            if maybe_queued and (key := digest()) is not None:
                await self._unconfirmed.remember(key, message_envelope.queue_id)
            return replies.QUEUE_UNAVAILABLE
        if self.client_closed and (key := digest()) is not None:
            # Whether the client reads this 250 we cannot know (it may have given up and
            # will send again): a retry reuses the queue id, as after a lost confirm.
            self._unconfirmed.remember_soon(key, message_envelope.queue_id)
        elif retry_of is not None:
            self._unconfirmed.forget(retry_of, message_envelope.queue_id)
        self._stats.accepted += 1
        self.queued += 1
        log.info(
            "queued from=<%s> to=<%s> size=%d checks_ms=%.2f%s",
            one_word(message_envelope.mail_from),
            ">,<".join(one_word(r.address) for r in message_envelope.recipients),
            message_envelope.size,
            checks_ms,  # the rules' time (scanners included), for the scanning benchmark
            "" if routing_key == DELIVER_ROUTING_KEY else f" via={routing_key}",
            extra=extra,
        )
        return replies.queued(message_envelope.queue_id)

    async def handle_exception(self, error: Exception) -> str:
        """Any unexpected error is a temporary failure; the details go to the log only."""
        if isinstance(error, TLSSetupException):
            # A client that gives up on the handshake after our 220 (it does not trust the
            # certificate, or speaks plaintext): its business; aiosmtpd closes the connection.
            log.info("TLS handshake failed: %s",
                     describe_handshake_failure(error.__cause__ or error),
                     extra=self.log_extra(self.current_queue_id))
            return replies.INTERNAL_ERROR  # not sent: the connection is closed
        log.error(
            "internal error in SMTP session",
            exc_info=(type(error), error, error.__traceback__),
            extra=self.log_extra(self.current_queue_id),
        )
        return replies.INTERNAL_ERROR


_RATE_REPLIES = {
    Limit.MESSAGES_PER_IP: replies.RATE_MESSAGES_IP,
    Limit.MESSAGES_PER_USER: replies.RATE_MESSAGES_USER,
}


def authenticated_user(session: SMTPSession) -> str | None:
    """The login of an authenticated session, for the per-user limit.

    Inert today: the filter refuses AUTH until submission exists (a later issue), so this is
    always None on the wire. aiosmtpd keeps what the authenticator returned in auth_data
    (its LoginPassword has `login` as bytes).
    """
    if not session.authenticated:
        return None
    login = getattr(session.auth_data, "login", session.auth_data)
    if isinstance(login, bytes):
        login = login.decode("utf-8", "replace")
    return login if isinstance(login, str) and login else None


def _recipient_reply(resolution: Resolution) -> str:
    if resolution is Resolution.LOCAL:
        return replies.RECIPIENT_OK
    if resolution is Resolution.UNKNOWN_USER:
        return replies.UNKNOWN_USER
    # Not one of our domains. Without authentication (a later issue) nobody may relay.
    return replies.RELAY_DENIED


def declared_size(mail_options: Sequence[str]) -> int:
    """The SIZE=n of MAIL FROM (aiosmtpd has checked it is digits), 0 when not declared."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isascii() and value.isdigit():
            return int(value)
    return 0


def _every(_value: bytes) -> bool:
    return True
