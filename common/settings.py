"""One typed settings object per process, read once from TIERMAIL_* variables.

Nothing else in tiermail reads os.environ. Every default lives here, once. An optional
config file (TIERMAIL_CONFIG, lines of KEY=VALUE) supplies values that the environment
does not; the environment always wins.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import parse_qsl, urlsplit

from common.topology import Topology

PREFIX = "TIERMAIL_"
LEARN_CHOICES = ("", "rspamd", "off")
MIB = 1024 * 1024

# What each setting may be. A value outside these stops every tier (and the tiermail
# command) at start with one line naming the setting, instead of a traceback later or a
# tier that starts half-working (a port of 70000 is silently port 4464 to the kernel; a
# prefetch of 0 is "unlimited" to RabbitMQ; nan seconds never time out).
CHOICES: dict[str, tuple[str, ...]] = {
    "spam": ("rspamd", "spamassassin", "off"),
    "virus": ("clamd", "off"),
    "virus_oversize": ("reject", "tempfail"),
    "scan_failure": ("tempfail", "accept", "defer"),
    "learn": LEARN_CHOICES,
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    "log_format": ("text", "json"),
}
PORTS = ("smtp_port", "submission_port", "imap_port", "imaps_port", "pop3_port",
         "pop3s_port", "webmail_port")
# The ports a tier listens on today (submission and webmail: later issues), each its own.
LISTENING_PORTS = ("smtp_port", "imap_port", "imaps_port", "pop3_port", "pop3s_port")
# Numbers that must be above 0 (sizes, counts, timeouts); every other number must be 0 or
# more (0 turns a limit or a wait off).
POSITIVE = frozenset({
    "scan_timeout", "clamd_stream_max", "rspamd_max_message", "max_message_size",
    "max_recipients", "max_line_length", "smtp_command_timeout", "smtp_data_timeout",
    "smtp_max_connections", "smtp_data_memory", "smtp_max_errors", "publish_timeout",
    "store_prefetch",
    "delivery_attempts", "pop3_timeout", "pop3_login_deadline", "pop3_max_connections",
    "imap_timeout", "imap_login_timeout", "imap_login_deadline", "imap_max_literal",
    "imap_literal_memory", "imap_fetch_memory", "imap_max_line", "imap_max_connections",
    "imap_max_errors"})
SIGNED = frozenset({"spamassassin_reject_score"})  # any finite number
MAX_INTEGER = 2**63 - 1  # what SQLite's INTEGER and AMQP's long-long hold
MAX_QUOTA = MAX_INTEGER
MAXIMUM = {
    "store_prefetch": 65535,  # AMQP basic.qos prefetch-count is a short
    "delivery_attempts": 2**31 - 1,  # the queue's x-delivery-limit: a signed 32-bit long
}
# Query parameters of TIERMAIL_AMQP_URL that every AMQP client of ours reads the same way:
# aiormq (filter, store) and pika (the spam learner, through dramatiq). aiormq's TLS ones
# (cafile, certfile, ...) and its `name` make pika refuse the URL.
AMQP_URL_PARAMETERS = ("heartbeat", "frame_max", "channel_max")
MAX_QUEUE_PREFIX = 200  # room for the longest name's suffix (".deliver.large", dramatiq's)
SCANNER_ADDRESSES = ("spamd_address", "clamd_address")
URL_SCHEMES = {"amqp_url": ("amqp", "amqps"), "redis_url": ("redis", "rediss", "unix"),
               "rspamd_url": ("http", "https"), "rspamd_controller_url": ("http", "https")}


class SettingsError(ValueError):
    """A TIERMAIL_* value could not be understood."""


@dataclass(frozen=True)
class Settings:
    # Network endpoints
    bind: str = "127.0.0.1"
    hostname: str = field(default_factory=socket.getfqdn)
    smtp_port: int = 2525
    submission_port: int = 2587
    imap_port: int = 2143
    imaps_port: int = 2993
    pop3_port: int = 2110
    pop3s_port: int = 2995
    webmail_port: int = 8080

    # Shared infrastructure. The AMQP vhost and the Redis database number (plus the key
    # prefix) are what keep two stacks on one machine apart.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tiermail:"
    queue_prefix: str = "tiermail"

    # Storage
    data_dir: Path = Path("./var")

    # TLS: a certificate and key in PEM. Empty means data_dir/tls/{cert,key}.pem.
    tls_cert: str = ""
    tls_key: str = ""

    # Scanning. spam: rspamd | spamassassin | off; virus: clamd | off;
    # scan_failure (a scanner unreachable or too slow): tempfail | accept | defer.
    spam: str = "rspamd"
    rspamd_url: str = "http://127.0.0.1:11333"
    # rspamd's max_message (its default, and deploy/scanners/rspamd/local.d/options.inc): it
    # drops the connection for a larger message. Must be at least max_message_size.
    rspamd_max_message: int = 50 * MIB
    spamd_address: str = "127.0.0.1:783"  # host:port or a unix socket path
    spamassassin_reject_score: float = 15.0  # at or above: 550; SpamAssassin's own threshold: Junk
    virus: str = "clamd"
    clamd_address: str = "/run/clamav/clamd.ctl"  # unix socket path or host:port
    clamd_stream_max: int = 100 * MIB  # must match clamd's StreamMaxLength
    virus_oversize: str = "tempfail"  # a message clamd cannot take whole: reject | tempfail
    scan_failure: str = "tempfail"
    scan_timeout: float = 30.0  # per scanner call

    # Rate limits, counted in Redis so they hold across every filter worker. 0 turns one off.
    rate_connections_per_ip: int = 120  # connections per minute from one client IP
    rate_messages_per_ip: int = 240  # messages per minute from one client IP
    rate_messages_per_user: int = 1000  # messages per hour from one authenticated user
    # Client networks the per-IP limits do not apply to (comma-separated CIDRs): local
    # injectors, and the tests and benchmarks, which send thousands of messages from loopback.
    rate_limit_exempt: str = "127.0.0.0/8,::1"

    # SMTP limits. RFC 5321 4.5.3.1 gives the minimums; these are our maximums.
    max_message_size: int = 25 * MIB
    max_recipients: int = 100  # RFC 5321 4.5.3.1.8 requires at least 100
    max_line_length: int = 4096  # RFC 5321 4.5.3.1.6 says 1000; real mail is sloppier
    smtp_command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: 5 minutes
    smtp_data_timeout: float = 180.0  # RFC 5321 4.5.3.2.5: 3 minutes between data blocks
    smtp_max_connections: int = 200  # per filter worker
    # Both timeouts above while a worker has 80 % of smtp_max_connections open (Postfix's
    # "stress"), and DATA must then bring a whole line within it; 0: no such mode.
    smtp_stress_timeout: float = 10.0
    # Open at once from one client address (IPv6: one /64), per filter worker; 0: no limit.
    # Networks in rate_limit_exempt are not counted. Postfix's default is 50 too.
    smtp_max_connections_per_ip: int = 50
    # Octets of message data one filter worker holds at once, across its sessions (DATA as
    # it arrives, until published); a message that would take more gets 452 4.3.1 and its
    # sender retries. Keep it at several times max_message_size.
    smtp_data_memory: int = 1024 * MIB
    smtp_max_errors: int = 20  # client errors since the last queued message: then 421, hang-up
    # RFC 5321 4.5.1: mail to postmaster@ every local domain, and to a bare <postmaster>, MUST
    # be accepted. An address (user or alias) that gets it where the domain has no
    # postmaster of its own; empty: only domains with their own postmaster accept it.
    postmaster: str = ""
    publish_timeout: float = 30.0  # wait for the broker's confirm before answering 451

    # Store
    store_prefetch: int = 64
    # Under load (messages already waiting when a batch starts, and the last 16 arrived within
    # this time) the consumer waits up to this long for a fuller batch (16): one commit and one
    # ack for many messages. A message that finds nothing waiting, or a slower stream, is
    # stored at once. Seconds; 0: off.
    store_batch_wait: float = 0.02
    # Bodies of at most this many octets live in the user's index.sqlite (one commit, no
    # file, no per-message fsync); larger ones are files. 0: every body is a file.
    store_inline_max: int = 64 * 1024
    # Octets the store keeps allocated for itself, given up by a start on a full disk so it can
    # start (services/store/backends/spacereserve.py). 0: none.
    store_space_reserve: int = 16 * 1024 * 1024
    delivery_attempts: int = 10  # broker delivery-limit before a message is dead-lettered
    pop3_timeout: float = 600.0  # RFC 1939 section 3: at least 10 minutes
    # Seconds from connect within which a client must have logged in, however busy it keeps
    # the AUTHORIZATION state (the idle timeout alone lets it stay forever with a CAPA now
    # and then). Dovecot allows 3 minutes (CLIENT_LOGIN_TIMEOUT_MSECS).
    pop3_login_deadline: float = 180.0
    pop3_max_connections: int = 1000  # per store process (POP3 and POP3S together)
    # Of those, open at once from one client address (IPv6: one /64); rate_limit_exempt
    # networks are not counted; 0: no limit. Without it one host could hold every slot.
    pop3_max_connections_per_ip: int = 50
    # None: allowed only when bound to loopback (development)
    allow_plaintext_auth: bool | None = None

    # IMAP (RFC 3501 5.4: the autologout timer is at least 30 minutes; IDLE clients re-issue
    # within 29 minutes, RFC 2177)
    imap_timeout: float = 1800.0
    # Before LOGIN: RFC 9051 5.4 leaves the pre-authentication timer to the server, so that
    # connections that never log in cannot hold the connection slots for 30 minutes.
    imap_login_timeout: float = 60.0
    # Seconds from connect within which a client must have logged in: the idle timer above
    # starts again at every command, so a client sending NOOP every 50 s would otherwise
    # hold its connection slot forever. Room for STARTTLS and a slow AUTHENTICATE exchange;
    # Dovecot allows 3 minutes (CLIENT_LOGIN_TIMEOUT_MSECS), not reset by commands either.
    imap_login_deadline: float = 180.0
    # During IDLE, "* OK Still here" this often: NAT gateways and stateful firewalls drop a
    # connection silent for a few minutes (carrier NATs for phones especially), and the
    # client would not learn of new mail until it re-issues IDLE. Seconds; 0: never.
    imap_idle_keepalive: float = 120.0
    imap_max_literal: int = 50 * MIB  # APPEND and other literals larger than this: refused
    # Octets of literals arrived (and not yet complete) on all IMAP connections of the store;
    # one that does not fit gets NO [UNAVAILABLE] (a slowly sent literal holds what it sent
    # as long as it takes; one announced and not sent holds nothing).
    imap_literal_memory: int = 1024 * MIB
    # Messages over 256 KiB being read and parsed for a FETCH at once (a part, TEXT, or a
    # structure not yet cached), on all IMAP connections; one more gets NO [UNAVAILABLE].
    # Sending is from the file and holds none of it.
    imap_fetch_memory: int = 1024 * MIB
    imap_max_line: int = 64 * 1024  # a command line (without literals)
    imap_max_connections: int = 1000  # per store process
    # Of those, open at once from one client address (IPv6: one /64), logged in or not;
    # rate_limit_exempt networks are not counted; 0: no limit. Without it one host could
    # hold every slot (one that never logs in stays up to imap_login_deadline).
    imap_max_connections_per_ip: int = 100
    imap_max_errors: int = 20  # BAD replies in a row before BYE and hang-up
    # Logged-in sessions of one account from one client address (IPv6: one /64); the next
    # login gets NO [LIMIT]. rate_limit_exempt networks are not counted; 0: no limit.
    imap_max_userip_connections: int = 10
    # Mailboxes of one account, INBOX and the parents CREATE and RENAME make included; one
    # more gets NO [LIMIT] (RFC 5530). Each is a row in the account's index that every LIST
    # of the account reads. Subscriptions (names, existing or not) are bounded by it too.
    # 0: no limit.
    imap_max_mailboxes: int = 10_000
    # Failed logins counted in Redis (per client IP and per account, across protocols); 0
    # turns a limit off.
    auth_failures_per_ip: int = 20  # per 10 minutes
    auth_failures_per_user: int = 10  # per 10 minutes
    default_quota: int = 0  # octets for accounts without their own quota; 0 = unlimited

    # Spam learning: moving mail into or out of Junk trains rspamd (controller API) in the
    # background. learn: rspamd | off | empty (the default): rspamd when spam is rspamd, else
    # off (with SpamAssassin or no spam scanning there is no rspamd to train).
    learn: str = ""
    rspamd_controller_url: str = "http://127.0.0.1:11334"
    rspamd_controller_password: str = ""

    # Logging
    log_level: str = "INFO"
    log_format: str = "text"  # or "json"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        values = _read_config_file(env.get(PREFIX + "CONFIG", ""))
        values.update({k: v for k, v in env.items() if k.startswith(PREFIX)})
        return cls(**_coerce_all(values))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """These settings as TIERMAIL_* variables, for starting child processes."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "yes" if value else "no"
            else:
                text = str(value)
            env[PREFIX + f.name.upper()] = text
        return env

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f.name, getattr(self, f.name))
        self._check_ports_differ()
        self._check_rspamd_takes_the_largest_message()
        self._check_a_worker_holds_the_largest_message()

    def _check_ports_differ(self) -> None:
        """Every listener binds TIERMAIL_BIND: two on one port made the second tier to
        start fail with "the port is in use (another tiermail stack, or another server)",
        sending the operator to look for a process that does not exist."""
        first_with: dict[int, str] = {}
        for name in LISTENING_PORTS:
            port = getattr(self, name)
            if port in first_with:
                raise SettingsError(f"{PREFIX}{name.upper()}={port}: the same port as "
                                    f"{PREFIX}{first_with[port].upper()}; each listener "
                                    "needs a port of its own")
            first_with[port] = name

    def _check_rspamd_takes_the_largest_message(self) -> None:
        """rspamd resets the connection for a message over its max_message, which looks like
        rspamd failing: such a message got 451 4.7.0 (scan_failure) every time it was sent,
        never an answer that says why. Refused here, where the operator sees it."""
        if self.spam == "rspamd" and self.max_message_size > self.rspamd_max_message:
            raise SettingsError(
                f"{PREFIX}MAX_MESSAGE_SIZE={self.max_message_size}: above rspamd's max_message "
                f"({PREFIX}RSPAMD_MAX_MESSAGE={self.rspamd_max_message}), and rspamd drops "
                "larger messages (they would get 451 every time); raise max_message in "
                f"rspamd's local.d/options.inc and {PREFIX}RSPAMD_MAX_MESSAGE with it, or "
                f"lower {PREFIX}MAX_MESSAGE_SIZE")

    def _check_a_worker_holds_the_largest_message(self) -> None:
        """A message larger than what a filter worker holds of all uploads at once got
        452 4.3.1 at every attempt, until its sender gave up and bounced it. What it holds
        is the data as sent: up to a third more than the message (data_wire_octets)."""
        needed = data_wire_octets(self.max_message_size)
        if self.smtp_data_memory < needed:
            raise SettingsError(
                f"{PREFIX}SMTP_DATA_MEMORY={self.smtp_data_memory}: below {needed}, what "
                f"DATA of a message of {PREFIX}MAX_MESSAGE_SIZE={self.max_message_size} "
                "octets may take as sent (dot-stuffing included), so a message that large "
                "could be refused at every attempt (452); raise it, or lower "
                f"{PREFIX}MAX_MESSAGE_SIZE")

    @property
    def stack_identity(self) -> str:
        """What the workers of one stack share, without passwords: filters on one port must
        agree on it (common/listen.py join_port)."""
        amqp = urlsplit(self.amqp_url)
        return f"broker {amqp.hostname}:{amqp.port or 5672} {self.ledger_identity}"

    @property
    def ledger_identity(self) -> str:
        """The queues and the Redis keys of a stack, whatever address its workers reach the
        broker by (services/filter/inflight.py)."""
        amqp, redis = urlsplit(self.amqp_url), urlsplit(self.redis_url)
        redis_at = (f"{redis.hostname}:{redis.port or 6379}{redis.path}" if redis.hostname
                    else f"{redis.path}?{redis.query}")
        return (f"vhost {amqp.path[1:] or '/'} queues {self.queue_prefix}, Redis {redis_at} "
                f"keys {self.redis_prefix}")

    @property
    def topology(self) -> Topology:
        return Topology(prefix=self.queue_prefix, delivery_limit=self.delivery_attempts)

    # Derived values: computed, never stored twice.

    @property
    def tls_cert_path(self) -> Path:
        return Path(self.tls_cert) if self.tls_cert else self.data_dir / "tls" / "cert.pem"

    @property
    def tls_key_path(self) -> Path:
        return Path(self.tls_key) if self.tls_key else self.data_dir / "tls" / "key.pem"

    @property
    def plaintext_auth_allowed(self) -> bool:
        if self.allow_plaintext_auth is not None:
            return self.allow_plaintext_auth
        return is_loopback(self.bind)

    @property
    def learns_spam(self) -> bool:
        """Whether moves into and out of Junk train rspamd (TIERMAIL_LEARN)."""
        return self.learn == "rspamd" if self.learn else self.spam == "rspamd"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"


