"""`tiermail deadletters` against large queues: the command keeps in memory only what it
sends back, not every message it looks at; it says when it did not look at them all."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import aiormq
import pytest
from pamqp.commands import Basic

from common.broker import close_connection, open_channel
from common.settings import Settings
from common.topology import PERSISTENT, message_properties
from services import cli, heldmail
from services.heldmail import SETTLE_BYTES
from tests.integration.store.helpers import make_message, queue_counts
from tests.support import REPO, AckTrap, FreezingProxy, broker_at, eventually, run_cli, tier_env

MESSAGES = 24
SIZE = 8 * 1024 * 1024  # 24 x 8 MiB: 192 MiB held in the queue


async def _dead_letter(settings: Settings,
                       messages: Iterable[tuple[bytes, Basic.Properties]]) -> None:
    """Publish each (body, properties) to the dead-letter exchange, confirmed, one at a time."""
    connection, channel = await open_channel(settings.amqp_url, settings.topology, 5.0,
                                             confirms=True)
    try:
        for body, properties in messages:
            await channel.basic_publish(body, exchange=settings.topology.dead_exchange,
                                        routing_key="", properties=properties)
    finally:
        await close_connection(connection)


async def _dead_letter_large_messages(settings: Settings, count: int = MESSAGES,
                                      size: int = SIZE, copies: int = 1) -> list[str]:
    """`count` dead letters, each `copies` times in a row (a crash's leftovers)."""
    queue_ids: list[str] = []

    def made() -> Iterator[tuple[bytes, Basic.Properties]]:  # one body in memory at a time
        for _ in range(count):
            envelope, body = make_message("ghost@example.test", padding=size)
            queue_ids.append(envelope.queue_id)
            for _ in range(copies):
                yield body, message_properties(envelope)

    await _dead_letter(settings, made())
    return queue_ids


def _run_measured(settings: Settings, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`tiermail ARGS` and its peak resident memory in KiB (ru_maxrss of a parent that has
    no other child)."""
    measure = ("import resource, subprocess, sys\n"
               "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stdout.write(done.stdout); sys.stderr.write(done.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(done.returncode)\n")
    done = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "services.cli",
                           *args], env=tier_env(settings), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    *errors, peak = done.stderr.rstrip("\n").split("\n")
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout,
                                       "\n".join(errors)), int(peak)


async def test_listing_and_dropping_large_dead_letters_holds_few_in_memory(
        settings: Settings) -> None:
    await close_connection((await open_channel(settings.amqp_url, settings.topology, 5.0,
                                               confirms=False))[0])  # the queues exist
    empty, baseline = await asyncio.to_thread(_run_measured, settings, "deadletters", "list")
    assert empty.returncode == 0, empty.stderr
    queue_ids = await _dead_letter_large_messages(settings)
    # A few messages' worth (aiormq joins a body from its frames; freed 8 MiB blocks are not
    # always given back to the system at once), far below the 24 the queue holds.
    budget_kib = baseline + 8 * SIZE // 1024

    listing, peak = await asyncio.to_thread(_run_measured, settings, "deadletters", "list",
                                            "--json")
    assert listing.returncode == 0, listing.stderr
    report = json.loads(listing.stdout)
    assert report["total"] == MESSAGES
    assert peak < budget_kib, f"list held {peak} KiB"

    last = queue_ids[-1]  # found after every other message was looked at
    dropped, peak = await asyncio.to_thread(_run_measured, settings, "deadletters", "drop", last)
    assert dropped.returncode == 0 and f"{last} dropped" in dropped.stdout, dropped.stderr
    assert peak < budget_kib, f"drop held {peak} KiB"

    # Sending back keeps bodies until the broker confirms them: up to SETTLE_BYTES more.
    retried, peak = await asyncio.to_thread(_run_measured, settings, "deadletters", "retry",
                                            "--all")
    assert retried.returncode == 0, retried.stderr
    assert peak < budget_kib + SETTLE_BYTES // 1024, f"retry held {peak} KiB"
    left = await asyncio.to_thread(_run_measured, settings, "deadletters", "list", "--json")
    assert json.loads(left[0].stdout)["total"] == 0
    assert await queue_counts(settings, settings.topology.large_queue) == MESSAGES - 1


def test_a_drop_of_more_than_one_command_looks_at_says_so_and_fails(
        settings: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One retry or drop looks at MAX_TAKEN messages (10,000; 5 here): `drop --all` of a
    larger queue dropped those, said `5 messages dropped` and exited 0, as if the queue were
    empty now. It says how many are left and exits 1; a queue id past those looked at is
    `not dead-lettered among those looked at`."""
    queue_ids = asyncio.run(_dead_letter_large_messages(settings, 12, 0))
    monkeypatch.setattr(heldmail, "MAX_TAKEN", 5)
    for name in [name for name in os.environ if name.startswith("TIERMAIL_")]:
        monkeypatch.delenv(name)
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    # The command quiets aiormq's logger; not for the rest of this test process.
    monkeypatch.setattr(logging.getLogger("aiormq"), "setLevel", lambda level: None)

    limit = ("tiermail: only the first 5 dead-lettered messages were looked at; {} more are "
             "held: run the command again\n")
    assert cli.main(["deadletters", "drop", "--all"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "5 messages dropped" and err == limit.format(7)
    last = queue_ids[-1]  # past the first 5 of the 7 left
    assert cli.main(["deadletters", "drop", last]) == 1
    out, err = capsys.readouterr()
    assert out == "0 messages dropped\n"
    assert err == limit.format(2) + f"tiermail: {last}: not dead-lettered among those looked at\n"
    assert cli.main(["deadletters", "drop", "--all"]) == 1
    assert capsys.readouterr() == ("".join(f"{q} dropped\n" for q in queue_ids[5:10])
                                   + "5 messages dropped\n", limit.format(2))
    assert cli.main(["deadletters", "drop", "NOPE", last]) == 1
    out, err = capsys.readouterr()
    assert out == f"{last} dropped\n1 message dropped\n"
    assert err == "tiermail: NOPE: not dead-lettered\n"  # every message was looked at
    assert cli.main(["deadletters", "drop", "--all"]) == 0
    assert capsys.readouterr().out == f"{queue_ids[10]} dropped\n1 message dropped\n"


def test_a_listing_counts_each_message_once_up_to_its_limit(settings: Settings) -> None:
    """Three dead letters, each in the queue twice: `list --limit 2` shows the two oldest,
    each with its two copies, and counts three."""
    queue_ids = asyncio.run(_dead_letter_large_messages(settings, 3, 0, copies=2))
    whole = json.loads(run_cli(settings, "deadletters", "list", "--json").stdout)
    assert whole["total"] == 3
    assert [(m["queue_id"], m["copies"]) for m in whole["messages"]] == [
        (queue_id, 2) for queue_id in queue_ids]
    some = run_cli(settings, "deadletters", "list", "--limit", "2")
    assert some.returncode == 0, some.stderr
    *lines, count = some.stdout.splitlines()
    assert [line.split()[0] for line in lines] == queue_ids[:2]
    assert all(line.endswith("  (2 copies)") for line in lines), lines
    assert count == ("2 of 3 dead-lettered messages (2 duplicate copies in the queue, each "
                     "listed once)")


def test_a_retry_sends_one_copy_of_a_message_held_twice(settings: Settings) -> None:
    """A dead letter in the queue twice (a crash's leftovers) is one message: a retry
    sends it back once and takes both copies out, or the store delivers it twice (for a
    message without a Message-ID, twice in the mailbox)."""
    asyncio.run(_dead_letter_large_messages(settings, 2, 0, copies=2))
    retried = run_cli(settings, "deadletters", "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert "2 messages sent for delivery" in retried.stdout, retried.stdout
    topology = settings.topology
    assert asyncio.run(queue_counts(settings, topology.deliver_queue)) == 2
    assert asyncio.run(queue_counts(settings, topology.dead_queue)) == 0


async def test_a_retry_whose_acks_the_broker_ignored_sends_each_message_back_once(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ 3.x can ignore acks that reach a quorum queue just before the channel
    closes (rabbitmq-server issue 10327): the messages return to the queue, and the retry
    takes them again in a later pass. There they are only acked: each was sent back once,
    in the first pass, and is delivered once. Here the first pass's acks never leave."""
    queue_ids = await _dead_letter_large_messages(settings, 2, 0)
    passes = 0
    one_pass = heldmail._one_pass

    async def ignored(*args: object, **kwargs: object) -> None:
        return None

    async def acks_of_the_first_pass_ignored(*args: Any, **kwargs: Any) -> Any:
        nonlocal passes
        passes += 1
        if passes > 1:
            return await one_pass(*args, **kwargs)
        with monkeypatch.context() as first:
            first.setattr(aiormq.Channel, "basic_ack", ignored)
            return await one_pass(*args, **kwargs)

    monkeypatch.setattr(heldmail, "_one_pass", acks_of_the_first_pass_ignored)
    monkeypatch.setattr(heldmail, "RESETTLE_PAUSE", 0)
    done = await heldmail.release(settings, heldmail.dead_letters(settings.topology),
                                  lambda held: True)
    assert sorted(held.queue_id for held in done) == sorted(queue_ids)
    assert passes == 3  # the second took both again; the third found none
    topology = settings.topology
    assert await queue_counts(settings, topology.deliver_queue) == 2
    assert await queue_counts(settings, topology.dead_queue) == 0


async def test_a_drop_whose_ack_never_reaches_the_broker_is_not_reported(
        settings: Settings) -> None:
    """An ack has no answer: `drop` says a message is dropped only once the answer to a later
    method on the channel shows the broker has it. With the ack lost on the way and the link
    cut right after it, the command fails, says nothing was dropped, and the message is
    held still."""
    queue_ids = await _dead_letter_large_messages(settings, 2, 0)
    trap = AckTrap(5672)
    trap.arm(None, lambda queue_id: queue_id == queue_ids[0])
    try:
        dropped = await asyncio.to_thread(run_cli, broker_at(settings, trap.port),
                                          "deadletters", "drop", queue_ids[0])
    finally:
        trap.cut()
    assert trap.caught == queue_ids[0], "the command never acked the message"
    assert dropped.returncode == 1, (dropped.stdout, dropped.stderr)
    assert f"{queue_ids[0]} dropped" not in dropped.stdout
    dead_queue = settings.topology.dead_queue
    await eventually(lambda: _counted(settings, dead_queue, 2),
                     what="both dead letters held again once the broker lost the command")


async def _counted(settings: Settings, queue: str, count: int) -> bool:
    return await queue_counts(settings, queue) == count


def test_a_listing_stays_oldest_first_after_a_show_and_a_drop(settings: Settings) -> None:
    """`show` and `drop` take messages and give back those they do not act on, which the
    broker puts behind the rest once they have been given back before (a listing did): the
    listing, in the queue's order, then began with a newer one, and `--limit` could hide
    the oldest (found in review). Messages received within one second: the AMQP timestamp
    has whole seconds, the envelope the fraction."""
    queue_ids = asyncio.run(_dead_letter_large_messages(settings, 5, 0))
    assert run_cli(settings, "deadletters", "list").returncode == 0
    assert run_cli(settings, "deadletters", "show", queue_ids[2]).returncode == 0
    assert run_cli(settings, "deadletters", "drop", queue_ids[1]).returncode == 0
    left = [queue_ids[0], *queue_ids[2:]]
    listed = json.loads(run_cli(settings, "deadletters", "list", "--json").stdout)
    assert [m["queue_id"] for m in listed["messages"]] == left
    oldest = run_cli(settings, "deadletters", "list", "--limit", "1").stdout.split()[0]
    assert oldest == left[0]


def test_a_listing_puts_a_message_received_at_no_known_time_last(settings: Settings) -> None:
    """An undecodable dead letter without an AMQP timestamp was received at no known time:
    it is listed after those that were, so that `--limit` still shows the oldest first."""
    unknown = Basic.Properties(delivery_mode=PERSISTENT, message_id="bad1")
    asyncio.run(_dead_letter(settings, [(b"garbage", unknown)]))
    queue_ids = asyncio.run(_dead_letter_large_messages(settings, 2, 0))
    listed = json.loads(run_cli(settings, "deadletters", "list", "--json").stdout)
    assert [m["queue_id"] for m in listed["messages"]] == [*queue_ids, "bad1"]
    oldest = run_cli(settings, "deadletters", "list", "--limit", "1").stdout.split()[0]
    assert oldest == queue_ids[0]


async def test_a_command_whose_path_to_the_broker_died_lets_go_of_the_queue_in_seconds(
        settings: Settings) -> None:
    """A command holds its queue's lock, and the messages it took, on one connection; when
    the path to the broker died under it, the broker kept both until RabbitMQ's default
    heartbeat noticed: up to three minutes. It asks for heldmail.HEARTBEAT now."""
    proxy = FreezingProxy(5672)
    where = heldmail.dead_letters(settings.topology)
    holding = asyncio.Event()

    async def a_command_that_works_for_ever() -> None:
        async with heldmail._locked(broker_at(settings, proxy.port), where):
            holding.set()
            await asyncio.Event().wait()

    command = asyncio.ensure_future(a_command_that_works_for_ever())
    looker = await aiormq.connect(settings.amqp_url)
    try:
        async with asyncio.timeout(30):
            await holding.wait()
        assert await heldmail.lock_state(looker, where.queue) == "held"
        proxy.freeze()
        await eventually(lambda: _free(looker, where.queue), within=4 * heldmail.HEARTBEAT + 10,
                         what="the broker letting go of the lock of a command it lost")
    finally:
        command.cancel()
        proxy.cut()
        await asyncio.gather(command, return_exceptions=True)
        await looker.close()


async def _free(connection: aiormq.abc.AbstractConnection, queue: str) -> bool:
    return await heldmail.lock_state(connection, queue) != "held"
