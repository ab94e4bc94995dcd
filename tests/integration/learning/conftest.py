"""Fixtures shared by the spam-learning tests."""

from __future__ import annotations

import pytest

from common.settings import Settings
from services.devscanners.runner import Scanner


@pytest.fixture
def learn_settings(settings: Settings, rspamd_scanner: Scanner) -> Settings:
    return settings.replace(learn="rspamd", rspamd_controller_url=rspamd_scanner.controller_url,
                            rspamd_controller_password=rspamd_scanner.controller_password)