def data_wire_octets(content_octets: int) -> int:
    """The most octets SMTP DATA may take as sent for a message of `content_octets`: a line
    of just "." (three octets with its CRLF) is sent stuffed as four (RFC 5321 4.5.2), and
    the end marker's ".\r\n" follows the last line's CRLF."""
    return content_octets + (content_octets + 2) // 3 + len(".\r\n")


def _check(name: str, value: Any) -> None:
    """Refuse a value the tiers cannot work with, naming the setting."""
    def bad(why: str) -> SettingsError:
        shown = value.as_posix() if isinstance(value, Path) else value
        return SettingsError(f"{PREFIX}{name.upper()}={shown!r}: {why}")

    if name in CHOICES:
        allowed = CHOICES[name]
        text = value.upper() if name == "log_level" else value
        if text not in allowed:
            raise bad("one of " + ", ".join(c or "(empty)" for c in allowed))
    elif name in PORTS:
        if not 1 <= value <= 65535:
            raise bad("a TCP port, 1 to 65535")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise bad("a finite number")
        if name in SIGNED:
            return
        if name in POSITIVE and value <= 0:
            raise bad("must be more than 0")
        if value < 0:
            raise bad("must be 0 or more")
        if name == "store_space_reserve" and 0 < value < MIB:
            raise bad("0 (none) or at least 1048576 (1 MiB): less frees too little to start")
        limit = MAXIMUM.get(name, MAX_INTEGER if isinstance(value, int) else math.inf)
        if value > limit:
            raise bad(f"at most {limit}")
    elif name in URL_SCHEMES:
        _check_url(name, value, bad)
    elif name == "rate_limit_exempt":
        for item in value.split(","):
            try:
                if item.strip():
                    ipaddress.ip_network(item.strip(), strict=False)
            except ValueError as exc:
                raise bad(str(exc)) from None
    elif name in SCANNER_ADDRESSES and value and not _is_scanner_address(value):
        raise bad("an absolute unix socket path, or host:port with a port 1 to 65535")
    elif name == "postmaster" and value and not _is_address(value):
        raise bad("an address, local@domain (a user or an alias)")
    elif name == "queue_prefix" and (value == "amq" or value.startswith("amq.")):
        # The exchanges and queues are named PREFIX.inbound, PREFIX.deliver, ...: RabbitMQ
        # refuses every declaration, and a filter answered 451 to all mail for ever.
        raise bad("RabbitMQ reserves names starting with amq.")
    elif name == "queue_prefix" and len(value.encode()) > MAX_QUEUE_PREFIX:
        raise bad(f"at most {MAX_QUEUE_PREFIX} octets (RabbitMQ names: at most 255)")
    elif name in {"hostname", "bind", "queue_prefix"} and not value.strip():
        raise bad("must not be empty")
    elif name == "hostname" and not _is_host_name(value):
        # It goes into SMTP greetings, EHLO replies and Received headers, which RFC 6531
        # 3.7.1 keeps ASCII even for SMTPUTF8: an IDN is written as its A-labels.
        raise bad("a host name: dot-separated labels of letters, digits and hyphens (an "
                  "IDN as xn-- A-labels)")


