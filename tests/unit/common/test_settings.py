from pathlib import Path

import pytest

from common.settings import Settings, SettingsError, data_wire_octets


def test_defaults_match_the_operator_interface() -> None:
    s = Settings.from_env({})
    assert (s.bind, s.smtp_port, s.submission_port) == ("127.0.0.1", 2525, 2587)
    assert (s.imap_port, s.imaps_port, s.pop3_port, s.pop3s_port) == (2143, 2993, 2110, 2995)
    assert s.webmail_port == 8080
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.spam, s.virus, s.scan_failure) == ("rspamd", "clamd", "tempfail")
    assert s.rspamd_url == "http://127.0.0.1:11333"
    assert s.data_dir == Path("./var")
    assert s.max_message_size == 25 * 1024 * 1024


def test_environment_is_typed() -> None:
    s = Settings.from_env({"TIERMAIL_SMTP_PORT": "3025", "TIERMAIL_PUBLISH_TIMEOUT": "2.5",
                           "TIERMAIL_DATA_DIR": "/srv/mail", "TIERMAIL_ALLOW_PLAINTEXT_AUTH": "no"})
    assert s.smtp_port == 3025 and s.publish_timeout == 2.5
    assert s.data_dir == Path("/srv/mail") and s.allow_plaintext_auth is False


@pytest.mark.parametrize("env", [{"TIERMAIL_SMTP_PORT": "many"}, {"TIERMAIL_NO_SUCH": "1"},
                                 {"TIERMAIL_ALLOW_PLAINTEXT_AUTH": "maybe"},
                                 {"TIERMAIL_LEARN": "spamassassin"}])
def test_bad_values_are_refused_by_name(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=next(iter(env))):
        Settings.from_env(env)


def test_config_file_fills_in_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "tiermail.env"
    config.write_text("# comment\nSMTP_PORT=4025\nTIERMAIL_POP3_PORT = 4110\n")
    s = Settings.from_env({"TIERMAIL_CONFIG": str(config), "TIERMAIL_POP3_PORT": "5110"})
    assert s.smtp_port == 4025 and s.pop3_port == 5110


def test_round_trip_through_environment() -> None:
    s = Settings(smtp_port=1, allow_plaintext_auth=None, data_dir=Path("/x"))
    assert Settings.from_env(s.as_env()) == s


@pytest.mark.parametrize(("bind", "allowed"), [("127.0.0.1", True), ("::1", True),
                                               ("localhost", True), ("0.0.0.0", False),
                                               ("192.0.2.1", False)])
def test_plaintext_auth_only_on_loopback_by_default(bind: str, allowed: bool) -> None:
    assert Settings(bind=bind).plaintext_auth_allowed is allowed
    assert Settings(bind=bind, allow_plaintext_auth=True).plaintext_auth_allowed is True


@pytest.mark.parametrize(("spam", "learn", "learns"), [
    ("rspamd", "", True), ("spamassassin", "", False), ("off", "", False),
    ("rspamd", "off", False), ("off", "rspamd", True)])
def test_spam_learning_follows_the_spam_scanner_unless_set(spam: str, learn: str,
                                                           learns: bool) -> None:
    """With SpamAssassin or no spam scanning there is no rspamd to train: a learner posting
    to it would only retry and log errors each time a user moves mail into Junk."""
    assert Settings(spam=spam, learn=learn).learns_spam is learns


def test_a_largest_message_rspamd_would_drop_is_refused_by_name() -> None:
    """rspamd resets the connection for a message over its max_message: with
    TIERMAIL_MAX_MESSAGE_SIZE above it, such mail got 451 4.7.0 for ever, said nowhere."""
    with pytest.raises(SettingsError, match=r"^TIERMAIL_MAX_MESSAGE_SIZE=52428801: above "
                       r"rspamd's max_message \(TIERMAIL_RSPAMD_MAX_MESSAGE=52428800\)"):
        Settings.from_env({"TIERMAIL_MAX_MESSAGE_SIZE": "52428801"})
    raised = {"TIERMAIL_MAX_MESSAGE_SIZE": "104857600", "TIERMAIL_RSPAMD_MAX_MESSAGE": "104857600"}
    assert Settings.from_env(raised).max_message_size == 100 * 1024 * 1024
    for spam in ("spamassassin", "off"):  # no rspamd: its limit does not apply
        assert Settings.from_env({"TIERMAIL_MAX_MESSAGE_SIZE": "104857600",
                                  "TIERMAIL_SPAM": spam}).max_message_size == 100 * 1024 * 1024


