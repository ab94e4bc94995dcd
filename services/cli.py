"""The `tiermail` command: run a tier, run a whole stack, manage accounts, show status."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from common.logs import setup_logging
from common.settings import Settings, SettingsError
from services.store.backends.accounts import AccountDB

EXIT_USAGE = 2
EXIT_FAILED = 1


class CommandError(Exception):
    """A failure to report to the operator in one line, without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        settings = Settings.from_env()
        return int(args.handler(settings, args) or 0)
    except SettingsError as exc:
        print(f"tiermail: bad setting: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"tiermail: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermail", description=__doc__)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Callable[..., int | None], help: str,
                parent: Any = commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("filter", run_filter, "run one filter-tier process (SMTP intake)")
    command("store", run_store, "run the store-tier process (delivery, POP3)")
    command("webmail", run_webmail, "run one webmail worker (not built yet)")
    command("up", run_up, "run a whole single-machine stack in the foreground")
    status = command("status", show_status, "tier health, queue depths, dead letters")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    domain = commands.add_parser("domain", help="manage local domains").add_subparsers(
        metavar="ACTION", required=True)
    command("add", domain_add, "add a local domain", domain).add_argument("domain")
    command("del", domain_del, "remove a domain without users", domain).add_argument("domain")
    command("list", domain_list, "list local domains", domain)

    user = commands.add_parser("user", help="manage mailbox users").add_subparsers(
        metavar="ACTION", required=True)
    for name, handler, text in (("add", user_add, "create a user"),
                                ("passwd", user_passwd, "set a user's password")):
        sub = command(name, handler, text, user)
        sub.add_argument("address")
        sub.add_argument("--password-stdin", action="store_true",
                         help="read the password from standard input (one line)")
    command("del", user_del, "delete a user (mail stays on disk)", user).add_argument("address")
    command("list", user_list, "list users", user)

    alias = commands.add_parser("alias", help="manage aliases").add_subparsers(
        metavar="ACTION", required=True)
    add = command("add", alias_add, "deliver mail for FROM (or @domain) to TO", alias)
    add.add_argument("source", metavar="FROM")
    add.add_argument("target", metavar="TO")
    rm = command("del", alias_del, "remove an alias (all targets unless TO is given)", alias)
    rm.add_argument("source", metavar="FROM")
    rm.add_argument("target", metavar="TO", nargs="?")
    command("list", alias_list, "list aliases", alias)
    return parser


# Tier processes


def run_filter(settings: Settings, args: argparse.Namespace) -> int:
    from services.filter.main import serve

    setup_logging(settings.log_level, settings.log_format, tier="filter")
    serve(settings)
    return 0


def run_store(settings: Settings, args: argparse.Namespace) -> int:
    from services.store.main import serve

    setup_logging(settings.log_level, settings.log_format, tier="store")
    serve(settings)
    return 0


def run_webmail(settings: Settings, args: argparse.Namespace) -> int:
    raise CommandError("the webmail tier is not built yet (a later issue); nothing to run")


def run_up(settings: Settings, args: argparse.Namespace) -> int:
    from services.stack import run_stack

    setup_logging(settings.log_level, settings.log_format, tier="up")
    return run_stack(settings)


def show_status(settings: Settings, args: argparse.Namespace) -> int:
    from services.status import collect_status, format_status

    report = asyncio.run(collect_status(settings))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0 if report["healthy"] else EXIT_FAILED


# Accounts: the store's database is the authority; Redis gets the change right after.


def _accounts(settings: Settings) -> AccountDB:
    return AccountDB.for_store(settings.store_dir)


def _change(settings: Settings, db_change: Callable[[Any], Any],
            redis_change: Callable[[Any], Any]) -> Any:
    """Apply a change to the account database, then mirror it into the Redis directory."""
    from services.store.backends.accounts import AccountError

    with _accounts(settings) as accounts:
        try:
            result = db_change(accounts)
        except AccountError as exc:
            raise CommandError(str(exc)) from None
    try:
        asyncio.run(_mirror(settings, redis_change))
    except Exception as exc:
        print(f"tiermail: warning: saved, but the Redis directory was not updated ({exc}); "
              "the store republishes it when it starts or notices it missing", file=sys.stderr)
    return result


async def _mirror(settings: Settings, redis_change: Callable[[Any], Any]) -> None:
    from redis.asyncio import from_url

    from common.directory import Directory

    redis = from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        directory = Directory(redis, settings.redis_prefix)
        with _accounts(settings) as accounts:
            if await directory.is_published():
                await redis_change(directory)
                await directory.mark_generation(accounts.generation())
            else:
                await directory.publish(accounts.snapshot())
    finally:
        await redis.aclose()


def domain_add(settings: Settings, args: argparse.Namespace) -> int:
    name = _change(settings, lambda a: a.add_domain(args.domain),
                   lambda d: d.add_domain(args.domain))
    print(f"domain {name} added")
    return 0


def domain_del(settings: Settings, args: argparse.Namespace) -> int:
    _change(settings, lambda a: a.remove_domain(args.domain),
            lambda d: d.remove_domain(args.domain))
    print(f"domain {args.domain.lower()} removed")
    return 0


def domain_list(settings: Settings, args: argparse.Namespace) -> int:
    with _accounts(settings) as accounts:
        for name in accounts.domains():
            print(name)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("passwords differ")
    else:
        raise CommandError("no terminal to ask for a password; use --password-stdin")
    if not password:
        raise CommandError("empty password refused")
    return password


def user_add(settings: Settings, args: argparse.Namespace) -> int:
    from common.passwords import hash_password

    password_hash = hash_password(_read_password(args))
    address = _change(settings, lambda a: a.add_user(args.address, password_hash),
                      lambda d: d.add_user(args.address))
    print(f"user {address} added")
    return 0


def user_passwd(settings: Settings, args: argparse.Namespace) -> int:
    from common.passwords import hash_password

    password_hash = hash_password(_read_password(args))
    with _accounts(settings) as accounts:
        try:
            accounts.set_password(args.address, password_hash)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    print(f"password of {args.address.lower()} changed")
    return 0


def user_del(settings: Settings, args: argparse.Namespace) -> int:
    _change(settings, lambda a: a.delete_user(args.address),
            lambda d: d.remove_user(args.address))
    print(f"user {args.address.lower()} deleted (mail kept under {settings.store_dir})")
    return 0


def user_list(settings: Settings, args: argparse.Namespace) -> int:
    with _accounts(settings) as accounts:
        for address in accounts.users():
            print(address)
    return 0


def alias_add(settings: Settings, args: argparse.Namespace) -> int:
    def db_change(accounts: Any) -> tuple[str, ...]:
        accounts.add_alias(args.source, args.target)
        return tuple(accounts.alias_targets(args.source))

    targets = _change(settings, db_change, lambda d: _set_alias(d, settings, args.source))
    print(f"alias {args.source.lower()} -> {', '.join(targets)}")
    return 0


def alias_del(settings: Settings, args: argparse.Namespace) -> int:
    _change(settings, lambda a: a.remove_alias(args.source, args.target),
            lambda d: _set_alias(d, settings, args.source))
    print(f"alias {args.source.lower()} removed")
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
