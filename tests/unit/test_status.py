"""How `tiermail status` prints the processes' heartbeats (services/status.py)."""

from __future__ import annotations

import asyncio
import re
import time
import types
from typing import Any

import pytest

from common.settings import Settings
from services import status
from services.status import (
    _consuming_tiers,
    _directory_problems,
    _eviction,
    _learn_problems,
    _not_reporting,
    _unconsumed,
    format_status,
)


def report(beat: dict[str, object]) -> dict[str, object]:
    return {"healthy": True, "problems": [], "broker": {"reachable": True},
            "redis": {"reachable": True, "processes": [beat],
                      "directory": {"published": True, "domains": 1, "users": 1,
                                    "aliases": 0}}}


def test_counters_get_a_rate_and_gauges_do_not() -> None:
    beat = {"tier": "store", "host": "h", "pid": 7, "started": time.time() - 60,
            "delivered": 60, "imap_sessions": 3, "pop3_sessions": 1, "imap_literals_held": 0,
            "consumer_connected": True, "dead_lettered": 0}
    line = format_status(report(beat)).splitlines()[-1]
    assert re.search(r"delivered=60 \([0-9.]+/min\)", line)
    assert "imap_sessions=3," in line and "pop3_sessions=1," in line
    assert "imap_literals_held=0," in line
    assert "consumer_connected=True" in line
    assert "dead_lettered" not in line  # a counter still at 0 is left out


def test_session_gauges_are_shown_against_their_limits() -> None:
    beat = {"tier": "store", "host": "h", "pid": 7, "started": time.time() - 60,
            "imap_sessions": 3, "imap_sessions_limit": 1000, "pop3_sessions": 0,
            "pop3_sessions_limit": 500}
    line = format_status(report(beat)).splitlines()[-1]
    assert "imap_sessions=3/1000" in line and "pop3_sessions=0/500" in line
    assert "_limit" not in line


def test_rates_come_from_the_last_minute_when_the_heartbeat_has_it() -> None:
    """A filter up for a day that accepted 86,400 messages but none in the last minute:
    its rate is 0, not the day's average of 60 a minute."""
    beat = {"tier": "filter", "host": "h", "pid": 7, "started": time.time() - 86_400,
            "accepted": 86_400, "rejected": 120,
            "recent": {"seconds": 60.0, "counts": {"accepted": 0, "rejected": 30}}}
    line = format_status(report(beat)).splitlines()[-1]
    assert "accepted=86400 (0.0/min)" in line
    assert "rejected=120 (30.0/min)" in line
    del beat["recent"]  # from a process of an older version: the average since start
    line = format_status(report(beat)).splitlines()[-1]
    assert "accepted=86400 (60.0/min)" in line


