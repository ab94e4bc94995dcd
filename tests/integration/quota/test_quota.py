"""Quota end to end with the real Redis, MailDB and filter: the store publishes which
mailboxes are full, the filter answers 452 4.2.2 at RCPT for them (and only them), and raising
the quota with `tiermail user quota` lets mail in again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from common.directory import Directory, QuotaState, Resolution
from common.ids import new_queue_id
from common.settings import Settings
from common.tasks import stop_task
from services.filter.protocol import replies
from services.store.backends.accounts import AccountDB
from services.store.backends.maildb import SCHEMA_VERSION, MailDB, store_user_path
from services.store.mailbox import INBOX, Delivery
from services.store.quota import RECONCILE_SHARE, QuotaPublisher
from tests.integration.filter.conftest import in_thread, message, running_filter, send
from tests.support import eventually, run_cli

DOMAIN = "example.test"
ALICE, BOB, CAROL = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"carol@{DOMAIN}"
TEAM, SOLO = f"team@{DOMAIN}", f"solo@{DOMAIN}"
BODY = b"Subject: filler\r\n\r\n" + b"x" * 2000 + b"\r\n"
FULL_CODE, FULL_TEXT = replies.MAILBOX_FULL.split(" ", 1)


@dataclass
class Store:
    accounts: AccountDB
    maildb: MailDB
    directory: Directory
    publisher: QuotaPublisher


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """What the store process runs for quotas: accounts, MailDB, the directory published and
    the QuotaPublisher listening to MailDB's changes."""
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.add_domain(DOMAIN)
    for user in (ALICE, BOB, CAROL):
        accounts.add_user(user, "not-a-real-hash")
    accounts.add_alias(TEAM, ALICE)
    accounts.add_alias(TEAM, BOB)
    accounts.add_alias(SOLO, ALICE)
    maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    directory = Directory(client, settings.redis_prefix)
    await directory.publish(accounts.snapshot())
    publisher = QuotaPublisher(maildb, accounts, client, settings.redis_prefix,
                               settings.default_quota, debounce=0.01, check_interval=0.1)
    maildb.add_listener(publisher.on_change)
    task = asyncio.create_task(publisher.run())
    yield Store(accounts, maildb, directory, publisher)
    await stop_task(task)
    await maildb.close()
    await client.aclose()
    accounts.close()


async def deliver(maildb: MailDB, user: str, count: int = 1) -> None:
    await maildb.deliver([Delivery(new_queue_id(), user, BODY, time.time())
                          for _ in range(count)])


async def test_a_full_mailbox_gets_452_while_others_get_250(settings: Settings,
                                                            store: Store) -> None:
    await deliver(store.maildb, ALICE, 2)
    await deliver(store.maildb, BOB, 2)
    store.accounts.set_quota(ALICE, 3000)  # about 4000 used
    store.accounts.set_quota(BOB, 1_000_000)
    await eventually(lambda: _over(store, {ALICE}), within=10, what="alice flagged full")

    async with running_filter(settings) as worker:
        refused = await in_thread(send, worker.ports[0], message(), [ALICE, BOB, CAROL])
        assert refused == {ALICE: (int(FULL_CODE), FULL_TEXT.encode())}
        # Through an alias: refused when one of its mailboxes is full; one that is not, passes.
        refused = await in_thread(send, worker.ports[0], message(), [TEAM, SOLO, CAROL])
        assert set(refused) == {TEAM, SOLO}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await in_thread(send, worker.ports[0], message(), [ALICE])

        raised = await in_thread(run_cli, settings, "user", "quota", ALICE, "1M")
        assert raised.returncode == 0, raised.stderr
        assert "quota of alice@example.test: 1M" in raised.stdout
        assert "in use:" in raised.stdout  # the CLI knew the usage: flag cleared at once
        assert await store.directory.over_quota() == set()
        assert await in_thread(send, worker.ports[0], message(), [ALICE, TEAM]) == {}


