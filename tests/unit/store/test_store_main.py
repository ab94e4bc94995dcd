"""The store's entry point (services/store/main.py): what it computes without a process."""

from __future__ import annotations

import types

import pytest

from services.store import main as store_main
from services.store.consumer import ConsumerStats


def test_the_text_indexer_waits_while_mail_was_delivered_in_the_last_moment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The indexer yields the CPU to delivery: it may work DELIVERY_QUIET seconds after the
    last delivery, not before (a clock of the test's own)."""
    monkeypatch.setattr(store_main, "time", types.SimpleNamespace(time=lambda: 1000.0))
    stats = ConsumerStats()
    stats.last_delivery_at = 1000.0
    assert store_main._quiet_in(stats) == store_main.DELIVERY_QUIET
    stats.last_delivery_at = 1000.0 - store_main.DELIVERY_QUIET - 1
    assert store_main._quiet_in(stats) < 0
