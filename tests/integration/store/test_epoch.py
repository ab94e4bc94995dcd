"""The store's run marker (services/store/backends/epoch.py) at a clean stop, from the order
of its system calls: the marker says "not stopped cleanly" until everything is on disk."""

from __future__ import annotations

from pathlib import Path

from services.store.backends.epoch import RUNNING
from tests.integration.store.syscall_trace import file_system, trace_python


def test_a_clean_stop_syncs_the_file_system_before_the_marker_goes(tmp_path: Path) -> None:
    """Flag changes commit without waiting for the disk: a marker removed before they are
    synced lets a power loss take MODSEQs back while the next start counts the stop as clean
    (no new epoch, MODSEQs handed out again). The removal itself is made durable too."""
    root = tmp_path / "mail"
    root.mkdir()
    calls, returned = trace_python(
        "from pathlib import Path\n"
        "from services.store.backends import epoch\n"
        f"epoch.begin_run(Path({str(root)!r}))\n"
        f"epoch.end_run(Path({str(root)!r}))",
        tmp_path / "stop.strace", "openat,unlink,unlinkat,syncfs,fsync,write")
    [removed] = [call for call in calls if call.name in ("unlink", "unlinkat") and call.ok
                 and call.strings()[-1].decode() == str(root / RUNNING)]
    synced = [call for call in calls if call.name == "syncfs" and call.ok
              and call.fds() == [str(root)]]
    assert any(sync.end < removed.start for sync in synced), (
        f"the marker was removed (line {removed.start}) before a syncfs of {root}")
    fs = file_system(calls, set(), str(root))
    assert fs.synced_between(str(root), removed.end, returned.start), (
        "the marker's removal was not made durable before end_run returned")