def test_a_data_memory_below_the_largest_message_as_sent_is_refused() -> None:
    """As sent, DATA of a message of MAX_MESSAGE_SIZE octets may take a third more (every
    line a stuffed "."): a worker holding less could refuse it at every attempt. A memory of
    just MAX_MESSAGE_SIZE was accepted, and such a message got 452 for ever (found in
    review)."""
    with pytest.raises(SettingsError, match=r"^TIERMAIL_SMTP_DATA_MEMORY=100000: below "
                       r"34952537, what DATA of a message of TIERMAIL_MAX_MESSAGE_SIZE="
                       r"26214400 octets may take as sent"):
        Settings.from_env({"TIERMAIL_SMTP_DATA_MEMORY": "100000"})
    for memory, accepted in (("100000", False), ("133336", False), ("133337", True)):
        values = {"TIERMAIL_SMTP_DATA_MEMORY": memory, "TIERMAIL_MAX_MESSAGE_SIZE": "100000"}
        if accepted:
            assert Settings.from_env(values).smtp_data_memory == int(memory)
        else:
            with pytest.raises(SettingsError, match="SMTP_DATA_MEMORY"):
                Settings.from_env(values)
    assert data_wire_octets(100000) == 133337  # + a dot per three octets, rounded up, + ".\r\n"


# Sizes, counts and timeouts where 0 would not mean "off": a POP3 or IMAP session cut at
# once, every message refused, a store that takes no message. Written out here, not read from
# common/settings.py POSITIVE, so that a name dropped there fails this test.
MUST_BE_ABOVE_ZERO = (
    "SCAN_TIMEOUT", "CLAMD_STREAM_MAX", "RSPAMD_MAX_MESSAGE", "MAX_MESSAGE_SIZE",
    "MAX_RECIPIENTS", "MAX_LINE_LENGTH", "SMTP_COMMAND_TIMEOUT", "SMTP_DATA_TIMEOUT",
    "SMTP_MAX_CONNECTIONS", "SMTP_DATA_MEMORY", "SMTP_MAX_ERRORS", "PUBLISH_TIMEOUT",
    "STORE_PREFETCH", "DELIVERY_ATTEMPTS", "POP3_TIMEOUT", "POP3_LOGIN_DEADLINE",
    "POP3_MAX_CONNECTIONS", "IMAP_TIMEOUT", "IMAP_LOGIN_TIMEOUT", "IMAP_LOGIN_DEADLINE",
    "IMAP_MAX_LITERAL", "IMAP_LITERAL_MEMORY", "IMAP_FETCH_MEMORY", "IMAP_MAX_LINE",
    "IMAP_MAX_CONNECTIONS", "IMAP_MAX_ERRORS")


