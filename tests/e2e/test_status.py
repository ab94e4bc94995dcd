"""`tiermail status` against a running stack, as an operator reads it."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable

import aiormq
from pamqp.commands import Basic, Connection
from prometheus_client.parser import text_string_to_metric_families

from common.settings import Settings
from tests.e2e.test_failure_contract import send_one, stored_message_ids
from tests.e2e.test_inbound_spine import provision, send
from tests.support import (
    QuietProxy,
    TcpProxy,
    TierProcess,
    broker_at,
    dead_letter_depth,
    run_cli,
    wait_until,
)


def status(settings: Settings) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = run_cli(settings, "status", "--json")
    return result.returncode, json.loads(result.stdout)


async def publish_undecodable(settings: Settings) -> None:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.basic_publish(
            b"not a message", exchange=settings.topology.inbound_exchange,
            routing_key="deliver", properties=Basic.Properties(delivery_mode=2))
    finally:
        await connection.close()


def test_status_shows_tiers_queues_and_dead_letters(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    provision(settings)
    store = run_tier(settings, "store")
    store.wait_for_port(settings.pop3_port)

    def only_the_filter_missing() -> bool:
        code, report = status(settings)
        return code == 1 and report["problems"] == ["no filter process is reporting"]

    wait_until(only_the_filter_missing, timeout=30, interval=0.5,
               what="status to miss the filter, and only it")
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    send(settings, "sender@example.net", ["alice@example.org"],
         b"Subject: counted\r\n\r\nhello\r\n")

    def healthy_with_counters() -> bool:
        code, report = status(settings)
        beats = {p["tier"]: p for p in report["redis"].get("processes", [])}
        return (code == 0 and beats.get("filter", {}).get("accepted") == 1
                and beats.get("store", {}).get("delivered") == 1)

    wait_until(healthy_with_counters, timeout=30, interval=0.5,
               what="status to show both tiers and their counters")
    code, report = status(settings)
    assert report["broker"]["deliver"]["consumers"] == 1
    assert report["redis"]["directory"]["users"] == 2
    # Young processes: their recent window reaches back to their start, so it holds it all.
    beats = {p["tier"]: p for p in report["redis"]["processes"]}
    assert beats["filter"]["recent"]["counts"]["accepted"] == 1
    assert beats["store"]["recent"]["counts"]["delivered"] == 1
    assert 0 < beats["filter"]["recent"]["seconds"] < 60
    text = run_cli(settings, "status").stdout
    assert "processes (rates over the last minute):" in text
    assert re.search(r"accepted=1 \([0-9.]+/min\)", text), text

    asyncio.run(publish_undecodable(settings))
    wait_until(lambda: dead_letter_depth(settings) == 1, what="the poison message dead-lettered")
    code, report = status(settings)
    assert code == 1 and report["broker"]["dead_letters"] == 1
    assert any("dead-letter" in problem for problem in report["problems"])

    store.stop()  # mail would now wait in the queues: said in so many words
    code, report = status(settings)
    assert code == 1
    assert "no store process is reporting" in report["problems"], report["problems"]
    for queue in (settings.topology.deliver_queue, settings.topology.large_queue):
        assert any(problem.startswith(f"nothing consumes {queue} ")
                   for problem in report["problems"]), report["problems"]


def test_status_says_how_long_mail_waited_for_a_store_that_was_down(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """After an outage the store's heartbeat says how long the last message it stored had
    waited, and status how fast the store takes the backlog; while no store runs, only how
    much waits."""
    provision(settings)
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    total = 20
    for n in range(total):
        send(settings, "sender@example.net", ["alice@example.org"],
             f"Subject: waits {n}\r\n\r\nhello\r\n".encode())
    last_sent = time.time()
    _, report = status(settings)
    assert report["broker"]["deliver"]["messages"] == total
    assert report["backlog"] == {"messages": total}  # no store: no rate to say
    assert f"backlog: {total} messages for the store\n" in run_cli(settings, "status").stdout
    time.sleep(2.0)
    store = run_tier(settings, "store")
    outage = time.time() - last_sent
    store.wait_for_port(settings.pop3_port)

    def all_taken() -> bool:
        _, report = status(settings)
        beats = {p["tier"]: p for p in report["redis"].get("processes", [])}
        return beats.get("store", {}).get("taken") == total

    wait_until(all_taken, timeout=30, interval=0.5, what="the store to report every message")
    _, report = status(settings)
    beats = {p["tier"]: p for p in report["redis"]["processes"]}
    assert beats["store"]["delivery_lag_seconds"] >= outage
    assert report["backlog"]["messages"] == 0
    assert report["backlog"]["taken_per_second"] > 0
    text = run_cli(settings, "status").stdout
    assert re.search(r"delivery_lag=\d+\.\ds", text), text
    assert "backlog:" not in text  # nothing waits any more

    scraped = run_cli(settings, "status", "--prometheus")
    assert scraped.returncode == 0, scraped.stderr
    samples = {(sample.name, sample.labels.get("tier")): sample.value
               for family in text_string_to_metric_families(scraped.stdout)
               for sample in family.samples}
    assert samples[("tiermail_healthy", None)] == 1
    assert samples[("tiermail_backlog_messages", None)] == 0
    assert samples[("tiermail_process_taken_total", "store")] == total
    assert samples[("tiermail_process_delivery_lag_seconds", "store")] >= outage
    assert samples[("tiermail_process_accepted_total", "filter")] == total


def test_status_shows_the_stores_open_sessions(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Each count against its own limit: the limits differ here, so that one shown against
    the other's is seen."""
    settings = settings.replace(imap_max_connections=700, pop3_max_connections=600)
    store = run_tier(settings, "store")
    store.wait_for_port(settings.pop3_port)
    store.wait_for_port(settings.imap_port)
    imap = [socket.create_connection(("127.0.0.1", settings.imap_port), timeout=30)
            for _ in range(2)]
    pop3 = socket.create_connection(("127.0.0.1", settings.pop3_port), timeout=30)
    try:
        assert all(client.recv(100).startswith(b"* OK") for client in imap)
        assert pop3.recv(100).startswith(b"+OK")

        def sessions_counted() -> bool:
            beats = {p["tier"]: p for p in status(settings)[1]["redis"].get("processes", [])}
            store_beat = beats.get("store", {})
            return (store_beat.get("imap_sessions"), store_beat.get("pop3_sessions"),
                    store_beat.get("imap_literals_held"),
                    store_beat.get("imap_fetch_held")) == (2, 1, 0, 0)

        wait_until(sessions_counted, timeout=30, interval=0.5,
                   what="the store's heartbeat to count 2 IMAP and 1 POP3 sessions")
        text = run_cli(settings, "status").stdout
        assert f"imap_sessions=2/{settings.imap_max_connections}," in text, text
        assert f"pop3_sessions=1/{settings.pop3_max_connections}," in text, text
    finally:
        for client in [*imap, pop3]:
            client.close()