def rcpt_codes(port: int, size: int | None, rcpts: list[str]) -> list[int]:
    """RCPT replies after MAIL FROM with SIZE=`size` (none declared when None)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.remote.test")
        options = [] if size is None else [f"SIZE={size}"]
        assert client.mail("sender@remote.test", options)[0] == 250
        return [client.rcpt(rcpt)[0] for rcpt in rcpts]


async def test_a_declared_size_that_does_not_fit_is_refused_at_rcpt(settings: Settings,
                                                                    store: Store) -> None:
    """RFC 1870: with SIZE declared at MAIL FROM, a recipient whose quota has less room
    left gets 452 4.2.2 (it may fit once mail is deleted), one whose whole quota is smaller
    552 5.2.2 (it never will). A 1 MB message went into a 300 KB mailbox."""
    store.accounts.set_quota(ALICE, 10_000)
    await deliver(store.maildb, ALICE, 2)
    used = await store.maildb.usage(ALICE)
    await eventually(lambda: _usage_published(store, ALICE, used), within=10,
                     what="alice's usage and quota in Redis")
    room = 10_000 - used
    async with running_filter(settings) as worker:
        port = worker.ports[0]
        assert await in_thread(rcpt_codes, port, room, [ALICE, BOB, TEAM]) == [250, 250, 250]
        assert await in_thread(rcpt_codes, port, room + 1, [ALICE, BOB, TEAM]) \
            == [452, 250, 452]  # the alias whole: alice is in it
        # An alias of several mailboxes is never 552: one member's small quota bounced the
        # message for every member (found in review); SOLO is an alias of alice alone.
        assert await in_thread(rcpt_codes, port, 10_001, [ALICE, BOB, TEAM, SOLO]) \
            == [552, 250, 452, 552]
        assert await in_thread(rcpt_codes, port, None, [ALICE]) == [250]  # known at DATA only
        await deliver(store.maildb, ALICE, 1)  # usage moves with no cache notice
        await eventually(lambda: _usage_published(store, ALICE, used + (used // 2)),
                         within=10, what="the new usage in Redis")
        assert await in_thread(rcpt_codes, port, room, [ALICE]) == [452]
        lifted = await in_thread(run_cli, settings, "user", "quota", ALICE, "0")
        assert lifted.returncode == 0, lifted.stderr
        await eventually(lambda: _rcpt_code_is(port, 10_001, ALICE, 250), within=10,
                         what="the lifted quota to reach the filter")


async def _usage_published(store: Store, user: str, usage: int) -> bool:
    return await store.directory.usage(user) == usage


async def _rcpt_code_is(port: int, size: int | None, rcpt: str, code: int) -> bool:
    return await in_thread(rcpt_codes, port, size, [rcpt]) == [code]


async def test_setting_a_quota_uses_the_usage_in_the_index(settings: Settings,
                                                            store: Store) -> None:
    """An account without a limit has no usage in Redis (or an old one): the CLI reads the
    store's index, prints it and flags the account full at once (it printed a stale figure
    and let mail in until the store's next reconcile)."""
    await deliver(store.maildb, BOB, 3)
    used = await store.maildb.usage(BOB)
    quota = await in_thread(run_cli, settings, "user", "quota", BOB, "1K")
    assert quota.returncode == 0, quota.stderr
    assert f"({used} octets), over quota" in quota.stdout
    assert BOB in await store.directory.over_quota()


async def test_the_quota_and_usage_are_shown_without_a_size(settings: Settings,
                                                             store: Store) -> None:
    """`tiermail user quota ADDR` alone shows the quota and the usage and changes nothing
    (it was a usage error: an operator had no way to see why a sender got 452)."""
    await deliver(store.maildb, BOB, 3)
    used = await store.maildb.usage(BOB)
    store.accounts.set_quota(BOB, 4096)
    generation = store.accounts.generation()
    shown = await in_thread(run_cli, settings, "user", "quota", BOB)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        f"quota of {BOB}: 4K",
        f"in use: {used / 1024:.1f}K ({used} octets), over quota: new mail is refused "
        "(452 4.2.2)"]
    assert store.accounts.generation() == generation  # nothing written
    unknown = await in_thread(run_cli, settings, "user", "quota", f"nobody@{DOMAIN}")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1, f"tiermail: no such user: nobody@{DOMAIN}")


async def test_usage_changes_move_a_mailbox_in_and_out_of_the_set(store: Store) -> None:
    store.accounts.set_quota(BOB, 5000)
    await eventually(lambda: store.directory.quota_generation(), within=10,
                     what="the first reconcile")
    await deliver(store.maildb, BOB, 2)
    assert await store.directory.over_quota() == set()
    await deliver(store.maildb, BOB, 1)  # 3 x ~2 KB >= 5000
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob flagged full")
    assert await store.directory.usage(BOB) == await store.maildb.usage(BOB)
    uids = await store.maildb.uids(BOB, INBOX)
    await store.maildb.expunge(BOB, INBOX, uids[:2])
    await eventually(lambda: _over(store, set()), within=10, what="bob no longer full")


