"""The open-file limit, raised at start to what the process is allowed.

Every client connection is a file descriptor (two while its TLS handshake lasts: see
common/tls.py), and so is every mailbox index the store has open (three with SQLite's WAL).
A login shell or service on Debian starts with a soft limit of 1024 (the hard limit is far
higher: 524288 by default under systemd), which is below the store's default of 1000 IMAP
plus 1000 POP3 connections: past it, accept() fails with EMFILE (the client is dropped
without a greeting) and so does opening a mailbox, for IMAP and for delivery alike. Each
tier therefore raises its soft limit to the hard limit when it starts, as Dovecot and nginx
do, and says so in the log when its connection limits still do not fit in it.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

RESERVE = 256  # descriptors for what is not a client connection: broker, Redis, scanners
FALLBACK_CEILING = 1 << 20  # Linux's default fs.nr_open, used when the hard limit is infinite


def raise_open_file_limit(connections: int, setting_names: str, reserve: int = RESERVE) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; warn when twice `connections` (the sum
    of the process's connection limits, named by `setting_names`) plus `reserve` exceeds it.
    Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FALLBACK_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d: %s", soft, exc,
                        extra={"event": "fd-limit"})
    # Each connection holds a second descriptor while its TLS handshake lasts (a duplicate
    # to send a refusal's alert on, common/tls.py), and a client can stall them all there.
    needed = 2 * connections + reserve
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-file limit %d is below the %d this process may need (twice %s, "
                    "for TLS handshakes, plus %d): "
                    "raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit "
                    "nofile=) or lower those settings", soft, needed, setting_names, reserve,
                    extra={"event": "fd-limit"})
    return soft
