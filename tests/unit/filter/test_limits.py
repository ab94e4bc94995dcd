"""The SMTP server's limits as derived from the settings."""

from __future__ import annotations

from common.settings import Settings
from services.filter.server import ServerLimits


def test_the_processing_timeout_outlasts_a_timed_out_scan_and_a_whole_publish() -> None:
    """From the end of DATA the scanners may take TIERMAIL_SCAN_TIMEOUT and the publish its
    deadline: the session's own timeout must outlast both, or a slow scan followed by a
    slow publish is cut with 421 instead of getting its own reply."""
    settings = Settings(scan_timeout=120.0)
    limits = ServerLimits.from_settings(settings, publish_deadline=40.0)
    assert limits.processing_timeout > 120.0 + 40.0
