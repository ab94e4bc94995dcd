"""The store's epoch on a host that does not say which boot this is (no
/proc/sys/kernel/random/boot_id: epoch.py's `current_boot` is then ""): a run marker left
behind can no longer be told from one a power loss left, so it always counts as one."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.store.backends import epoch


@pytest.fixture
def boot_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epoch, "BOOT_ID", tmp_path / "no-boot-id")


@pytest.mark.usefixtures("boot_unknown")
def test_a_store_not_stopped_cleanly_starts_a_new_epoch(tmp_path: Path) -> None:
    """The marker the unknown boot wrote (an empty id) must not pass for this boot's: the
    flag changes the stop may have lost would then keep their MODSEQs."""
    root = tmp_path / "mail"
    root.mkdir()
    first = epoch.begin_run(root)
    assert epoch.begin_run(root) == first + 1


@pytest.mark.usefixtures("boot_unknown")
def test_a_store_not_stopped_cleanly_is_not_taken_for_a_killed_one(tmp_path: Path) -> None:
    """A killed run needs no room to start again (spacereserve.at_start keeps the reserve);
    one that may have been cut by a power loss is not that."""
    root = tmp_path / "mail"
    root.mkdir()
    epoch.begin_run(root)
    assert not epoch.resumes_a_killed_run(root)


@pytest.mark.usefixtures("boot_unknown")
def test_a_clean_stop_is_still_clean(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    first = epoch.begin_run(root)
    epoch.end_run(root)
    assert epoch.begin_run(root) == first
