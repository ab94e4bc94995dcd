"""The store acknowledges only what is on disk: proved from the order of its system calls.

Killing the store (the crash tests) keeps the page cache, so it cannot show that data was on
disk before the ack: only a power loss or a kernel crash could. This test runs a real store
under strace instead, sends it mail through the real filter and RabbitMQ (small messages
stored inside the index, large ones in files, several recipients, an alias, first deliveries
to new accounts), works on a mailbox over IMAP (APPEND, COPY, MOVE, EXPUNGE; STORE then
CHECK) and POP3 (DELE, QUIT), and then reads the trace (syscall_trace.py): at every basic.ack
the store sent to the broker, every tagged OK and the +OK of the UPDATE state, everything the
store had written to
the mailbox files concerned (index, its WAL, message files, the journal, the UIDVALIDITY
counter) had been fsynced, and every name created on the way (user and message directories,
files, renames, links) had had its directory fsynced; and EXPUNGE and POP3 unlink message
files only after the commit that forgot them was synced. A second test kills a store inside
its commit's fsync (strace's fault injection) and checks that the next store syncs the
index before acking the redelivery it finds already stored.

The AMQP acks are found by decoding the store's side of the broker connection with pamqp:
basic.deliver frames (class 60, method 60) give each delivery tag, the content header after
one its message id (the queue id), and basic.ack frames (class 60, method 80) with their
tag and `multiple` bit say which deliveries each ack settles.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import socket
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from pamqp import commands

from common.settings import Settings
from services.store.backends.maildb import MAIL_DIR, store_user_path
from tests.integration.store.syscall_trace import (
    STRACE_OPTIONS,
    Call,
    FileSystem,
    amqp_acks,
    amqp_frames,
    call_at,
    durability_violations,
    file_system,
    parse_strace,
    socket_streams,
    stream_bytes,
    written_before,
)
from tests.support import REPO, TierProcess, run_cli, strace_attached, wait_until

PASSWORD = "correct horse"
DOMAIN = "example.org"
ALICE, BOB, CAROL = (f"{name}@{DOMAIN}" for name in ("alice", "bob", "carol"))
TEAM = f"team@{DOMAIN}"  # an alias: alice and bob
LARGE = 100 * 1024  # over the default inline limit (64 KiB): a message file


def provision(settings: Settings) -> None:
    def tiermail(*args: str, stdin: str = "") -> None:
        result = run_cli(settings, *args, stdin=stdin)
        assert result.returncode == 0, result.stderr

    tiermail("domain", "add", DOMAIN)
    for user in (ALICE, BOB, CAROL):
        tiermail("user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
    for member in (ALICE, BOB):
        tiermail("alias", "add", TEAM, member)


def message(marker: str, size: int = 0) -> bytes:
    body = b"".join(b"%076d\r\n" % line for line in range(size // 78)) or b"Hello.\r\n"
    return (f"From: sender@example.net\r\nTo: {TEAM}\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.net>\r\n\r\n").encode() + body


def send(settings: Settings, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=60) as smtp:
        smtp.sendmail("sender@example.net", rcpts, data)


def index_rows(settings: Settings, user: str, query: str) -> list[tuple[str, ...]]:
    index = store_user_path(settings.store_dir, user) / "index.sqlite"
    if not index.exists():
        return []
    with closing(sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)) as conn:
        return [tuple(str(v) for v in row) for row in conn.execute(query)]


def stored(settings: Settings, user: str) -> int:
    try:
        return len(index_rows(settings, user, "SELECT 1 FROM delivered"))
    except sqlite3.OperationalError:  # the index being created
        return 0


def copies(settings: Settings) -> dict[str, list[tuple[str, str]]]:
    """queue id -> (user, GUID) of each stored copy."""
    found: dict[str, list[tuple[str, str]]] = {}
    for user in (ALICE, BOB, CAROL):
        for queue_id, guid in index_rows(settings, user, (
                "SELECT queue_id, guid FROM delivered JOIN message USING (mailbox_id, uid)")):
            found.setdefault(queue_id, []).append((user, guid))
    return found


def covered_by(settings: Settings, user: str) -> Callable[[str], bool]:
    """The paths a copy of `user`'s depends on: the user's directory (but the text index,
    derived data rebuilt from the index, and SQLite's shared-memory files, never read after
    a crash), the store-wide journal and UIDVALIDITY counter, and the directories above."""
    root = os.path.realpath(settings.store_dir / MAIL_DIR)
    home = os.path.realpath(store_user_path(settings.store_dir, user))
    shared = {f"{root}/inflight", f"{root}/uidvalidity.sqlite", f"{root}/uidvalidity.sqlite-wal"}
    above = {str(p) for p in Path(home).parents if str(p).startswith(root)}

    def covers(path: str) -> bool:
        if path in shared or path in above or path == home:
            return True
        name = os.path.basename(path)
        return path.startswith(home + "/") and not (
            name.startswith("text.sqlite") or name.endswith("-shm"))
    return covers


def test_every_acknowledgement_comes_after_the_fsyncs_it_depends_on(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    settings = settings.replace(log_level="INFO")
    provision(settings)
    store = run_tier(settings, "store")
    store.wait_for_port(settings.imap_port)
    store.wait_for_port(settings.pop3_port)
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    existing = {os.path.realpath(p) for p in settings.store_dir.rglob("*") if p.is_file()}
    trace = tmp_path / "store.strace"
    with strace_attached(store.proc.pid, trace, STRACE_OPTIONS):
        archived, delivered = exercise(settings)
        past_the_last_reply(settings)
    store.stop()

    with open(trace, errors="replace") as lines:
        calls = parse_strace(lines)
    fs = file_system(calls, existing, str(REPO))
    problems = check_acks(settings, calls, fs, delivered)
    problems += check_imap(settings, calls, fs, archived)
    problems += check_checkpoint(settings, calls, fs)
    problems += check_pop3(settings, calls, fs)
    assert not problems, "\n".join(problems)


def exercise(settings: Settings) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Deliver, append, copy, move, expunge, and delete over POP3; the GUIDs copied into
    Archive and, by queue id, the copies delivered."""
    # First deliveries to three new accounts, each creating a user directory and an index.
    send(settings, [ALICE], message("small-alice"))
    send(settings, [TEAM, CAROL], message("small-team-carol"))
    send(settings, [BOB, CAROL], message("large-bob-carol", LARGE))
    send(settings, [TEAM], message("large-team", LARGE))
    wanted = {ALICE: 3, BOB: 3, CAROL: 2}
    wait_until(lambda: all(stored(settings, user) == count for user, count in wanted.items()),
               timeout=60, what="eight copies of four messages stored")
    delivered = copies(settings)

    with imaplib.IMAP4("127.0.0.1", settings.imap_port, timeout=60) as imap:
        imap.login(ALICE, PASSWORD)
        imap.append("Drafts", "", None, message("append-small"))
        imap.append("Drafts", "", None, message("append-large", LARGE))
        imap.select("INBOX")
        assert imap.copy("1:*", "Archive")[0] == "OK"
        assert imap.uid("MOVE", "1", "Trash")[0] == "OK"
        imap.store("1:*", "+FLAGS", "\\Deleted")  # an inline message and a file
        assert imap.expunge()[0] == "OK"
        imap.select("Archive")
        imap.store("1:*", "+FLAGS", "\\Flagged")  # passes the MODSEQ reservation: synced
        imap.store("1:*", "+FLAGS", "\\Answered")  # below it: committed without a sync
        assert imap.check()[0] == "OK"
    with closing(poplib.POP3("127.0.0.1", settings.pop3_port, timeout=60)) as pop:
        pop.user(BOB)
        pop.pass_(PASSWORD)
        for number in (1, 2, 3):  # an inline message and two files
            pop.dele(number)
        pop.quit()
    archived = [guid for (guid,) in index_rows(settings, ALICE, (
        "SELECT guid FROM message JOIN mailbox ON mailbox.id = mailbox_id"
        " WHERE name = 'Archive'"))]
    return archived, delivered


