"""A Postfix of the test's own, relaying one domain to the filter tier: a real sending MTA,
with a real queue and real retries, as the internet meets tiermail.

Everything lives under one temporary directory of its own (config, queue, log; not under
pytest's, which only root may enter, while Postfix's daemons run as the postfix user),
removed by `stop`. It listens on a free
loopback port for the test to submit to, resolves nothing (no DNS), sends only to the
filter (STARTTLS when offered) and retries deferred mail every second, so a test sees a
4xx turn into a later delivery within seconds rather than Postfix's default minutes.
Needs root (the master starts its daemons as the postfix user) and Debian's postfix.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from services.devscanners.ports import free_port
from tests.support import port_open, wait_until

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"

MASTER_CF = """\
{listen}   inet  n       -       n       -       -       smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
flush      unix  n       -       n       1000?   0       flush
smtp       unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {root}/etc
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-tiermail-test
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.test.invalid
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = {domain}
transport_maps = inline:{{ {domain}=smtp:[127.0.0.1]:{next_hop} }}
default_transport = error:this test relays {domain} only
smtp_tls_security_level = may
smtp_tls_loglevel = 1
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 1s
biff = no
"""

# maillog: "... postfix-tiermail-test/smtp[123]: 4Xyz: to=<a@b>, relay=..., status=deferred
# (host 127.0.0.1[127.0.0.1] said: 451 4.3.0 ...)"
DELIVERY = re.compile(r"\bto=<(?P<to>[^>]*)>.*\bstatus=(?P<status>\w+) \((?P<detail>.*)\)$")


class PostfixRelay:
    def __init__(self, *, domain: str, next_hop_port: int) -> None:
        self.root = root = Path(tempfile.mkdtemp(prefix="tiermail-postfix-"))
        self.etc = root / "etc"
        self.port = free_port()
        self._domain, self._next_hop = domain, next_hop_port
        self._env = {**os.environ, "MAIL_CONFIG": str(self.etc)}
        self._started = False

    def start(self) -> None:
        for folder in (self.etc, self.root / "queue", self.root / "data"):
            folder.mkdir(parents=True)
        self.root.chmod(0o755)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        (self.etc / "main.cf").write_text(MAIN_CF.format(
            root=self.root, domain=self._domain, next_hop=self._next_hop))
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        for action in ("check", "start"):
            subprocess.run([POSTFIX, "-c", str(self.etc), action], env=self._env, check=True,
                           capture_output=True, timeout=60)
        self._started = True
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout=60,
                   what=f"Postfix on port {self.port}")

    def deliveries(self) -> list[tuple[str, str, str]]:
        """(recipient, status, detail) for every delivery attempt in the log, in order:
        status is sent, deferred or bounced."""
        log = self.root / "maillog"
        if not log.exists():
            return []
        return [(m["to"], m["status"], m["detail"])
                for line in log.read_text(errors="replace").splitlines()
                if (m := DELIVERY.search(line))]

    def log(self) -> str:
        log = self.root / "maillog"
        return log.read_text(errors="replace") if log.exists() else "(no maillog)"

    def queued(self) -> int:
        """Messages still in Postfix's queue (active or deferred)."""
        listing = subprocess.run([POSTQUEUE, "-c", str(self.etc), "-j"], env=self._env,
                                 check=True, capture_output=True, text=True, timeout=60).stdout
        return sum(1 for line in listing.splitlines() if line.strip())

    def flush(self) -> None:
        """`postqueue -f`: deliver everything queued now, whatever its retry time."""
        subprocess.run([POSTQUEUE, "-c", str(self.etc), "-f"], env=self._env, check=True,
                       capture_output=True, timeout=60)

    def stop(self) -> None:
        if self._started:
            result = subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], env=self._env,
                                    capture_output=True, timeout=60)
            if result.returncode != 0:
                subprocess.run([POSTFIX, "-c", str(self.etc), "abort"], env=self._env,
                               capture_output=True, timeout=60)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
