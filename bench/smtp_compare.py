#!/usr/bin/env python3
"""SMTP replies side by side with Postfix's: a compatibility check, not a benchmark.

The same dialogues (commands in and out of order, odd addresses and parameters, extensions
that are not offered, over-long lines, a few whole messages) go to a loopback Postfix set up
as bench/smtp_bench.py sets it up and to tiermail's filter tier; the reply code of every step
is printed side by side and the steps that differ are counted. Postfix is a reference for
what mail clients and senders meet every day, not the spec: the differences kept on purpose
are listed in docs/architecture.md ("Filter: SMTP"), and anything new is worth a look.

    .venv/bin/python bench/smtp_compare.py
    .venv/bin/python bench/smtp_compare.py --all     # every step, not only differing ones

Needs root (Postfix runs its own master) and Debian's postfix (`make install`).
"""

from __future__ import annotations

import argparse
import socket
import sys

from benchlib import DOMAIN, USER, PostfixStack, TiermailStack, free_port, log, temp_root

MESSAGE = ["From: <sender@client.test>", f"To: <{USER}>", "Subject: compare", "",
           "body line", "..a line that began with a dot", ""]
ENVELOPE = ["EHLO client.test", "MAIL FROM:<sender@client.test>", f"RCPT TO:<{USER}>"]

# (name, commands). "DATA" sends MESSAGE after a 354; "<raw:...>" sends the bytes as they are.
DIALOGUES: list[tuple[str, list[str]]] = [
    ("a whole message", [*ENVELOPE, "DATA", "QUIT"]),
    ("two messages in one session", [*ENVELOPE, "DATA", "MAIL FROM:<>", f"RCPT TO:<{USER}>",
                                     "DATA", "QUIT"]),
    ("HELO and EHLO without a name", ["HELO", "EHLO", "EHLO client.test", "QUIT"]),
    ("MAIL before EHLO", ["MAIL FROM:<sender@client.test>", "QUIT"]),
    ("RCPT before MAIL", ["EHLO client.test", f"RCPT TO:<{USER}>", "QUIT"]),
    ("DATA before RCPT", ["EHLO client.test", "MAIL FROM:<sender@client.test>", "DATA",
                          "QUIT"]),
    ("MAIL twice", ["EHLO client.test", "MAIL FROM:<a@client.test>",
                    "MAIL FROM:<b@client.test>", "QUIT"]),
    ("RSET clears the transaction", [*ENVELOPE, "RSET", "DATA", "QUIT"]),
    ("EHLO again clears the transaction", [*ENVELOPE, "EHLO client.test", "DATA", "QUIT"]),
    ("addresses without brackets", ["EHLO client.test", "MAIL FROM:sender@client.test",
                                    f"RCPT TO:{USER}", "QUIT"]),
    ("spaces around the address", ["EHLO client.test", "MAIL FROM: <sender@client.test>",
                                   f"RCPT TO: <{USER}>", "QUIT"]),
    ("null sender", ["EHLO client.test", "MAIL FROM:<>", f"RCPT TO:<{USER}>", "QUIT"]),
    ("source route", ["EHLO client.test", "MAIL FROM:<@relay.test:sender@client.test>",
                      f"RCPT TO:<@relay.test:{USER}>", "QUIT"]),
    ("quoted local part", ["EHLO client.test", 'MAIL FROM:<"first last"@client.test>',
                           f'RCPT TO:<"user"@{DOMAIN}>', "QUIT"]),
    ("recipient domain in capitals", ["EHLO client.test", "MAIL FROM:<s@client.test>",
                                      f"RCPT TO:<{USER.upper()}>", "QUIT"]),
    ("unknown local user", ["EHLO client.test", "MAIL FROM:<s@client.test>",
                            f"RCPT TO:<nobody-here@{DOMAIN}>", "QUIT"]),
    ("postmaster", ["EHLO client.test", "MAIL FROM:<s@client.test>", "RCPT TO:<postmaster>",
                    f"RCPT TO:<postmaster@{DOMAIN}>", f"RCPT TO:<PostMaster@{DOMAIN}>",
                    "QUIT"]),
    ("broken addresses", ["EHLO client.test", "MAIL FROM:<sender@>", "MAIL FROM:<@>",
                          "MAIL FROM:<a b@client.test>", "MAIL FROM:<sender@client.test",
                          "MAIL FROM:", "MAIL TO:<x@client.test>", "QUIT"]),
    ("SIZE", ["EHLO client.test", "MAIL FROM:<s@client.test> SIZE=1000",
              "RSET", "MAIL FROM:<s@client.test> SIZE=999999999999",
              "MAIL FROM:<s@client.test> SIZE=abc", "QUIT"]),
    ("BODY", ["EHLO client.test", "MAIL FROM:<s@client.test> BODY=8BITMIME", "RSET",
              "MAIL FROM:<s@client.test> BODY=7BIT", "RSET",
              "MAIL FROM:<s@client.test> BODY=BINARYMIME", "RSET",
              "MAIL FROM:<s@client.test> BODY=NONSENSE", "QUIT"]),
    ("SMTPUTF8", ["EHLO client.test", "MAIL FROM:<s@client.test> SMTPUTF8",
                  f"RCPT TO:<{USER}>", "RSET", "MAIL FROM:<grüße@client.test>", "RSET",
                  "MAIL FROM:<s@client.test>", f"RCPT TO:<grüße@{DOMAIN}>", "QUIT"]),
    ("unknown MAIL and RCPT parameters", ["EHLO client.test", "MAIL FROM:<s@client.test> FOO=1",
                                          "MAIL FROM:<s@client.test>",
                                          f"RCPT TO:<{USER}> NOTIFY=NEVER", "QUIT"]),
    ("parameters with a hyphen, malformed, repeated",
     ["EHLO client.test", "MAIL FROM:<s@client.test> MT-PRIORITY=3",
      "MAIL FROM:<s@client.test> X_Y=1", "MAIL FROM:<s@client.test> SIZE=10 SIZE=20", "RSET",
      "MAIL FROM:<s@client.test> BODY=8BITMIME BODY=7BIT", "RSET",
      "MAIL FROM:<s@client.test>", f"RCPT TO:<{USER}> X-FOO=1", "QUIT"]),
    ("VRFY, EXPN, HELP, NOOP", ["EHLO client.test", f"VRFY {USER}", "EXPN staff", "HELP",
                                "NOOP", "NOOP with an argument", "QUIT"]),
    ("unknown and empty commands", ["EHLO client.test", "FOO", "", "MAIL", "QUIT"]),
    ("BDAT, ETRN, TURN not offered", ["EHLO client.test", "BDAT 10 LAST", "ETRN client.test",
                                      "TURN", "QUIT"]),
    ("AUTH before STARTTLS", ["EHLO client.test", "AUTH PLAIN AGZvbwBiYXI=", "QUIT"]),
    ("STARTTLS with an argument", ["EHLO client.test", "STARTTLS now", "QUIT"]),
    ("an over-long command line", ["EHLO client.test", "MAIL FROM:<" + "a" * 1100
                                   + "@client.test>", "NOOP", "QUIT"]),
    ("QUIT with an argument", ["EHLO client.test", "QUIT now"]),
    ("lower-case commands", ["ehlo client.test", "mail from:<s@client.test>",
                             f"rcpt to:<{USER}>", "rset", "quit"]),
]