async def test_imap_append_copy_and_delete_move_a_mailbox_in_and_out_of_the_set(
        store: Store) -> None:
    """Not only delivery and expunge: a mailbox filled by an IMAP COPY or APPEND is flagged,
    one emptied by deleting a mailbox is cleared, each without waiting for other mail."""
    store.accounts.set_quota(BOB, 5000)
    await eventually(lambda: _settled(store), within=10, what="bob's quota published")
    await deliver(store.maildb, BOB, 2)  # 2 x ~2 KB < 5000
    await store.maildb.create_mailbox(BOB, "Kept")
    used = await store.maildb.usage(BOB)
    await eventually(lambda: _usage_published(store, BOB, used), within=10,
                     what="the deliveries published")  # so the COPY alone must move it
    assert await store.directory.over_quota() == set()
    await store.maildb.copy(BOB, INBOX, (await store.maildb.uids(BOB, INBOX))[:1], "Kept")
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob full after a COPY")
    await store.maildb.delete_mailbox(BOB, "Kept")
    await eventually(lambda: _over(store, set()), within=10,
                     what="bob no longer full after a DELETE")
    await store.maildb.append(BOB, INBOX, BODY, frozenset())
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob full after an APPEND")


async def test_mail_to_an_unlimited_mailbox_holds_up_no_other_flag(store: Store) -> None:
    """A change to a mailbox without a quota is published along with the others: it must
    not fail the publication of a limited mailbox that filled at the same time."""
    store.accounts.set_quota(BOB, 5000)
    await eventually(lambda: _settled(store), within=10, what="bob's quota published")
    await deliver(store.maildb, CAROL, 1)  # carol has no quota
    await deliver(store.maildb, BOB, 3)  # 3 x ~2 KB >= 5000
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob flagged full")


async def test_a_mailbox_exactly_at_its_quota_is_full(store: Store) -> None:
    """"Over quota" is usage >= limit (docs): a mailbox holding exactly its quota takes no
    more mail, one octet of room lets mail in again."""
    await deliver(store.maildb, BOB, 2)
    used = await store.maildb.usage(BOB)
    store.accounts.set_quota(BOB, used)
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob flagged full")
    store.accounts.set_quota(BOB, used + 1)
    await eventually(lambda: _over(store, set()), within=10, what="bob no longer full")