@pytest.mark.parametrize(("name", "value"), [
    ("TIERMAIL_SMTP_PORT", "70000"),  # the kernel would take it as port 4464
    ("TIERMAIL_IMAP_PORT", "0"),
    ("TIERMAIL_POP3_PORT", "-5"),
    ("TIERMAIL_SMTP_PORT", ""),
    ("TIERMAIL_STORE_PREFETCH", "0"),  # 0 is "no limit" to RabbitMQ
    ("TIERMAIL_STORE_PREFETCH", "70000"),
    ("TIERMAIL_MAX_MESSAGE_SIZE", "25M"),
    ("TIERMAIL_MAX_MESSAGE_SIZE", "-1"),
    ("TIERMAIL_RSPAMD_MAX_MESSAGE", "0"),
    ("TIERMAIL_DELIVERY_ATTEMPTS", "0"),
    ("TIERMAIL_SCAN_TIMEOUT", "nan"),
    ("TIERMAIL_PUBLISH_TIMEOUT", "inf"),
    ("TIERMAIL_SMTP_COMMAND_TIMEOUT", "0"),
    ("TIERMAIL_STORE_BATCH_WAIT", "-0.5"),
    ("TIERMAIL_RATE_MESSAGES_PER_IP", "-1"),
    ("TIERMAIL_DEFAULT_QUOTA", "-1"),
    ("TIERMAIL_SPAM", "bogus"),
    ("TIERMAIL_VIRUS", "clamav"),
    ("TIERMAIL_SCAN_FAILURE", "ignore"),
    ("TIERMAIL_VIRUS_OVERSIZE", "accept"),
    ("TIERMAIL_LOG_LEVEL", "LOUD"),
    ("TIERMAIL_LOG_FORMAT", "xml"),
    ("TIERMAIL_AMQP_URL", "http://127.0.0.1:5672/"),
    ("TIERMAIL_AMQP_URL", "amqp://guest:guest@127.0.0.1:99999/"),
    ("TIERMAIL_REDIS_URL", "redis://127.0.0.1:6379/abc"),  # redis-py would use database 0
    ("TIERMAIL_REDIS_URL", "127.0.0.1:6379"),
    ("TIERMAIL_RSPAMD_URL", "127.0.0.1:11333"),
    ("TIERMAIL_RATE_LIMIT_EXEMPT", "127.0.0.0/8,localhost"),
    ("TIERMAIL_DATA_DIR", ""),
    ("TIERMAIL_HOSTNAME", " "),
    ("TIERMAIL_HOSTNAME", "mail.bücher.example"),  # RFC 6531 3.7.1: A-labels in greetings
    ("TIERMAIL_HOSTNAME", "mail example.org"),
    # No domain for a greeting; "," and "/" broke the dev certificate's subject (traceback).
    ("TIERMAIL_HOSTNAME", "a,b"),
    ("TIERMAIL_HOSTNAME", "mail/x"),
    ("TIERMAIL_HOSTNAME", "x=y"),
    ("TIERMAIL_HOSTNAME", "-bad"),
    ("TIERMAIL_HOSTNAME", "a:b"),
    ("TIERMAIL_HOSTNAME", "a..b"),
    ("TIERMAIL_SMTP_PORT", "2_525"),  # int() takes both, as 2525 and 33
    ("TIERMAIL_SMTP_PORT", "\u0663\u0663"),
    ("TIERMAIL_SCAN_TIMEOUT", "3_0"),
    # A scanner address whose port is no number was a traceback and a 451 at every scan.
    ("TIERMAIL_CLAMD_ADDRESS", "clamd.internal:clamd"),
    ("TIERMAIL_SPAMD_ADDRESS", "127.0.0.1:99999"),
    ("TIERMAIL_SPAMD_ADDRESS", ":783"),
    # A host without its port was taken for a socket file in the working directory.
    ("TIERMAIL_CLAMD_ADDRESS", "clamav"), ("TIERMAIL_CLAMD_ADDRESS", "127.0.0.1"),
    ("TIERMAIL_SPAMD_ADDRESS", "run/spamd.sock"),
    # Postmaster mail went to an address no domain has: refused as not local.
    ("TIERMAIL_POSTMASTER", "alice"),
    ("TIERMAIL_POSTMASTER", "@example.org"),
    ("TIERMAIL_POSTMASTER", "alice@example.org, bob@example.org"),
    # RabbitMQ refused every exchange and queue: the filter answered 451 to all mail.
    ("TIERMAIL_QUEUE_PREFIX", "amq"), ("TIERMAIL_QUEUE_PREFIX", "amq.mail"),
    ("TIERMAIL_QUEUE_PREFIX", "q" * 250),
    # A reserve this small frees too little for a store to start on a full disk.
    ("TIERMAIL_STORE_SPACE_RESERVE", "4096"),
    # aiormq takes these; the learner's pika refused them: a traceback, restarted forever.
    ("TIERMAIL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/x?name=store1"),
    ("TIERMAIL_AMQP_URL", "amqps://u:p@mq.internal/x?cafile=/etc/ssl/ca.pem"),
    ("TIERMAIL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/x?heartbeat=abc"),
    ("TIERMAIL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/x?frame_max=1"),
    # redis-py refused these at the first client or connection: a traceback in every tier.
    ("TIERMAIL_REDIS_URL", "redis://127.0.0.1:6379/1?socket_timeout=abc"),
    ("TIERMAIL_REDIS_URL", "redis://127.0.0.1:6379/1?bogus=1"),
    # Past what the broker's x-delivery-limit or a quota's INTEGER holds: the filter
    # answered 451 to all mail; IMAP QUOTA sent a number outside RFC 9208's number64.
    ("TIERMAIL_DELIVERY_ATTEMPTS", str(2**31)),
    ("TIERMAIL_DEFAULT_QUOTA", str(2**63)),
    ("TIERMAIL_MAX_MESSAGE_SIZE", "9" * 30),
    ("TIERMAIL_STORE_PREFETCH", "65536"),  # basic.qos would refuse it at every start
    ("TIERMAIL_HOSTNAME", ".".join(["a" * 63] * 4)[:254]),  # 254 octets: no DNS name
    ("TIERMAIL_ALLOW_PLAINTEXT_AUTH", "maybe"),
    *((f"TIERMAIL_{name}", "0") for name in MUST_BE_ABOVE_ZERO),
])
def test_values_no_tier_can_work_with_are_refused_by_name(name: str, value: str) -> None:
    """Each was taken as it was, and a tier failed later with a traceback (a scanner
    choice, a log level) or ran half-working (port 70000 listened on 4464)."""
    with pytest.raises(SettingsError, match=f"^{name}="):
        Settings.from_env({name: value})