class Dialogue:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """The code of one (possibly multi-line) reply; "closed" when the server hung up."""
        while True:
            line = self.file.readline()
            if not line:
                return "closed"
            if line[3:4] != b"-":
                return line[:3].decode(errors="replace") + enhanced(line)

    def step(self, command: str) -> str:
        try:
            self.sock.sendall(command.encode() + b"\r\n")
            code = self.reply()
            if command == "DATA" and code.startswith("354"):
                self.sock.sendall("\r\n".join(MESSAGE).encode() + b".\r\n")
                code += " / " + self.reply()
            return code
        except OSError:
            return "closed"

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def enhanced(line: bytes) -> str:
    """ ' 5.1.1' when the reply carries an enhanced status code (RFC 3463)."""
    words = line[4:].split(b" ", 1)
    code = words[0] if words else b""
    parts = code.split(b".")
    return " " + code.decode() if len(parts) == 3 and all(p.isdigit() for p in parts) else ""


def converse(port: int) -> dict[str, list[str]]:
    answers: dict[str, list[str]] = {}
    for name, commands in DIALOGUES:
        dialogue = Dialogue(port)
        try:
            codes = [dialogue.reply()]  # the greeting
            codes += [dialogue.step(command) for command in commands]
        finally:
            dialogue.close()
        answers[name] = codes
    return answers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="print every step")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    with temp_root("tiermail-smtp-compare-", args.keep) as root:
        postfix = PostfixStack(root / "postfix", free_port())
        postfix.start()
        try:
            log("postfix: the dialogues")
            theirs = converse(postfix.port)
        finally:
            postfix.stop()
        tiermail = TiermailStack(root / "tiermail", args.redis_db)
        try:
            tiermail.setup()
            tiermail.start_store()
            tiermail.start_filter()
            log("tiermail: the dialogues")
            ours = converse(tiermail.smtp_port)
        finally:
            tiermail.close()
    differing = 0
    for name, commands in DIALOGUES:
        steps = ["(greeting)", *commands]
        rows = [(step, p, t) for step, p, t in zip(steps, theirs[name], ours[name], strict=True)
                if args.all or p.split()[0] != t.split()[0]]
        differing += sum(1 for _, p, t in rows if p.split()[0] != t.split()[0])
        if rows:
            print(f"{name}:")
            for step, p, t in rows:
                mark = "  " if p.split()[0] == t.split()[0] else "!="
                print(f"  {mark} {step[:60]!r:64} postfix {p:18} tiermail {t}")
    total = sum(len(commands) + 1 for _, commands in DIALOGUES)
    print(f"\n{differing} of {total} steps answered with a different code")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