def _is_scanner_address(value: str) -> bool:
    """How services/filter/backends/streams.py reads it: a path (starting with / or
    without a colon) or host:port. A port that is no number failed at every scan, and so
    did a host without its port (`clamav`, `127.0.0.1`), taken for a socket file relative
    to the tier's working directory: only absolute paths are taken."""
    if value.startswith("/"):
        return True
    if ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return bool(host.strip("[]").strip()) and _is_decimal(port) and 1 <= int(port) <= 65535


def _is_address(value: str) -> bool:
    """local@domain, as the directory looks it up: without one, postmaster mail went to an
    address no domain has, and was refused as not local."""
    local, at, domain = value.strip().rpartition("@")
    return bool(at and local and domain) and value.isprintable() \
        and not any(c.isspace() or c in ",<>" for c in value.strip())


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


# RFC 1123 2.1 labels; "_" too, which some machines' own names have (the default is the
# machine's name). Anything else (a comma, a slash, "=", ":") broke the dev certificate's
# subject (a traceback from openssl) or made a greeting no client can read as a domain.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def _is_host_name(value: str) -> bool:
    return len(value) <= 253 and _HOST_NAME.fullmatch(value) is not None


def _check_url(name: str, value: str, bad: Any) -> None:
    schemes = URL_SCHEMES[name]
    try:
        parts = urlsplit(value)
        port = parts.port  # a port that is no number, or out of range, raises here
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.scheme not in schemes:
        raise bad(f"a URL starting with {' or '.join(s + '://' for s in schemes)}")
    if parts.scheme != "unix" and not parts.hostname:
        raise bad("no host in the URL")
    if port == 0:
        raise bad("port 0 in the URL")
    if name == "redis_url" and parts.scheme != "unix":
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise bad("the path is the database number: /0, /1, ...")
    if name == "redis_url" and parts.query:
        _check_redis_options(value, bad)
    if name == "amqp_url" and parts.query:
        _check_amqp_options(value, parts.query, bad)


