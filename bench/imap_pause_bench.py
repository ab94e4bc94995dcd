"""What one IMAP command costs after a pause, beside the floor of this machine.

One client (the same lean reader as bench/imap_bench.py) sends each command N times back to
back, then N times with a pause before each, first to a minimal uvloop server that answers
every command with two lines (what a server that does nothing costs after a pause: the
wake-ups of both processes), then to tiermail's store serving the mailbox that
`imap_bench.py --tiermail-only --tiermail-data DIR` filled and kept. The mixed load of
imap_bench.py is made of such commands; this shows how much of each is the machine and how
much the server.

    .venv/bin/python bench/imap_bench.py --tiermail-only --tiermail-data /var/tmp/imapbench \\
        --mixed-seconds 0                       # once: fills and keeps the mailbox
    .venv/bin/python bench/imap_pause_bench.py --tiermail-data /var/tmp/imapbench
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import imap_bench
from benchlib import TiermailStack

COMMANDS = ("NOOP", "FETCH {mid} (BODY.PEEK[])", "FETCH {mid}:{mid200} (UID FLAGS)")


def serve_floor(ports: multiprocessing.Queue[int]) -> None:
    """The floor: greets, answers CAPABILITY, and every other command with two lines."""
    import uvloop

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK ready\r\n")
        while line := await reader.readline():
            tag = line.split(b" ", 1)[0]
            if b" CAPABILITY" in line.upper():
                writer.write(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
            else:
                writer.write(b"* 1 EXISTS\r\n" + tag + b" OK done\r\n")
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    uvloop.run(main())


def medians(port: int, commands: list[str], count: int, pause: float,
            login: bool) -> dict[str, tuple[float, float]]:
    """command -> (median back to back, median after `pause`) in ms."""
    if login:
        imap, _ = imap_bench.login_select(port)
    else:
        imap = imap_bench.connect(port)
    result = {}
    try:
        for text in commands:
            result[text] = (_median(imap, text, count, 0.0), _median(imap, text, count, pause))
    finally:
        imap_bench.logout(imap)
    return result


def _median(imap: imaplib.IMAP4, text: str, count: int, pause: float) -> float:
    samples = []
    for _ in range(count):
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        imap_bench.command(imap, text)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def floor(count: int, pause: float) -> tuple[float, float]:
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve_floor, args=(ports,), daemon=True)
    server.start()
    try:
        return medians(ports.get(timeout=30), ["NOOP"], count, pause, login=False)["NOOP"]
    finally:
        server.terminate()
        server.join()


def tiermail(root: Path, commands: list[str], count: int, pause: float,
             redis_db: int) -> dict[str, tuple[float, float]]:
    stack = TiermailStack(root, redis_db)
    try:
        stack.create_vhost()
        stack.start_store()
        imap_bench.wait_for(lambda: imap_bench.port_open(stack.imap_port), 60,
                            f"tiermail IMAP on port {stack.imap_port}")
        return medians(stack.imap_port, commands, count, pause, login=True)
    finally:
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tiermail-data", metavar="DIR", required=True,
                        help="a mailbox kept by imap_bench.py --tiermail-data DIR")
    parser.add_argument("--count", type=int, default=300, help="runs of each command")
    parser.add_argument("--pause-ms", type=float, default=15.0)
    parser.add_argument("--redis-db", type=int, default=13)
    args = parser.parse_args()
    root = Path(args.tiermail_data).resolve()
    marker = root / "populated.json"
    if not marker.exists():
        print(f"{marker} missing: fill it with imap_bench.py --tiermail-only "
              f"--tiermail-data {root} first", file=sys.stderr)
        return 2
    messages = int(json.loads(marker.read_text())["messages"])
    mid = messages // 2
    commands = [c.format(mid=mid, mid200=mid + 199) for c in COMMANDS]
    pause = args.pause_ms / 1000
    floor_back, floor_paused = floor(args.count, pause)
    found = tiermail(root, commands, args.count, pause, args.redis_db)
    print(f"\n| one client, {args.count} commands each | back to back | "
          f"{args.pause_ms:g} ms pause before each |\n| --- | ---: | ---: |")
    print(f"| minimal uvloop server, NOOP | {floor_back:.3f} ms | {floor_paused:.3f} ms |")
    for text, (back, paused) in found.items():
        print(f"| tiermail {text} | {back:.3f} ms | {paused:.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