def test_status_names_a_filter_cut_off_from_the_broker(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """Status itself may reach RabbitMQ while a filter cannot (another host, a network
    between): the filter's heartbeat says so, and it reconnects by itself, without waiting
    for a sender, once the broker is reachable again."""
    provision(settings)
    run_tier(settings, "store").wait_for_port(settings.pop3_port)
    proxy = TcpProxy(5672)
    run_tier(broker_at(settings, proxy.port), "filter").wait_for_port(settings.smtp_port)

    def filter_connected() -> bool | None:
        beats = [p for p in status(settings)[1]["redis"].get("processes", [])
                 if p["tier"] == "filter"]
        return beats[0].get("broker_connected") if beats else None

    try:
        wait_until(lambda: filter_connected() is True, timeout=30, interval=0.5,
                   what="the filter to report its broker connection")
        proxy.cut()
        wait_until(lambda: filter_connected() is False, timeout=30, interval=0.5,
                   what="the filter to report the broker unreachable")
        code, report = status(settings)
        assert code == 1
        assert any(problem.startswith("filter ") and "cannot reach the broker" in problem
                   for problem in report["problems"]), report["problems"]
        proxy.start()  # no mail sent: the filter reconnects on its own
        wait_until(lambda: filter_connected() is True, timeout=30, interval=0.5,
                   what="the filter to reconnect by itself")
        assert status(settings)[0] == 0
    finally:
        proxy.cut()


def test_status_answers_when_the_broker_takes_the_connection_and_goes_quiet(
        settings: Settings) -> None:
    """A node that hangs after the handshake: status waited on aiormq's channel.open
    (without a deadline) until the heartbeat gave up, minutes later, the operator's first
    check hanging when it was needed most. Now it says so within its timeout."""
    said = status_through(settings, QuietProxy(5672, after=Connection.OpenOk))
    assert "broker: DOWN it took the connection, then did not answer within 5 s" in said, said


def test_status_names_a_broker_that_answers_no_handshake(settings: Settings) -> None:
    """A listener that takes the TCP connection and says nothing: status said `no answer in
    time`, which the operations guide did not list."""
    proxy = TcpProxy(5672)
    proxy.hang()
    said = status_through(settings, proxy)
    assert "broker: DOWN no answer within 5 s to the connection or its handshake" in said, said


def status_through(settings: Settings, proxy: TcpProxy) -> str:
    """`tiermail status` (exit 1) with the broker reached through `proxy`, which is cut."""
    try:
        result = run_cli(broker_at(settings, proxy.port), "status")
    finally:
        proxy.cut()
    assert result.returncode == 1, result.stdout + result.stderr
    return result.stdout


def test_status_names_a_filter_that_was_killed(settings: Settings,
                                               run_tier: Callable[..., TierProcess]) -> None:
    """A filter that is killed (or cut off from Redis, which stops its heartbeat) vanished
    from status 15 s later, which then said healthy beside the other filters."""
    provision(settings)
    store = run_tier(settings, "store")
    store.wait_for_port(settings.imap_port)
    kept = run_tier(settings, "filter")
    kept.wait_for_port(settings.smtp_port)
    killed = run_tier(settings, "filter")
    wait_until(lambda: sum(p["tier"] == "filter" for p in status(settings)[1]["redis"]
                           ["processes"]) == 2, what="both filters reporting")
    killed.kill()
    wait_until(lambda: any(f":{killed.proc.pid} stopped reporting" in problem
                           for problem in status(settings)[1]["problems"]),
               timeout=60, interval=1.0, what="status to name the killed filter")
    code, report = status(settings)
    assert code == 1
    assert f"filter {socket.gethostname()}:{killed.proc.pid} stopped reporting" in \
        " ".join(report["problems"])


def test_status_names_a_store_whose_broker_connection_hangs(
        settings: Settings, run_tier: Callable[..., TierProcess]) -> None:
    """A broker that hangs (or a path that drops packets) leaves the store's connection open
    and quiet: the messages sent to the store wait unacknowledged, which the queue depth
    does not count, until the AMQP heartbeat gives the connection up (3 minutes by
    default). Status said healthy meanwhile; the store's probe now names it, and when the
    broker answers again, the messages arrive, each once."""
    provision(settings)
    proxy = TcpProxy(5672)
    store = run_tier(broker_at(settings, proxy.port), "store")
    store.wait_for_port(settings.pop3_port)
    run_tier(settings, "filter").wait_for_port(settings.smtp_port)
    wait_until(lambda: any(p["tier"] == "store" and p.get("consumer_connected")
                           for p in status(settings)[1]["redis"]["processes"]),
               what="the store consuming")
    silent = f"store {socket.gethostname()}:{store.proc.pid}: the broker has not answered"
    sent: list[str] = []
    proxy.hang()
    try:
        for _ in range(3):
            send_one(settings, sent)  # the filter reaches the broker directly
        wait_until(lambda: any(problem.startswith(silent)
                               for problem in status(settings)[1]["problems"]),
                   timeout=60, interval=1.0, what="status to name the store's silent broker")
        assert stored_message_ids(settings) == []
    finally:
        proxy.resume()
    wait_until(lambda: sorted(stored_message_ids(settings)) == sorted(sent), timeout=60,
               what="the held messages in the mailbox")
    wait_until(lambda: status(settings)[0] == 0, timeout=60, interval=1.0,
               what="status healthy again")
    assert "the broker has not answered for" in store.output()
    assert "the broker answers again after" in store.output()
    proxy.cut()
