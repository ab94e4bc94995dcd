"""Raising the open-file limit at start (common/fdlimit.py), on this process's own limit."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from common.fdlimit import FALLBACK_CEILING, RESERVE, raise_open_file_limit


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 512, f"hard limit {hard} too low to test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_one(low_soft_limit: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    raised = raise_open_file_limit(100, "TIERMAIL_X")
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
    if low_soft_limit != resource.RLIM_INFINITY:
        assert raised == low_soft_limit
    assert "open-file limit" not in caplog.text


def test_connection_limits_beyond_the_hard_limit_are_named_in_a_warning(
        low_soft_limit: int, caplog: pytest.LogCaptureFixture) -> None:
    connections = FALLBACK_CEILING if low_soft_limit == resource.RLIM_INFINITY else low_soft_limit
    with caplog.at_level(logging.WARNING):
        raise_open_file_limit(connections, "TIERMAIL_IMAP_MAX_CONNECTIONS")
    assert f"below the {2 * connections + RESERVE}" in caplog.text  # two during a handshake
    assert "TIERMAIL_IMAP_MAX_CONNECTIONS" in caplog.text