def past_the_last_reply(settings: Settings) -> None:
    """Have the store's event loop answer one more connection while it is traced. The client
    has a reply as soon as the store's write has sent it, which can be before strace records
    that write's end; detached then, the trace lacks the reply (`<detached ...>`). The thread
    that wrote it has to finish that call before it can greet a new connection."""
    with socket.create_connection(("127.0.0.1", settings.pop3_port), timeout=60) as conn:
        assert conn.recv(512).startswith(b"+OK")


def check_acks(settings: Settings, calls: list[Call], fs: FileSystem,
               delivered: dict[str, list[tuple[str, str]]]) -> list[str]:
    streams = socket_streams(calls, lambda sock: sock.endswith("->127.0.0.1:5672]"))
    acks = [ack for sent, received in streams.values()
            for ack in amqp_acks(stream_bytes(received), stream_bytes(sent), sent)]
    acked = {queue_id for ack in acks for queue_id in ack.queue_ids}
    assert acked == delivered.keys(), f"acks for {acked}, stored {delivered.keys()}"
    problems = []
    for ack in acks:
        for queue_id in ack.queue_ids:
            for user, guid in delivered[queue_id]:
                covers = covered_by(settings, user)
                where = f"ack of {queue_id} for {user} (line {ack.at.start})"
                if not written_before(fs, ack.at.start, guid.encode(), covers):
                    problems.append(f"{where}: its index row was not written yet")
                problems += [f"{where}: {p}" for p in durability_violations(fs, ack.at, covers)]
    return problems


