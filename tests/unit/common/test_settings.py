from pathlib import Path

import pytest

from common.settings import Settings, SettingsError


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
                                               ("0.0.0.0", False), ("192.0.2.1", False)])
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
