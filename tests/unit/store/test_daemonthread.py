"""services/store/daemonthread.py: a call that cannot be interrupted (a learn publish
RabbitMQ blocks, an FTS5 write of a large body) must not keep a stopped store alive."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO

BLOCKED_FOR_EVER = """
import threading
from services.store.daemonthread import DaemonThread
DaemonThread("stuck").submit(threading.Event().wait)
print("submitted", flush=True)
"""


def test_a_process_exits_with_a_call_still_running_in_its_daemon_thread() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCKED_FOR_EVER], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "submitted\n"), done.stderr