def _replies(calls: list[Call], port: int, command: bytes) -> list[tuple[Call, Call]]:
    """(receipt, reply) of each `command` on the connections to `port`: the read that
    brought its line, and the write that started its reply: the tagged OK (IMAP), or the
    last +OK of the connection for POP3's QUIT (its last command)."""
    found = []
    streams = socket_streams(calls, lambda sock: f"127.0.0.1:{port}->" in sock)
    for sent, received in streams.values():
        inbound, outbound = stream_bytes(received), stream_bytes(sent)
        for line_end, words in _command_lines(inbound):
            if command == b"QUIT" == words[0].upper():
                reply = outbound.rfind(b"+OK")
            elif _imap_command(words) == command:
                reply = outbound.find(b"\r\n" + words[0] + b" OK ") + 2
            else:
                continue
            assert reply > 0, f"no reply to {words!r}"
            found.append((call_at(received, line_end), call_at(sent, reply)))
    return found


def _command_lines(data: bytes) -> list[tuple[int, list[bytes]]]:
    """(offset of its CRLF, words) of each line (an APPEND's literal is lines too)."""
    lines, start = [], 0
    while (end := data.find(b"\r\n", start)) >= 0:
        lines.append((end, data[start:end].split(b" ")))
        start = end + 2
    return lines


def _imap_command(words: list[bytes]) -> bytes:
    if len(words) > 2 and words[1].upper() == b"UID":
        return words[2].upper()
    return words[1].upper() if len(words) > 1 else b""


def _reply_problems(settings: Settings, fs: FileSystem, user: str, what: str,
                    receipt: Call, reply: Call) -> list[str]:
    covers = covered_by(settings, user)
    where = f"{what} for {user} (reply at line {reply.start})"
    committed = [w for w in fs.writes if receipt.end < w.at.start and w.at.end < reply.start
                 and w.path.endswith("/index.sqlite-wal") and covers(w.path)]
    problems = [] if committed else [f"{where}: no index write between command and reply"]
    problems += [f"{where}: {p}" for p in durability_violations(fs, reply, covers)]
    # Files go only once the index no longer names them, durably: a crash in between must
    # leave a file without a row (the sweep removes it), never a row without its file.
    wal = os.path.realpath(store_user_path(settings.store_dir, user) / "index.sqlite-wal")
    for name in fs.names:
        if (name.removed_at is not None and receipt.end < name.removed_at < reply.start
                and "/m/" in name.path and covers(name.path)
                and not fs.synced_between(wal, receipt.end, name.removed_at)):
            problems.append(f"{where}: {name.path} unlinked (line {name.removed_at}) before "
                            "the index commit was synced")
    return problems


def check_imap(settings: Settings, calls: list[Call], fs: FileSystem,
               archived: list[str]) -> list[str]:
    problems = []
    for command, count in ((b"APPEND", 2), (b"COPY", 1), (b"MOVE", 1), (b"EXPUNGE", 1)):
        replies = _replies(calls, settings.imap_port, command)
        assert len(replies) == count, f"{command!r}: {len(replies)} replies in the trace"
        for receipt, reply in replies:
            problems += _reply_problems(settings, fs, ALICE, command.decode(), receipt, reply)
    (_, appended_large), (_, appended_small) = sorted(
        _replies(calls, settings.imap_port, b"APPEND"), key=lambda r: -r[1].start)
    for marker, reply in ((b"append-small", appended_small), (b"append-large", appended_large)):
        if not written_before(fs, reply.start, marker, covered_by(settings, ALICE)):
            problems.append(f"APPEND of {marker!r}: OK before the message was written")
    [(_, copied)] = _replies(calls, settings.imap_port, b"COPY")
    problems += [f"COPY: OK before the row of {guid} was written" for guid in archived
                 if not written_before(fs, copied.start, guid.encode(),
                                       covered_by(settings, ALICE))]
    return problems


