"""Shared fixtures: every test gets its own queue names, Redis keys, data dir and ports.

The real RabbitMQ and Redis are required. Under CI=true a missing service fails the run;
on a developer machine the integration tests that need one are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.settings import Settings
from common.tls import ensure_dev_certificate
from tests.support import TierProcess, free_port, port_open, rabbitmqctl

TEST_REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "9"))


def _require(service: str, available: bool) -> None:
    if available:
        return
    message = f"{service} is not reachable on 127.0.0.1; `make test` starts it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """A vhost of this test run's own, removed at the end (it holds every test's queues)."""
    _require("RabbitMQ", port_open("127.0.0.1", 5672))
    name = f"tiermail-test-{uuid.uuid4().hex[:8]}"
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
    )
    yield value
    keys = list(redis_client.scan_iter(match=f"t{tag}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def run_tier(tmp_path: Path) -> Iterator[Callable[..., TierProcess]]:
    """Start `tiermail ARGS...` with given settings; every process is stopped afterwards."""
    started: list[TierProcess] = []

    def start(settings: Settings, *args: str, extra_env: dict[str, str] | None = None
              ) -> TierProcess:
        log_path = tmp_path / f"{'-'.join(args)}-{len(started)}.log"
        process = TierProcess(settings, list(args), log_path, extra_env)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
