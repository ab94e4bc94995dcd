"""An executor whose one thread does not keep a stopping process alive."""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any


class DaemonThread(concurrent.futures.Executor):
    """One daemon thread running what is submitted, in order. A ThreadPoolExecutor's threads
    are joined when the interpreter exits, so a call that cannot be interrupted kept the
    stopped store from exiting until it ended: a learn job's publish RabbitMQ blocked (a
    resource alarm; pika cannot be interrupted from another thread), the text index's write
    of a large body (SQLite's FTS5 does not look at sqlite3_interrupt while it tokenizes)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._shut = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        if self._shut:
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Never waits: the thread may be stuck in a publish (what it is a daemon for)."""
        self._shut = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while True:
                    call = self._calls.get_nowait()
                    if call is not None:
                        call[0].cancel()
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits it
                future.set_exception(exc)
