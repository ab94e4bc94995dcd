"""Run the development scanners in the foreground until Ctrl-C, for working by hand:

    .venv/bin/python -m services.devscanners --dir /tmp/scanners \\
        --rspamd-port 11333 --clamd 127.0.0.1:3310 --spamd-port 10783

Each scanner is optional (leave its option out). rspamd's controller gets the port after the
normal worker's; the DNS stub runs in this process on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from services.devscanners import runner


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.devscanners",
                                     description="run rspamd, clamd and spamd for development")
    parser.add_argument("--dir", type=Path, required=True, help="runtime directory (logs, pids)")
    parser.add_argument("--rspamd-port", type=int, help="rspamd normal worker port")
    parser.add_argument("--no-test-rules", action="store_true",
                        help="leave out deploy/scanners/rspamd/test.d")
    parser.add_argument("--clamd", metavar="ADDRESS", help="127.0.0.1:PORT or a socket path")
    parser.add_argument("--spamd-port", type=int, help="spamd port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM as Ctrl-C: the scanners are stopped on the way out (the default action ended
    # this process at once and left clamd running, orphaned).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.ExitStack() as stack:
        try:
            if args.rspamd_port:
                dns = runner.start_dns_stub()
                stack.callback(dns.stop)
                stack.enter_context(runner.start_rspamd(
                    args.dir / "rspamd", port=args.rspamd_port,
                    controller_port=args.rspamd_port + 1, dns_address=dns.address,
                    test_rules=not args.no_test_rules))
            if args.clamd:
                stack.enter_context(runner.start_clamd(args.dir / "clamd", address=args.clamd))
            if args.spamd_port:
                stack.enter_context(runner.start_spamd(args.dir / "spamd", port=args.spamd_port))
        except runner.ScannerError as exc:
            print(f"devscanners: {exc}")
            return 1
        print("devscanners: running; Ctrl-C (or SIGTERM) stops them", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
