"""Reading an strace of the store: which bytes went where, and what was durable when.

The trace is taken with `strace -f -xx -yy` (STRACE_OPTIONS): every string in hex, every fd
with its path or socket. strace handles one tracee stop at a time and prints a call's exit
before it lets that thread go on, so the order of the lines is an order the calls really
happened in: a reply that depends on an fsync having returned can only be written by a
call that starts on a later line. Each call keeps the line of its start (`start`) and of its
return (`end`); "A before B" below always means A.end < B.start.

`durability_violations` holds the store to its rule (docs/architecture.md, "Delivery: order
of operations"): when it tells a peer that something is stored (an AMQP basic.ack, an IMAP
tagged OK, a POP3 +OK), every byte it had written to the files that something lives in, and
every name it had created on the way to them, were already on disk: each write followed by
an fsync or fdatasync of the same file, each new name (mkdir, a new file, the target of a
rename or link) by one of its directory. Files are followed through renames and links, so
a message written and fsynced under tmp/ counts as the file under m/ it becomes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pamqp import commands, frame, header

from tests.support import REPO, require_client

STRACE_SYSCALLS = ("mkdir,mkdirat,open,openat,creat,rename,renameat,renameat2,link,linkat,"
                   "unlink,unlinkat,rmdir,write,writev,pwrite64,pwritev,pwritev2,sendto,"
                   "sendmsg,read,readv,recvfrom,recvmsg,fsync,fdatasync")
# Socket reads are needed whole to follow the AMQP framing: uvloop reads at most 256 KiB.
STRACE_OPTIONS = ["-f", "-qq", "-xx", "-yy", "-s", str(256 * 1024),
                  "-e", f"trace={STRACE_SYSCALLS}"]

_LINE = re.compile(r"^(\d+) +(?:\d\d:\d\d:\d\d\.\d+ )?(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
# An fd and what it is: a path (in hex; a device's numbers after it) or a socket.
_FD = re.compile(r"(-?\d+|AT_FDCWD)<((?:\\x[0-9a-f]{2})+|[\w-]+:\[[^\]]*\]|[^<>]*)"
                 r"(?:<[^>]*>)?>")
_RESULT = re.compile(r"\) += (-?\d+)")


def _unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


@dataclass
class Call:
    tid: int
    name: str
    start: int  # line number of its start
    end: int  # line number of its return
    args: str
    result: int

    @property
    def ok(self) -> bool:
        return self.result >= 0

    def strings(self) -> list[bytes]:
        """The call's string arguments (paths, or the data of a write), in order."""
        return [_unhex(s) for s in _STRING.findall(self.args)]

    def fds(self) -> list[str]:
        """The paths or socket names of its fd arguments (AT_FDCWD's included)."""
        out = []
        for _, target in _FD.findall(self.args):
            out.append(_unhex(target).decode("utf-8", "replace")
                       if target.startswith("\\x") else target)
        return out


