"""`tiermail status` while a scanner does not answer: the filter refuses every message with
451 (the default policy), so status must not say "healthy"; and once the scanner is back it
must say so again without waiting for mail."""

from __future__ import annotations

import asyncio

from common.settings import Settings
from services.filter.main import open_worker
from services.filter.protocol import replies
from services.status import collect_status
from tests.integration.scanning.conftest import ham, send_one
from tests.support import TcpProxy, eventually


async def scanner_problems(settings: Settings, scanner: str) -> list[str]:
    report = await collect_status(settings)
    return [p for p in report["problems"] if p.startswith("filter ") and f" {scanner} " in p]


async def test_status_names_a_scanner_that_does_not_answer_until_it_is_back(
        scan_settings: Settings) -> None:
    host, _, port = scan_settings.clamd_address.rpartition(":")
    proxy = TcpProxy(int(port), host)
    through_proxy = scan_settings.replace(clamd_address=f"127.0.0.1:{proxy.port}")
    try:
        async with open_worker(through_proxy, drain_scan_queue=False) as worker:
            assert await asyncio.to_thread(send_one, worker.ports[0], ham("before")) == (250, "")
            assert await scanner_problems(scan_settings, "clamd") == []
            proxy.cut()
            code, text = await asyncio.to_thread(send_one, worker.ports[0], ham("refused"))
            assert f"{code} {text}" == replies.SCANNER_UNAVAILABLE

            async def clamd_named() -> bool:
                return bool(await scanner_problems(scan_settings, "clamd"))

            await eventually(clamd_named, what="status to name clamd")
            [problem] = await scanner_problems(scan_settings, "clamd")
            assert "451 4.7.0" in problem and "TIERMAIL_SCAN_FAILURE=tempfail" in problem, \
                problem
            proxy.start()  # no mail sent: the filter finds out by itself

            async def clamd_not_named() -> bool:
                return not await scanner_problems(scan_settings, "clamd")

            await eventually(clamd_not_named, what="status to stop naming clamd")
    finally:
        proxy.cut()


async def test_status_names_a_scanner_that_answers_pings_but_fails_every_scan(
        scan_settings: Settings) -> None:
    """clamd without its temporary directory answers PING and closes every INSTREAM without
    a word: each message got 451, and the ping every 5 s cleared the mark, so status said
    "healthy" throughout. Only a scan that passes clears it now."""
    async def half_working(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = await reader.readuntil(b"\0")
        if command == b"zPING\0":
            writer.write(b"PONG\0")
        writer.close()

    stub = await asyncio.start_server(half_working, "127.0.0.1", 0)
    address = f"127.0.0.1:{stub.sockets[0].getsockname()[1]}"
    try:
        async with open_worker(scan_settings.replace(clamd_address=address),
                               drain_scan_queue=False) as worker:
            code, text = await asyncio.to_thread(send_one, worker.ports[0], ham("refused"))
            assert f"{code} {text}" == replies.SCANNER_UNAVAILABLE

            async def failing_named() -> bool:
                return any("answers pings, but its scans have failed" in problem
                           for problem in await scanner_problems(scan_settings, "clamd"))

            await eventually(failing_named, what="status to name clamd's failing scans")
            await asyncio.sleep(6)  # past the next ping and heartbeat: it stays named
            [problem] = await scanner_problems(scan_settings, "clamd")
            assert "answers pings" in problem and "451 4.7.0" in problem, problem
    finally:
        stub.close()