def _check_redis_options(url: str, bad: Any) -> None:
    """Query options redis-py takes: a value it cannot read raised at the first client, a
    name it does not know at the first connection, each a traceback in every tier."""
    import redis.asyncio  # here: only a URL with options pays for the import

    try:
        pool = redis.asyncio.ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)  # builds, does not connect
    except (TypeError, ValueError) as exc:
        raise bad(f"an option Redis's client does not take: {exc}") from None


def _check_amqp_options(url: str, query: str, bad: Any) -> None:
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in AMQP_URL_PARAMETERS:
            raise bad(f"query parameter {key!r}: only {', '.join(AMQP_URL_PARAMETERS)} "
                      "work in every tier (the spam learner's client refuses others)")
        if not _is_decimal(value):
            raise bad(f"query parameter {key!r}: a whole number")
    import pika  # the stricter of the two clients on the values' ranges

    try:
        pika.URLParameters(url)
    except ValueError as exc:
        raise bad(str(exc)) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_config_file(path: str) -> dict[str, str]:
    if not path:
        return {}
    try:
        # utf-8-sig: a file saved by an editor that writes a byte-order mark still reads
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError(f"{PREFIX}CONFIG={path!r}: cannot read it: {reason}") from None
    known = {f.name for f in fields(Settings)}
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):  # a file also sourced by a shell
            key = key.removeprefix("export ").strip()
        if not sep or not key:
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, not {line[:60]!r}")
        if not key.startswith(PREFIX):
            key = PREFIX + key
        if key[len(PREFIX):].lower() not in known or key == PREFIX + "CONFIG":
            raise SettingsError(f"{path}:{number}: unknown setting {key}")
        values[key] = _unquoted(value.strip())
    return values


