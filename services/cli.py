"""The `tiermail` command: run a tier, run a whole stack, manage accounts, show status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import decimal
import getpass
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from common.directory import MAX_ALIAS_DEPTH, normalize_address, normalize_domain
from common.listen import CannotStart, lock_directory
from common.logs import one_line, setup_logging
from common.settings import MAX_QUOTA, Settings, SettingsError
from services.store.backends.accounts import AccountDB, AccountDBUnusable

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_CANNOT_START = 3  # a port taken, a data directory in use: `tiermail up` does not retry
EXIT_BROKEN_PIPE = 128 + 13  # as a process killed by SIGPIPE
T = TypeVar("T")


class CommandError(Exception):
    """A failure to report to the operator in one line, without a traceback."""


class UsageError(CommandError):
    """Arguments that do not go together (argparse cannot say): exit code 2, as its own."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    if args.parent and not _exit_with_parent(args.parent):
        return EXIT_FAILED
    # The one-line errors below say what went wrong; aiormq would log it again, with the
    # connection's internals (a tier's setup_logging sets its own level).
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        code = int(args.handler(settings, args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except SettingsError as exc:
        print(f"tiermail: bad setting: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"tiermail: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"tiermail: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except CannotStart as exc:
        print(f"tiermail: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except AccountDBUnusable as exc:
        print(f"tiermail: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `tiermail status | head`, `deadletters show Q | less` quit early: not an error
        # worth a traceback. Output to a closed pipe is dropped, as `git log | head` does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # A data directory that cannot be created or written, a port in use, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"tiermail: {exc.strerror or exc}{where}{_setting_of(settings, exc.filename)}",
              file=sys.stderr)
        return EXIT_FAILED


def _setting_of(settings: Settings | None, filename: Any) -> str:
    """Which setting a failing path comes from, for the operator to fix: the data directory."""
    if settings is None or not isinstance(filename, str | os.PathLike):
        return ""
    data_dir = settings.data_dir.absolute()
    path = Path(os.path.abspath(filename))
    if path == data_dir or data_dir in path.parents:
        return f" (under TIERMAIL_DATA_DIR={settings.data_dir})"
    return ""


def _exit_with_parent(parent: int) -> bool:
    """Have the kernel send SIGTERM when the parent process ends (Linux); False when it has
    already ended. Elsewhere the tier simply outlives it."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return True
    return os.getppid() == parent  # it may have ended before the prctl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermail", description=__doc__)
    # `tiermail up` starts its tiers with --parent PID: they end when it does, however it
    # ends (SIGKILL, a crash), instead of living on with the stack's ports and data.
    parser.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Callable[..., int | None], help: str,
                parent: Any = commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("filter", run_filter, "run one filter-tier process (SMTP intake)")
    command("store", run_store, "run the store-tier process (delivery, IMAP, POP3)")
    learner = command("learner", run_learner,
                      "run the spam-learning worker (moves into/out of Junk train rspamd)")
    learner.add_argument("--retry-dead", action="store_true",
                         help="move the dead learn jobs (out of retries, or their retry "
                         "not scheduled) back to the learn queue (once rspamd's controller "
                         "works again) and exit")
    learner.add_argument("--wait-when-off", action="store_true",
                         help="with spam learning off, say so and wait until stopped instead "
                         "of exiting with an error (for a service manager or compose, which "
                         "would restart a process that ends)")
    command("webmail", run_webmail, "run one webmail worker (not built yet)")
    command("up", run_up, "run a whole single-machine stack in the foreground")
    status = command("status", show_status, "tier health, queue depths, backlog, dead letters")
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("--prometheus", action="store_true",
                        help="Prometheus's text format (for node_exporter's textfile collector)")

    domain = commands.add_parser("domain", help="manage local domains").add_subparsers(
        metavar="ACTION", required=True)
    command("add", domain_add, "add a local domain", domain).add_argument("domain")
    command("del", domain_del, "remove a domain without users", domain).add_argument("domain")
    command("list", domain_list, "list local domains", domain)

    user = commands.add_parser("user", help="manage mailbox users").add_subparsers(
        metavar="ACTION", required=True)
    for name, handler, text in (("add", user_add, "create a user"),
                                ("passwd", user_passwd,
                                 "set a user's password (open sessions go on)")):
        sub = command(name, handler, text, user)
        sub.add_argument("address")
        sub.add_argument("--password-stdin", action="store_true",
                         help="read the password from standard input (one line)")
        if name == "add":
            sub.add_argument("--reuse-mail", action="store_true",
                             help="give the new account the mail a deleted account of the "
                                  "same address left, in its mailbox and still queued for it "
                                  "(without it, the one is moved aside and the other goes to "
                                  "the dead-letter queue)")
    command("del", user_del, "delete a user and end its IMAP and POP3 sessions (mail stays on "
            "disk)", user).add_argument("address")
    command("list", user_list, "list users (with their quota, where they have one)", user)
    quota = command("quota", user_quota,
                    "set a user's storage quota: SIZE in octets or with K, M, G, T "
                    "(1024-based), 0 (or none, unlimited) for unlimited, 'default' for "
                    "TIERMAIL_DEFAULT_QUOTA; without SIZE, show the quota and the usage",
                    user)
    quota.add_argument("address")
    quota.add_argument("size", metavar="SIZE", nargs="?")

    alias = commands.add_parser("alias", help="manage aliases").add_subparsers(
        metavar="ACTION", required=True)
    add = command("add", alias_add, "deliver mail for FROM (or @domain) to TO (each TO given)",
                  alias)
    add.add_argument("source", metavar="FROM")
    add.add_argument("targets", metavar="TO", nargs="+")
    rm = command("del", alias_del, "remove an alias (all targets unless TO is given)", alias)
    rm.add_argument("source", metavar="FROM")
    rm.add_argument("target", metavar="TO", nargs="?")
    command("list", alias_list, "list aliases", alias)

    uidvalidity = commands.add_parser(
        "uidvalidity", help="renew mailboxes' UIDVALIDITY (after restoring a backup)"
    ).add_subparsers(metavar="ACTION", required=True)
    renew = command("renew", uidvalidity_renew,
                    "give every mailbox of the accounts a new UIDVALIDITY, so IMAP clients "
                    "resynchronize instead of trusting UIDs the restore gives out again "
                    "(UIDs, flags and POP3 UIDLs stay); only with the store stopped",
                    uidvalidity)
    renew.add_argument("addresses", metavar="ADDRESS", nargs="*",
                       help="an account whose mailboxes to renew")
    renew.add_argument("--all", action="store_true",
                       help="every account with mail on disk (deleted ones' kept mail too)")

    _held_mail_commands(commands, command, "deadletters", "dead-lettered", "retry",
                        "send messages back for delivery (after fixing the cause: the "
                        "disk repaired; for a deleted account's mail, the account added "
                        "again with user add --reuse-mail); mailboxes that already have one "
                        "get no copy")
    _held_mail_commands(commands, command, "quarantine", "quarantined", "release",
                        "deliver messages after all (a false positive); the scan header "
                        "stays on them")
    return parser


def _held_mail_commands(commands: Any, command: Callable[..., argparse.ArgumentParser],
                        name: str, held: str, release: str, release_help: str) -> None:
    actions = commands.add_parser(
        name, help=f"look at, {release} or drop {held} messages").add_subparsers(
        metavar="ACTION", required=True)
    browse = command("list", held_list,
                     f"show {held} messages (oldest first) without taking them away", actions)
    browse.add_argument("--limit", type=_count, default=100, help="at most this many (100)")
    browse.add_argument("--json", action="store_true", help="machine-readable output")
    show = command("show", held_show, f"write one {held} message to standard output "
                   "(headers and body, as it would be delivered), taking nothing away", actions)
    show.add_argument("queue_id", metavar="QUEUE_ID",
                      help="as list shows it; - for a message without one")
    for action, handler, text in ((release, held_release, release_help),
                                  ("drop", held_drop, "delete messages for good")):
        sub = command(action, handler, text, actions)
        sub.add_argument("queue_ids", metavar="QUEUE_ID", nargs="*",
                         help="as list shows them; - for messages without one")
        sub.add_argument("--all", action="store_true", help=f"every {held} message")
    for sub in (browse, *actions.choices.values()):
        sub.set_defaults(held_queue=name, held_words=held)


# Tier processes


def run_filter(settings: Settings, args: argparse.Namespace) -> int:
    from services.filter.main import serve

    setup_logging(settings.log_level, settings.log_format, tier="filter")
    serve(settings)
    return 0


def run_store(settings: Settings, args: argparse.Namespace) -> int:
    from services.store.main import serve

    setup_logging(settings.log_level, settings.log_format, tier="store")
    try:
        serve(settings)
    except AccountDBUnusable as exc:
        if not exc.lasting:  # a full disk, say: up starts it again until there is room
            raise
        # A damaged file is not something a restart mends: `tiermail up` stops the stack
        # instead of starting the store again every 2 s for as long as it runs.
        raise CannotStart(str(exc)) from None
    return 0


LEARNING_OFF = "spam learning is off (TIERMAIL_LEARN, or TIERMAIL_SPAM is not rspamd)"


def run_learner(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.learns_spam:
        if args.wait_when_off and not args.retry_dead:
            return _wait_until_stopped(settings, f"{LEARNING_OFF}: nothing to do; waiting "
                                       "until stopped")
        raise CommandError(f"{LEARNING_OFF}; nothing to run")
    import dramatiq

    from services.store.learning import Learning, run_worker

    setup_logging(settings.log_level, settings.log_format, tier="learner")
    if not args.retry_dead:
        return run_worker(settings)
    learning = Learning(settings)
    try:
        moved = learning.requeue_dead()
    except dramatiq.errors.BrokerError as exc:
        raise CommandError(f"RabbitMQ could not be used: {exc}") from None
    finally:
        learning.close()
    print(f"{moved} learn job{'' if moved == 1 else 's'} moved back to {learning.queue_name}")
    return 0


def _wait_until_stopped(settings: Settings, why: str) -> int:
    """Log `why` once and wait for SIGTERM or SIGINT: a process with nothing to do that a
    service manager would otherwise restart for ever."""
    setup_logging(settings.log_level, settings.log_format, tier="learner")
    logging.getLogger("tiermail.learner").info(why, extra={"event": "idle"})
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    return 0


def run_webmail(settings: Settings, args: argparse.Namespace) -> int:
    raise CommandError("the webmail tier is not built yet (a later issue); nothing to run")


def run_up(settings: Settings, args: argparse.Namespace) -> int:
    from services.stack import run_stack

    setup_logging(settings.log_level, settings.log_format, tier="up")
    return run_stack(settings)


def show_status(settings: Settings, args: argparse.Namespace) -> int:
    from services.status import collect_status, format_status
    from services.status_metrics import prometheus_text

    report = asyncio.run(collect_status(settings))
    if args.prometheus:
        print(prometheus_text(report), end="")
    else:
        print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0 if report["healthy"] else EXIT_FAILED


# Held mail: dead letters and the quarantine


def _held_queue(settings: Settings, args: argparse.Namespace) -> Any:
    from services import heldmail

    pick = heldmail.dead_letters if args.held_queue == "deadletters" else heldmail.quarantine
    return pick(settings.topology)


def held_list(settings: Settings, args: argparse.Namespace) -> int:
    from services.heldmail import browse

    where = _held_queue(settings, args)
    shown, total = _broker(settings, browse(settings, where, max(args.limit, 0)))
    if args.json:
        print(json.dumps({"total": total, "messages": [x.as_dict() for x in shown]}, indent=2))
        return 0
    for held in shown:
        when = held.received_at.strftime("%Y-%m-%d %H:%M:%S") if held.received_at else "-"
        sender = "(undecodable)" if held.sender is None else f"<{held.sender}>"
        copies = f"  ({held.copies} copies)" if held.copies > 1 else ""
        # Escaped: a sender's bidi override turned "gnp.exe" into "exe.png" on the screen,
        # and a crafted queue id or mailbox could write escape sequences (found in review).
        print(one_line(f"{held.queue_id or '-'}  {when}  {held.size:>9}  {sender} -> "
                       f"{','.join(held.recipients) or '-'}  [{held.reason}]{copies}"))
    count = f"{len(shown)} of {total}" if total > len(shown) else f"{total}"
    print(f"{count} {args.held_words} message{'' if total == 1 else 's'}"
          f"{_copies(shown, 'in the queue, each listed once')}")
    return 0


def _copies(held: list[Any], what: str) -> str:
    """The copies that crashes left in the queue besides these messages, if any."""
    extra = sum(message.copies - 1 for message in held)
    return f" ({extra} duplicate cop{'y' if extra == 1 else 'ies'} {what})" if extra else ""


def held_show(settings: Settings, args: argparse.Namespace) -> int:
    from services.heldmail import peek

    found = _broker(settings, peek(settings, _held_queue(settings, args), _held_id(args.queue_id)))
    if found is None:
        raise CommandError(f"{args.queue_id}: not {args.held_words}")
    sys.stdout.buffer.write(found)
    sys.stdout.flush()
    return 0


def held_release(settings: Settings, args: argparse.Namespace) -> int:
    from services.heldmail import release

    return _act_on_held(settings, args, release, "sent for delivery", "removed")


def held_drop(settings: Settings, args: argparse.Namespace) -> int:
    from services.heldmail import drop

    return _act_on_held(settings, args, drop, "dropped", "dropped too")


def _act_on_held(settings: Settings, args: argparse.Namespace, action: Callable[..., Any],
                 done: str, copies_done: str) -> int:
    from services.heldmail import MAX_TAKEN, Outcome, grouped

    if args.all == bool(args.queue_ids):
        raise UsageError("name the messages by queue id, or give --all")
    wanted = {_held_id(queue_id) for queue_id in args.queue_ids}
    outcome = Outcome()
    try:
        acted = _broker(settings, action(settings, _held_queue(settings, args),
                                         lambda held: args.all or held.queue_id in wanted,
                                         outcome))
    except CommandError:
        if outcome.settled:  # the broker went away midway: say what had been done by then
            _report_acted(grouped(outcome.settled), done, copies_done, " before the failure")
        raise
    _report_acted(acted, done, copies_done)
    missing = wanted - {held.queue_id for held in acted}
    unfinished = bool(outcome.unread) and (args.all or bool(missing))
    if unfinished:
        print(f"tiermail: only the first {MAX_TAKEN} {args.held_words} messages were looked "
              f"at; {outcome.unread} more are held: run the command again", file=sys.stderr)
    for queue_id in sorted(missing):
        print(f"tiermail: {queue_id or '-'}: not {args.held_words}"
              f"{' among those looked at' if unfinished else ''}", file=sys.stderr)
    return EXIT_FAILED if missing or unfinished else 0


def _held_id(named: str) -> str:
    """A queue id as named on the command line: `-`, as `list` shows it, is a message that
    carries none (not published by a filter)."""
    return "" if named == "-" else named


def _report_acted(acted: list[Any], done: str, copies_done: str, when: str = "") -> None:
    scanned = 0
    for held in acted:
        said = done
        if done == "sent for delivery" and held.to_be_scanned:
            said, scanned = "sent back to be scanned", scanned + 1
        print(one_line(f"{held.queue_id or '-'} {said}"))
    if scanned:  # dead letters of the scan queue: never scanned, they are scanned first
        done = ("sent back to be scanned" if scanned == len(acted) else
                f"sent back ({scanned} to be scanned, the rest for delivery)")
    print(f"{len(acted)} message{'' if len(acted) == 1 else 's'} {done}{when}"
          f"{_copies(acted, copies_done)}")


def _broker(settings: Settings, work: Any) -> Any:
    """Run `work` against RabbitMQ; a broker that cannot be used is one line, not a trace."""
    from aiormq.exceptions import AMQPError, PublishError

    from common.broker import connect_failure
    from services.heldmail import (
        LOCK_WAIT,
        LockNameTaken,
        NoSuchQueue,
        QueueBusy,
        delete_queue_command,
    )

    try:
        return asyncio.run(work)
    except PublishError as exc:  # a copy sent back, returned unroutable (mandatory)
        raise CommandError(
            f"RabbitMQ could not route the message sent back ({exc}): the queue it goes to "
            "is missing or not bound to its exchange (starting the tier that consumes it "
            "declares it again); the message is still held") from None
    except (OSError, TimeoutError, AMQPError) as exc:
        raise CommandError(f"RabbitMQ could not be used: {connect_failure(exc)}") from None
    except QueueBusy as exc:
        raise CommandError(f"{exc} has been held for {LOCK_WAIT:g} s and more by another "
                           "deadletters or quarantine command, or by one whose connection was "
                           "lost and that the broker has not given up on yet (within about "
                           "15 s); nothing was done: run this again later"
                           ) from None
    except LockNameTaken as exc:
        raise CommandError(f"a queue named {exc}, which these commands use as their lock, "
                           "is on the broker and is not theirs: nothing was done (delete it: "
                           f"{delete_queue_command(settings, str(exc))})") from None
    except NoSuchQueue as exc:
        raise CommandError(f"no queue {exc} on the broker: no tier has run with these "
                           "settings (TIERMAIL_QUEUE_PREFIX, the vhost in "
                           "TIERMAIL_AMQP_URL)") from None


# Accounts: the store's database is the authority; Redis gets the change right after.


def _accounts(settings: Settings) -> AccountDB:
    """The account database, which must exist: a mistyped TIERMAIL_DATA_DIR made an empty
    one there, and `user list` then printed nothing, as after any command that refused or
    only read (found in review). Only `domain add` makes one (_change_after)."""
    if not _has_accounts(settings):
        raise CommandError(f"no account database at {AccountDB.for_store_path(settings.store_dir)}"
                           f": is TIERMAIL_DATA_DIR={settings.data_dir} the store's? (the "
                           "store makes it when it first starts, and so does the first "
                           "`tiermail domain add`)")
    return AccountDB.for_store(settings.store_dir)


def _has_accounts(settings: Settings) -> bool:
    try:
        AccountDB.for_store_path(settings.store_dir).stat()
    except FileNotFoundError:
        return False
    except OSError:
        pass  # opening it says what is wrong, as for every account command
    return True


def _change(settings: Settings, db_change: Callable[[Any], Any],
            redis_change: Callable[[Any], Any]) -> Any:
    """Apply a change to the account database, then mirror it into the Redis directory."""
    # Read first: generations only grow.
    return _change_after(settings, _published_generation(settings), db_change, redis_change)


def _change_after(settings: Settings, published: int | None, db_change: Callable[[Any], Any],
                  redis_change: Callable[[Any], Any], *, makes_database: bool = False) -> Any:
    """`_change`, with the directory's generation already read (`_published_generation`).
    `makes_database`: the first change of a new installation may make the account database,
    unless Redis holds a directory, which another one was published from."""
    from services.store.backends.accounts import AccountError

    if makes_database and not _has_accounts(settings) and published is not None:
        raise CommandError(
            f"no account database at {AccountDB.for_store_path(settings.store_dir)}, while "
            f"the directory in Redis was published from one (at change {published}): is "
            f"TIERMAIL_DATA_DIR={settings.data_dir} the store's? Nothing was changed.")
    opened = AccountDB.for_store(settings.store_dir) if makes_database else _accounts(settings)
    with opened as accounts:
        if published is not None and published > accounts.generation():
            raise CommandError(
                f"the directory in Redis was published from another account database than "
                f"{accounts.path.absolute()} (at change {published}, this one at "
                f"{accounts.generation()}): is TIERMAIL_DATA_DIR={settings.data_dir} the "
                "store's? Nothing was changed. (After restoring the account database from a "
                "backup, start the store first: it publishes the directory again.)")
        try:
            result = db_change(accounts)
        except AccountError as exc:
            raise CommandError(str(exc)) from None
        generation = accounts.written_generation
    try:
        _on_directory(settings, lambda d: _mirror(settings, d, redis_change, generation))
    except Exception as exc:
        print(f"tiermail: warning: saved, but the Redis directory was not updated ({exc}); "
              "until the store republishes it (within 5 s while it runs, else when it "
              "starts) the filters answer from the directory as it was", file=sys.stderr)
    return result


def _on_directory(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(directory)` on the Redis directory, over a connection of its own."""
    from common.directory import Directory
    from common.redisconn import open_redis

    async def run() -> T:
        redis = open_redis(settings, 3.0)
        try:
            return await work(Directory(redis, settings.redis_prefix))
        finally:
            await redis.aclose()

    return asyncio.run(run())


def _published_generation(settings: Settings) -> int | None:
    """The account database generation the Redis directory was published from; None when
    Redis cannot say (out of reach, nothing published): then there is nothing to check.
    A TIERMAIL_REDIS_URL that Redis refuses raises SettingsError."""
    from common.redisconn import refused_setting

    try:
        return _on_directory(settings, lambda d: d.published_generation())
    except Exception as exc:
        # A database number Redis does not have, a password it refuses: a bad setting (exit
        # 2, nothing changed), as for the tiers, not a Redis that is down for a moment.
        refused = refused_setting(settings, exc)
        if refused is not None:
            raise refused from None
        return None


async def _mirror(settings: Settings, directory: Any, redis_change: Callable[[Any], Any],
                  generation: int) -> None:
    """Apply the change made at account `generation` to Redis, in one transaction that also
    moves the directory's generation to it, if the directory is at the one just before.
    Otherwise (a change not mirrored while the store was stopped, another command's under
    way, Redis restarted empty) it is published whole from the account database, unless
    Redis already reflects a later change."""
    if await directory.change_at(generation, redis_change):
        return
    # (What the change writes beside the directory, a quota's state, is written already.)
    with _accounts(settings) as accounts:
        snapshot = accounts.snapshot()
    # Not swapped in if a later change is mirrored already: its directory holds this one.
    await directory.publish(snapshot, generation_now=_generation_of(settings))


def _generation_of(settings: Settings) -> Callable[[], Awaitable[int]]:
    async def now() -> int:
        with _accounts(settings) as accounts:
            return int(accounts.generation())
    return now


def domain_add(settings: Settings, args: argparse.Namespace) -> int:
    existing = False
    if _has_accounts(settings):
        with _accounts(settings) as accounts:
            existing = accounts.has_domain(args.domain)
    if existing:
        # As `alias add` of an alias that exists: what was asked for holds, so a script
        # that provisions a domain may run again (a user is refused: its password would be
        # dropped unsaid).
        print(f"domain {normalize_domain(args.domain)} already exists; nothing changed")
        return 0
    name = _change_after(settings, _published_generation(settings),
                         lambda a: a.add_domain(args.domain),
                         lambda d: d.add_domain(args.domain), makes_database=True)
    print(f"domain {name} added")
    if not settings.postmaster:
        # RFC 5321 4.5.1: postmaster@ every domain MUST take mail; the domain is new, so
        # nothing answers for it yet unless the filter tier has TIERMAIL_POSTMASTER.
        print(f"tiermail: mail to postmaster@{name} is refused until it exists: "
              f"tiermail alias add postmaster@{name} ADDRESS (or set TIERMAIL_POSTMASTER "
              "for the filter tier)", file=sys.stderr)
    return 0


def domain_del(settings: Settings, args: argparse.Namespace) -> int:
    _change(settings, lambda a: a.remove_domain(args.domain),
            lambda d: d.remove_domain(args.domain))
    print(f"domain {normalize_domain(args.domain)} removed")
    return 0


def domain_list(settings: Settings, args: argparse.Namespace) -> int:
    with _accounts(settings) as accounts:
        for name in accounts.domains():
            print(name)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = _password_from_stdin()
    elif sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                raise CommandError("passwords differ")
        except EOFError:  # Ctrl-D at the prompt
            print(file=sys.stderr)  # the prompt's line, left open
            raise CommandError("no password given") from None
    else:
        raise CommandError("no terminal to ask for a password; use --password-stdin")
    if not password:
        raise CommandError("empty password refused")
    if "\0" in password:
        # SASL PLAIN (IMAP AUTHENTICATE, POP3 AUTH) separates its fields with NUL and IMAP
        # strings cannot hold one: no client could ever log in with it.
        raise CommandError("a password with a NUL character refused: no client can send it")
    return password


def _password_from_stdin() -> str:
    """One line of standard input as UTF-8, how IMAP and POP3 clients send passwords;
    other bytes are refused (they would be hashed as something no client sends)."""
    line = sys.stdin.buffer.readline().rstrip(b"\r\n")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the password on standard input is not UTF-8 text") from None


def user_add(settings: Settings, args: argparse.Namespace) -> int:
    from common.passwords import hash_password

    password_hash = hash_password(_read_password(args))
    # Read before any mail is moved aside: a Redis URL refused is exit 2 with nothing done.
    published = _published_generation(settings)
    with _earlier_mailbox_settled(settings, normalize_address(args.address),
                                  args.reuse_mail) as note:
        address = _change_after(settings, published,
                                lambda a: a.add_user(args.address, password_hash,
                                                    inherits=args.reuse_mail),
                                lambda d: d.add_user(args.address))
    print(f"user {address} added{note}")
    with _accounts(settings) as accounts:
        targets = accounts.alias_targets(address)
    if targets and address not in targets:
        # As `alias add` warns in the other order: the alias takes the new user's mail.
        print(f"tiermail: warning: {address} is also an alias (-> {', '.join(targets)}): "
              f"its mail goes to the alias targets only (tiermail alias add {address} "
              f"{address} keeps a copy for the user)", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _earlier_mailbox_settled(settings: Settings, address: str, reuse: bool
                             ) -> Iterator[str]:
    """A deleted account's mail stays on disk under its address; a new account with that
    address (often another person) must not find it in its INBOX. Unless `reuse` (an
    account deleted by mistake, restored), the old mailbox is moved aside first, which only
    a stopped store allows: the store's lock is held until the account exists."""
    from services.store.backends.maildb import retire_mailbox, store_user_path
    from services.store.mailbox import NoSuchUser

    try:
        old = store_user_path(settings.store_dir, address)
    except NoSuchUser:  # not a usable address: adding the account says why
        old = None
    if old is None or not old.exists() or _is_user(settings, address):
        yield ""
        return
    if reuse:
        yield f", with the mail an earlier account of that address left in {old}"
        return
    try:
        lock = lock_directory(settings.store_dir, "store")
    except CannotStart:
        raise CommandError(
            f"{address} had an account before, whose mail is still in {old}. "
            f"--reuse-mail gives that mail to the new account; to start it empty, stop the "
            f"store and run this again (the old mail is then moved to "
            f"{settings.store_dir / 'retired'})") from None
    with lock:
        retired = retire_mailbox(settings.store_dir, address)
        yield f"; the mail of the earlier account of that address was moved to {retired}"


def _is_user(settings: Settings, address: str) -> bool:
    with _accounts(settings) as accounts:
        return accounts.user_exists(address)


def user_passwd(settings: Settings, args: argparse.Namespace) -> int:
    from common.passwords import hash_password

    password_hash = hash_password(_read_password(args))
    with _accounts(settings) as accounts:
        try:
            accounts.set_password(args.address, password_hash)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    print(f"password of {normalize_address(args.address)} changed")
    return 0


def user_del(settings: Settings, args: argparse.Namespace) -> int:
    sources: list[str] = []

    def db_change(accounts: Any) -> None:
        sources.extend(accounts.delete_user(args.address))

    async def redis_change(directory: Any) -> None:
        await directory.remove_user(args.address)
        for source in sources:
            await _set_alias(directory, settings, source)

    with _warning_of_dead_aliases(settings):
        _change(settings, db_change, redis_change)
        print(f"user {normalize_address(args.address)} deleted "
              f"(mail kept under {settings.store_dir}; a new account with the address "
              f"starts without it)")
        if sources:
            print(f"taken out of the aliases {', '.join(sources)}")
    return 0


def user_list(settings: Settings, args: argparse.Namespace) -> int:
    with _accounts(settings) as accounts:
        quotas = accounts.stored_quotas()
    for address, stored in quotas.items():
        shown = _quota_text(stored, settings.default_quota)
        print(address if shown is None else f"{address}  quota {shown}")
    return 0


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return value


def parse_size(text: str) -> int | None:
    """A quota on the command line: "500M", "2G", "1048576", "0", "none" or "unlimited"
    (all three 0: unlimited, as `user list` shows it) or "default" (None). K/M/G/T are
    powers of 1024, as RFC 9208 counts STORAGE in units of 1024 octets; a trailing "B" or
    "iB" is allowed. Anything else is a usage error (exit 2, as argparse's own)."""
    cleaned = text.strip().upper()
    if cleaned == "DEFAULT":
        return None
    if cleaned in ("NONE", "UNLIMITED"):
        return 0
    for suffix in ("IB", "B"):
        if cleaned.endswith(suffix) and cleaned[:-len(suffix)][-1:] in "KMGT":
            cleaned = cleaned[:-len(suffix)]
    if cleaned.endswith("B") and cleaned[:-1][-1:].isdigit():
        cleaned = cleaned[:-1]  # "100B": octets
    unit = cleaned[-1:] if cleaned[-1:] in "KMGT" else ""
    number = cleaned[:-1] if unit else cleaned
    try:
        value = decimal.Decimal(number)  # exact: a float changed octet counts past 2^53
    except decimal.InvalidOperation:
        raise UsageError(f"not a size: {text!r} (examples: 500M, 2G, 0 for unlimited)") \
            from None
    if not value.is_finite():
        raise UsageError(f"not a size: {text!r}")
    if value < 0:
        raise UsageError(f"a quota cannot be negative: {text!r} (0 means unlimited)")
    octets = value * _SIZE_UNITS[unit]
    if octets > MAX_QUOTA:
        raise UsageError(f"too large a size: {text!r} (at most 8589934591G, 2^63 - 1 "
                           "octets)")
    if 0 < octets < 1:
        # It would round to 0, which means unlimited: the opposite of what was asked.
        raise UsageError(f"not a size: {text!r} is less than one octet (0 means unlimited)")
    return int(octets)


def format_size(octets: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if octets >= _SIZE_UNITS[unit] and octets % _SIZE_UNITS[unit] == 0:
            return f"{octets // _SIZE_UNITS[unit]}{unit}"
    return str(octets)


def approximate_size(octets: int) -> str:
    """A usage for people: exact where format_size is ("2G"), else one decimal ("2.2M")."""
    exact = format_size(octets)
    if exact != str(octets):
        return exact
    for unit in ("T", "G", "M", "K"):
        if octets >= _SIZE_UNITS[unit]:
            return f"{octets / _SIZE_UNITS[unit]:.1f}{unit}"
    return exact


def _quota_text(stored: int | None, default: int) -> str | None:
    """How `user list` shows a quota; None when there is nothing to say (unlimited by
    default)."""
    if stored is None:
        return f"{format_size(default)} (default)" if default > 0 else None
    return "unlimited" if stored == 0 else format_size(stored)


def user_quota(settings: Settings, args: argparse.Namespace) -> int:
    from services.store.backends.accounts import effective_quota

    if args.size is None:
        return _show_quota(settings, normalize_address(args.address))
    stored = parse_size(args.size)
    limit = effective_quota(stored, settings.default_quota)
    user = normalize_address(args.address)
    known: dict[str, int] = {}

    def db_change(accounts: Any) -> None:
        accounts.set_quota(user, stored)
        usage = _usage_saying_why_not(settings, user)  # read once the account is known
        if usage is not None:
            known["usage"] = usage

    _change(settings, db_change,
            lambda d: _publish_quota(d, user, limit, known.get("usage")))
    _print_quota(user, stored, settings.default_quota, known.get("usage"))
    return 0


def _usage_saying_why_not(settings: Settings, user: str) -> int | None:
    """The usage in the store's index; None, with a warning naming the index, when it cannot
    be read (the quota is saved all the same; the CLI then flags nothing in Redis)."""
    from services.store.backends.maildb import stored_usage
    from services.store.mailbox import StorageError

    try:
        return stored_usage(settings.store_dir, user)
    except StorageError as exc:
        print(f"tiermail: warning: quota saved, but {exc}; its usage is unknown",
              file=sys.stderr)
        return None


def _show_quota(settings: Settings, address: str) -> int:
    """`user quota ADDR`: the quota and the usage the store's index holds, changing nothing
    (an operator asking why a sender got 452 4.2.2 had no way to see the usage)."""
    from services.store.backends.maildb import stored_usage
    from services.store.mailbox import StorageError

    with _accounts(settings) as accounts:
        if not accounts.user_exists(address):
            raise CommandError(f"no such user: {address}")
        stored = accounts.stored_quotas()[address]
    try:
        usage = stored_usage(settings.store_dir, address)
    except StorageError as exc:
        _print_quota(address, stored, settings.default_quota, None)
        raise CommandError(str(exc)) from None
    _print_quota(address, stored, settings.default_quota, usage)
    return 0


def _print_quota(address: str, stored: int | None, default: int, usage: int | None) -> None:
    from services.store.backends.accounts import effective_quota

    print(f"quota of {address}: {_quota_text(stored, default) or 'unlimited (default)'}")
    if usage is None:
        return
    limit = effective_quota(stored, default)
    print(f"in use: {approximate_size(usage)} ({usage} octets)"
          + (", over quota: new mail is refused (452 4.2.2)"
             if limit is not None and usage >= limit else ""))


async def _publish_quota(directory: Any, user: str, limit: int | None,
                         usage: int | None) -> None:
    """Flag the mailbox full or not at once, by the usage in the store's index (the store
    publishes usage to Redis only for accounts with a limit: what Redis held could be old);
    the store reconciles every quota within seconds anyway (services/store/quota.py). With
    no usage (an index that cannot be read) nothing is flagged."""
    from common.directory import QuotaState

    if usage is None:
        return
    over = limit is not None and usage >= limit
    await directory.set_quota_states({user: QuotaState(usage, over, limit)})


def uidvalidity_renew(settings: Settings, args: argparse.Namespace) -> int:
    """After a restore (docs/operations.md, "Backups"): new UIDVALIDITYs, above anything the
    lost part of the store's history may have handed out (uidrenewal.py)."""
    from services.store.backends import uidrenewal
    from services.store.backends.maildb import MAIL_DIR
    from services.store.mailbox import NoSuchUser, StorageError

    if args.all == bool(args.addresses):
        raise UsageError("name the accounts by address, or give --all")
    root = settings.store_dir / MAIL_DIR
    try:
        lock = lock_directory(settings.store_dir, "store")
    except CannotStart:
        raise CommandError(f"the store is running on {settings.store_dir}: stop it first "
                           "(its sessions would go on with the old UIDVALIDITYs)") from None
    with lock:
        try:
            users = (uidrenewal.indexed_users(root) if args.all
                     else list(dict.fromkeys(map(normalize_address, args.addresses))))
            missing = uidrenewal.missing(root, users)
            unknown = [user for user in missing if not _is_user(settings, user)]
            if unknown:
                raise CommandError(f"no such account, and no mail of it on disk: "
                                   f"{', '.join(unknown)}; nothing was changed")
            for user in missing:
                print(f"{user}: no mail yet, nothing to renew")
            _print_renewals(uidrenewal.renew(root, users))
        except (NoSuchUser, StorageError) as exc:
            raise CommandError(str(exc)) from None
    return 0


def _print_renewals(renewals: Iterator[Any]) -> None:
    accounts = mailboxes = 0
    first = last = 0
    for done in renewals:
        print(f"{done.user}: {done.mailboxes} mailbox{'' if done.mailboxes == 1 else 'es'}, "
              f"UIDVALIDITY {done.first}-{done.last}")
        accounts, mailboxes = accounts + 1, mailboxes + done.mailboxes
        first, last = first or done.first, done.last
    if accounts:
        print(f"new UIDVALIDITY ({first}-{last}) for {mailboxes} mailbox"
              f"{'' if mailboxes == 1 else 'es'} of {accounts} account"
              f"{'' if accounts == 1 else 's'}: IMAP clients resynchronize them")
    else:
        print("no mailboxes to renew")


def alias_add(settings: Settings, args: argparse.Namespace) -> int:
    def db_change(accounts: Any) -> tuple[str, ...]:
        accounts.add_alias(args.source, *args.targets)
        return tuple(accounts.alias_targets(args.source))

    source = normalize_address(args.source)
    with _warning_of_dead_aliases(settings, also=source):
        targets = _change(settings, db_change, lambda d: _set_alias(d, settings, args.source))
        print(f"alias {source} -> {', '.join(targets)}")
        for warning in _alias_warnings(settings, source, targets):
            print(f"tiermail: warning: {warning}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _warning_of_dead_aliases(settings: Settings, also: str = "") -> Iterator[None]:
    """After a change, warn of the aliases it left reaching no mailbox (and of `also`, the
    alias just changed, if it reaches none): the filter refuses their mail with 550, which
    nothing else would tell the operator (a loop, a user deleted under an alias's alias)."""
    before = _dead_aliases(settings)
    yield
    after = _dead_aliases(settings)
    for alias in sorted((after - before) | (after & {also})):
        print(f"tiermail: warning: {alias} reaches no mailbox (aliases in a loop, nested "
              f"deeper than {MAX_ALIAS_DEPTH}, or targets that exist nowhere): its mail is "
              "refused (550 5.1.1)", file=sys.stderr)


def _dead_aliases(settings: Settings) -> set[str]:
    from common.directory import aliases_reaching_no_mailbox

    with _accounts(settings) as accounts:
        return set(aliases_reaching_no_mailbox(set(accounts.users()), accounts.aliases()))


def _alias_warnings(settings: Settings, source: str, targets: tuple[str, ...]) -> list[str]:
    """What an operator may not mean: a source that is a user (the alias takes its mail
    away), targets that are neither users nor aliases (nothing receives that copy, or only
    their domain's catch-all does)."""
    from common.directory import domain_of, reaches_mailbox

    with _accounts(settings) as accounts:
        aliases = accounts.aliases()
        users = set(accounts.users())
        warnings = []
        for target in (t for t in targets if t not in users and t not in aliases):
            catch_all = "@" + domain_of(target)
            if reaches_mailbox(users, aliases, target):  # as the filter resolves it
                warnings.append(f"{target} is neither a user nor an alias: its mail goes to "
                                f"the catch-all {catch_all} (-> {', '.join(aliases[catch_all])})")
            else:
                warnings.append(f"{target} is neither a user nor an alias: it gets no mail "
                                "until it is one")
        if source in users and source not in targets:
            warnings.append(f"{source} is a user: its mail now goes to the alias targets "
                            f"only (add {source} itself as a target to keep it)")
    return warnings


def alias_del(settings: Settings, args: argparse.Namespace) -> int:
    with _warning_of_dead_aliases(settings):
        _change(settings, lambda a: a.remove_alias(args.source, args.target),
                lambda d: _set_alias(d, settings, args.source))
        if args.target:
            print(f"alias {normalize_address(args.source)} no longer delivers to "
                  f"{normalize_address(args.target)}")
        else:
            print(f"alias {normalize_address(args.source)} removed")
    return 0


async def _set_alias(directory: Any, settings: Settings, source: str) -> None:
    with _accounts(settings) as accounts:
        targets = accounts.alias_targets(source)
    if targets:
        await directory.set_alias(source, targets)
    else:
        await directory.remove_alias(source)


def alias_list(settings: Settings, args: argparse.Namespace) -> int:
    with _accounts(settings) as accounts:
        for source, targets in accounts.aliases().items():
            print(f"{source} -> {', '.join(targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
