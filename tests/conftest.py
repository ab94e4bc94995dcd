"""Shared fixtures: every test gets its own queue names, Redis keys, data dir and ports.

The real RabbitMQ and Redis are required. Under CI=true a missing service fails the run;
on a developer machine the integration tests that need one are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.settings import Settings
from common.tls import ensure_dev_certificate
from services.devscanners.devdns import DnsStub
from services.devscanners.runner import (
    Scanner,
    ScannerError,
    start_clamd,
    start_dns_stub,
    start_rspamd,
    start_spamd,
)
from tests.support import (
    FAILURE_LOGS,
    INLINE_MODES,
    TierProcess,
    delete_queues,
    free_port,
    log_tail,
    port_open,
    rabbitmqctl,
    show_on_failure,
)

TEST_REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "9"))
# rspamd's Bayes statistics (its keys are not prefixed): a database of their own, one per
# worker of a parallel run (`pytest -n N`: gw0 takes 10, gw1 11, ...).
TEST_RSPAMD_REDIS_DB = (int(os.environ.get("TEST_RSPAMD_REDIS_DB", "10"))
                        + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]))


def _require(service: str, available: bool) -> None:
    if available:
        return
    message = f"{service} is not reachable on 127.0.0.1; `make test` starts it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


VHOST_PREFIX = "tiermail-test-"


def _remove_vhosts_of_dead_runs() -> None:
    """Vhosts of test runs that were killed (their pid is in the name) would pile up queues.
    The workers of a parallel run all look at the start: another may delete one first."""
    for name in rabbitmqctl("list_vhosts").split():
        pid = name[len(VHOST_PREFIX):].partition("-")[0]
        if name.startswith(VHOST_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(subprocess.CalledProcessError):
                rabbitmqctl("delete_vhost", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(params=list(INLINE_MODES.values()), ids=list(INLINE_MODES))
def inline_max(request: pytest.FixtureRequest) -> int:
    """A test using this runs twice: bodies as files only, and inline up to the default."""
    return int(request.param)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A vhost of this test run's own, removed at the end (it holds every test's queues)."""
    _require("RabbitMQ", port_open("127.0.0.1", 5672))
    _remove_vhosts_of_dead_runs()
    name = f"{VHOST_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    ensure_dev_certificate(cert, key, "mx.test.invalid")
    return cert, key


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    _require("Redis", port_open("127.0.0.1", 6379))
    client = redis.Redis(host="127.0.0.1", port=6379, db=TEST_REDIS_DB)
    yield client
    client.close()


@pytest.fixture
def settings(amqp_vhost: str, redis_client: redis.Redis, tmp_path: Path,
             tls_files: tuple[Path, Path]) -> Iterator[Settings]:
    """Settings for one isolated stack: its own queues, Redis keys, data dir and ports."""
    tag = uuid.uuid4().hex[:10]
    cert, key = tls_files
    value = Settings(
        hostname="mx.test.invalid",
        smtp_port=free_port(),
        submission_port=free_port(),
        imap_port=free_port(),
        imaps_port=free_port(),
        pop3_port=free_port(),
        pop3s_port=free_port(),
        webmail_port=free_port(),
        amqp_url=f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}",
        redis_url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
        redis_prefix=f"t{tag}:",
        queue_prefix=f"t{tag}",
        data_dir=tmp_path / "var",
        tls_cert=str(cert),
        tls_key=str(key),
        spam="off",
        virus="off",
        log_level="DEBUG",
        # 16 MiB allocated per test's data dir, kept by pytest for three runs: gigabytes.
        # The reserve's own tests set it (tests/integration/store/test_space_reserve.py).
        store_space_reserve=0,
    )
    yield value
    keys = list(redis_client.scan_iter(match=f"t{tag}:*", count=1000))
    if keys:
        redis_client.delete(*keys)
    delete_queues(value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for name, read in item.stash.get(FAILURE_LOGS, []):
        try:
            text = log_tail(read())
        except Exception as exc:  # a log that cannot be read must not hide the failure
            text = f"(could not read it: {exc!r})"
        report.sections.append((f"{name}, last lines (DEBUG left out)", text))


@pytest.fixture
def run_tier(tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[Callable[..., TierProcess]]:
    """Start `tiermail ARGS...` with given settings; every process is stopped afterwards,
    and a failed test's report shows the end of each one's log."""
    started: list[TierProcess] = []

    def start(settings: Settings, *args: str, extra_env: dict[str, str] | None = None,
              wrapper: list[str] | None = None) -> TierProcess:
        log_path = tmp_path / f"{'-'.join(args)}-{len(started)}.log"
        process = TierProcess(settings, list(args), log_path, extra_env, wrapper)
        started.append(process)
        show_on_failure(request.node, f"tiermail {' '.join(args)} log", process.output)
        return process

    yield start
    for process in reversed(started):
        process.stop()


# Real scanners, started once per test run on free ports by services/devscanners/runner.py with
# the project's configuration (deploy/scanners/); stopped at the end of the run. Under CI=true a
# scanner that cannot start fails the run; elsewhere the tests that need it are skipped.

def _start_scanner(start: Callable[[], Scanner]) -> Scanner:
    try:
        return start()
    except ScannerError as exc:
        message = f"{exc}\n`make test` installs the scanners (scripts/install-system.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def scanner_dns() -> Iterator[DnsStub]:
    """The loopback DNS stub rspamd resolves through (NXDOMAIN for every name, at once)."""
    stub = start_dns_stub()
    yield stub
    stub.stop()


@pytest.fixture(scope="session")
def rspamd_scanner(tmp_path_factory: pytest.TempPathFactory,
                   scanner_dns: DnsStub) -> Iterator[Scanner]:
    """A real rspamd, test rules loaded, its controller (controller_url, controller_password:
    generated) learning into Bayes statistics in Redis database TEST_RSPAMD_REDIS_DB."""
    runtime = tmp_path_factory.mktemp("rspamd")
    scanner = _start_scanner(lambda: start_rspamd(
        runtime, port=free_port(), controller_port=free_port(), dns_address=scanner_dns.address,
        bayes_redis_url=f"redis://127.0.0.1:6379/{TEST_RSPAMD_REDIS_DB}"))
    yield scanner
    scanner.stop()


@pytest.fixture(scope="session")
def rspamd(rspamd_scanner: Scanner) -> str:
    """The URL of a real rspamd normal worker ("http://127.0.0.1:PORT"), test rules loaded
    (deploy/scanners/rspamd/test.d: `X-Tiermail-Test: add-header` / `soft-reject`)."""
    return rspamd_scanner.address


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address ("127.0.0.1:PORT") of a real clamd with the repository's EICAR signatures."""
    runtime = tmp_path_factory.mktemp("clamd")
    scanner = _start_scanner(lambda: start_clamd(runtime, address=f"127.0.0.1:{free_port()}"))
    yield scanner.address
    scanner.stop()


@pytest.fixture(scope="session")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address ("127.0.0.1:PORT") of a real SpamAssassin spamd, local tests only."""
    runtime = tmp_path_factory.mktemp("spamd")
    scanner = _start_scanner(lambda: start_spamd(runtime, port=free_port()))
    yield scanner.address
    scanner.stop()