async def test_a_mailbox_that_fills_after_a_failed_publish_is_still_flagged(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis failed once while the store published a delivery's usage: the mailbox must
    still be flagged once Redis answers, with no further mail to remind the store of it
    (otherwise the full mailbox kept taking mail)."""
    store.accounts.set_quota(BOB, 5000)
    await eventually(lambda: _settled(store), within=10, what="bob's quota published")
    failures = failing_once(monkeypatch, "set_quota_states")
    await deliver(store.maildb, BOB, 3)  # 3 x ~2 KB >= 5000
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob flagged full")
    assert failures == ["failed"]


def failing_once(monkeypatch: pytest.MonkeyPatch, method: str) -> list[str]:
    """Make the Directory's `method` fail once as if Redis went away; the list returned
    notes the failure."""
    real = getattr(Directory, method)
    failures: list[str] = []

    async def fails_once(self: Directory, *args: Any, **kwargs: Any) -> None:
        if not failures:
            failures.append("failed")
            raise ConnectionError("Redis went away")
        await real(self, *args, **kwargs)

    monkeypatch.setattr(Directory, method, fails_once)
    return failures


async def test_a_quota_state_redis_lost_is_published_again(store: Store) -> None:
    """Redis flushed, or restarted without persistence, while the store runs: the full
    mailboxes must be flagged again without waiting for mail or an account change."""
    await _alice_full_and_settled(store)
    redis_ = store.directory._redis
    await redis_.delete(*(store.directory.key(name)
                          for name in ("overquota", "limit", "quota-generation")))
    await eventually(lambda: _over(store, {ALICE}), within=10,
                     what="alice flagged full again")
    await eventually(lambda: _settled(store), within=10, what="the quota generation back")
    assert await store.directory.quota_limits() == {ALICE: 3000}


@pytest.mark.parametrize("lost", ["overquota", "limit", "usage"])
async def test_a_quota_key_lost_on_its_own_is_published_again(
        store: Store, lost: str, caplog: pytest.LogCaptureFixture) -> None:
    """One key evicted by a shared Redis's maxmemory policy, or deleted by hand, while the
    quota generation stays: the store notices (the key held PRESENT), says which, and
    reconciles, also when a flush wrote into the lost key meanwhile and so made it again
    (bob's usage, carol's limit and her flag: SADD makes a lost over-quota set anew)."""
    store.accounts.set_quota(BOB, 50_000)
    store.accounts.set_quota(CAROL, 1000)
    await _alice_full_and_settled(store)
    with caplog.at_level(logging.WARNING, logger="services.store.quota"):
        await store.directory._redis.delete(store.directory.key(lost))
        await deliver(store.maildb, BOB, 1)
        await deliver(store.maildb, CAROL, 1)  # about 2000: full
        await eventually(lambda: _over(store, {ALICE, CAROL}), within=10,
                         what="alice flagged full again, and carol")
        await eventually(lambda: _limits_are(store, {ALICE: 3000, BOB: 50_000, CAROL: 1000}),
                         within=10, what="the quotas published again")
        await eventually(lambda: _usage_known(store, ALICE), within=10,
                         what="alice's usage published again")
    assert any(record.getMessage() == f"quota state lost in Redis "
               f"({store.directory.key(lost)}): reconciling every account"
               for record in caplog.records), caplog.text


async def test_a_change_written_into_a_lost_quota_key_does_not_hide_the_loss(
        settings: Settings) -> None:
    """The order that races in the store (a flush landing between the loss and the next
    check), made deterministic: each key, lost and then written into, still counts as lost."""
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    directory = Directory(client, settings.redis_prefix)
    try:
        for part in ("overquota", "limit", "usage"):
            await directory.replace_quota_states({ALICE: QuotaState(1, False, 5)}, 7)
            assert await directory.quota_state() == (7, [])
            await client.delete(directory.key(part))
            await directory.set_quota_states({BOB: QuotaState(10, True, 9)})
            assert await directory.quota_state() == (7, [directory.key(part)])
            assert await directory.quota_generation() is None
            assert await directory.over_quota() <= {BOB}
            assert set(await directory.quota_limits()) <= {ALICE, BOB}
    finally:
        await client.aclose()


async def test_a_settled_quota_state_is_not_reconciled_again(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over many checks after account changes (a quota set, one lifted, a user deleted) and
    then with no quota left at all, nothing reads as lost: one full reconcile at 100,000 accounts
    takes some 23 s, so a check that kept finding a loss would never stop paying it."""
    reconciles: list[float] = []
    real = QuotaPublisher.reconcile

    async def counted(self: QuotaPublisher) -> None:
        reconciles.append(time.monotonic())
        await real(self)

    monkeypatch.setattr(QuotaPublisher, "reconcile", counted)
    store.accounts.set_quota(ALICE, 3000)
    await deliver(store.maildb, ALICE, 2)
    store.accounts.set_quota(BOB, 50_000)
    await eventually(lambda: _settled(store), within=10, what="the quota state settled")
    store.accounts.set_quota(BOB, 0)  # lifted: unlimited
    store.accounts.delete_user(CAROL)
    await eventually(lambda: _settled(store), within=10, what="the changes applied")
    await asyncio.sleep(1.5)  # 15 checks
    store.accounts.set_quota(ALICE, 0)  # no quota left anywhere
    await eventually(lambda: _settled(store), within=10, what="the last quota lifted")
    await asyncio.sleep(1.5)
    assert reconciles == []
    assert await store.directory.quota_state() == (store.accounts.generation(), [])


async def _alice_full_and_settled(store: Store) -> None:
    store.accounts.set_quota(ALICE, 3000)
    await deliver(store.maildb, ALICE, 2)  # about 4000: full
    await eventually(lambda: _over(store, {ALICE}), within=10, what="alice flagged full")
    await eventually(lambda: _settled(store), within=10, what="the quota state settled")


async def _limits_are(store: Store, expected: dict[str, int]) -> bool:
    return await store.directory.quota_limits() == expected


async def _usage_known(store: Store, user: str) -> bool:
    return (await store.directory.usages([user]))[0] > 3000


async def _settled(store: Store) -> bool:
    return await _settled_in(store.directory, store.accounts)


async def _settled_in(directory: Directory, accounts: AccountDB) -> bool:
    """Whether the quota state published is that of the account database as it is now."""
    return await directory.quota_generation() == accounts.generation()


async def test_the_filter_takes_mail_again_once_an_expunge_makes_room(settings: Settings,
                                                                      store: Store) -> None:
    """Through the filter's directory cache: the store's flush after the expunge clears the
    flag and tells the filters, which answer 250 at RCPT again."""
    store.accounts.set_quota(BOB, 5000)
    await deliver(store.maildb, BOB, 3)
    await eventually(lambda: _over(store, {BOB}), within=10, what="bob flagged full")
    async with running_filter(settings) as worker:
        port = worker.ports[0]
        assert await in_thread(rcpt_codes, port, None, [BOB]) == [452]
        await store.maildb.expunge(BOB, INBOX, (await store.maildb.uids(BOB, INBOX))[:2])
        await eventually(lambda: _rcpt_code_is(port, None, BOB, 250), within=10,
                         what="the filter to take bob's mail again")


async def test_the_default_quota_and_unlimited(settings: Settings) -> None:
    limited = settings.replace(default_quota=1000)
    accounts = AccountDB.for_store(limited.store_dir)
    accounts.add_domain(DOMAIN)
    accounts.add_user(ALICE, "h")
    accounts.add_user(BOB, "h")
    accounts.set_quota(BOB, 0)  # unlimited whatever the default
    maildb = MailDB.for_store(limited.store_dir, inline_max=limited.store_inline_max)
    client = redis.asyncio.Redis.from_url(limited.redis_url)
    try:
        await deliver(maildb, ALICE)
        await deliver(maildb, BOB)
        publisher = QuotaPublisher(maildb, accounts, client, limited.redis_prefix,
                                   limited.default_quota)
        await publisher.reconcile()
        directory = Directory(client, limited.redis_prefix)
        assert await directory.over_quota() == {ALICE}
        assert await directory.quota_generation() == accounts.generation()
        listing = await in_thread(run_cli, limited, "user", "list")
        assert listing.stdout.splitlines() == [f"{ALICE}  quota 1000 (default)",
                                               f"{BOB}  quota unlimited"]
    finally:
        await maildb.close()
        await client.aclose()
        accounts.close()


async def test_resolve_reports_full_mailboxes_in_the_same_lookup(settings: Settings) -> None:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    directory = Directory(client, settings.redis_prefix)
    try:
        accounts = AccountDB.for_store(settings.store_dir)
        accounts.add_domain(DOMAIN)
        for user in (ALICE, BOB):
            accounts.add_user(user, "h")
        accounts.add_alias(TEAM, ALICE)
        accounts.add_alias(TEAM, BOB)
        await directory.publish(accounts.snapshot())
        accounts.close()
        await directory.set_quota_states({BOB: QuotaState(10, True), ALICE: QuotaState(1, False)})
        plain = await directory.resolve(BOB)
        assert (plain.resolution, plain.over_quota) == (Resolution.LOCAL, (BOB,))
        team = await directory.resolve(TEAM)
        assert team.mailboxes == (ALICE, BOB) and team.over_quota == (BOB,)
        assert (await directory.resolve(ALICE)).over_quota == ()
        # A directory republish (e.g. after `tiermail user add`) keeps the quota state.
        await directory.publish(AccountDB.for_store(settings.store_dir).snapshot())
        assert (await directory.resolve(BOB)).over_quota == (BOB,)
        await directory.remove_user(BOB)
        assert await directory.over_quota() == set()
    finally:
        await client.aclose()


async def _over(store: Store, expected: set[str]) -> bool:
    return await store.directory.over_quota() == expected


@dataclass
class Parts:
    accounts: AccountDB
    maildb: MailDB
    client: redis.asyncio.Redis
    directory: Directory

    def publisher(self, settings: Settings, default_quota: int,
                  reconcile_share: float = RECONCILE_SHARE) -> QuotaPublisher:
        return QuotaPublisher(self.maildb, self.accounts, self.client, settings.redis_prefix,
                              default_quota, check_interval=0.1,
                              reconcile_share=reconcile_share)


@contextlib.asynccontextmanager
async def store_parts(settings: Settings) -> AsyncIterator[Parts]:
    """Alice's account, MailDB and Redis with no publisher listening: each store the test
    starts is a QuotaPublisher of its own."""
    accounts = AccountDB.for_store(settings.store_dir)
    accounts.add_domain(DOMAIN)
    accounts.add_user(ALICE, "h")
    maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        yield Parts(accounts, maildb, client, Directory(client, settings.redis_prefix))
    finally:
        await maildb.close()
        await client.aclose()
        accounts.close()


@contextlib.asynccontextmanager
async def running(publisher: QuotaPublisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("share", [RECONCILE_SHARE, 1e-9])
async def test_reconciles_for_a_loss_take_at_most_their_share_of_the_time(
        settings: Settings, share: float) -> None:
    """A Redis that keeps losing a quota key (an evicting policy, too little memory) must not
    keep the store reconciling every account: after the start's reconcile, one asked for by a
    loss waits until that one's time is at most `share` of the time since it began. With the
    default share and a quick reconcile, that is at once; with a share of 1e-9 the few
    milliseconds it took mean weeks of rest, and the loss stays."""
    async with store_parts(settings) as parts:
        parts.accounts.set_quota(ALICE, 3000)
        await deliver(parts.maildb, ALICE, 2)  # about 4000: full
        async with running(parts.publisher(settings, 0, reconcile_share=share)):
            await eventually(lambda: _over_in(parts.directory, {ALICE}), within=10,
                             what="alice flagged full at the start")
            await parts.client.delete(parts.directory.key("overquota"))
            if share == RECONCILE_SHARE:
                await eventually(lambda: _over_in(parts.directory, {ALICE}), within=10,
                                 what="alice flagged full again")
            else:
                await asyncio.sleep(1.0)  # ten checks
                assert await parts.directory.quota_state() == (
                    parts.accounts.generation(), [parts.directory.key("overquota")])


async def test_a_mailbox_that_fills_under_the_default_quota_is_flagged(
        settings: Settings) -> None:
    """With TIERMAIL_DEFAULT_QUOTA set, an account without a quota of its own that fills
    while the store runs is flagged then, not only at the store's next start or account
    change: the full mailbox kept taking mail."""
    limited = settings.replace(default_quota=5000)
    async with store_parts(limited) as parts:
        publisher = parts.publisher(limited, limited.default_quota)
        parts.maildb.add_listener(publisher.on_change)

        async with running(publisher):
            await eventually(lambda: _settled_in(parts.directory, parts.accounts), within=10,
                             what="the first reconcile")
            assert await parts.directory.over_quota() == set()
            await deliver(parts.maildb, ALICE, 3)  # 3 x ~2 KB >= 5000
            await eventually(lambda: _over_in(parts.directory, {ALICE}), within=10,
                             what="alice flagged full")


async def _full_then_emptied_unpublished(parts: Parts, settings: Settings) -> None:
    """Alice over a 5000-octet quota, published, then two of her three messages expunged
    by a store that stopped before its debounced publish."""
    parts.accounts.set_quota(ALICE, 5000)
    await deliver(parts.maildb, ALICE, 3)
    await parts.publisher(settings, 0).reconcile()
    assert await parts.directory.over_quota() == {ALICE}
    await parts.maildb.expunge(ALICE, INBOX, (await parts.maildb.uids(ALICE, INBOX))[:2])


async def test_a_restarted_store_publishes_usage_its_predecessor_did_not(
        settings: Settings) -> None:
    """A store stopped (or killed) between an expunge and its debounced publish left the
    mailbox flagged full in Redis at the same account generation: the next store compared
    generations only, so the filter kept answering 452 until the user changed something."""
    async with store_parts(settings) as parts:
        await _full_then_emptied_unpublished(parts, settings)
        async with running(parts.publisher(settings, 0)):
            await eventually(lambda: _over_in(parts.directory, set()), within=10,
                             what="the restarted store to clear the flag")
            assert await parts.directory.usage(ALICE) == await parts.maildb.usage(ALICE)


async def test_a_restarted_store_whose_first_publish_failed_still_publishes_it(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with Redis failing the restarted store's first reconcile: its retry must be
    a whole reconcile again. The generation in Redis matches the accounts', so a generation
    check alone left the mailbox flagged full for good."""
    async with store_parts(settings) as parts:
        await _full_then_emptied_unpublished(parts, settings)
        failures = failing_once(monkeypatch, "replace_quota_states")
        async with running(parts.publisher(settings, 0)):
            await eventually(lambda: _over_in(parts.directory, set()), within=10,
                             what="the restarted store to clear the flag")
        assert failures == ["failed"]


async def test_a_quota_set_while_the_store_reconciles_is_applied_after_it(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quota lowered while the store's reconcile runs (`tiermail user quota` as the store
    starts), after it read the limits: the reconcile is published at the account generation
    it read, so the next check applies the new quota. Published at the newer generation, the
    change was never applied and the full mailbox kept taking mail."""
    async with store_parts(settings) as parts:
        parts.accounts.set_quota(ALICE, 5000)
        await deliver(parts.maildb, ALICE, 2)  # about 4000
        read_quotas = parts.accounts.stored_quotas
        lowered: list[int] = []

        def read_then_lowered() -> dict[str, int | None]:
            quotas = read_quotas()
            if not lowered:
                parts.accounts.set_quota(ALICE, 3000)
                lowered.append(3000)
            return quotas

        monkeypatch.setattr(parts.accounts, "stored_quotas", read_then_lowered)
        async with running(parts.publisher(settings, 0)):
            await eventually(lambda: _over_in(parts.directory, {ALICE}), within=10,
                             what="the lowered quota applied")
            await eventually(lambda: _settled_in(parts.directory, parts.accounts), within=10,
                             what="the quota state at the latest generation")
        assert lowered == [3000]


async def test_a_store_restarted_with_another_default_quota_applies_it(
        settings: Settings) -> None:
    """TIERMAIL_DEFAULT_QUOTA raised (here: lifted) and the store restarted: no account
    changed, so the generation in Redis matched and accounts full under the old default
    stayed refused at RCPT."""
    async with store_parts(settings) as parts:
        await deliver(parts.maildb, ALICE)
        await parts.publisher(settings, 1000).reconcile()
        assert await parts.directory.over_quota() == {ALICE}
        async with running(parts.publisher(settings, 0)):
            await eventually(lambda: _over_in(parts.directory, set()), within=10,
                             what="the new default to lift the flag")


async def _over_in(directory: Directory, expected: set[str]) -> bool:
    return await directory.over_quota() == expected


async def test_a_reconcile_creates_no_index_for_accounts_without_mail(
        settings: Settings) -> None:
    """With a default quota every account has a limit; reading the usage of one that never
    got mail created its index (standard folders, fsyncs: ~10 ms each, minutes for a large
    site at the store's first start). Its usage is 0 without one."""
    limited = settings.replace(default_quota=1000)
    async with store_parts(limited) as parts:
        parts.accounts.add_user(BOB, "h")
        await deliver(parts.maildb, ALICE)
        await parts.publisher(limited, limited.default_quota).reconcile()
        assert await parts.directory.over_quota() == {ALICE}
        assert await parts.directory.usage(BOB) == 0
        assert not store_user_path(limited.store_dir, BOB).exists()
        assert await parts.maildb.usage(BOB) == 0


class CountingMailDB(MailDB):
    """The real MailDB, noting whose usage was read."""

    usage_reads: list[str]

    async def usage(self, user: str) -> int:
        self.usage_reads.append(user)
        return await super().usage(user)


async def test_an_account_change_recomputes_only_the_limits_it_changed(
        settings: Settings) -> None:
    """Every account change the directory follows (a user added, a quota) bumps the account
    generation, and the store recomputed every limited account's usage at each one: with a
    default quota and 100,000 accounts, each change read 100,000 indexes (about 23 s here)
    while the over-quota flags waited behind it. Now only users whose limit changed (or who
    are new, lifted or deleted) are read, and the state still ends up exact. A password
    change moves nothing (it is not in the directory)."""
    limited = settings.replace(default_quota=3000)
    async with store_parts(limited) as parts:
        maildb = CountingMailDB.for_store(limited.store_dir, inline_max=limited.store_inline_max)
        maildb.usage_reads = []
        accounts = parts.accounts
        for user in (BOB, CAROL):
            accounts.add_user(user, "h")
        await deliver(maildb, ALICE, 2)  # about 4000: over the default
        await deliver(maildb, BOB, 2)
        publisher = QuotaPublisher(maildb, accounts, parts.client, limited.redis_prefix,
                                   limited.default_quota, check_interval=0.1)

        def settled() -> Awaitable[bool]:
            return _settled_in(parts.directory, accounts)

        try:
            async with running(publisher):
                await eventually(settled, within=10, what="the first reconcile")
                assert await parts.directory.over_quota() == {ALICE, BOB}
                assert sorted(maildb.usage_reads) == [ALICE, BOB, CAROL]

                maildb.usage_reads.clear()
                before = accounts.generation()
                accounts.set_password(ALICE, "h2")
                assert accounts.generation() == before
                accounts.add_user(f"erin@{DOMAIN}", "h")  # a change for someone else
                await eventually(settled, within=10, what="erin added")
                assert maildb.usage_reads == [f"erin@{DOMAIN}"]
                maildb.usage_reads.clear()

                accounts.set_quota(BOB, 1_000_000)
                accounts.set_quota(ALICE, 0)  # unlimited
                accounts.add_user(f"dave@{DOMAIN}", "h")
                await eventually(settled, within=10, what="the quota changes")
                assert sorted(maildb.usage_reads) == [ALICE, BOB, f"dave@{DOMAIN}"]
                assert await parts.directory.over_quota() == set()
                limits = await parts.directory.quota_limits()
                assert limits == {BOB: 1_000_000, CAROL: 3000, f"dave@{DOMAIN}": 3000,
                                  f"erin@{DOMAIN}": 3000}

                # Deleted and added again at once: the CLI cleared its state in Redis, the
                # limit is the same as before, and the new account is read all the same.
                # (Redis first: a check of the publisher's in the await between the delete
                # and the add would read the deleted account too, and count it.)
                maildb.usage_reads.clear()
                await parts.directory.publish(accounts.snapshot())  # changes need one
                await parts.directory.remove_user(CAROL)
                accounts.delete_user(CAROL)
                accounts.add_user(CAROL, "h")
                await eventually(settled, within=10, what="carol added again")
                assert maildb.usage_reads == [CAROL]
                assert (await parts.directory.quota_limits())[CAROL] == 3000
        finally:
            await maildb.close()


def _damaged(index: Path) -> None:
    for leftover in index.parent.glob("index.sqlite-*"):
        leftover.unlink()
    index.write_bytes(b"this is not a database" * 200)


def _from_a_newer_store(index: Path) -> None:
    with contextlib.closing(sqlite3.connect(index, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


@pytest.mark.parametrize("spoil", [_damaged, _from_a_newer_store])
async def test_an_unreadable_index_leaves_the_other_accounts_quota_published(
        settings: Settings, caplog: pytest.LogCaptureFixture,
        spoil: Callable[[Path], None]) -> None:
    """A `file is not a database` in one user's index failed the whole reconcile, retried
    for ever: nobody's quota state was published again, so a user who had deleted mail got
    `452 Mailbox full` indefinitely. An index a newer store wrote (the store downgraded
    since) was published as an empty mailbox under its quota. Either account is now left
    out (what Redis held for it is kept), logged once."""
    limited = settings.replace(default_quota=3000)
    async with store_parts(limited) as parts:
        carol_used = await _with_carol_unreadable(parts, limited, spoil)
        publisher = parts.publisher(limited, limited.default_quota)
        with caplog.at_level(logging.ERROR, logger="services.store.quota"):
            for _ in range(2):
                await publisher.reconcile()
                assert await parts.directory.over_quota() == {ALICE}
        assert await parts.directory.usage(ALICE) > 3000
        assert await parts.directory.usage(CAROL) == carol_used
        assert [getattr(record, "user", None) for record in caplog.records
                if getattr(record, "event", None) == "quota-index-unusable"] == [CAROL]


async def _with_carol_unreadable(parts: Parts, settings: Settings,
                                 spoil: Callable[[Path], None]) -> int:
    """Alice over the default quota, carol under it, both published; then carol's index,
    with the store stopped, made unreadable by `spoil`, and the store started again. Carol's
    usage as published."""
    parts.accounts.add_user(CAROL, "h")
    await deliver(parts.maildb, ALICE, 2)
    await deliver(parts.maildb, CAROL)
    await parts.publisher(settings, settings.default_quota).reconcile()
    carol_used = await parts.directory.usage(CAROL)
    assert carol_used
    await parts.maildb.close()
    spoil(store_user_path(settings.store_dir, CAROL) / "index.sqlite")
    parts.maildb = MailDB.for_store(settings.store_dir, inline_max=settings.store_inline_max)
    return carol_used
