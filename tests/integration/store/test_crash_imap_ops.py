"""SIGKILL during APPEND, EXPUNGE, MOVE and COPY: after the startup sweep nothing acknowledged
is lost, nothing is duplicated, and the index, the bodies (inline and files) and the usage
agree. Run with every body a file, and with the default inline threshold, where about a
quarter of the messages are larger than it: inline bodies and files side by side.

A child process (this file run as a script) loops over random operations on one account and
prints, flushed, what it is about to do and what has finished; the test kills it at random
moments, restarts it, and finally checks the mailboxes against that log.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
if __name__ == "__main__":  # the child runs this file directly
    sys.path.insert(0, str(REPO))

from services.store.backends.maildb import MailDB  # noqa: E402
from services.store.mailbox import ARCHIVE, INBOX, MailboxExists  # noqa: E402
from tests.support import check_bodies  # noqa: E402

USER = "crash@example.test"
COPIES = "Copies"
KILLS = 15
MARKER = re.compile(rb"^X-Marker: (\S+)\r$", re.MULTILINE)


# The child


def message(marker: str, rng: random.Random) -> bytes:
    size = rng.randint(100, 30_000) if rng.random() < 0.75 else rng.randint(70_000, 120_000)
    padding = "".join(rng.choices("abcdefghij \r\n", k=size))
    return f"X-Marker: {marker}\r\nSubject: {marker}\r\n\r\n{padding}\r\n".encode()


def marker_of(db: MailDB, guid: str) -> str:
    with db.open_message(USER, guid) as f:
        found = MARKER.search(f.read(200))
    assert found, guid
    return found.group(1).decode()


def say(line: str) -> None:
    # One write(2) per line: print() may hand the text and its newline to the file in two
    # writes, and a SIGKILL between them ran this line into the next child's first one
    # ("A 11-126" + "SWEPT 0": two acknowledged appends that never existed).
    os.write(sys.stdout.fileno(), (line + "\n").encode())


async def child(root: Path, run: int, inline_max: int) -> None:
    rng = random.Random()
    db = MailDB(root, inline_max=inline_max)
    swept = await db.sweep()  # as the store does at startup
    say(f"SWEPT {swept.files_removed}")
    try:
        await db.create_mailbox(USER, COPIES)
    except MailboxExists:
        pass
    copied = {marker_of(db, m.guid) for m in await db.list_messages(USER, COPIES)}
    say("READY")
    for n in range(1_000_000):
        choice = rng.random()
        if choice < 0.45:
            marker = f"{run}-{n}"
            say(f"a {marker}")  # about to append
            await db.append(USER, INBOX, message(marker, rng), frozenset({"\\Seen"}))
            say(f"A {marker}")  # acknowledged
        elif choice < 0.65:
            source, dest = (INBOX, ARCHIVE) if rng.random() < 0.7 else (ARCHIVE, INBOX)
            uids = [m.uid for m in await db.list_messages(USER, source)]
            await db.move(USER, source, rng.sample(uids, min(3, len(uids))), dest)
        elif choice < 0.78:
            inbox = await db.list_messages(USER, INBOX)
            fresh = [m for m in inbox[-20:] if marker_of(db, m.guid) not in copied]
            if fresh:
                pick = rng.choice(fresh)
                copied.add(marker_of(db, pick.guid))
                await db.copy(USER, INBOX, [pick.uid], COPIES)
        elif choice < 0.93:
            mailbox = rng.choice([INBOX, ARCHIVE, COPIES])
            messages = await db.list_messages(USER, mailbox)
            doomed = rng.sample(messages, min(2, len(messages)))
            if mailbox == COPIES:
                await db.expunge(USER, mailbox, [m.uid for m in doomed])
                continue
            markers = " ".join(marker_of(db, m.guid) for m in doomed)
            say(f"x {markers}")  # may be gone from now on
            await db.expunge(USER, mailbox, [m.uid for m in doomed])
            say(f"X {markers}")  # gone
        else:
            uids = [m.uid for m in await db.list_messages(USER, INBOX)]
            await db.store_flags(USER, INBOX, rng.sample(uids, min(5, len(uids))), "+",
                                 frozenset({"\\Flagged"}))


# The test


def start_child(root: Path, run: int, log: Path, inline_max: int) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out, open(log.with_suffix(".err"), "ab") as err:
        return subprocess.Popen([sys.executable, __file__, str(root), str(run), str(inline_max)],
                                stdout=out, stderr=err, cwd=REPO)


def child_errors(log: Path) -> str:
    return log.with_suffix(".err").read_text()[-3000:]


def wait_ready(child_process: subprocess.Popen[bytes], log: Path, readies: int) -> None:
    deadline = time.monotonic() + 20
    while log.read_text().count("READY\n") < readies:
        assert child_process.poll() is None, f"child died: {child_errors(log)}"
        assert time.monotonic() < deadline, "child never became ready"
        time.sleep(0.01)


def parse_log(log: Path) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {"a": set(), "A": set(), "x": set(), "X": set()}
    swept = 0
    for line in log.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind in seen:
            seen[kind].update(rest.split())
        elif kind == "SWEPT":
            swept += int(rest)
    print(f"\ncrash test: {len(seen['A'])} appends acknowledged, {len(seen['X'])} expunged, "
          f"{swept} orphan files swept by the restarted children")
    return seen


def check_store(root: Path, log: Path, inline_max: int) -> None:
    index_path_holder: list[Path] = []

    async def sweep_and_locate() -> None:
        db = MailDB(root, inline_max=inline_max)
        try:
            await db.sweep()
            index_path_holder.append(db.user_path(USER))
        finally:
            await db.close()

    asyncio.run(sweep_and_locate())
    base = index_path_holder[0]
    bodies = check_bodies(base)  # integrity, one body per row, no orphans, no tmp files
    conn = sqlite3.connect(base / "index.sqlite")
    try:
        rows = conn.execute("SELECT name, uid, guid, size, uidnext FROM message JOIN mailbox"
                            " ON mailbox.id = message.mailbox_id").fetchall()
        [(usage,)] = conn.execute("SELECT usage FROM account").fetchall()
    finally:
        conn.close()

    found: dict[str, Counter[str]] = {INBOX: Counter(), ARCHIVE: Counter(), COPIES: Counter()}
    bytes_of: dict[tuple[str, str], bytes] = {}
    for mailbox, uid, guid, size, uidnext in rows:
        assert uid < uidnext
        data = bodies[guid]
        assert len(data) == size, f"{mailbox} {uid}: size"
        assert (guid in bodies.inline) == (0 < size <= inline_max), f"{mailbox} {uid}: kind"
        match = MARKER.search(data)
        assert match, f"{mailbox} {uid}: not a test message"
        marker = match.group(1).decode()
        found[mailbox][marker] += 1
        bytes_of[(mailbox, marker)] = data
    assert usage == sum(size for _, _, _, size, _ in rows)
    assert bodies.files, "no message larger than the threshold"
    assert bool(bodies.inline) == bool(inline_max)

    log_of = parse_log(log)
    assert len(log_of["A"]) >= KILLS, "the children did too little work between kills"
    live = found[INBOX] + found[ARCHIVE]
    duplicated = [m for m, count in live.items() if count > 1]
    assert not duplicated, f"in two places at once: {duplicated[:5]}"
    assert not [m for m, count in found[COPIES].items() if count > 1], "copied twice"
    lost = log_of["A"] - log_of["x"] - set(live)
    assert not lost, f"acknowledged appends lost: {sorted(lost)[:5]}"
    assert not log_of["X"] & set(live), "an acknowledged expunge came back"
    assert set(live) | set(found[COPIES]) <= log_of["a"], "messages nobody appended"
    for marker in found[COPIES]:  # a copy has the bytes of its original
        original = bytes_of.get((INBOX, marker)) or bytes_of.get((ARCHIVE, marker))
        assert original is None or original == bytes_of[(COPIES, marker)]


@pytest.mark.slow
def test_sigkill_during_imap_operations(tmp_path: Path, inline_max: int) -> None:
    root = tmp_path / "mail"
    log = tmp_path / "child.log"
    log.touch()
    rng = random.Random()
    for run in range(KILLS):
        process = start_child(root, run, log, inline_max)
        try:
            wait_ready(process, log, run + 1)
            time.sleep(rng.uniform(0.1, 0.8))  # the random moment to crash at
            assert process.poll() is None, f"child died: {child_errors(log)}"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    check_store(root, log, inline_max)


if __name__ == "__main__":
    asyncio.run(child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
