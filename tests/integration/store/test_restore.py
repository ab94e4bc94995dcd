"""Restoring the store from a backup as docs/operations.md, "Backups" says: the real store
process, RabbitMQ delivery, the documented shell commands, the real CLI, and imapclient and
poplib as the clients that had seen mail the restore loses."""

from __future__ import annotations

import asyncio
import os
import poplib
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from imapclient import IMAPClient

from common.settings import Settings
from tests.integration.store.helpers import make_message, publish_all, stored_count
from tests.support import REPO, TierProcess, run_cli, tier_env, wait_until

ALICE, BOB = "alice@example.org", "bob@example.org"
PASSWORDS = {ALICE: "alice pw", BOB: "bob pw"}
TIMEOUT = 30


def tiermail(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    result = run_cli(settings, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result


def documented_scripts() -> list[str]:
    """The shell blocks of docs/operations.md, "Backups": the backup, then the restore."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("\n## Backups\n", 1)[1].split("\n## ", 1)[0]
    return [re.sub(r"^  ", "", block, flags=re.MULTILINE)
            for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]


def run_script(script: str, settings: Settings, backup: Path, tmp_path: Path) -> str:
    """Run a documented block as an operator would, `tiermail` being this checkout's CLI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "tiermail"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m services.cli "$@"\n')
    shim.chmod(0o755)
    env = {**tier_env(settings), "BACKUP": str(backup), "PYTHONPATH": str(REPO),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def renewed_range(output: str, user: str) -> tuple[int, int]:
    """The UIDVALIDITYs `uidvalidity renew` says it gave the six mailboxes of `user`."""
    found = re.search(rf"^{re.escape(user)}: 6 mailboxes, UIDVALIDITY (\d+)-(\d+)$", output,
                      re.MULTILINE)
    assert found, output
    return int(found[1]), int(found[2])


def deliver(settings: Settings, user: str, count: int, padding: int = 0) -> None:
    before = stored_count(settings.store_dir, [user])
    asyncio.run(publish_all(settings, [make_message(user, padding=padding)
                                       for _ in range(count)]))
    wait_until(lambda: stored_count(settings.store_dir, [user]) == before + count,
               what=f"{count} messages for {user} stored")


def imap(settings: Settings, user: str) -> IMAPClient:
    client = IMAPClient("127.0.0.1", settings.imap_port, ssl=False, timeout=TIMEOUT)
    client.login(user, PASSWORDS[user])
    return client


def uidvalidities(settings: Settings, user: str) -> dict[str, int]:
    """Every mailbox's UIDVALIDITY, as a client sees it (LIST, then STATUS)."""
    client = imap(settings, user)
    try:
        return {name: client.folder_status(name, [b"UIDVALIDITY"])[b"UIDVALIDITY"]
                for _, _, name in client.list_folders()}
    finally:
        client.logout()


def inbox(settings: Settings, user: str) -> tuple[int, dict[int, tuple[bytes, ...]]]:
    """(UIDVALIDITY, UID -> flags) of the INBOX, as a client that SELECTs it sees them."""
    client = imap(settings, user)
    try:
        uidvalidity = client.select_folder("INBOX")[b"UIDVALIDITY"]
        flags = {uid: tuple(data[b"FLAGS"])
                 for uid, data in client.fetch(client.search("ALL"), ["FLAGS"]).items()}
        return uidvalidity, flags
    finally:
        client.logout()


def uidls(settings: Settings, user: str) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", settings.pop3_port, timeout=TIMEOUT)
    try:
        client.user(user)
        client.pass_(PASSWORDS[user])
        return client.uidl()[1]
    finally:
        client.quit()


def start(settings: Settings, run_tier: Callable[..., TierProcess]) -> TierProcess:
    store = run_tier(settings, "store")
    store.wait_for_port(settings.pop3_port)
    store.wait_for_port(settings.imap_port)  # IMAP starts listening after POP3
    return store


def stop(store: TierProcess) -> None:
    store.kill(signal.SIGTERM)
    assert store.proc.returncode == 0, store.output()


def test_after_a_restore_clients_see_new_uidvalidities_and_keep_their_uidls(
        settings: Settings, run_tier: Callable[..., TierProcess], tmp_path: Path) -> None:
    tiermail(settings, "domain", "add", "example.org")
    for user, password in PASSWORDS.items():
        tiermail(settings, "user", "add", user, "--password-stdin", stdin=password + "\n")
    store = start(settings, run_tier)
    deliver(settings, ALICE, 3)
    deliver(settings, BOB, 1)
    client = imap(settings, ALICE)
    client.select_folder("INBOX")
    client.add_flags([1], [b"\\Flagged"])
    client.logout()
    backed_up = {user: uidvalidities(settings, user) for user in PASSWORDS}
    backed_up_inbox = inbox(settings, ALICE)
    backed_up_uidls = uidls(settings, ALICE)

    backup_script, restore_script = documented_scripts()
    backup = tmp_path / "backup"
    run_script(backup_script, settings, backup, tmp_path)  # hot, with the store running

    # After the backup: mail a client sees as UIDs 4 and 5, and a new mailbox.
    deliver(settings, ALICE, 2)
    client = imap(settings, ALICE)
    client.create_folder("Later")
    client.logout()
    seen_uidvalidity, seen = inbox(settings, ALICE)
    assert list(seen) == [1, 2, 3, 4, 5]
    handed_out = {value for user in PASSWORDS for value in uidvalidities(settings, user).values()}

    # While the store runs, nothing is renewed.
    refused = run_cli(settings, "uidvalidity", "renew", "--all")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "stop it first" in refused.stderr
    assert uidvalidities(settings, ALICE)["INBOX"] == seen_uidvalidity

    stop(store)
    output = run_script(restore_script, settings, backup, tmp_path)
    first_run = renewed_range(output, ALICE)
    assert renewed_range(output, BOB)
    assert "for 12 mailboxes of 2 accounts" in output
    store = start(settings, run_tier)

    for user in PASSWORDS:
        renewed = uidvalidities(settings, user)
        assert renewed.keys() == backed_up[user].keys()  # "Later" went with the restore
        assert min(renewed.values()) > max(handed_out)
    # The restored messages keep their UIDs and flags, under the new UIDVALIDITY.
    uidvalidity, restored = inbox(settings, ALICE)
    assert uidvalidity != seen_uidvalidity
    assert restored == backed_up_inbox[1]
    assert restored[1] == (b"\\Flagged",)
    # New mail gets the UIDs of the lost mail again: a client that cached them under the old
    # UIDVALIDITY must (and, told a new one, does) fetch these as new messages.
    deliver(settings, ALICE, 1)
    assert list(inbox(settings, ALICE)[1]) == [1, 2, 3, 4]
    # A message too large for the index goes through the user's tmp/, which the backup
    # (files with data only) does not hold: it was dead-lettered after ten quick attempts.
    deliver(settings, ALICE, 1, padding=settings.store_inline_max + 1)
    assert list(inbox(settings, ALICE)[1]) == [1, 2, 3, 4, 5]
    # POP3 leave-on-server clients download nothing again: the UIDLs are the backup's.
    assert uidls(settings, ALICE)[:3] == backed_up_uidls
    stop(store)

    # Run again (interrupted, or by mistake): values above the first run's.
    again = tiermail(settings, "uidvalidity", "renew", ALICE).stdout
    assert renewed_range(again, ALICE)[0] > first_run[1]
    assert BOB not in again


def test_named_accounts_only_and_unknown_ones_refused(settings: Settings,
                                                      run_tier: Callable[..., TierProcess]
                                                      ) -> None:
    tiermail(settings, "domain", "add", "example.org")
    for user, password in PASSWORDS.items():
        tiermail(settings, "user", "add", user, "--password-stdin", stdin=password + "\n")
    store = start(settings, run_tier)
    deliver(settings, ALICE, 1)
    stop(store)

    typo = run_cli(settings, "uidvalidity", "renew", ALICE, "alcie@example.org")
    assert typo.returncode == 1
    assert typo.stderr == ("tiermail: no such account, and no mail of it on disk: "
                           "alcie@example.org; nothing was changed\n")
    assert typo.stdout == ""
    neither = run_cli(settings, "uidvalidity", "renew")
    assert neither.returncode == 2 and "or give --all" in neither.stderr  # usage

    done = tiermail(settings, "uidvalidity", "renew", "Alice@Example.org", BOB).stdout
    assert renewed_range(done, ALICE)
    assert f"{BOB}: no mail yet, nothing to renew" in done
