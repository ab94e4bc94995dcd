"""Opening a tier's listening sockets and its data directory: a failure at start is one line
for the operator (CannotStart), naming the setting to look at, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.settings import PREFIX

log = logging.getLogger(__name__)

PORT_LOCK_PREFIX = "tiermail-smtp-"
ABANDONED_AFTER = 60.0  # seconds a port file must be unchanged before it counts as abandoned


class CannotStart(Exception):
    """A tier cannot start as configured on this machine: a port taken, a bind address
    this machine does not have, a data directory another process owns. Not retried: `tiermail
    up` stops instead of restarting the tier."""


def format_address(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets ([::1]:2525), as clients write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def binding(setting: str, host: str, port: int) -> Iterator[None]:
    """Around opening the listener for `TIERMAIL_<setting>` on host:port."""
    try:
        yield
    except OSError as exc:
        raise CannotStart(f"cannot listen on {format_address(host, port)} "
                          f"({PREFIX}{setting.upper()}): {_why(exc, host)}") from None


def _why(exc: OSError, host: str) -> str:
    if exc.errno == errno.EADDRINUSE or "address already in use" in str(exc):
        return "the port is in use (another tiermail stack, or another server)"
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"{host!r} is no address of this machine ({PREFIX}BIND)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


def check_free(host: str, port: int, setting: str) -> None:
    """Raise CannotStart unless host:port could be listened on now. Without SO_REUSEPORT,
    so a port that filters share (they open it with SO_REUSEPORT) counts as taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with binding(setting, host, port), socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.listen(1)


def join_port(host: str, port: int, stack: str, setting: str,
              lock_dir: Path | None = None) -> IO[str] | None:
    """Take part in serving host:port with the workers already on it, if they belong to the
    same `stack` (what the workers share: queues and directory, no password in it): the
    kernel spreads connections over every process on an SO_REUSEPORT port, so a worker of
    another stack there would take half of the mail into its own queues (or answer 451
    without its directory). Raises CannotStart when the port's workers are another stack's.
    Held (a shared lock) until `leave_port`; the first worker on the port writes its stack
    into the file, the last removes it. None (and a warning) when the file cannot be opened
    (another user's, say): the check is skipped rather than the worker not started.

    The file is the port's, whatever `host`: two spellings of one address (127.0.0.1 and
    localhost), or a wildcard and an address it covers (0.0.0.0 and 127.0.0.1, where the
    kernel gives the more specific listener every connection to its address), are one
    listening place to the kernel."""
    folder = lock_dir or Path(tempfile.gettempdir())
    path = folder / f"{PORT_LOCK_PREFIX}{port}.lock"
    _remove_abandoned(folder, path)
    _refuse_older_workers_of_another_stack(folder, host, port, stack, setting)
    while True:
        try:
            handle = open(path, "a+")  # noqa: SIM115 - held open on purpose
        except OSError as exc:
            log.warning("cannot check which stack serves %s (%s: %s); listening anyway",
                        format_address(host, port), path, exc.strerror or exc)
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            first = True
        except BlockingIOError:  # workers are on the port
            fcntl.flock(handle, fcntl.LOCK_SH)  # after a first one's write, if one is writing
            first = False
        if still_names(handle, path):
            break
        handle.close()  # the last worker removed it while we opened it: open the new one
    if not first:  # theirs is the stack in the file
        handle.seek(0)
        theirs = handle.read().strip()
        if theirs != stack:
            handle.close()
            raise _taken(host, port, setting, theirs, stack) from None
        return handle
    handle.seek(0)  # the first: say whose the port is
    handle.truncate()
    handle.write(stack + "\n")
    handle.flush()
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def _refuse_older_workers_of_another_stack(folder: Path, host: str, port: int, stack: str,
                                           setting: str) -> None:
    """Workers of tiermail before 2026-12-07 named the file after their bind text as well
    (`tiermail-smtp-HOST-PORT.lock`): while one of them still serves the port (an upgrade
    under way), its file is the one that says whose the port is."""
    for older in folder.glob(f"{PORT_LOCK_PREFIX}*-{port}.lock"):
        try:
            with open(older) as handle:
                if locked_if_unheld(handle):
                    continue  # no worker holds it: abandoned, removed by the next start
                theirs = handle.read().strip()
        except OSError:
            continue  # gone meanwhile, or another user's
        if theirs and theirs != stack:
            raise _taken(host, port, setting, theirs, stack)


def _taken(host: str, port: int, setting: str, theirs: str, ours: str) -> CannotStart:
    return CannotStart(
        f"cannot listen on {format_address(host, port)} ({PREFIX}{setting.upper()}): "
        f"filters of another stack serve port {port} ({theirs}; this one: {ours}), and the "
        "kernel would share the connections between both (on one machine, the filters on a "
        f"port are one stack's, whatever their {PREFIX}BIND)")


def _remove_abandoned(folder: Path, ours: Path) -> None:
    """Remove the port files no worker holds: those of workers that were killed (SIGKILL,
    a crash) and so never left their port. Not a recent one: the first worker on a port
    changes its exclusive lock to a shared one after writing the file, and that change
    lets go of the lock for a moment (flock(2)), in which the file would look abandoned."""
    settled = time.time() - ABANDONED_AFTER
    for path in folder.glob(f"{PORT_LOCK_PREFIX}*.lock"):
        try:
            if path == ours or path.stat().st_mtime > settled:
                continue
            handle = open(path)  # noqa: SIM115 - closed by leave_port; not created if gone
        except OSError:
            continue  # gone meanwhile, or another user's
        leave_port(handle)


def leave_port(handle: IO[str]) -> None:
    """Stop taking part in serving the port `join_port` let us join; the last worker on it
    removes the file (one per port ever used piled up in /tmp: hundreds per test run).
    Taking the exclusive lock is no atomic change from the shared one; a worker that joins
    meanwhile either takes it first (and nothing is removed) or finds the file it opened
    removed and opens the new one (`still_names`). Also what a starting worker does with
    the files of killed ones (`_remove_abandoned`)."""
    if locked_if_unheld(handle):
        with contextlib.suppress(FileNotFoundError):
            Path(handle.name).unlink()
    handle.close()


def locked_if_unheld(handle: IO[str] | IO[bytes]) -> bool:
    """Take an exclusive lock on `handle`'s file if no one holds one (without waiting);
    True when taken and its path still names that file (whoever held it last has gone, and
    no one removed it meanwhile): the caller may remove it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return still_names(handle, Path(handle.name))


def still_names(handle: IO[str] | IO[bytes], path: Path) -> bool:
    """Whether `path` still names the file `handle` has open."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def lock_directory(directory: Path, what: str) -> IO[str]:
    """Hold an exclusive lock on `directory` for as long as the returned file stays open
    (the kernel lets go when the process ends, however it ends). A second holder gets
    CannotStart naming the first one's process id."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise CannotStart(f"another {what} is running on {directory} (pid {holder}); "
                          f"one {what} per {PREFIX}DATA_DIR") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