@pytest.mark.parametrize(("env", "named"), [
    ({"TIERMAIL_POP3_PORT": "2143"}, "TIERMAIL_POP3_PORT=2143: the same port as "
                                     "TIERMAIL_IMAP_PORT"),
    ({"TIERMAIL_SMTP_PORT": "993", "TIERMAIL_IMAPS_PORT": "993"},
     "TIERMAIL_IMAPS_PORT=993: the same port as TIERMAIL_SMTP_PORT"),
    ({"TIERMAIL_POP3S_PORT": "2110"}, "TIERMAIL_POP3S_PORT=2110: the same port as "
                                      "TIERMAIL_POP3_PORT"),
])
def test_two_listeners_on_one_port_are_refused_by_name(env: dict[str, str],
                                                        named: str) -> None:
    """The second tier failed at start, blaming "another tiermail stack, or another
    server" for a port its own settings had given twice."""
    with pytest.raises(SettingsError, match=f"^{named}"):
        Settings.from_env(env)


@pytest.mark.parametrize(("name", "value"), [
    ("TIERMAIL_RATE_MESSAGES_PER_IP", "0"), ("TIERMAIL_STORE_BATCH_WAIT", "0"),
    ("TIERMAIL_IMAP_IDLE_KEEPALIVE", "0"), ("TIERMAIL_LOG_LEVEL", "debug"),
    ("TIERMAIL_SPAMASSASSIN_REJECT_SCORE", "-2.5"), ("TIERMAIL_SMTP_PORT", "65535"),
    ("TIERMAIL_REDIS_URL", "redis://:pw@redis.internal:6380/3"),
    ("TIERMAIL_REDIS_URL", "unix:///run/redis/redis.sock?db=2"),
    ("TIERMAIL_AMQP_URL", "amqps://u:p@mq.internal/tiermail-b"),
    ("TIERMAIL_AMQP_URL", "amqp://u:p@mq.internal/b?heartbeat=30&frame_max=131072"),
    ("TIERMAIL_REDIS_URL", "redis://redis.internal:6379/1?socket_timeout=2.5"),
    ("TIERMAIL_DELIVERY_ATTEMPTS", str(2**31 - 1)), ("TIERMAIL_DEFAULT_QUOTA", str(2**63 - 1)),
    ("TIERMAIL_RATE_LIMIT_EXEMPT", ""), ("TIERMAIL_LEARN", ""),
    ("TIERMAIL_HOSTNAME", "mail.xn--bcher-kva.example"),
    ("TIERMAIL_SMTP_PORT", " 2525 "), ("TIERMAIL_SCAN_TIMEOUT", "1e1"),
    ("TIERMAIL_CLAMD_ADDRESS", "/run/clamav/clamd.ctl"),
    ("TIERMAIL_CLAMD_ADDRESS", "[::1]:3310"), ("TIERMAIL_SPAMD_ADDRESS", "spamd.internal:783"),
    ("TIERMAIL_SPAMD_ADDRESS", ""),  # with TIERMAIL_SPAM=rspamd or off, not used
    ("TIERMAIL_POSTMASTER", "Alice@Example.org"), ("TIERMAIL_POSTMASTER", "pm@b\u00fccher.example"),
    ("TIERMAIL_QUEUE_PREFIX", "amqp-mail"), ("TIERMAIL_QUEUE_PREFIX", "mail.amq"),
    ("TIERMAIL_STORE_PREFETCH", "65535"),
    ("TIERMAIL_HOSTNAME", ".".join(["a" * 63] * 4)[:253]),
])
def test_edge_values_that_mean_something_are_taken(name: str, value: str) -> None:
    Settings.from_env({name: value})