def test_a_time_in_a_heartbeat_is_shown_as_how_long_ago(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    # The clock held still: a stall of a second on a loaded machine would otherwise change
    # how long ago it was.
    monkeypatch.setattr(status, "time", types.SimpleNamespace(time=lambda: now))
    beat = {"tier": "store", "host": "h", "pid": 7, "started": now - 600,
            "last_delivery_at": now - 42.2, "delivered": 3}
    line = format_status(report(beat)).splitlines()[-1]
    assert "last_delivery 42s ago" in line
    assert "last_delivery_at" not in line and str(int(now)) not in line


def test_delivery_queues_without_a_consumer_are_a_problem() -> None:
    queue = {"declared": True, "messages": 3, "consumers": 0}
    broker = {"deliver": {**queue, "queue": "t.deliver"},
              "large": {**queue, "queue": "t.deliver.large", "consumers": 1},
              "scan": {**queue, "queue": "t.scan", "consumers": 1}}
    assert _unconsumed(broker) == [
        "nothing consumes t.deliver (3 message(s) waiting): the store is stopped or cannot "
        "reach the broker"]
    assert _unconsumed({"deliver": {"declared": False, "queue": "t.deliver"}}) == []


def test_mail_waiting_to_be_scanned_that_no_filter_takes_is_a_problem() -> None:
    """A dead letter of the scan queue retried while no filter scans (scanning off) sat in
    the scan queue while status said healthy (found in review)."""
    waiting = {"scan": {"queue": "t.scan", "declared": True, "messages": 2, "consumers": 0}}
    assert _unconsumed(waiting) == [
        "2 message(s) wait in t.scan to be scanned and no filter is scanning them: its "
        "scanners are down, or no filter runs with scanning on"]
    assert _unconsumed({"scan": {**waiting["scan"], "messages": 0}}) == []


def test_learn_jobs_nobody_takes_are_a_problem_while_learning_is_on() -> None:
    """Moves into Junk queue learn jobs; without a `tiermail learner` they only pile up."""
    waiting = {"learn": {"queue": "t.learn", "declared": True, "messages": 4, "consumers": 0}}
    assert _learn_problems(waiting, Settings(spam="rspamd")) == [
        "nothing consumes t.learn (4 spam-learning job(s) waiting): start `tiermail learner`"]
    assert _learn_problems(waiting, Settings(spam="rspamd", learn="off")) == []
    taken = {"learn": {**waiting["learn"], "consumers": 1}}
    assert _learn_problems(taken, Settings(spam="rspamd")) == []


def test_counts_and_times_read_as_sentences() -> None:
    now = time.time()
    broker = {"reachable": True, "deliver": {"queue": "t.deliver", "declared": True,
                                             "messages": 1, "consumers": 1}}
    beat = {"tier": "learner", "host": "h", "pid": 1, "started": now - 60, "at": now}
    store = {"tier": "store", "host": "h", "pid": 2, "started": now - 60, "at": now,
             "storage_down_since": now - 90}
    redis = {"reachable": True, "processes": [beat, store],
             "directory": {"published": True, "domains": 1, "users": 1, "aliases": 0}}
    shown = format_status({"healthy": True, "problems": [], "broker": broker, "redis": redis})
    assert "  t.deliver: 1 message, 1 consumer\n" in shown
    assert "directory published: 1 domain, 1 user, 0 aliases\n" in shown
    assert "  learner h:1 up 60s\n" in shown
    assert "storage_down for 90s" in shown


def test_a_store_that_puts_messages_back_is_a_problem() -> None:
    """Messages a store cannot store while its storage works (a damaged index) wait
    unacked, which the queue depth does not count: status said healthy for minutes."""
    beat = {"tier": "store", "host": "h", "pid": 7, "started": time.time() - 600,
            "requeued": 12, "recent": {"seconds": 60.0, "counts": {"requeued": 5}}}
    [problem] = status._failing_deliveries([beat])
    assert problem.startswith("store h:7 could not store 5 message(s) in the last 60 s")
    beat["recent"] = {"seconds": 60.0, "counts": {"requeued": 0}}
    assert status._failing_deliveries([beat]) == []


def test_a_store_whose_link_keeps_breaking_is_a_problem() -> None:
    """Renewals (services/store/redelivery.py) keep mail out of the dead-letter queue, but
    a broker link that breaks with mail in flight again and again needs the operator."""
    beat = {"tier": "store", "host": "h", "pid": 7, "started": time.time() - 600,
            "renewed": 3, "recent": {"seconds": 60.0, "counts": {"renewed": 2}}}
    [problem] = status._failing_deliveries([beat])
    assert problem.startswith("store h:7: its broker connection broke while 2 message(s)")
    beat["recent"] = {"seconds": 60.0, "counts": {"renewed": 0}}
    assert status._failing_deliveries([beat]) == []
    beat["renewals_off_since"] = time.time() - 5
    [problem] = status._failing_deliveries([beat])
    assert problem.startswith("store h:7: its attempt log (attempts.sqlite")


def test_a_filter_under_stress_is_a_problem_until_it_ends() -> None:
    """Most of a worker's connections open (services/filter/server.py stress mode): slow
    clients or too few workers; the log alone said so."""
    beat = {"tier": "filter", "host": "h", "pid": 7, "active": 165, "active_limit": 200,
            "stressed_since": time.time() - 30}
    [problem] = status._stressed_filters([beat])
    assert problem.startswith("filter h:7 has had most of its connections open for 30 s "
                              "(165 of 200)")
    beat["stressed_since"] = 0.0
    assert status._stressed_filters([beat]) == []
    assert "active=165/200" in format_status(report(beat))


def test_a_store_whose_broker_does_not_answer_is_a_problem() -> None:
    beat = {"tier": "store", "host": "h", "pid": 7, "broker_silent_since": time.time() - 25}
    [problem] = status._silent_brokers([beat])
    assert problem.startswith("store h:7: the broker has not answered its connection for 25 s")
    beat["broker_silent_since"] = 0.0
    assert status._silent_brokers([beat]) == []


def test_filters_connected_before_the_broker_refused_status_still_take_mail() -> None:
    """A vhost connection limit refuses status's connection, not the filters' open ones:
    status said `filters answer 451` while they queued mail (found in review)."""
    connected = {"tier": "filter", "host": "h", "pid": 7, "broker_connected": True}
    cut_off = {"tier": "filter", "host": "h", "pid": 8, "broker_connected": False}
    assert status._while_broker_unusable([connected, cut_off]).startswith(
        "1 filter(s) connected before still take mail")
    assert status._while_broker_unusable([cut_off]) == (
        "filters answer 451, mail waits at the senders")
    stalled = {**connected, "broker_not_confirming": True}  # answers 451 at MAIL FROM
    assert status._while_broker_unusable([stalled]) == (
        "filters answer 451, mail waits at the senders")


def test_a_process_that_went_without_stopping_is_named() -> None:
    went = {"tier": "filter", "host": "h", "pid": 7, "at": time.time() - 42}
    [problem] = status._silent([went])
    assert re.match(r"filter h:7 stopped reporting 4[23] s ago without stopping \(killed, "
                    r"or it cannot reach Redis: it then answers 451 at RCPT\)", problem)


def test_a_lost_directory_is_blamed_on_the_store_only_when_none_runs() -> None:
    """`start the store` was said with the store running, which republishes it itself."""
    lost = {"reachable": True, "directory": {"published": False}}
    [with_store] = _directory_problems(lost, {"filter", "store"})
    assert "451" in with_store and "start the store" not in with_store
    assert "publishes it again" in with_store
    [without] = _directory_problems(lost, {"filter"})
    assert without.endswith("start the store")
    assert _directory_problems({"reachable": True, "directory": {"published": True}},
                               set()) == []
    assert _directory_problems({"reachable": False}, {"store"}) == [
        "Redis unreachable: filters answer 451 at RCPT"]


def test_a_store_the_broker_shows_consuming_is_not_told_to_start() -> None:
    """Redis evicting keys took the store's heartbeat: status said `no store process is
    reporting` and `start the store` while it consumed (found in review)."""
    broker = {"reachable": True,
              "deliver": {"queue": "tiermail.deliver", "declared": True, "messages": 0,
                          "consumers": 1}}
    assert _consuming_tiers(broker) == {"store"}
    said = _not_reporting("store", broker)
    assert "though tiermail.deliver has 1 consumer" in said and "heartbeat" in said
    assert _not_reporting("filter", broker) == "no filter process is reporting"
    assert _not_reporting("store", {"reachable": False}) == "no store process is reporting"
    lost = {"reachable": True, "directory": {"published": False}}
    [said] = _directory_problems(lost, _consuming_tiers(broker))
    assert "start the store" not in said


def test_eviction_is_a_problem_only_where_redis_evicts() -> None:
    evicting = {"memory": {"policy": "allkeys-lru", "evicted_keys": 12}}
    [said] = _eviction(evicting)
    assert said.startswith("Redis has evicted 12 keys") and "noeviction" in said
    assert _eviction({"memory": {"policy": "allkeys-lru", "evicted_keys": 0}}) == []
    assert _eviction({"memory": {"policy": "noeviction", "evicted_keys": 0}}) == []
    assert _eviction({"memory": {}}) == [] and _eviction({"reachable": False}) == []


def test_a_queue_a_command_holds_is_one_problem_not_two() -> None:
    """A deadletters command at work holds what it took: status says so, once, instead of
    also giving the count it can see as all there is."""
    held = {"dead": {"queue": "t.dead", "declared": True, "messages": 3, "consumers": 1,
                     "held_by_a_command": True}}
    [problem] = status._held_mail(held, Settings())
    assert problem.startswith("3 message(s) or more in the dead-letter queue")
    [problem] = status._held_mail({"dead": {**held["dead"], "held_by_a_command": False}},
                                  Settings())
    assert problem.startswith("3 message(s) in the dead-letter queue")


def test_the_large_delivery_queue_without_a_consumer_is_a_problem() -> None:
    large = {"large": {"queue": "t.deliver.large", "declared": True, "messages": 2,
                       "consumers": 0}}
    assert _unconsumed(large) == [
        "nothing consumes t.deliver.large (2 message(s) waiting): the store is stopped or "
        "cannot reach the broker"]


def test_learn_queues_with_nothing_in_them_are_no_problem() -> None:
    """An empty dead learn queue, and an empty learn queue no learner takes yet, leave
    status healthy: only jobs that wait are the operator's business."""
    empty = {"queue": "t.learn", "declared": True, "messages": 0, "consumers": 0}
    assert _learn_problems({"learn": empty, "learn_dead": {**empty, "queue": "t.learn.XQ"}},
                           Settings(spam="rspamd")) == []
    [dead] = _learn_problems({"learn_dead": {**empty, "queue": "t.learn.XQ", "messages": 1}},
                             Settings(spam="rspamd"))
    assert dead.startswith("1 spam-learning job(s) ran out of retries")


def test_a_store_that_put_one_message_back_is_a_problem() -> None:
    beat = {"tier": "store", "host": "h", "pid": 7, "requeued": 1,
            "recent": {"seconds": 60.0, "counts": {"requeued": 1}}}
    [problem] = status._failing_deliveries([beat])
    assert problem.startswith("store h:7 could not store 1 message(s) in the last 60 s")


def test_eviction_counted_before_redis_was_set_to_noeviction_is_no_problem() -> None:
    """The count of evicted keys stays until CONFIG RESETSTAT: once the policy is fixed,
    the advice to fix it is not given again."""
    assert _eviction({"memory": {"policy": "noeviction", "evicted_keys": 12}}) == []


def test_a_window_of_no_length_falls_back_to_the_rate_since_start() -> None:
    """A heartbeat taken as its process started: no division by a window of 0 s."""
    beat = {"tier": "filter", "host": "h", "pid": 7, "started": time.time() - 60,
            "accepted": 60, "recent": {"seconds": 0.0, "counts": {"accepted": 0}}}
    line = format_status(report(beat)).splitlines()[-1]
    assert re.search(r"accepted=60 \([0-9.]+/min\)", line)


def collected(monkeypatch: pytest.MonkeyPatch, broker: dict[str, Any],
              redis: dict[str, Any]) -> dict[str, Any]:
    """collect_status over what the broker and Redis are made to show (pure logic: how
    the verdict is put together)."""
    async def shown(result: dict[str, Any]) -> dict[str, Any]:
        return result

    monkeypatch.setattr(status, "_broker_status", lambda settings: shown(broker))
    monkeypatch.setattr(status, "_redis_status", lambda settings: shown(redis))
    return asyncio.run(status.collect_status(Settings()))


def test_with_redis_unreachable_no_tier_is_said_to_be_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis out of reach hides the heartbeats, not the processes: status says Redis is
    unreachable and does not add "no filter/store process is reporting"."""
    result = collected(monkeypatch, {"reachable": True},
                       {"reachable": False, "error": "ConnectionError: refused"})
    assert result["problems"] == ["Redis unreachable: filters answer 451 at RCPT"]
    assert not result["healthy"]


def test_a_lost_directory_with_a_store_consuming_but_not_reporting_is_not_blamed_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat gone with the directory (Redis evicting keys): the broker still shows
    the store consuming, so it is not told to start."""
    broker = {"reachable": True, "deliver": {"queue": "t.deliver", "declared": True,
                                             "messages": 0, "consumers": 1}}
    redis = {"reachable": True, "directory": {"published": False}, "processes": [],
             "silent": [], "memory": {}}
    problems = collected(monkeypatch, broker, redis)["problems"]
    assert [p for p in problems if p.startswith("directory not published")] == [
        "directory not published in Redis: filters answer 451 at RCPT; the running store "
        "publishes it again within about 5 s (if this stays, see its log)"]


def test_one_problem_is_enough_to_be_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    beats = [{"tier": tier, "host": "h", "pid": 1} for tier in ("filter", "store")]
    redis = {"reachable": True, "directory": {"published": True}, "processes": beats,
             "silent": [], "memory": {}}
    healthy = collected(monkeypatch, {"reachable": True}, redis)
    assert healthy["healthy"] and healthy["problems"] == []
    dead = {"dead": {"queue": "t.dead", "declared": True, "messages": 1, "consumers": 0}}
    result = collected(monkeypatch, {"reachable": True, **dead}, redis)
    assert len(result["problems"]) == 1 and not result["healthy"]


def backlog_of(waiting: int, large: int = 0, taken: int | None = None,
               seconds: float = 30.0, tier: str = "store",
               accepted: int | None = None) -> dict[str, Any] | None:
    """store_backlog over a deliver and a large queue, one process of `tier` that took
    `taken` in its last `seconds`, and a filter that accepted `accepted` meanwhile."""
    broker = {"reachable": True,
              "deliver": {"queue": "t.deliver", "declared": True, "messages": waiting,
                          "consumers": 1},
              "large": {"queue": "t.large", "declared": True, "messages": large,
                        "consumers": 1}}
    counts = {} if taken is None else {"taken": taken}
    beats: list[dict[str, Any]] = [{"tier": tier, "host": "h", "pid": 7,
                                    "recent": {"seconds": seconds, "counts": counts}}]
    if accepted is not None:
        beats.append({"tier": "filter", "host": "h", "pid": 8,
                      "recent": {"seconds": seconds, "counts": {"accepted": accepted}}})
    return status.store_backlog(broker, beats)


def backlog_line(backlog: dict[str, Any] | None) -> str:
    assert backlog is not None
    text = format_status({**report({"tier": "store", "host": "h", "pid": 7}),
                          "backlog": backlog})
    [line] = [line for line in text.splitlines() if "backlog" in line] or [""]
    return line


def test_a_backlog_is_shown_with_how_long_the_store_needs_at_its_recent_rate() -> None:
    backlog = backlog_of(9_000, large=1_000, taken=3_000, seconds=30.0)
    assert backlog == {"messages": 10_000, "taken_per_second": 100.0,
                       "arriving_per_second": 0.0, "over_seconds": 30,
                       "catch_up_seconds": 100.0}
    assert backlog_line(backlog) == (
        "  backlog: 10000 messages for the store, which took 100/s over the last 30 s: "
        "about 100 s to catch up at that pace")
    assert backlog_line(backlog_of(30_000, taken=3_000)).endswith(
        "about 5 min to catch up at that pace")
    assert backlog_line(backlog_of(720_000, taken=3_000)).endswith(
        "about 2.0 h to catch up at that pace")
    assert backlog_line(backlog_of(50, taken=3_000)).endswith(
        "less than a second to catch up at that pace")


def test_mail_still_arriving_slows_the_catch_up() -> None:
    """150/s taken while 100/s arrive: the queue shrinks by 50/s, not 150/s."""
    backlog = backlog_of(30_000, taken=9_000, accepted=6_000, seconds=60.0)
    assert backlog is not None and backlog["catch_up_seconds"] == 600.0
    assert backlog_line(backlog) == (
        "  backlog: 30000 messages for the store, which took 150/s over the last 60 s while "
        "100/s arrived: about 10 min to catch up at that pace")
    growing = backlog_of(30_000, taken=9_000, accepted=10_800, seconds=60.0)
    assert growing is not None and "catch_up_seconds" not in growing
    assert backlog_line(growing) == (
        "  backlog: 30000 messages for the store, which took 150/s over the last 60 s while "
        "180/s arrived: it is not catching up")


def test_a_backlog_the_store_does_not_take_is_said_to_be_untaken() -> None:
    backlog = backlog_of(50, taken=0, seconds=60.0)
    assert backlog is not None and "catch_up_seconds" not in backlog
    assert backlog_line(backlog) == (
        "  backlog: 50 messages for the store, which took none over the last 60 s")


def test_rates_are_shown_as_the_estimate_uses_them() -> None:
    """One message a minute is 0.0167/s, not 0/s beside an estimate of hours; a stalled
    heartbeat's hour-long window keeps its one message too; rates that round alike are
    not a backlog shrinking."""
    backlog = backlog_of(520, taken=1, seconds=60.0)
    assert backlog is not None and backlog["taken_per_second"] == 0.0167
    assert backlog_line(backlog) == (
        "  backlog: 520 messages for the store, which took 0.0167/s over the last 60 s: "
        "about 8.6 h to catch up at that pace")
    assert backlog_of(520, taken=1, seconds=3600.0)["taken_per_second"] > 0  # type: ignore[index]
    assert "which took 2.5/s" in backlog_line(backlog_of(520, taken=150, seconds=60.0))
    even = backlog_line(backlog_of(520, taken=599_898, accepted=599_700, seconds=6000.0))
    assert even.endswith("which took 100/s over the last 6000 s while 100/s arrived: "
                         "it is not catching up"), even


def test_a_store_that_takes_none_while_mail_arrives() -> None:
    assert backlog_line(backlog_of(50, taken=0, accepted=600, seconds=60.0)) == (
        "  backlog: 50 messages for the store, which took none over the last 60 s while "
        "10/s arrived")


def test_no_backlog_line_when_nothing_waits() -> None:
    assert backlog_line(backlog_of(0, taken=500)) == ""


def test_no_rate_is_made_up_without_a_store_that_has_counted_for_a_while() -> None:
    only_the_count = {"messages": 100}
    assert backlog_of(100, taken=None) == only_the_count  # a store of an older version
    assert backlog_of(100, taken=10, tier="filter") == only_the_count  # no store reporting
    # A store that just started: its window reaches back to its start, a moment ago.
    assert backlog_of(100, taken=10, seconds=0.2) == only_the_count
    assert backlog_line(backlog_of(100, taken=10, seconds=0.2)) == (
        "  backlog: 100 messages for the store")
    assert status.store_backlog({"reachable": False}, []) is None
    assert status.store_backlog({"reachable": True, "deliver": {"declared": False}}, []) is None


def test_the_delivery_lag_is_shown_in_seconds() -> None:
    beat = {"tier": "store", "host": "h", "pid": 7, "started": time.time() - 60,
            "delivered": 3, "delivery_lag_seconds": 754.25}
    line = format_status(report(beat)).splitlines()[-1]
    assert "delivery_lag=754.2s" in line and "_seconds" not in line
