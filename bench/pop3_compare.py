#!/usr/bin/env python3
"""POP3 answers side by side with Dovecot's: a compatibility check, not a benchmark.

The mailbox of bench/imap_compare.py (the IMAP benchmark's corpus plus hand-made malformed
messages) goes into a loopback Dovecot (POP3 on) and into tiermail's store; then both are
asked the same things and every difference is shown:

  * STAT and LIST, and RETR and TOP (0, 3 and 1,000 lines) of every message, byte for byte
    after dot-unstuffing;
  * one session's DELE, RSET and QUIT (what the next session sees);
  * the status (+OK/-ERR) of commands at the edges: numbers out of range, deleted messages,
    missing or extra arguments, unknown commands.

UIDL values are each server's own; only that they are unique and stable is compared.

    .venv/bin/python bench/pop3_compare.py
    .venv/bin/python bench/pop3_compare.py --messages 1000

Needs root (Dovecot runs its own master) and Debian's dovecot-pop3d (`make install`).
"""

from __future__ import annotations

import argparse
import poplib
import sys
from typing import Any

import imap_bench as ib
from benchlib import free_port, log, temp_root
from imap_compare import Mailbox, malformed_messages, store_holding

EDGES = ["RETR 0", "RETR 99999", "RETR", "RETR 1 2", "RETR x", "TOP 1", "TOP 1 -1",
         "TOP 1 x", "TOP 0 1", "LIST 0", "LIST 99999", "LIST 1 2", "UIDL 0", "UIDL 99999",
         "DELE 0", "DELE 99999", "DELE 2", "DELE 2", "RETR 2", "TOP 2 0", "LIST 2", "UIDL 2",
         "RSET", "RETR 2", "NOOP", "NOOP x", "STAT x", "FOO", "", "USER again", "PASS again",
         "APOP user digest", "AUTH PLAIN", "STLS", "LAST", "RSET x"]


def ask(port: int, count: int) -> dict[str, Any]:
    pop = session(port)
    try:
        answers: dict[str, Any] = {"STAT": pop.stat(), "LIST": pop.list()[1]}
        for number in range(1, count + 1):
            answers[f"RETR {number}"] = pop.retr(number)[1]
            for lines in (0, 3, 1000):
                answers[f"TOP {number} {lines}"] = pop.top(number, lines)[1]
        uidls = pop.uidl()[1]
        answers["UIDL unique"] = len({line.split()[1] for line in uidls}) == count
        # A NOOP after each: both servers hang up after some errors in a row.
        answers["EDGES"] = [(status(pop, command), pop.noop())[0] for command in EDGES]
        pop.dele(1)
        pop.dele(count)
        pop.quit()
    finally:
        pop.close()
    after = session(port)
    try:
        answers["after QUIT: STAT"] = after.stat()
        answers["after QUIT: first message"] = after.retr(1)[1][:5]
        answers["UIDL stable"] = sorted(after.uidl()[1]) == sorted(
            line for line in uidls if not line.startswith((b"1 ", b"%d " % count)))
        after.quit()
    finally:
        after.close()
    return answers


def session(port: int) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=120)
    pop.user(ib.USER)
    pop.pass_(ib.PASSWORD)
    return pop


def status(pop: poplib.POP3, command: str) -> str:
    """+OK or -ERR, and the RFC 2449 response code if there is one; a multi-line answer is
    read to its end."""
    pop._putcmd(command)  # noqa: SLF001 - poplib has no public way to send a raw line
    line = pop._getline()[0]  # noqa: SLF001
    if line.startswith(b"+OK") and command.split(" ")[0].upper() in ("RETR", "TOP") or (
            line.startswith(b"+OK") and command.upper() in ("LIST", "UIDL")):
        while pop._getline()[0] != b".":  # noqa: SLF001
            pass
    words = line.split(b" ")
    code = words[1] if len(words) > 1 and words[1].startswith(b"[") else b""
    return (words[0] + b" " + code).decode().strip()


def compare(dovecot: dict[str, Any], tiermail: dict[str, Any]) -> int:
    differing = 0
    for question in dovecot:
        if question == "EDGES":
            continue
        if dovecot[question] != tiermail[question]:
            differing += 1
            if differing <= 12:
                print(f"{question}: DIFFERENT\n      dovecot  {str(dovecot[question])[:300]}"
                      f"\n      tiermail {str(tiermail[question])[:300]}")
    print(f"messages and sessions: {differing} of {len(dovecot) - 1} answers differ")
    edges = [(command, d, t) for command, d, t in zip(EDGES, dovecot["EDGES"],
                                                      tiermail["EDGES"], strict=True) if d != t]
    print(f"edge commands: {len(edges)} of {len(EDGES)} answered differently")
    for command, d, t in edges:
        print(f"    {command!r:24} dovecot {d:28} tiermail {t}")
    return differing + len(edges)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200,
                        help="benchmark corpus messages after the malformed ones")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    mailbox = Mailbox(args.messages)
    with temp_root("tiermail-pop3-compare-", args.keep) as root:
        pop3_port = free_port()
        dovecot = ib.DovecotStack(root / "dovecot", [
            "protocols = imap pop3", ib.dovecot_listener("pop3", pop3_port)])
        dovecot.configure()
        ib.populate_maildir(dovecot.maildir, mailbox)
        dovecot.start()
        try:
            ib.wait_for(lambda: ib.port_open(pop3_port), 30, "dovecot POP3")
            log(f"dovecot: asking about {mailbox.count} messages")
            theirs = ask(pop3_port, mailbox.count)
        finally:
            dovecot.stop()
        with store_holding(mailbox, root / "tiermail", args.redis_db) as tiermail:
            log(f"tiermail: asking about {mailbox.count} messages")
            ours = ask(tiermail.pop3_port, mailbox.count)
    print(f"\n{mailbox.count} messages ({len(malformed_messages())} malformed, 1-"
          f"{len(malformed_messages())}); Dovecot {ib.dovecot_version()}")
    print(f"\n{compare(theirs, ours)} differences in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