def test_config_file_as_operators_write_it(tmp_path: Path) -> None:
    config = tmp_path / "tiermail.env"
    config.write_bytes("\ufeff# stack b\r\n\r\n  SMTP_PORT = 4025  \r\n"
                       'export TIERMAIL_HOSTNAME="mx.example.org"\r\n'
                       "RSPAMD_CONTROLLER_PASSWORD=ends-in-a-quote'\r\n"
                       "REDIS_PREFIX='b:'\r\n".encode())
    s = Settings.from_env({"TIERMAIL_CONFIG": str(config)})
    assert (s.smtp_port, s.hostname, s.redis_prefix) == (4025, "mx.example.org", "b:")
    assert s.rspamd_controller_password == "ends-in-a-quote'"


@pytest.mark.parametrize(("text", "message"), [
    ("SMTP_PORT=25\nSMPT_PORT=26\n", r"tiermail\.env:2: unknown setting TIERMAIL_SMPT_PORT"),
    ("SMTP_PORT\n", r"tiermail\.env:1: expected KEY=VALUE"),
    ("=25\n", r"tiermail\.env:1: expected KEY=VALUE"),
    ("CONFIG=other.env\n", r"tiermail\.env:1: unknown setting TIERMAIL_CONFIG"),
    ("SMTP_PORT=25 # the standard port\n", r"TIERMAIL_SMTP_PORT='25 # the standard port'"),
])
def test_config_file_mistakes_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "tiermail.env"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"TIERMAIL_CONFIG": str(config)})


def test_missing_config_file_is_a_settings_error(tmp_path: Path) -> None:
    """It was a FileNotFoundError with a traceback from every tier and command."""
    with pytest.raises(SettingsError, match=r"^TIERMAIL_CONFIG='.*nope\.env': cannot read it: "
                                            "No such file or directory"):
        Settings.from_env({"TIERMAIL_CONFIG": str(tmp_path / "nope.env")})


def test_choices_are_the_ones_the_tiers_know() -> None:
    from common.settings import CHOICES
    from services.filter.backends.scanners import SPAM_BACKENDS, VIRUS_BACKENDS
    from services.filter.rules.scan_failure import ScanFailure
    from services.filter.rules.virus import Oversize

    assert CHOICES["spam"] == SPAM_BACKENDS and CHOICES["virus"] == VIRUS_BACKENDS
    assert set(CHOICES["scan_failure"]) == set(ScanFailure)
    assert set(CHOICES["virus_oversize"]) == set(Oversize)


@pytest.mark.parametrize(("value", "meant"), [
    ("yes", True), ("on", True), ("true", True), ("1", True), (" Yes ", True),
    ("no", False), ("off", False), ("false", False), ("0", False), ("OFF", False)])
def test_yes_and_no_are_read_as_operators_write_them(value: str, meant: bool) -> None:
    assert Settings.from_env({"TIERMAIL_ALLOW_PLAINTEXT_AUTH": value}).allow_plaintext_auth \
        is meant
