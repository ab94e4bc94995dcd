from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def handlers_restored() -> Iterator[None]:
    """For tests that run `services.stack._run_tiers`: it installs its own SIGINT and
    SIGTERM handlers."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])
