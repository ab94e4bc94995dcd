"""Whether a redelivered message's delivery count came from failures or from broken links.

RabbitMQ 3.10's quorum queues count every return of an unacknowledged message toward
`x-delivery-limit`, and dead-letter the message on the return after the delivery whose
`x-delivery-count` equals the limit. A return is a nack, but equally a store connection that
broke while the message was in flight. So a link that kept breaking dead-lettered accepted
mail as "delivery failed too often" without a single failed attempt, even mail already
stored whose acks were lost.

The store knows its own failures: it records each attempt at a redelivered message before
making it, and clears the record once the message is stored
(services/store/backends/attempts.py). A message that comes back near the limit with
returns its record does not explain is *renewed*: a fresh copy, without the broker's count,
is published with a confirm, then the old one acked. (Died between the two, the store leaves
both copies queued, and delivery is idempotent, so the second is a no-op; at the last
delivery the limit allows, the old one goes to the dead-letter queue instead, where a retry
finds it stored. Renewals start two deliveries earlier for that.) A message that really
fails, or kills the store, keeps its record and meets the limit as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from common.envelope import Envelope

DELIVERY_COUNT_HEADER = "x-delivery-count"  # set by the broker on a redelivery
RENEWALS_HEADER = "x-tiermail-renewals"  # how often the store renewed this message
# The store's unfinished attempts at the message when it was last renewed: those made since
# are the ones that count against this copy's delivery count.
RENEWED_AT_HEADER = "x-tiermail-renewed-at-attempts"
# Renewed from this many deliveries before the last chance on: a renewal interrupted by a
# broken link gets another go before the broker dead-letters.
RENEW_BEFORE_LAST = 2
# Returns the record does not explain before a message is renewed. A first delivery is
# never recorded (services/store/backends/attempts.py), so one return always goes
# unexplained.
UNEXPLAINED_RETURNS = 2
# Renewals of one message, at most: past them the broker's limit decides again. The record
# can miss attempts (a store that could not write it, and died): without a bound, a message
# that kills the store would then go round for ever. 10 renewals at the default limit of 10
# are about 80 broken links while one message was in flight.
MAX_RENEWALS = 10


@dataclass(frozen=True)
class Returns:
    """What is known of a delivered message's earlier deliveries."""

    count: int  # the broker's x-delivery-count: returns of this copy
    renewals: int  # copies before this one (0: the accepted message itself)
    renewed_at: int  # the unfinished attempts when this copy was made

    @property
    def redelivered(self) -> bool:
        """Whether this delivery is recorded: a return, or a renewed copy (which may have
        been renewed for good reason before)."""
        return self.count > 0 or self.renewals > 0


def returns_of(headers: dict[str, Any] | None) -> Returns:
    headers = headers or {}
    return Returns(count=_count(headers, DELIVERY_COUNT_HEADER),
                   renewals=_count(headers, RENEWALS_HEADER),
                   renewed_at=_count(headers, RENEWED_AT_HEADER))


def _count(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def should_renew(returns: Returns, unfinished: int, limit: int) -> bool:
    """Whether to renew a message delivered with `returns` whose record shows `unfinished`
    attempts, under the queue's delivery `limit`.

    Only near the limit (the renewal costs a publish), only when at least
    UNEXPLAINED_RETURNS of this copy's returns were no attempt of ours, and never once the
    unfinished attempts reach the limit themselves: a message that fails (or crashes the
    store) every time still goes to the dead-letter queue, after at most twice the limit
    (and after at most MAX_RENEWALS renewals whatever the record says)."""
    if returns.count < max(1, limit - RENEW_BEFORE_LAST) or unfinished >= limit or \
            returns.renewals >= MAX_RENEWALS:
        return False
    return returns.count - failed_before(returns, unfinished) >= UNEXPLAINED_RETURNS


def failed_before(returns: Returns, unfinished: int) -> int:
    """This copy's attempts that failed or never ended (the store died in them), of the
    `unfinished` recorded for the message."""
    return max(0, unfinished - returns.renewed_at)


def renewed_headers(headers: dict[str, Any] | None, returns: Returns,
                    unfinished: int) -> dict[str, Any]:
    """The fresh copy's headers: the broker's count dropped (a published x-delivery-count
    is passed on as it is: the copy would start at the old count), the renewal noted."""
    fresh = {name: value for name, value in (headers or {}).items()
             if name != DELIVERY_COUNT_HEADER}
    fresh[RENEWALS_HEADER] = returns.renewals + 1
    fresh[RENEWED_AT_HEADER] = unfinished
    return fresh


def attempt_key(envelope: Envelope) -> str:
    """One queued message: its queue id, and which mailboxes it is for (a message for a
    large alias goes as several, one per part of the mailboxes, with the same queue id)."""
    mailboxes = "\n".join(envelope.mailboxes).encode("utf-8", "surrogatepass")
    return f"{envelope.queue_id} {hashlib.sha256(mailboxes).hexdigest()[:16]}"