def _unquoted(value: str) -> str:
    """A value in one pair of matching quotes loses them ("a b" -> a b); others stay as
    they are (a password may end in a quote)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _coerce_all(values: Mapping[str, str]) -> dict[str, Any]:
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, raw in values.items():
        name = key[len(PREFIX):].lower()
        if name == "config":
            continue
        if name not in known:
            raise SettingsError(f"unknown setting {key}")
        out[name] = _coerce(name, hints[name], raw)
    return out


def _coerce(name: str, hint: Any, raw: str) -> Any:
    try:
        # int() and float() also take "1_000" and digits of other scripts ("٣٣"): what
        # an operator did not mean to write is refused, not read as some number.
        if hint is int:
            try:
                return int(_plain_number(raw))
            except ValueError:
                raise ValueError("not a whole number") from None
        if hint is float:
            try:
                return float(_plain_number(raw))
            except ValueError:
                raise ValueError("not a number") from None
        if hint is Path:
            if not raw.strip():
                raise ValueError("must not be empty")
            return Path(raw)
        if hint == bool | None:
            return None if raw.strip() == "" else _parse_bool(raw)
        if hint is bool:
            return _parse_bool(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r}: {exc}") from None


def _plain_number(raw: str) -> str:
    if not raw.isascii() or "_" in raw:
        raise ValueError(raw)
    return raw


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected a boolean (yes/no)")
