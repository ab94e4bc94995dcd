"""Thunderbird (Debian package thunderbird) as an IMAP or POP3 client under test control.

Thunderbird runs headless with a profile of its own (one account on the server under test,
STARTTLS or STLS, the test certificate accepted as a user would) and is driven through
Marionette, its remote control protocol: each step of thunderbird.js runs in Thunderbird's
chrome context and calls the same folder, copy and mail-fetching services its user
interface calls. Its protocol log (MOZ_LOG) records every line both sides sent, so a test
can look for refused commands.

Marionette frames are `<length>:<json>`; a command is `[0, id, name, params]`, its answer
`[1, id, error, result]`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from services.devscanners.ports import free_port

THUNDERBIRD = "/usr/bin/thunderbird"
HOST = "127.0.0.1"
STEPS = Path(__file__).with_name("thunderbird.js")
START_TIMEOUT = 60.0
STEP_TIMEOUT = 60.0

# Thunderbird's IMAP log, per line: "... I/IMAP <connection>:<host>:<state>:SendData: 12 select
# "Junk"" and "... CreateNewLineFromSocket: 12 NO [NONEXISTENT] ...".
SENT = re.compile(r"I/IMAP (?P<connection>[0-9a-f]+):.*:SendData: (?P<tag>\S+) (?P<command>.*)$")
TAGGED_FAILURE = re.compile(r"I/IMAP (?P<connection>[0-9a-f]+):.*:CreateNewLineFromSocket: "
                            r"(?P<tag>\S+) (?P<reply>(?:NO|BAD)\b.*)$")

STARTTLS, IMPLICIT_TLS = 2, 3  # mail.server.*.socketType
PASSWORD_CLEARTEXT = 3  # mail.server.*.authMethod: PLAIN or LOGIN, over TLS here
NO_AUTHENTICATION = 1


class StepFailed(AssertionError):
    """A step in Thunderbird threw; the message carries its JavaScript stack."""


class Marionette:
    """A blocking Marionette client, just enough to run scripts in the chrome context."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
        self._buffer = b""
        self._last_id = 0
        self._read_frame()  # the greeting: application type and protocol version
        self.call("WebDriver:NewSession", {"capabilities": {}})
        self.call("Marionette:SetContext", {"value": "chrome"})
        # A step may take this long (the socket's timeout is the same bound).
        self.call("WebDriver:SetTimeouts", {"script": int(STEP_TIMEOUT * 1000)})

    def _read_frame(self) -> Any:
        while b":" not in self._buffer:
            self._receive()
        length, _, self._buffer = self._buffer.partition(b":")
        while len(self._buffer) < int(length):
            self._receive()
        frame, self._buffer = self._buffer[:int(length)], self._buffer[int(length):]
        return json.loads(frame)

    def _receive(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("Thunderbird closed the Marionette connection")
        self._buffer += data

    def call(self, name: str, params: dict[str, Any]) -> Any:
        self._last_id += 1
        frame = json.dumps([0, self._last_id, name, params]).encode()
        self._sock.sendall(b"%d:%s" % (len(frame), frame))
        while True:
            _, answer_id, error, result = self._read_frame()
            if answer_id == self._last_id:
                if error:
                    raise StepFailed(f"{name}: {error.get('message')}")
                return result

    def close(self) -> None:
        self._sock.close()


class Thunderbird:
    """One headless Thunderbird with one account (`protocol` imap or pop3) for `user` on
    127.0.0.1:`port`."""

    def __init__(self, root: Path, *, port: int, user: str, protocol: str = "imap",
                 extra_prefs: dict[str, Any] | None = None) -> None:
        self.root = root
        self.port, self.user, self.protocol = port, user, protocol
        self.profile = root / "profile"
        self.log_file = root / f"{protocol}.log"
        self._marionette_port = free_port()
        self.profile.mkdir(parents=True)
        prefs = {**_account_prefs(port, user, protocol), **(extra_prefs or {}),
                 "marionette.port": self._marionette_port}
        (self.profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items()))
        self._process: subprocess.Popen[bytes] | None = None
        self._marionette: Marionette | None = None
        self._steps = STEPS.read_text()

    def start(self) -> None:
        env = {**os.environ, "HOME": str(self.root), "MOZ_LOG": f"{self.protocol.upper()}:5",
               # Thunderbird appends ".moz_log" to the name it is given.
               "MOZ_LOG_FILE": str(self.log_file)}
        with (self.root / "thunderbird.out").open("wb") as output:
            self._process = subprocess.Popen(
                [THUNDERBIRD, "--headless", "--no-remote", "--marionette",
                 "-remote-allow-system-access", "--profile", str(self.profile)],
                env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._marionette = Marionette(self._marionette_port)
                return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    output = (self.root / "thunderbird.out").read_text()[-2000:]
                    raise RuntimeError(f"Thunderbird did not start: {output}") from None
                time.sleep(0.2)

    def trust_certificate(self, pem: str, port: int | None = None) -> None:
        """Accept the server's self-signed certificate on `port` (the account's own port
        unless given), as its user would."""
        self.step("trustCertificate", host=HOST, port=port or self.port, pem=pem)

    def login(self, password: str) -> None:
        """Store the password (and, for IMAP, let Thunderbird find the folders)."""
        self.step("login", host=HOST, user=self.user, password=password)

    def step(self, name: str, **args: Any) -> Any:
        """Run one step of thunderbird.js and return what it resolved to."""
        assert self._marionette is not None, "start() first"
        script = (self._steps + "\nconst done = arguments[arguments.length - 1];\n"
                  f"run({json.dumps(name)}, {json.dumps(args)}).then("
                  "value => done({value}), e => done({error: `${e}\\n${e.stack}`}));")
        result = self._marionette.call("WebDriver:ExecuteAsyncScript", {
            "script": script, "args": []})["value"]
        if result is None:  # Thunderbird opened a dialog (an alert, a prompt) instead
            raise StepFailed(f"{name}: Thunderbird showed a dialog; see {self.log_file}*")
        if "error" in result:
            raise StepFailed(f"{name}({args}): {result['error']}")
        return result["value"]

    def refused_commands(self) -> list[str]:
        """Every command the server answered with a tagged NO or BAD, from Thunderbird's IMAP
        log, as 'command -> reply'."""
        refused: list[str] = []
        for log in sorted(self.root.glob(f"{self.log_file.name}*")):  # POP3 has no tags
            sent: dict[str, str] = {}  # tag -> command, per connection (the log's prefix)
            for line in log.read_text(errors="replace").splitlines():
                if sending := SENT.search(line):
                    sent[sending["connection"] + sending["tag"]] = sending["command"]
                elif failure := TAGGED_FAILURE.search(line):
                    command = sent.get(failure["connection"] + failure["tag"], "?")
                    refused.append(f"{command} -> {failure['reply']}")
        return refused

    def stop(self) -> None:
        if self._marionette is not None:
            self._marionette.close()
        if self._process is not None and self._process.poll() is None:
            # Thunderbird starts helper processes of its own: end the whole group.
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()


def outgoing_prefs(smtp_port: int) -> dict[str, Any]:
    """The identity's outgoing server: the filter tier on `smtp_port`, STARTTLS, no login
    (mail to local recipients needs none; submission with AUTH is a later issue)."""
    return {
        "mail.smtpservers": "smtp1",
        "mail.smtpserver.smtp1.hostname": HOST,
        "mail.smtpserver.smtp1.port": smtp_port,
        "mail.smtpserver.smtp1.try_ssl": STARTTLS,
        "mail.smtpserver.smtp1.authMethod": NO_AUTHENTICATION,
        "mail.identity.id1.smtpServer": "smtp1",
        "mail.identity.id1.fcc_folder": f"imap://{HOST}/Sent",
    }


def _account_prefs(port: int, user: str, protocol: str) -> dict[str, Any]:
    """One account, no first-run dialogs, nothing fetched before the test says so."""
    return {
        "mail.shell.checkDefaultClient": False,
        "mail.provider.suppress_dialog_on_startup": True,
        "mailnews.start_page.enabled": False,
        "app.update.enabled": False,
        "datareporting.policy.dataSubmissionEnabled": False,
        "mail.rights.version": 1,
        "mail.accountmanager.accounts": "account1,account2",
        "mail.accountmanager.defaultaccount": "account1",
        "mail.accountmanager.localfoldersserver": "server2",
        "mail.account.account1.server": "server1",
        "mail.account.account1.identities": "id1",
        "mail.account.account2.server": "server2",
        "mail.identity.id1.useremail": user,
        "mail.identity.id1.valid": True,
        "mail.server.server1.type": protocol,
        "mail.server.server1.hostname": HOST,
        "mail.server.server1.port": port,
        "mail.server.server1.userName": user,
        "mail.server.server1.name": user,
        "mail.server.server1.socketType": STARTTLS,
        "mail.server.server1.authMethod": PASSWORD_CLEARTEXT,
        # The test logs in (a stored password) before Thunderbird may connect: a password
        # prompt in a headless Thunderbird would wait for ever.
        "mail.server.server1.login_at_startup": False,
        "mail.server.server1.check_new_mail": False,
        "mail.server.server1.offline_download": True,  # IMAP: it fetches whole messages too
        "mail.server.server1.directory-rel": "[ProfD]ImapMail/server1",
        "mail.server.server2.type": "none",
        "mail.server.server2.hostname": "Local Folders",
        "mail.server.server2.userName": "nobody",
        "mail.server.server2.name": "Local Folders",
        "mail.server.server2.directory-rel": "[ProfD]Mail/Local Folders",
    }