def check_checkpoint(settings: Settings, calls: list[Call], fs: FileSystem) -> list[str]:
    """CHECK (RFC 3501 6.4.1) answers only once the flag change that the STORE before it
    committed without waiting for the disk is on it."""
    covers = covered_by(settings, ALICE)
    receipt, reply = max(_replies(calls, settings.imap_port, b"STORE"),
                         key=lambda pair: pair[1].start)
    flags = [w for w in fs.writes if receipt.end < w.at.start and w.at.end < reply.start
             and w.path.endswith("/index.sqlite-wal") and covers(w.path)]
    assert flags, "the last STORE wrote nothing to the index"
    assert not any(fs.synced_between(w.file, w.at.end, reply.start) for w in flags), (
        "the last STORE waited for the disk: CHECK had nothing to make durable")
    [(_, checked)] = _replies(calls, settings.imap_port, b"CHECK")
    return [f"CHECK for {ALICE} (reply at line {checked.start}): {problem}"
            for problem in durability_violations(fs, checked, covers)]


def check_pop3(settings: Settings, calls: list[Call], fs: FileSystem) -> list[str]:
    [(receipt, reply)] = _replies(calls, settings.pop3_port, b"QUIT")
    return _reply_problems(settings, fs, BOB, "POP3 QUIT", receipt, reply)


def test_a_redelivery_found_stored_is_acked_only_after_the_index_is_synced(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    """A store that dies after writing a commit to the WAL but before its fsync returned
    leaves the commit in the page cache: the next store reads it, finds the redelivered
    message already there and acks it. Unless it syncs the index first, a power loss after
    that ack loses a message nobody will deliver again."""
    settings = settings.replace(log_level="INFO")
    provision(settings)
    first = run_tier(settings, "store")
    first.wait_for_port(settings.pop3_port)
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    send(settings, [ALICE], message("before"))
    wait_until(lambda: stored(settings, ALICE) == 1, what="the first message stored")
    wal = store_user_path(settings.store_dir, ALICE) / "index.sqlite-wal"
    dying = ["-f", "-qq", "-e", "trace=fdatasync,fsync", "-P", str(wal),
             "-e", "inject=fdatasync,fsync:error=EIO:signal=SIGKILL"]
    with strace_attached(first.proc.pid, tmp_path / "dying.strace", dying):
        send(settings, [ALICE], message("unsynced"))
        wait_until(lambda: not first.alive, what="the store killed at its commit's fsync")
    assert stored(settings, ALICE) == 2, "the commit is not in the page cache"

    trace = tmp_path / "store.strace"
    options = ["-f", "--seccomp-bpf", "-qq", "-xx", "-yy", "-s", "65536",
               "-e", "trace=write,writev,sendto,sendmsg,fsync,fdatasync", "-o", str(trace)]
    second = run_tier(settings, "store", wrapper=["/usr/bin/strace", *options, "--"])
    wait_until(lambda: "already delivered" in second.output(), timeout=60,
               what="the redelivery found stored")
    second.stop()

    with open(trace, errors="replace") as lines:
        calls = parse_strace(lines)
    streams = socket_streams(calls, lambda sock: sock.endswith("->127.0.0.1:5672]"))
    # The only message this store is given is the redelivery: its ack is the first.
    ack = min((call_at(sent, offset) for sent, _ in streams.values()
               for offset, _, decoded in amqp_frames(stream_bytes(sent))
               if isinstance(decoded, commands.Basic.Ack)), key=lambda call: call.start)
    synced = [c for c in calls if c.name in ("fsync", "fdatasync") and c.end < ack.start
              and c.fds() and c.fds()[0] == os.path.realpath(wal)]
    assert synced, f"the redelivery was acked (line {ack.start}) before the WAL was synced"
