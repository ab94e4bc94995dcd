"""The ports test servers listen on: below the ephemeral range, one slice per xdist worker."""

from __future__ import annotations

import socket

import pytest

from services.devscanners import ports


def test_a_single_process_takes_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert ports._port_range() == (20000, 32000)


def test_parallel_workers_take_slices_that_do_not_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    slices = []
    for worker in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        slices.append(ports._port_range())
    assert slices == [(20000, 24000), (24000, 28000), (28000, 32000)]


def test_a_port_handed_out_is_free_and_not_handed_out_again() -> None:
    first, second = ports.free_port(), ports.free_port()
    assert first != second
    low, high = ports.PORT_RANGE
    for port in (first, second):
        assert low <= port < high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