def parse_strace(lines: Iterable[str]) -> list[Call]:
    """The complete calls of an `strace -f -xx -yy` output, in the order they started."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, int, str]] = {}
    for number, raw in enumerate(lines):
        matched = _LINE.match(raw.rstrip("\n"))
        if not matched:
            continue
        tid, rest = int(matched.group(1)), matched.group(2)
        if rest.startswith(("---", "+++")):
            continue
        resumed = _RESUMED.match(rest)
        if resumed:
            if tid not in pending:
                continue
            name, start, head = pending.pop(tid)
            calls.append(_call(tid, name, start, number, head + resumed.group(2)))
            continue
        call = _CALL.match(rest)
        if not call:
            continue
        if rest.endswith("<unfinished ...>"):
            pending[tid] = (call.group(1), number, call.group(2)[:-len("<unfinished ...>")])
        else:
            calls.append(_call(tid, call.group(1), number, number, call.group(2)))
    calls.sort(key=lambda c: c.start)
    return calls


def _call(tid: int, name: str, start: int, end: int, text: str) -> Call:
    result = _RESULT.findall(text)
    args = text[:text.rfind(") = ")] if ") = " in text else text
    return Call(tid, name, start, end, args, int(result[-1]) if result else -1)


RETURNED = b"-- the code returned --"


def trace_python(code: str, output: Path, syscalls: str) -> tuple[list[Call], Call]:
    """Run `code` in a new Python interpreter of this repository under `strace -f -xx -yy`
    tracing `syscalls` (write included); its calls, and the write that says `code` returned."""
    strace = require_client("/usr/bin/strace", "strace")
    options = ["-f", "-qq", "-xx", "-yy", "-e", f"trace={syscalls}", "-o", str(output)]
    script = f"{code}\nimport os\nos.write(1, {RETURNED!r})\n"
    subprocess.run([strace, *options, "--", sys.executable, "-c", script], cwd=REPO,
                   check=True, timeout=60, stdout=subprocess.DEVNULL)
    with open(output, errors="replace") as lines:
        calls = parse_strace(lines)
    [returned] = [call for call in calls
                  if call.name == "write" and RETURNED in b"".join(call.strings())]
    return calls, returned


# Files and names

# fallocate: blocks given to a file (the space reserve), durable only once it is fsynced.
_WRITES = {"write", "writev", "pwrite64", "pwritev", "pwritev2", "fallocate"}
_SENDS = {"write", "writev", "sendto", "sendmsg"}
_RECEIVES = {"read", "readv", "recvfrom", "recvmsg"}
_SYNCS = {"fsync", "fdatasync"}


@dataclass
class Write:
    file: int  # identity of the file, kept across renames and links
    path: str  # its name when written
    at: Call
    data: bytes


@dataclass
class Name:
    path: str
    file: int | None  # None for a directory
    at: Call  # what made it (for a name older than the trace: a stand-in at line -1)
    removed_at: int | None = None  # line of the unlink or rename that took the name away

    @property
    def made_in_trace(self) -> bool:
        return self.at.start >= 0


@dataclass
class FileSystem:
    """The file-system side of a trace: writes, syncs and names, files followed by identity."""

    writes: list[Write] = field(default_factory=list)
    syncs: dict[int | str, list[Call]] = field(default_factory=dict)  # by file id and path
    names: list[Name] = field(default_factory=list)
    current: dict[str, int] = field(default_factory=dict)  # path -> file id now
    _next_id: int = 0

    def identity(self, path: str) -> int:
        if path not in self.current:
            self._next_id += 1
            self.current[path] = self._next_id
        return self.current[path]

    def synced_between(self, key: int | str, after: int, before: int) -> bool:
        return any(after < s.start and s.end < before for s in self.syncs.get(key, []))

    def live_files(self, line: int) -> set[int]:
        """The file ids that still had a name at `line`."""
        alive: dict[str, int] = {}
        for name in self.names:
            if name.file is not None and name.at.end < line and (
                    name.removed_at is None or name.removed_at >= line):
                alive[name.path] = name.file
        return set(alive.values())


def file_system(calls: list[Call], existing: set[str], cwd: str) -> FileSystem:
    """Follow every file operation of `calls`; `existing`: absolute paths of the files that
    existed before the trace began."""
    fs = FileSystem()
    before = Call(0, "existing", -1, -1, "", 0)
    for path in sorted(existing):
        fs.names.append(Name(path, fs.identity(path), before))
    for call in calls:
        if call.ok:
            _apply(fs, call, cwd)
    return fs


def _resolve(dirfd: str, path: str, cwd: str) -> str:
    base = cwd if dirfd == "AT_FDCWD" or not dirfd.startswith("/") else dirfd
    return str(PurePosixPath(base, path)) if not path.startswith("/") else path


_AT_CALLS = {"openat", "mkdirat", "renameat", "renameat2", "linkat", "unlinkat"}


def _at_paths(call: Call, cwd: str) -> list[str]:
    """The absolute paths a call names, in argument order (a *at() call's each relative to
    the directory fd before it)."""
    strings = [s.decode("utf-8", "replace") for s in call.strings()]
    dirfds = call.fds() if call.name in _AT_CALLS else []
    return [_resolve(dirfds[i] if i < len(dirfds) else "AT_FDCWD", s, cwd)
            for i, s in enumerate(strings)]


def _remove(fs: FileSystem, path: str, line: int) -> None:
    fs.current.pop(path, None)
    for name in fs.names:
        if name.path == path and name.removed_at is None:
            name.removed_at = line


def _apply(fs: FileSystem, call: Call, cwd: str) -> None:
    name = call.name
    if name in _WRITES and call.fds() and call.fds()[0].startswith("/"):
        path = call.fds()[0]
        fs.writes.append(Write(fs.identity(path), path, call, b"".join(call.strings())))
    elif name in _SYNCS and call.fds() and call.fds()[0].startswith("/"):
        # Keyed by both: a file's sync follows it through renames, a directory's is found
        # by its path (SQLite opens directories without O_DIRECTORY).
        path = call.fds()[0]
        fs.syncs.setdefault(path, []).append(call)
        fs.syncs.setdefault(fs.identity(path), []).append(call)
    elif name in ("mkdir", "mkdirat"):
        fs.names.append(Name(_at_paths(call, cwd)[0], None, call))
    elif name in ("open", "openat", "creat") and ("O_CREAT" in call.args or name == "creat"):
        path = _at_paths(call, cwd)[0]
        if path not in fs.current:
            fs.names.append(Name(path, fs.identity(path), call))
    elif name in ("rename", "renameat", "renameat2"):
        old, new = _at_paths(call, cwd)[:2]
        file = fs.current.get(old)
        _remove(fs, old, call.end)
        _remove(fs, new, call.end)
        if file is not None:
            fs.current[new] = file
        fs.names.append(Name(new, file, call))
    elif name in ("link", "linkat"):
        old, new = _at_paths(call, cwd)[:2]
        fs.current[new] = fs.identity(old)
        fs.names.append(Name(new, fs.current[new], call))
    elif name in ("unlink", "unlinkat", "rmdir"):
        _remove(fs, _at_paths(call, cwd)[0], call.end)


# Sockets

def socket_streams(calls: list[Call], wanted: Callable[[str], bool]
                   ) -> dict[str, tuple[list[tuple[int, Call]], list[tuple[int, Call]]]]:
    """For each socket `wanted` accepts (by its strace name, "TCP:[a:p->b:q]"): the data
    it sent and received, as (offset in the stream, call) pieces."""
    streams: dict[str, tuple[list[tuple[int, Call]], list[tuple[int, Call]]]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for call in calls:
        if not call.ok or not call.fds() or not wanted(call.fds()[0]):
            continue
        direction = 0 if call.name in _SENDS else 1 if call.name in _RECEIVES else None
        if direction is None:
            continue
        sock = call.fds()[0]
        pieces = streams.setdefault(sock, ([], []))[direction]
        offset = sizes.get((sock, direction), 0)
        pieces.append((offset, call))
        sizes[(sock, direction)] = offset + call.result
    return streams


def stream_bytes(pieces: list[tuple[int, Call]]) -> bytes:
    return b"".join(call_data(call)[:call.result] for _, call in pieces)


def call_data(call: Call) -> bytes:
    """What a send wrote or a receive read (strace prints a receive's buffer after it)."""
    data = b"".join(call.strings())
    if len(data) < call.result:
        raise AssertionError(f"strace cut the data of {call.name} at line {call.start}; "
                             "raise -s")
    return data


def call_at(pieces: list[tuple[int, Call]], offset: int) -> Call:
    """The call that carried the byte at `offset` of a stream."""
    found = pieces[0][1]
    for start, call in pieces:
        if start > offset:
            break
        found = call
    return found


def amqp_frames(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(offset, channel, frame) for each frame of one direction of an AMQP connection."""
    offset = 0
    if data.startswith(b"AMQP"):
        offset = 8
    while offset < len(data):
        size = int.from_bytes(data[offset + 3:offset + 7], "big") + 8
        if offset + size > len(data):
            raise AssertionError(f"AMQP stream ends inside a frame at {offset}")
        _, channel, decoded = frame.unmarshal(data[offset:offset + size])
        yield offset, channel, decoded
        offset += size


@dataclass(frozen=True)
class Ack:
    at: Call  # the send that carried the basic.ack frame
    queue_ids: tuple[str, ...]  # the messages it settled


def amqp_acks(received: bytes, sent: bytes, sent_pieces: list[tuple[int, Call]]) -> list[Ack]:
    """Each basic.ack (class 60, method 80) the client sent, with the message ids
    (the queue ids) of the deliveries it covers: its delivery tag, and with `multiple` every
    earlier unsettled tag of the channel (AMQP 0-9-1, basic.ack)."""
    message_ids: dict[tuple[int, int], str] = {}
    last_tag: dict[int, int] = {}
    for _, channel, decoded in amqp_frames(received):
        if isinstance(decoded, commands.Basic.Deliver):
            last_tag[channel] = decoded.delivery_tag
        elif isinstance(decoded, header.ContentHeader) and channel in last_tag:
            message_ids[(channel, last_tag.pop(channel))] = str(decoded.properties.message_id)
    acks: list[Ack] = []
    unsettled = dict(message_ids)
    for offset, channel, decoded in amqp_frames(sent):
        if isinstance(decoded, commands.Basic.Ack | commands.Basic.Nack | commands.Basic.Reject):
            tag = decoded.delivery_tag
            covered = [key for key in sorted(unsettled) if key[0] == channel and (
                key[1] == tag or (getattr(decoded, "multiple", False) and key[1] <= tag))]
            ids = tuple(unsettled.pop(key) for key in covered)
            if isinstance(decoded, commands.Basic.Ack):
                acks.append(Ack(call_at(sent_pieces, offset), ids))
    return acks


# The rule

def durability_violations(fs: FileSystem, reply: Call, covers: Callable[[str], bool]
                          ) -> list[str]:
    """What was not durable when `reply` started, among the files and names whose path
    `covers` accepts: writes without a later fsync of the file, new names without a later
    fsync of their directory. Files and names gone again by then are not counted."""
    problems = []
    live = fs.live_files(reply.start)
    for write in fs.writes:
        if write.at.end >= reply.start or not covers(write.path) or write.file not in live:
            continue
        if not fs.synced_between(write.file, write.at.end, reply.start):
            problems.append(f"write of {len(write.data)} bytes to {write.path} "
                            f"(line {write.at.start}) not fsynced before line {reply.start}")
    for name in fs.names:
        if not name.made_in_trace or name.at.end >= reply.start or not covers(name.path):
            continue
        if name.removed_at is not None and name.removed_at < reply.start:
            continue
        parent = str(PurePosixPath(name.path).parent)
        if not fs.synced_between(parent, name.at.end, reply.start):
            problems.append(f"new name {name.path} ({name.at.name}, line {name.at.start}) "
                            f"without an fsync of {parent} before line {reply.start}")
    return problems


def written_before(fs: FileSystem, line: int, needle: bytes,
                   covers: Callable[[str], bool]) -> bool:
    """Whether `needle` was in some write, to a path `covers` accepts, before `line`."""
    return any(w.at.end < line and covers(w.path) and needle in w.data for w in fs.writes)
